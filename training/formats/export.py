"""Export peft adapters on diffusers/transformers models as kohya/LyCORIS tensors.

Supported peft layers (docs/lora-format.md §4, §6, §7):

* ``LoraConfig`` Linear / Conv2d (LoRA, LoCon): ``lora_down``/``lora_up`` + ``alpha = scaling * r``
  (rsLoRA, alpha_pattern and rank_pattern included).
* ``LoraConfig(use_dora=True)``: the same plus ``dora_scale`` on the output axis (``[out, 1]`` /
  ``[out, 1, 1, 1]``), as current LyCORIS and ComfyUI read it. A1111 reads only the input axis and
  diffusers drops ``dora_scale``; ComfyUI <= 0.3.64 divides by the wrong norm on this axis. For a
  file that loads identically everywhere, bake it (``bake="dora"``).
* ``LoHaConfig``: ``hada_w1_a ... hada_t2`` + ``alpha = scaling * r``.
* ``LoKrConfig``: ``lokr_w1 ... lokr_t2``; when both factors are full, loaders ignore alpha, so
  peft's alpha/r is folded into ``lokr_w1`` and no alpha is written.

``bake``: "none" (default), "dora" (DoRA modules) or "all" (DoRA, LoHa and LoKr) are turned into plain
LoRA modules by truncated SVD of their exact weight change; the relative error per module is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .families import ALL_FAMILIES, check_family
from .lowrank import common_alpha, lowrank_from_delta
from .modules import _CONV3_RE, dora_weight, module_rank
from .names import ALPHA, DORA, DOWN, UP, comfy_unet_name, te_name, te_prefixes, unet_name

logger = logging.getLogger(__name__)

DORA_WARNING = (
    "DoRA exported with dora_scale on the output axis (current LyCORIS, ComfyUI): A1111 applies it on the "
    "input axis (wrong result, no error), diffusers drops dora_scale, and ComfyUI <= 0.3.64 normalises by "
    "the base weight's norm on this axis. Export with bake='dora' for a plain LoRA that loads the same "
    "everywhere."
)
_PEFT_WRAPPER_PREFIXES = ("base_model.model.",)
BAKE_CHOICES = ("none", "dora", "all")


@dataclass
class ExportResult:
    tensors: dict[str, torch.Tensor]
    kinds: dict[str, int] = field(default_factory=dict)          # adapter kind -> module count
    bake_errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error
    warnings: list[str] = field(default_factory=list)

    def network_metadata(self) -> dict:
        """``ss_network_module`` / ``ss_network_args`` values A1111 and Civitai show for this export
        (LyCORIS types: ``lycoris.kohya`` with ``algo``; DoRA: ``dora_wd``), for RunInfo."""
        kinds = {k.split(" ")[0] for k in self.kinds if not k.startswith("lora (baked")}
        args: dict = {}
        if kinds & {"loha", "lokr"}:
            args["algo"] = "loha" if "loha" in kinds else "lokr"
        if "dora" in kinds:
            args["dora_wd"] = True
            args.setdefault("algo", "lora")
        module = "lycoris.kohya" if args else "networks.lora"
        names = {k.split(".", 1)[0] for k in self.tensors}
        conv_ranks = [module_rank(self.tensors, n) for n in names if _CONV3_RE.search(n)]
        conv_ranks = [r for r in conv_ranks if r is not None]
        if conv_ranks:
            args["conv_dim"] = max(conv_ranks)
        return {"network_module": module, "network_args": args}

    @property
    def bake_error_overall(self) -> float | None:
        if not self.bake_errors:
            return None
        return max(self.bake_errors.values())


def _grab(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def _strip_wrapper(path: str) -> str:
    path = path.replace("_orig_mod.", "")  # torch.compile wrapper
    for p in _PEFT_WRAPPER_PREFIXES:
        if path.startswith(p):
            return path[len(p):]
    return path


def _check_layer(name: str, layer, adapter_name: str) -> None:
    if getattr(layer, "lora_bias", {}).get(adapter_name, False):
        raise NotImplementedError(f"Module {name!r} has lora_bias=True; the kohya format has no slot for a LoRA bias.")
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"Module {name!r} uses fan_in_fan_out, which the kohya format does not support.")
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d) and base.groups != 1:
        raise NotImplementedError(f"Module {name!r} is a grouped convolution; not supported in the kohya format.")
    if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
        raise NotImplementedError(
            f"Module {name!r} wraps a {type(base).__name__}; only Linear and Conv2d layers can be written "
            "in the kohya format.")


def _lora_tensors(name: str, layer, adapter_name: str) -> dict[str, torch.Tensor]:
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    dora = bool(getattr(layer, "use_dora", {}).get(adapter_name, False))
    if variant is not None and not dora:
        raise NotImplementedError(
            f"Module {name!r} uses the peft LoRA variant {type(variant).__name__}, which has no kohya representation.")
    down = layer.lora_A[adapter_name].weight
    up = layer.lora_B[adapter_name].weight
    r = int(layer.r[adapter_name])
    if down.shape[0] != r or up.shape[1] != r:
        raise ValueError(f"Module {name!r}: LoRA shapes {tuple(down.shape)}/{tuple(up.shape)} do not match r={r}.")
    out = {DOWN: _grab(down), UP: _grab(up), ALPHA: _f32(float(layer.scaling[adapter_name]) * r)}
    if dora:
        m = layer.lora_magnitude_vector[adapter_name].weight.detach()
        n_out = up.shape[0]
        out[DORA] = _grab(m).reshape(n_out, *[1] * (down.dim() - 1))
    return out


def _loha_tensors(name: str, layer, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for attr in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
        holder = getattr(layer, attr)
        if adapter_name in holder:
            out["." + attr] = _grab(holder[adapter_name])
    r = int(out[".hada_w1_b"].shape[0])
    out[ALPHA] = _f32(float(layer.scaling[adapter_name]) * r)
    return out


def _lokr_tensors(name: str, layer, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for attr in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
        holder = getattr(layer, attr)
        if adapter_name in holder:
            out["." + attr] = _grab(holder[adapter_name])
    scaling = float(layer.scaling[adapter_name])
    low = [k for k in (".lokr_w1_b", ".lokr_w2_b") if k in out]
    if low:
        out[ALPHA] = _f32(scaling * int(out[low[0]].shape[0]))
    else:  # loaders use scale 1 when both factors are full: fold peft's alpha/r into w1
        out[".lokr_w1"] = out[".lokr_w1"] * scaling
    return out


def _adapter_kind(module, adapter_name: str) -> str | None:
    """"lora" | "loha" | "lokr" | None (module has no such adapter); raises for others."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return None
    cls = {c.__name__ for c in type(module).__mro__}
    holders = [getattr(module, a, None) for a in getattr(module, "adapter_layer_names", ())]
    has = any(h is not None and hasattr(h, "__contains__") and adapter_name in h for h in holders)
    if not has:
        return None
    if "LoraLayer" in cls:
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise NotImplementedError(f"an embedding LoRA cannot be written in the kohya format")
        return "lora"
    if "LoHaLayer" in cls:
        return "loha"
    if "LoKrLayer" in cls:
        return "lokr"
    kinds = [c.__name__[:-len("Layer")] for c in type(module).__mro__
             if c.__name__.endswith("Layer") and c.__name__ not in ("BaseTunerLayer", "LycorisLayer")]
    kind = kinds[0] if kinds else type(module).__name__
    raise NotImplementedError(
        f"a {kind} adapter {adapter_name!r} (peft {type(module).__module__}); only LoRA, LoCon, DoRA, LoHa and "
        "LoKr can be exported to a kohya/LyCORIS file")


_EXTRACT = {"lora": _lora_tensors, "loha": _loha_tensors, "lokr": _lokr_tensors}


def _peft_delta(layer, kind: str, adapter_name: str) -> torch.Tensor:
    """The exact change of the layer's weight (DoRA: merged weight - base weight), float32."""
    base = layer.get_base_layer().weight.detach().float()
    delta = layer.get_delta_weight(adapter_name).detach().float().reshape(base.shape)
    if kind == "lora" and layer.use_dora.get(adapter_name, False):
        m = layer.lora_magnitude_vector[adapter_name].weight.detach().float()
        return dora_weight(base, delta, m.reshape(base.shape[0])) - base
    return delta


def _bake(name: str, layer, kind: str, adapter_name: str, rank: int | None, module: dict) -> tuple[dict, float]:
    if rank is None:
        r = int(layer.r[adapter_name])
        rank = r * r if kind == "loha" else r
        if kind == "lokr":
            rank = max(r, 8)
    low = lowrank_from_delta(_peft_delta(layer, kind, adapter_name), rank=rank)
    return {DOWN: low.down, UP: low.up, ALPHA: low.alpha}, low.rel_error


def _collect(model, adapter_name: str, path_fn, out: dict, result: ExportResult, bake: str,
             bake_rank: int | None) -> int:
    model = getattr(model, "_orig_mod", model)  # torch.compile'd module
    n = 0
    for raw_name, module in model.named_modules():
        try:
            kind = _adapter_kind(module, adapter_name)
        except NotImplementedError as e:
            raise NotImplementedError(f"Module {raw_name!r} carries {e}.") from None
        if kind is None:
            continue
        _check_layer(raw_name, module, adapter_name)
        name = path_fn(_strip_wrapper(raw_name))
        if any(k.startswith(name + ".") for k in out):
            raise ValueError(f"Two modules map to the same kohya name {name!r}.")
        tensors = _EXTRACT[kind](raw_name, module, adapter_name)
        is_dora = DORA in tensors
        label = "dora" if is_dora else kind
        if (bake == "dora" and is_dora) or (bake == "all" and (is_dora or kind != "lora")):
            tensors, err = _bake(raw_name, module, kind, adapter_name, bake_rank, tensors)
            result.bake_errors[name] = err
            label = "lora (baked " + label + ")"
        elif is_dora and DORA_WARNING not in result.warnings:
            result.warnings.append(DORA_WARNING)
            logger.warning(DORA_WARNING)
        result.kinds[label] = result.kinds.get(label, 0) + 1
        for suffix, t in tensors.items():
            out[name + suffix] = t
        n += 1
    return n


def _most_common_alpha(tensors: dict, skip) -> float | None:
    """The alpha most unbaked modules share (diffusers applies only that one to attention modules)."""
    counts: dict[float, int] = {}
    for k, t in tensors.items():
        if k.endswith(ALPHA) and k[: -len(ALPHA)] not in skip:
            counts[float(t.item())] = counts.get(float(t.item()), 0) + 1
    return max(counts, key=counts.get) if counts else None


def export_kohya(family: str, unet=None, text_encoders=(), adapter_name: str = "default", bake: str = "none",
                 bake_rank: int | None = None) -> ExportResult:
    """kohya/LyCORIS tensors (with counts, bake errors and warnings) from peft adapters; see the module doc."""
    family = check_family(family)
    if bake not in BAKE_CHOICES:
        raise ValueError(f"bake must be one of {', '.join(BAKE_CHOICES)}, got {bake!r}")
    result = ExportResult(tensors={})
    total = 0
    if unet is not None:
        structure = unet if family == "sdxl" else None
        total += _collect(unet, adapter_name, lambda p: unet_name(family, p, structure), result.tensors, result,
                          bake, bake_rank)
    tes = list(text_encoders or ())
    prefixes = te_prefixes(family)
    present = [t for t in tes if t is not None]
    if len(tes) > len(prefixes) and len(present) > len(prefixes):
        raise ValueError(f"Family {family!r} has {len(prefixes)} text encoder(s); got {len(present)}.")
    if len(prefixes) == 1:
        tes = present[:1]
    for te, prefix in zip(tes, prefixes):
        if te is not None:
            total += _collect(te, adapter_name, lambda p, pre=prefix: te_name(pre, p), result.tensors, result,
                              bake, bake_rank)
    return _finish(result, total, adapter_name)


def export_diffusion_model(family: str, diffusion_model, adapter_name: str = "default", bake: str = "none",
                           bake_rank: int | None = None, structure=None) -> ExportResult:
    """kohya/LyCORIS tensors from the peft adapters on ComfyUI's ``model.diffusion_model`` of any family
    (:data:`.families.ALL_FAMILIES`), named by :func:`.names.comfy_unet_name` (``structure``: SD1/SD2's UNet
    layout, as there); otherwise what :func:`export_kohya` does for a diffusers UNet."""
    family = check_family(family, ALL_FAMILIES)
    if bake not in BAKE_CHOICES:
        raise ValueError(f"bake must be one of {', '.join(BAKE_CHOICES)}, got {bake!r}")
    result = ExportResult(tensors={})
    total = _collect(diffusion_model, adapter_name, lambda p: comfy_unet_name(family, p, structure),
                     result.tensors, result, bake, bake_rank)
    return _finish(result, total, adapter_name)


def _finish(result: ExportResult, total: int, adapter_name: str) -> ExportResult:
    if result.bake_errors:
        common_alpha(result.tensors, list(result.bake_errors), _most_common_alpha(result.tensors, result.bake_errors))
    if total == 0:
        raise ValueError(
            f"No LoRA layers for adapter {adapter_name!r} were found on the given models; attach one with "
            "training.adapters.add_adapter(model, LoraConfig(...)) before exporting."
        )
    return result


def kohya_state_dict_from_models(family: str, unet=None, text_encoders=(), adapter_name: str = "default",
                                 bake: str = "none", bake_rank: int | None = None) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors from the peft adapters of a diffusers UNet and/or CLIP text encoders.

    Names: ``lora_unet_<diffusers path>`` (SD1/SD2), ``lora_unet_<LDM path>`` (SDXL),
    ``lora_te_text_model_...`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL). Tensors are detached
    float32 CPU copies; alphas are 0-dim float32. See :func:`export_kohya` for counts and bake errors.
    """
    return export_kohya(family, unet, text_encoders, adapter_name, bake, bake_rank).tensors
