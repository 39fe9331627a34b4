"""Import: kohya, LyCORIS, diffusers/peft and ComfyUI-native LoRA key styles -> kohya names.

Every module ends up under the name :mod:`.names` builds for its family, with the LyCORIS tensor
suffixes (``lora_down``/``lora_up``/``lora_mid``, ``hada_*``, ``lokr_*``, ``diff``/``diff_b``,
``alpha``, ``dora_scale``), so the rest of the package handles one layout.

Styles recognised per key:

* kohya / LyCORIS: ``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ``lora_te2_*`` (a missing
  ``text_model_`` level, as diffusers' converter writes it, is added); ``lycoris_*`` (= ``lora_unet_``).
* diffusers / peft: ``[base_model.model.][unet.|text_encoder.|text_encoder_2.]<path>.lora_A.weight`` /
  ``lora_B`` (also ``.lora.down/up``, ``_lora.down/up``, ``lora_linear_layer``, ``lora_A.default``),
  ``lora_magnitude_vector`` (DoRA) and peft ``hada_*``/``lokr_*``. Alphas come from ``.alpha`` keys, or
  from diffusers' ``lora_adapter_metadata`` header (lora_alpha, alpha_pattern, use_rslora), else
  alpha = rank, as diffusers assumes.
* ComfyUI native (core Train LoRA node, LORA_MODEL): ``diffusion_model.<LDM path>.<suffix>``,
  ``text_encoders.clip_l|clip_g|clip_h.transformer.<path>.<suffix>``.
"""

from __future__ import annotations

import json
import math
import re

import torch

from .families import CONTEXT_WIDTH_FAMILY, family_from_metadata
from .names import (
    ALPHA,
    DORA,
    KOHYA_PREFIXES,
    SDXL_TE_KOHYA_PREFIXES,
    TE1_PREFIX_KOHYA,
    TE2_PREFIX_KOHYA,
    TE_KOHYA_PREFIXES,
    TE_PREFIX_KOHYA,
    UNET_PREFIX_KOHYA,
    comfy_unet_name,
    te_name,
    unet_name,
)

# peft/diffusers tensor suffix -> LyCORIS suffix
_PEFT_SUFFIXES = [
    (".lora_A.default.weight", ".lora_down.weight"), (".lora_B.default.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
    (".lora_linear_layer.down.weight", ".lora_down.weight"), (".lora_linear_layer.up.weight", ".lora_up.weight"),
    ("_lora.down.weight", ".lora_down.weight"), ("_lora.up.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora_down.weight"), (".lora.up.weight", ".lora_up.weight"),
    (".lora_magnitude_vector.weight", DORA), (".lora_magnitude_vector", DORA),
]
_NATIVE_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale", ".diff", ".diff_b",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
)
_COMFY_TE = {"clip_l": 0, "clip_h": 0, "clip_g": 1}
_ROOTS = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"), ("transformer.", None))
_UNET_HEADS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")


class NotALoraError(ValueError):
    pass


def _split_suffix(key: str):
    for src, dst in _PEFT_SUFFIXES:
        if key.endswith(src):
            return key[: -len(src)], dst, "peft"
    for s in _NATIVE_SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)], s, "native"
    return None, None, None


def _diffusers_unet_path(path: str) -> str:
    path = path.replace(".processor.", ".")
    if path.endswith(".to_out"):
        path += ".0"
    return path


def guess_family(keys_shapes: dict, metadata: dict | None) -> str | None:
    """Family from metadata, else from key names and the cross-attention width."""
    fam = family_from_metadata(metadata)
    if fam:
        return fam
    keys = list(keys_shapes)
    if any(k.startswith((TE2_PREFIX_KOHYA + "_", "text_encoder_2.", "text_encoders.clip_g.")) or "clip_g" in k
           for k in keys):
        return "sdxl"
    for k, shape in keys_shapes.items():
        if re.search(r"attn2[._]to_k", k) and re.search(r"(lora_down|lora_A|lora\.down|_lora\.down)", k):
            width = shape[1] if len(shape) > 1 else None
            return CONTEXT_WIDTH_FAMILY.get(width)
    if any(re.match(rf"({UNET_PREFIX_KOHYA}_|diffusion_model\.)(input_blocks|middle_block|output_blocks)", k)
           for k in keys):
        return None
    return None


def _adapter_config(metadata: dict | None) -> dict[str, dict]:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field = k.partition(".")
        out.setdefault(comp, {})[field] = v
    return out


def _peft_alpha(cfg: dict, module_path: str, rank: int) -> float | None:
    if not cfg or cfg.get("lora_alpha") is None:
        return None
    alpha = float(cfg["lora_alpha"])
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module_path):
            alpha = float(a)
            break
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return scaling * rank


class _Namer:
    """``structure``: the UNet (or its config, or (layers_per_block, up blocks with attention)) the file is
    meant for; None: the public models' layout (2 resnets per level). It decides how LDM paths
    (ComfyUI-native SD1/SD2 keys) and diffusers paths (diffusers-style SDXL keys) are renamed."""

    def __init__(self, family: str | None, structure=None):
        self.family = family
        self.structure = structure

    def unet_diffusers(self, path: str) -> str:
        return unet_name(self.family or "sd1", _diffusers_unet_path(path), self.structure)

    def unet_ldm(self, path: str) -> str:
        return comfy_unet_name(self.family or "sd1", path, self.structure)

    def te(self, index: int, path: str) -> str:
        if self.family == "sdxl":
            prefix = TE1_PREFIX_KOHYA if index == 0 else TE2_PREFIX_KOHYA
        else:
            prefix = TE_PREFIX_KOHYA
        return te_name(prefix, path)


def _fix_kohya_name(name: str, family: str | None) -> str:
    for p in TE_KOHYA_PREFIXES:
        if name.startswith(p) and not name[len(p):].startswith("text_model_"):
            name = p + "text_model_" + name[len(p):]
            break
    te1, te = TE1_PREFIX_KOHYA + "_", TE_PREFIX_KOHYA + "_"
    if name.startswith(te1) and family in ("sd1", "sd2", "sd2-v"):
        name = te + name[len(te1):]
    if name.startswith("lycoris_"):
        name = UNET_PREFIX_KOHYA + "_" + name[len("lycoris_"):]
    return name


def _module_name(base: str, namer: _Namer) -> tuple[str, str | None, str, str] | None:
    """(kohya name, adapter-config component, style, component path) for a key stem, or None."""
    if base.startswith(KOHYA_PREFIXES) or base.startswith("lycoris_"):
        return _fix_kohya_name(base, namer.family), None, "kohya", base
    if base.startswith("base_model.model."):
        base = base[len("base_model.model."):]
    for p in ("model.diffusion_model.", "diffusion_model."):
        if base.startswith(p):
            return namer.unet_ldm(base[len(p):]), None, "comfyui", base
    if base.startswith("text_encoders."):
        parts = base.split(".", 3)
        if len(parts) == 4 and parts[1] in _COMFY_TE and parts[2] == "transformer":
            return namer.te(_COMFY_TE[parts[1]], parts[3]), None, "comfyui", base
        return None
    for root, comp in _ROOTS:
        if base.startswith(root):
            rest = base[len(root):]
            if comp == "unet" or (comp is None and rest.startswith(_UNET_HEADS)):
                return namer.unet_diffusers(rest), "unet", "diffusers", rest
            if comp in ("te", "te2"):
                component = "text_encoder" + ("_2" if comp == "te2" else "")
                return namer.te(0 if comp == "te" else 1, rest), component, "diffusers", rest
    if base.startswith(_UNET_HEADS):
        return namer.unet_diffusers(base), "unet", "diffusers", base
    if "." not in base:  # an underscore-joined module name without a known prefix: keep it
        return base, None, "kohya", base
    return None


def to_kohya(tensors: dict[str, torch.Tensor], metadata: dict | None = None, source: str = "LoRA",
             family: str | None = None, unet_structure=None) -> tuple:
    """(kohya tensors, family or None, style) from a state dict in any supported style.

    ``style`` is "kohya", "diffusers", "comfyui" or "mixed". ``family``: the family to assume when the
    metadata and the keys do not tell; ``unet_structure``: the UNet the file is for (see ``_Namer``;
    None: the public models' layout). Raises NotALoraError when no key is a LoRA module, ValueError when
    two keys map to the same tensor.
    """
    family = guess_family({k: tuple(v.shape) for k, v in tensors.items()}, metadata) or family
    namer = _Namer(family, unet_structure)
    configs = _adapter_config(metadata)
    out: dict[str, torch.Tensor] = {}
    styles: set[str] = set()
    comps: dict[str, tuple[str, str]] = {}  # kohya name -> (component, diffusers module path)
    skipped: list[str] = []
    for key, t in tensors.items():
        base, suffix, _ = _split_suffix(key)
        named = _module_name(base, namer) if base is not None else None
        if named is None:
            skipped.append(key)
            continue
        name, comp, style, path = named
        styles.add(style)
        if suffix == DORA and t.dim() == 1:
            t = t.reshape(t.shape[0], 1)  # peft Linear magnitude [out] -> LyCORIS [out, 1]
        elif suffix == DORA and t.dim() == 4 and t.shape[0] == 1 and t.shape[1] > 1:
            t = t.transpose(0, 1)  # peft Conv magnitude [1, out, 1, 1] -> [out, 1, 1, 1]
        if name + suffix in out:
            raise ValueError(f"{source}: keys for module {name!r} appear twice (e.g. {key!r}); the file mixes styles.")
        out[name + suffix] = t
        if comp is not None:
            comps[name] = (comp, path)
    if not out:
        raise NotALoraError(f"{source}: no LoRA tensors recognised (first keys: {', '.join(sorted(tensors)[:3])})")
    for name, (comp, path) in comps.items():
        if name + ALPHA in out or name + ".lora_down.weight" not in out:
            continue
        rank = int(out[name + ".lora_down.weight"].shape[0])
        alpha = _peft_alpha(configs.get(comp, {}), path, rank)
        if alpha is not None:
            out[name + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
    style = styles.pop() if len(styles) == 1 else "mixed"
    if family is None:
        family = family_from_kohya_names(out)
    return out, family, style, skipped


def family_from_kohya_names(tensors) -> str | None:
    for k in tensors:
        if k.startswith(SDXL_TE_KOHYA_PREFIXES + tuple(f"{UNET_PREFIX_KOHYA}_{block}_" for block in (
                "input_blocks", "middle_block", "output_blocks"))):
            return "sdxl"
    return None
