"""kohya-style LoRA tensors: export from peft-adapted diffusers/transformers models, load, delta.

Key layout (lora-format.md §1-4, §7): ``<lora_name>.lora_down.weight`` ``[r, in(, k, k)]``,
``<lora_name>.lora_up.weight`` ``[out, r(, 1, 1)]``, ``<lora_name>.alpha`` (0-dim float32), with
``lora_name = prefix + "_" + module_path.replace(".", "_")``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .families import check_family, family_from_metadata

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"

_PEFT_WRAPPER_PREFIXES = ("base_model.model.",)


@dataclass
class LoraWeights:
    """The in-memory LoRA value passed between nodes (kohya keys)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None

    def __repr__(self) -> str:  # keep node previews / logs short
        return (
            f"LoraWeights(family={self.family!r}, modules={len(module_names(self))}, "
            f"tensors={len(self.tensors)}, metadata_keys={len(self.metadata)})"
        )


# --------------------------------------------------------------------------------------------
# export from peft layers
# --------------------------------------------------------------------------------------------

def _strip_wrapper(path: str) -> str:
    path = path.replace("_orig_mod.", "")  # torch.compile wrapper
    for p in _PEFT_WRAPPER_PREFIXES:
        if path.startswith(p):
            return path[len(p):]
    return path


def _check_unsupported_tuner(name: str, module, adapter_name: str) -> None:
    """Raise for non-LoRA peft tuner layers (LoHa, LoKr, ...) holding this adapter."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover - peft is a hard dependency
        return
    if not isinstance(module, BaseTunerLayer):
        return
    for attr in getattr(module, "adapter_layer_names", ()):
        holder = getattr(module, attr, None)
        try:
            has = holder is not None and adapter_name in holder
        except TypeError:
            has = False
        if has:
            kinds = [c.__name__[: -len("Layer")] for c in type(module).__mro__
                     if c.__name__.endswith("Layer") and c.__name__ not in ("BaseTunerLayer", "LycorisLayer")]
            kind = kinds[0] if kinds else type(module).__name__
            raise NotImplementedError(
                f"Module {name!r} carries a {kind} adapter {adapter_name!r} (peft {type(module).__module__}); "
                "export of this adapter type is not supported yet; only plain "
                "LoRA (peft LoraConfig without DoRA) can be exported to a kohya file at present."
            )


def _layer_tensors(name: str, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from peft.tuners import lora as peft_lora

    if not isinstance(layer, (peft_lora.Linear, peft_lora.Conv2d)):
        raise NotImplementedError(
            f"Module {name!r} is a peft {type(layer).__name__} LoRA layer; only Linear and Conv2d "
            "layers can be written in the kohya format."
        )
    if layer.use_dora.get(adapter_name, False):
        raise NotImplementedError(
            f"Module {name!r} uses DoRA (use_dora=True) for adapter {adapter_name!r}; DoRA export is not "
            "supported yet. Train without DoRA or wait for DoRA export support."
        )
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if variant is not None:
        raise NotImplementedError(
            f"Module {name!r} uses the peft LoRA variant {type(variant).__name__}, which has no kohya "
            "representation yet."
        )
    if getattr(layer, "lora_bias", {}).get(adapter_name, False):
        raise NotImplementedError(
            f"Module {name!r} has lora_bias=True; the kohya format has no slot for a LoRA bias."
        )
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"Module {name!r} uses fan_in_fan_out, which the kohya format does not support.")
    base = layer.get_base_layer()
    if isinstance(layer, peft_lora.Conv2d) and getattr(base, "groups", 1) != 1:
        raise NotImplementedError(f"Module {name!r} is a grouped convolution; not supported in the kohya format.")

    down = layer.lora_A[adapter_name].weight
    up = layer.lora_B[adapter_name].weight
    r = int(layer.r[adapter_name])
    if down.shape[0] != r or up.shape[1] != r:
        raise ValueError(f"Module {name!r}: LoRA shapes {tuple(down.shape)}/{tuple(up.shape)} do not match r={r}.")
    alpha = float(layer.scaling[adapter_name]) * r

    def grab(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True).contiguous()

    return grab(down), grab(up), torch.tensor(alpha, dtype=torch.float32)


def _collect(model, adapter_name: str, path_fn, prefix: str, out: dict[str, torch.Tensor]) -> int:
    from peft.tuners.lora import LoraLayer

    model = getattr(model, "_orig_mod", model)  # torch.compile'd module
    n = 0
    for raw_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if adapter_name not in module.lora_A:
                if adapter_name in getattr(module, "lora_embedding_A", {}):
                    raise NotImplementedError(
                        f"Module {raw_name!r} is an embedding LoRA; the kohya format does not support it."
                    )
                continue
            down, up, alpha = _layer_tensors(raw_name, module, adapter_name)
            path = path_fn(_strip_wrapper(raw_name))
            lora_name = prefix + "_" + path.replace(".", "_")
            if lora_name + DOWN in out:
                raise ValueError(f"Two modules map to the same kohya name {lora_name!r}.")
            out[lora_name + DOWN] = down
            out[lora_name + UP] = up
            out[lora_name + ALPHA] = alpha
            n += 1
        else:
            _check_unsupported_tuner(raw_name, module, adapter_name)
    return n


def _te_path(path: str) -> str:
    # transformers >= 5.6 flattens CLIPTextModel (no "text_model." level); ComfyUI/A1111 need it.
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_state_dict_from_models(family: str, unet=None, text_encoders=(), adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """kohya LoRA tensors from the peft LoRA layers of a diffusers UNet and/or CLIP text encoders.

    Models must have had adapters attached with ``model.add_adapter(LoraConfig(...))`` (or be
    peft-wrapped). Names: ``lora_unet_<diffusers path>`` for SD1/SD2, ``lora_unet_<LDM path>`` for
    SDXL, ``lora_te_text_model_...`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL). ``alpha`` is
    ``scaling * r`` as a 0-dim float32, so rsLoRA / alpha_pattern / rank_pattern load exactly.
    Tensors are detached CPU copies. Raises NotImplementedError for DoRA / LoHa / LoKr layers.
    """
    family = check_family(family)
    out: dict[str, torch.Tensor] = {}
    total = 0
    if unet is not None:
        if family == "sdxl":
            try:
                from ..models import unet_module_path_to_ldm
            except ImportError as e:  # pragma: no cover - depends on training.models landing
                raise ImportError(
                    "SDXL LoRA export needs training.models.unet_module_path_to_ldm, which is not available."
                ) from e

            def unet_path(p: str) -> str:
                return unet_module_path_to_ldm(p, unet)
        else:
            def unet_path(p: str) -> str:
                return p
        total += _collect(unet, adapter_name, unet_path, "lora_unet", out)

    tes = list(text_encoders or ())
    if family == "sdxl":
        if len(tes) > 2:
            raise ValueError(f"SDXL has two text encoders; got {len(tes)}.")
        prefixes = ["lora_te1", "lora_te2"]
    else:
        if len([t for t in tes if t is not None]) > 1:
            raise ValueError(f"Family {family!r} has one text encoder; got {len(tes)}.")
        prefixes = ["lora_te"] * max(1, len(tes))
    for te, prefix in zip(tes, prefixes):
        if te is not None:
            total += _collect(te, adapter_name, _te_path, prefix, out)

    if total == 0:
        raise ValueError(
            f"No LoRA layers for adapter {adapter_name!r} were found on the given models; attach one with "
            "model.add_adapter(LoraConfig(...)) before exporting."
        )
    return out


# --------------------------------------------------------------------------------------------
# inspection / delta
# --------------------------------------------------------------------------------------------

def module_names(weights: LoraWeights) -> list[str]:
    """Sorted lora module names (the part of each key before the first ".")."""
    return sorted({k.split(".", 1)[0] for k in weights.tensors})


def lora_scale(weights: LoraWeights, lora_name: str) -> float:
    """alpha / rank as ComfyUI and A1111 apply it (missing alpha -> 1)."""
    down = weights.tensors[lora_name + DOWN]
    alpha = weights.tensors.get(lora_name + ALPHA)
    if alpha is None:
        return 1.0
    return float(alpha.item()) / down.shape[0]


def lora_delta(weights: LoraWeights, lora_name: str) -> torch.Tensor:
    """``(alpha/r) * up @ down`` as a float32 tensor shaped like the module weight.

    Linear: ``[out, in]``; Conv2d: ``[out, in, k, k]`` (computed as
    ``(up.reshape(out, -1) @ down.reshape(r, -1)).reshape(out, in, k, k)``).
    """
    t = weights.tensors
    if lora_name + DOWN not in t or lora_name + UP not in t:
        others = sorted(k for k in t if k.startswith(lora_name + "."))
        if others:
            raise NotImplementedError(
                f"Module {lora_name!r} is not a plain LoRA (keys: {', '.join(others)}); its delta is not supported yet."
            )
        raise KeyError(f"No LoRA module named {lora_name!r}.")
    extra = sorted(k for k in t if k.startswith(lora_name + ".") and k not in (lora_name + DOWN, lora_name + UP, lora_name + ALPHA))
    if extra:
        raise NotImplementedError(
            f"Module {lora_name!r} has extra tensors ({', '.join(extra)}); only plain LoRA deltas are supported yet."
        )
    down = t[lora_name + DOWN].float()
    up = t[lora_name + UP].float()
    r = down.shape[0]
    if up.shape[1] != r:
        raise ValueError(f"Module {lora_name!r}: lora_up {tuple(up.shape)} does not match rank {r} of lora_down.")
    delta = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
    if down.dim() == 4:
        delta = delta.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return delta * lora_scale(weights, lora_name)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

def _family_from_keys(keys) -> str | None:
    for k in keys:
        if k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")):
            return "sdxl"
    return None


def load_lora_file(path) -> LoraWeights:
    """Read a kohya-style LoRA ``.safetensors`` file.

    Raises FileNotFoundError, or ValueError naming the file when it is not a (complete)
    safetensors file or holds no kohya LoRA tensors.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k).clone()
    except Exception as e:
        raise ValueError(
            f"Cannot read LoRA file {path!r}: it is not a valid .safetensors file or it is truncated/corrupted "
            f"({type(e).__name__}: {e})."
        ) from e

    downs = [k for k in tensors if k.endswith(DOWN)]
    if not downs:
        sample = ", ".join(sorted(tensors)[:3])
        if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors):
            kind = "a diffusers/peft-format LoRA (lora_A/lora_B keys)"
        elif any(".hada_w1_a" in k or ".lokr_w" in k for k in tensors):
            kind = "a LyCORIS LoHa/LoKr file"
        elif any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model.")) for k in tensors):
            kind = "a full model checkpoint, not a LoRA"
        else:
            kind = "not a kohya LoRA"
        raise ValueError(
            f"{path!r} is {kind}: no '*.lora_down.weight' keys found"
            + (f" (first keys: {sample})" if sample else " (it holds no tensors)")
            + ". Only kohya-style LoRA files are supported here."
        )
    for k in downs:
        name = k[: -len(DOWN)]
        up = tensors.get(name + UP)
        if up is None:
            raise ValueError(f"LoRA file {path!r}: module {name!r} has lora_down but no lora_up.")
        if up.dim() < 2 or up.shape[1] != tensors[k].shape[0]:
            raise ValueError(
                f"LoRA file {path!r}: module {name!r} has mismatched shapes "
                f"{tuple(tensors[k].shape)} (down) / {tuple(up.shape)} (up)."
            )
    family = family_from_metadata(metadata) or _family_from_keys(tensors)
    return LoraWeights(tensors=tensors, metadata=metadata, family=family)
