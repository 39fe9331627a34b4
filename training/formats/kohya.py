"""The in-memory LoRA value, its modules and deltas, and reading LoRA files of any supported style.

Key layout (docs/lora-format.md §1-4, §6): ``<lora_name>.<suffix>`` with LyCORIS suffixes
(``lora_down.weight``/``lora_up.weight``/``alpha`` for LoRA; ``hada_*``, ``lokr_*``, ``diff``,
``dora_scale``); names are built in :mod:`.names`, module semantics live in :mod:`.modules`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .convert import NotALoraError, to_kohya
from .families import family_from_metadata
from .modules import module_delta, module_kind, module_scale
from .names import ALPHA, DOWN, UP  # noqa: F401  (re-exported)


@dataclass
class LoraWeights:
    """The in-memory LoRA value passed between nodes (kohya/LyCORIS keys)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None
    source_format: str = "kohya"  # style the tensors were read from: kohya | diffusers | comfyui | mixed

    def __repr__(self) -> str:  # keep node previews / logs short
        return (
            f"LoraWeights(family={self.family!r}, modules={len(module_names(self))}, "
            f"tensors={len(self.tensors)}, metadata_keys={len(self.metadata)})"
        )


def module_names(weights: LoraWeights) -> list[str]:
    """Sorted lora module names (the part of each key before the first ".")."""
    return sorted({k.split(".", 1)[0] for k in weights.tensors})


def lora_scale(weights: LoraWeights, lora_name: str) -> float:
    """alpha / rank as ComfyUI and A1111 apply it (missing alpha -> 1; full-factor LoKr -> 1)."""
    return module_scale(weights.tensors, lora_name)


def lora_delta(weights: LoraWeights, lora_name: str, shape=None, base_weight=None) -> torch.Tensor:
    """The module's weight change at strength 1 (float32), shaped like the module weight.

    Any module kind (LoRA/LoCon, LoHa, LoKr, diff); DoRA modules need ``base_weight``.
    """
    if not any(k.startswith(lora_name + ".") for k in weights.tensors):
        raise KeyError(f"No LoRA module named {lora_name!r}.")
    return module_delta(weights.tensors, lora_name, shape=shape, base_weight=base_weight)


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

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
    return tensors, metadata


def _check_modules(tensors: dict, path: str) -> None:
    for name in sorted({k.split(".", 1)[0] for k in tensors}):
        try:
            kind = module_kind(tensors, name)
        except ValueError as e:
            raise ValueError(f"LoRA file {path!r}: {e}") from None
        if kind == "lora":
            down, up = tensors.get(name + DOWN), tensors.get(name + UP)
            if up is None:
                raise ValueError(f"LoRA file {path!r}: module {name!r} has lora_down but no lora_up.")
            if up.dim() < 2 or up.shape[1] != down.shape[0]:
                raise ValueError(
                    f"LoRA file {path!r}: module {name!r} has mismatched shapes "
                    f"{tuple(down.shape)} (down) / {tuple(up.shape)} (up)."
                )


def weights_from_state_dict(tensors: dict, metadata: dict | None = None, source: str = "LoRA",
                            family: str | None = None, unet_structure=None) -> LoraWeights:
    """A LoraWeights from a state dict in any supported key style (kohya, LyCORIS, diffusers/peft,
    ComfyUI native; see :mod:`.convert`). Non-LoRA keys are dropped. ``family`` (assumed when the file
    does not tell) and ``unet_structure`` (the UNet the names are for) as in :func:`.convert.to_kohya`."""
    metadata = dict(metadata or {})
    try:
        converted, family, style, _skipped = to_kohya(tensors, metadata, source, family, unet_structure)
    except NotALoraError:
        raise ValueError(_not_a_lora_message(tensors, source)) from None
    _check_modules(converted, source)
    return LoraWeights(converted, metadata, family_from_metadata(metadata) or family, style)


def _not_a_lora_message(tensors: dict, path: str) -> str:
    sample = ", ".join(sorted(tensors)[:3])
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model."))
           for k in tensors):
        kind = "a full model checkpoint, not a LoRA"
    else:
        kind = "not a LoRA file"
    return (f"{path!r} is {kind}: no LoRA keys found" + (f" (first keys: {sample})" if sample else
            " (it holds no tensors)") + ". Supported: kohya, LyCORIS, diffusers/peft and ComfyUI LoRA files.")


def load_lora_file(path, family: str | None = None, unet_structure=None) -> LoraWeights:
    """Read a LoRA ``.safetensors`` file of any supported style into kohya names.

    ``family`` / ``unet_structure``: the model the file is meant for, when known (see
    :func:`.convert.to_kohya`). Raises FileNotFoundError, or ValueError naming the file when it is not a
    (complete) safetensors file or holds no LoRA tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    tensors, metadata = _read_safetensors(path)
    return weights_from_state_dict(tensors, metadata, path, family, unet_structure)


from .export import kohya_state_dict_from_models  # noqa: E402  (re-exported; export imports names only)
