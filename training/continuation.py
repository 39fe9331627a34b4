"""Continue training from an existing LoRA file (``network_weights``), in any key style the importer reads.

The file goes through :mod:`.formats` (kohya, LyCORIS LoRA/LoCon/LoHa/LoKr/DoRA, diffusers/peft,
ComfyUI-native keys and the core Train LoRA node's files) into kohya names, and its modules are matched to
the model's modules by :func:`.formats.names.model_module_names`, the names our exporter writes, so
``formats`` stays the one place that converts names. What the file decides:

* **adapter type, rank, alpha** (per module; 3x3 convolutions separately): taken from the file where the
  config leaves ``adapter`` / ``rank`` / ``alpha`` / ``conv_rank`` / ``conv_alpha`` at their defaults.
  A value set in the config that disagrees with the file (another adapter type, another rank) is a
  ConfigError naming the file and the key; a set ``alpha`` is kept, and the file's scale is folded into
  its weights, so training starts from the file's exact weight changes either way.
* **modules**: the run trains its ``target`` preset plus every module of the file (at the file's rank);
  a file with text-encoder modules switches ``train_text_encoder`` on (when it is off by default).
* ``diff`` / ``diff_b`` (full weight / bias changes; ComfyUI's core Train LoRA node writes them for every
  bias and norm) cannot be trained as adapters: they are added to the base weights for the run and
  written unchanged into the result, so the result still holds the file's whole change.

Not continued (error naming the file): Tucker LoCon (``lora_mid``), DoRA with ``dora_scale`` on the
input axis (LyCORIS before 3.2), files mixing adapter types, modules the model does not have.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from types import SimpleNamespace

import torch

from .adapters import AdapterError
from .config import ConfigError, TrainConfig
from .formats import load_lora_file
from .formats.modules import _CONV3_RE, has_dora, module_kind, module_rank, module_scale
from .formats.names import TE_KOHYA_PREFIXES, UNET_PREFIX_KOHYA, model_module_names

_DIFFS = (".diff", ".diff_b")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _is_conv3(tensors: dict, name: str, kind: str) -> bool:
    down = tensors.get(name + ".lora_down.weight")
    if kind in ("lora", "dora") and down is not None and down.dim() == 4:
        return down.shape[-1] > 1
    return bool(_CONV3_RE.search(name))


class Continuation:
    """The plan for continuing from ``path``: read the file (``__init__``), settle the config (``resolve``),
    bind it to the model (``prepare``: diffs into the base weights), shape the adapters
    (``adjust``, the hook of :func:`.adapters.attach_adapters`), then copy the weights in (``load``)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            weights = load_lora_file(self.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"network_weights = {self.path!r}: {e}") from None
        self.modules = self._scan(weights.tensors)  # names as the file says; prepare() renames for the model
        if not self.modules:
            raise AdapterError(f"network_weights = {self.path!r}: the file holds no LoRA, LoHa, LoKr or DoRA modules "
                               "to continue")
        kinds = Counter(m["kind"] for m in self.modules.values())
        if len(kinds) > 1:
            raise AdapterError(f"network_weights = {self.path!r}: the file mixes adapter types "
                               f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); only a file of one "
                               "type can be continued")
        self.kind = next(iter(kinds))
        self.has_unet = any(n.startswith(UNET_PREFIX_KOHYA + "_") for n in self.modules)
        self.has_te = any(n.startswith(TE_KOHYA_PREFIXES) for n in self.modules)
        self.passthrough: dict[str, torch.Tensor] = {}
        self.fold_alpha = False
        self.notes: list[str] = []
        self._models: dict[int, dict] = {}
        self._matched: dict[str, tuple] = {}

    def _scan(self, t: dict) -> dict[str, dict]:
        """Adapter modules: kohya name -> {kind, rank, scale, conv3} (diff/diff_b-only modules left out)."""
        modules = {}
        for name in sorted({k.split(".", 1)[0] for k in t}):
            kind = module_kind(t, name)
            if kind == "full":
                continue
            if kind == "lora" and name + ".lora_mid.weight" in t:
                raise AdapterError(f"network_weights = {self.path!r}: module {name} is a Tucker LoCon (lora_mid), "
                                   "which peft cannot train; resize it to a plain LoRA first (lora resize)")
            if has_dora(t, name):
                kind = "dora"
            modules[name] = {"kind": kind, "rank": module_rank(t, name), "scale": module_scale(t, name),
                             "conv3": _is_conv3(t, name, kind)}
        return modules

    # ------------------------------------------------------------------ config
    def _common(self, conv3: bool):
        pairs = [(m["rank"], m["scale"] * m["rank"]) for m in self.modules.values()
                 if m["conv3"] == conv3 and m["rank"] is not None]
        return Counter(pairs).most_common(1)[0][0] if pairs else None

    def resolve(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the file's adapter type, rank and alpha where it leaves them at their defaults;
        ConfigError naming the file where a set value disagrees."""
        def explicit(key):
            return getattr(config, key) != _DEFAULTS[key]

        def refuse(key, file_value, fix):
            raise ConfigError(f"network_weights = {self.path!r} has {key} {file_value!r}, but {key} = "
                              f"{getattr(config, key)!r}: {fix}, or leave {key} at its default "
                              f"({_DEFAULTS[key]!r}) to take it from the file")

        changes: dict = {}
        if config.adapter != self.kind:
            if explicit("adapter"):
                refuse("adapter", self.kind, f"set adapter = {self.kind!r}")
            changes["adapter"] = self.kind
        common = self._common(False) or self._common(True)
        if common is not None:
            rank, alpha = common
            if config.rank != rank:
                if explicit("rank"):
                    refuse("rank", rank, f"set rank = {rank}")
                changes["rank"] = int(rank)
            if explicit("alpha"):
                self.fold_alpha = True  # keep the config's alpha; the file's scale goes into its weights
            else:
                changes["alpha"] = float(alpha)
        conv = self._common(True)
        if conv is not None:
            c_rank, c_alpha = conv
            wanted = config.conv_rank or changes.get("rank", config.rank)
            if wanted != c_rank:
                if explicit("conv_rank"):
                    refuse("conv_rank", c_rank, f"set conv_rank = {c_rank}")
                changes["conv_rank"] = int(c_rank)
            if not explicit("conv_alpha") and not self.fold_alpha:
                changes["conv_alpha"] = float(c_alpha)
        if self.has_te and not config.train_text_encoder:
            changes["train_text_encoder"] = True
            self.notes.append("the file has text-encoder modules: train_text_encoder switched on")
        if self.has_unet and not config.train_unet:
            raise ConfigError(f"network_weights = {self.path!r} has UNet modules, but train_unet = false would drop "
                              "them from the result: set train_unet = true")
        return dataclasses.replace(config, **changes) if changes else config

    # ------------------------------------------------------------------ model
    def prepare(self, base, config: TrainConfig) -> None:
        """Match the file's modules to ``base``'s modules and add its diff/diff_b changes to the base weights."""
        weights = load_lora_file(self.path, family=base.family, unet_structure=base.unet)  # names for this UNet
        same = {"sd2-v": "sd2"}
        if same.get(weights.family, weights.family) != same.get(base.family, base.family):
            raise AdapterError(f"network_weights = {self.path!r} is a LoRA for {weights.family}, the model is "
                               f"{base.family}; continue it on a {weights.family} checkpoint")
        t = weights.tensors
        self.modules = self._scan(t)
        names = model_module_names(base.family, base.unet, base.text_encoders)
        trained = {id(base.unet): config.train_unet}
        trained.update({id(te): config.train_text_encoder for te in base.text_encoders})
        missing = sorted(n for n in {k.split(".", 1)[0] for k in t} if n not in names)
        if missing:
            raise AdapterError(f"network_weights = {self.path!r}: {len(missing)} module(s) of the file are not in this "
                               f"{base.family} model (e.g. {', '.join(missing[:3])}); is it a LoRA for another model?")
        for name in sorted({k.split(".", 1)[0] for k in t}):
            model, path = names[name]
            module = model.get_submodule(path)
            if name in self.modules:
                if not isinstance(getattr(module, "base_layer", module), (torch.nn.Linear, torch.nn.Conv2d)):
                    raise AdapterError(f"network_weights = {self.path!r}: module {name} patches a "
                                       f"{type(module).__name__}; adapters can be trained on Linear and Conv2d only")
                self._matched[name] = (model, path, {k[len(name):]: v for k, v in t.items()
                                                      if k.startswith(name + ".") and not k.endswith(_DIFFS)})
                info = self._models.setdefault(id(model), {"paths": {}})
                info["paths"][path] = self._rank_alpha(t, name)
        for key, diff in t.items():
            if not key.endswith(_DIFFS):
                continue
            name, suffix = key.rsplit(".", 1)
            model, path = names[name]
            module = model.get_submodule(path)
            param = getattr(getattr(module, "base_layer", module), "weight" if suffix == "diff" else "bias", None)
            if param is None or param.numel() != diff.numel() or not param.is_floating_point():
                raise AdapterError(f"network_weights = {self.path!r}: {key} does not fit the model's "
                                   f"{path}.{'weight' if suffix == 'diff' else 'bias'}")
            with torch.no_grad():
                param.add_(diff.reshape(param.shape).to(param.device, param.dtype))
            self.passthrough[key] = diff.detach().to("cpu", torch.float32 if diff.is_floating_point() else diff.dtype)
        if self.passthrough:
            self.notes.append(f"{len(self.passthrough)} diff/diff_b tensor(s) added to the base weights, kept "
                              "unchanged in the result")
        untrained = [n for n, (m, _, _) in self._matched.items() if not trained.get(id(m))]
        if untrained:  # resolve() switched the models on; a caller that skipped it gets told
            raise ConfigError(f"network_weights = {self.path!r}: module {untrained[0]} belongs to a model this run "
                              "does not train (train_unet / train_text_encoder)")

    def _rank_alpha(self, t: dict, name: str) -> tuple[int, float]:
        """(peft r, peft alpha) reproducing the module's shapes and scale."""
        m = self.modules[name]
        r = m["rank"]
        if r is None:  # LoKr with both factors full: any r large enough keeps them full in peft
            sizes = [s for k in (".lokr_w1", ".lokr_w2") if name + k in t for s in t[name + k].shape[:2]]
            r = max(sizes)
        return int(r), float(m["scale"] * r)

    def adjust(self, peft_config, model):
        """The hook for :func:`.adapters.attach_adapters`: ``peft_config`` targets the preset's modules and the
        file's, with the file's ranks (and alphas, unless the config sets alpha) for the file's modules."""
        from peft.tuners.tuners_utils import check_target_module_exists

        info = self._models.get(id(model))
        if info is None:
            return peft_config
        file_paths = info["paths"]
        preset = [p for p, mod in model.named_modules()
                  if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and check_target_module_exists(peft_config, p)]
        by_rank, by_alpha = {}, {}
        for path, (r, alpha) in file_paths.items():
            by_rank.setdefault(r, []).append(re.escape(path))
            by_alpha.setdefault(alpha, []).append(re.escape(path))
        # first match wins in peft: the file's modules come before the config's own (conv) patterns
        peft_config.rank_pattern = {**{"|".join(v): r for r, v in by_rank.items()}, **(peft_config.rank_pattern or {})}
        if not self.fold_alpha:
            peft_config.alpha_pattern = {**{"|".join(v): a for a, v in by_alpha.items()},
                                         **(peft_config.alpha_pattern or {})}
        peft_config.target_modules = set(preset) | set(file_paths)
        t_keys = {k for _, _, tensors in self._matched.values() for k in tensors}
        if self.kind == "lokr":
            peft_config.decompose_both = ".lokr_w1_a" in t_keys
            peft_config.use_effective_conv2d = ".lokr_t2" in t_keys
        elif self.kind == "loha":
            peft_config.use_effective_conv2d = ".hada_t1" in t_keys
        return peft_config

    @torch.no_grad()
    def load(self, adapter_name: str = "default") -> int:
        """Copy the file's weights into the attached adapters; returns the number of modules loaded."""
        for name, (model, path, tensors) in self._matched.items():
            layer = model.get_submodule(path)
            if not hasattr(layer, "scaling") or adapter_name not in getattr(layer, "scaling", {}):
                raise AdapterError(f"network_weights = {self.path!r}: module {name} got no adapter")
            factor = self.modules[name]["scale"] / float(layer.scaling[adapter_name])
            {"lora": self._load_lora, "dora": self._load_lora, "loha": self._load_loha,
             "lokr": self._load_lokr}[self.kind](name, layer, tensors, adapter_name, factor)
        return len(self._matched)

    def _put(self, name: str, what: str, dst: torch.Tensor, src: torch.Tensor, factor: float = 1.0) -> None:
        if src.shape[0] != dst.shape[0] or src.numel() != dst.numel():
            raise AdapterError(f"network_weights = {self.path!r}: {name}.{what} has shape {tuple(src.shape)}, this "
                               f"run's adapter {tuple(dst.shape)}")
        dst.copy_((src.float() * factor).reshape(dst.shape).to(dst.dtype))

    def _load_lora(self, name, layer, t, adapter, factor):
        self._put(name, "lora_down.weight", layer.lora_A[adapter].weight, t[".lora_down.weight"])
        self._put(name, "lora_up.weight", layer.lora_B[adapter].weight, t[".lora_up.weight"], factor)
        if not getattr(layer, "use_dora", {}).get(adapter, False):
            return
        mag = layer.lora_magnitude_vector[adapter].weight
        base = layer.get_base_layer().weight
        scale = t.get(".dora_scale")
        if scale is None:  # a plain module in a DoRA run: the magnitude that makes DoRA = LoRA
            w = base.float() + layer.get_delta_weight(adapter).float().reshape(base.shape)
            scale = w.reshape(w.shape[0], -1).norm(dim=1)
        elif scale.shape[0] != base.shape[0] or scale.numel() != base.shape[0]:
            raise AdapterError(f"network_weights = {self.path!r}: {name}.dora_scale {tuple(scale.shape)} is on the input "
                               "axis (LyCORIS before 3.2); only output-axis DoRA ([out, 1]) can be continued")
        mag.copy_(scale.float().reshape(mag.shape).to(mag.dtype))

    def _load_loha(self, name, layer, t, adapter, factor):
        for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
            holder = getattr(layer, key)
            if (adapter in holder) != ("." + key in t):
                raise AdapterError(f"network_weights = {self.path!r}: {name} has {'no ' if adapter in holder else ''}"
                                   f"{key}, unlike this run's LoHa (Tucker convolutions must match)")
            if adapter in holder:
                self._put(name, key, holder[adapter], t["." + key], factor if key == "hada_w1_a" else 1.0)

    def _load_lokr(self, name, layer, t, adapter, factor):
        def product(a, b):
            return t[a].float().reshape(t[a].shape[0], -1) @ t[b].float().reshape(t[b].shape[0], -1)

        if adapter in layer.lokr_w1:
            src = t[".lokr_w1"] if ".lokr_w1" in t else product(".lokr_w1_a", ".lokr_w1_b")
            self._put(name, "lokr_w1", layer.lokr_w1[adapter], src, factor)
        else:
            if ".lokr_w1_a" not in t:
                raise AdapterError(f"network_weights = {self.path!r}: {name} has a full lokr_w1, this run's LoKr a "
                                   "factored one")
            self._put(name, "lokr_w1_a", layer.lokr_w1_a[adapter], t[".lokr_w1_a"], factor)
            self._put(name, "lokr_w1_b", layer.lokr_w1_b[adapter], t[".lokr_w1_b"])
        if adapter in layer.lokr_w2:
            if ".lokr_t2" in t:
                raise AdapterError(f"network_weights = {self.path!r}: {name} has a Tucker lokr_t2, this run's LoKr not")
            src = t[".lokr_w2"] if ".lokr_w2" in t else product(".lokr_w2_a", ".lokr_w2_b")
            self._put(name, "lokr_w2", layer.lokr_w2[adapter], src)
        else:
            if ".lokr_w2_a" not in t:
                raise AdapterError(f"network_weights = {self.path!r}: {name} has a full lokr_w2, this run's LoKr a "
                                   "factored one (a different rank or factor)")
            for key in ("lokr_w2_a", "lokr_w2_b", "lokr_t2"):
                holder = getattr(layer, key)
                if adapter in holder:
                    if "." + key not in t:
                        raise AdapterError(f"network_weights = {self.path!r}: {name} has no {key}")
                    self._put(name, key, holder[adapter], t["." + key])


def load_lora_weights_into(base, path: str, include_unet: bool, include_te: bool, adapter_name: str = "default") -> int:
    """Copy a LoRA file's weights (any key style the importer reads) into the adapters already attached to
    ``base``; returns the modules loaded. Training runs use ``Continuation`` (which also shapes the adapters
    after the file)."""
    continuation = Continuation(path)
    continuation.prepare(base, SimpleNamespace(train_unet=include_unet, train_text_encoder=include_te))
    return continuation.load(adapter_name)
