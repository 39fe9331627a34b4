"""Model families, their shipped constants and detection from checkpoint keys/shapes."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from functools import lru_cache
from typing import Any, Mapping

import torch

from ..formats.families import FAMILIES  # noqa: F401 (re-exported by models/)
from ..formats.ldm_names import UNET_PREFIX
from ..formats.names import KOHYA_PREFIXES

logger = logging.getLogger(__name__)

ARCH_METADATA_KEY = "comfyui_lora_trainer.arch"
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."


class UnsupportedModelError(ValueError):
    """The checkpoint is a model family this trainer does not support (yet)."""


@lru_cache(maxsize=None)
def _load_config(family: str) -> str:
    with open(os.path.join(_CONFIG_DIR, f"{family}.json"), encoding="utf-8") as f:
        return f.read()


def family_config(family: str) -> dict:
    """A fresh copy of the shipped constants/configs of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return copy.deepcopy(json.loads(_load_config(family)))


def _shape(v) -> tuple:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if hasattr(v, "get_shape"):  # safetensors slice
        return tuple(v.get_shape())
    return tuple(v)


def _normalise(sd) -> dict:
    if isinstance(sd, Mapping):
        return dict(sd)
    return {k: v for k, v in sd}


def _describe_keys(keys) -> str:
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(prefixes[:6])
    return shown + (" ..." if len(prefixes) > 6 else "")


def _unsupported(what: str, extra: str = "") -> UnsupportedModelError:
    msg = (f"This looks like {what}, which is not supported yet. Supported base models: SD1.x, SD2.x "
           f"(512 eps / 768 v-prediction) and SDXL base checkpoints.")
    if extra:
        msg += " " + extra
    return UnsupportedModelError(msg)


def detect_family(state_dict_or_keys_and_shapes, metadata: Mapping[str, str] | None = None) -> str:
    """Detect "sd1" | "sd2" | "sd2-v" | "sdxl" from an LDM/SAI state dict (key -> tensor or shape).

    Raises UnsupportedModelError naming the family it sees for anything else. SD2 v-prediction cannot be
    told from weights with certainty: it is reported when the file's metadata says so
    (modelspec.prediction_type "v", a 768-v modelspec architecture, or our own arch hint) and otherwise by
    ComfyUI's own heuristic (std of output_blocks.11.1.transformer_blocks.0.norm1.bias > 0.09, the rule
    ComfyUI uses to sample from the same file) when tensor values are available. Pass family="sd2-v"
    to load_base_model to override.
    """
    sd = _normalise(state_dict_or_keys_and_shapes)
    keys = set(sd)
    meta = dict(metadata or {})

    def has_prefix(p):
        return any(k.startswith(p) for k in keys)

    U = UNET_PREFIX
    if not has_prefix(U):
        if any(k.startswith(KOHYA_PREFIXES) or ".lora_down." in k
               or ".lora_A." in k or ".hada_w1_a" in k or ".lokr_w" in k for k in keys):
            raise _unsupported("a LoRA / LyCORIS adapter file, not a base checkpoint",
                               "Load it with the LoRA nodes; training needs a full base checkpoint.")
        if has_prefix("double_blocks.") or has_prefix("single_blocks."):
            raise _unsupported("a Flux diffusion model")
        if has_prefix("joint_blocks."):
            raise _unsupported("an SD3 / SD3.5 diffusion model")
        if "input_blocks.0.0.weight" in keys:
            raise _unsupported("a UNet-only (diffusion model) file without VAE and text encoder",
                               "Use a full single-file checkpoint (UNet + VAE + text encoders).")
        if "conv_in.weight" in keys and has_prefix("down_blocks."):
            raise _unsupported("a diffusers-format component file (UNet or VAE only)",
                               "Use a full single-file checkpoint or a diffusers folder with model_index.json.")
        if has_prefix("encoder.down.") and has_prefix("decoder.up."):
            raise _unsupported("a standalone VAE file")
        if has_prefix("text_model.") or has_prefix("transformer.resblocks."):
            raise _unsupported("a standalone text-encoder file")
        raise _unsupported(f"an unrecognised model (top-level keys: {_describe_keys(keys)})")

    if has_prefix(U + "joint_blocks."):
        raise _unsupported("an SD3 / SD3.5 checkpoint")
    if has_prefix(U + "double_blocks.") or has_prefix(U + "single_blocks."):
        raise _unsupported("a Flux checkpoint")
    if U + "input_blocks.0.0.weight" not in keys:
        raise _unsupported(f"a non-UNet diffusion model (keys under {U}: {_describe_keys(k[len(U):] for k in keys if k.startswith(U))})")
    if has_prefix(U + "input_blocks.1.1.time_stack.") or has_prefix(U + "input_blocks.1.0.time_stack.") \
            or any(".time_stack." in k or ".time_mix_blocks." in k for k in keys if k.startswith(U)):
        raise _unsupported("a video model (Stable Video Diffusion)")
    if "edm_mean" in keys or "edm_std" in keys:
        raise _unsupported("Playground v2.5 (EDM SDXL)")
    if "edm_vpred.sigma_max" in keys or "v_pred" in keys:
        raise _unsupported("an SDXL v-prediction checkpoint (v_pred / edm_vpred marker keys)")
    in_ch = _shape(sd[U + "input_blocks.0.0.weight"])[1]
    if in_ch == 9:
        raise _unsupported("an inpainting checkpoint (9 UNet input channels)")
    if in_ch == 8:
        raise _unsupported("an instruct-pix2pix / edit checkpoint (8 UNet input channels)")
    if in_ch == 7:
        raise _unsupported("the SD2 x4 upscaler (7 UNet input channels)")
    if in_ch != 4:
        raise _unsupported(f"a UNet with {in_ch} input channels")
    if U + "out.2.weight" in keys and _shape(sd[U + "out.2.weight"])[0] != 4:
        raise _unsupported(f"a UNet with {_shape(sd[U + 'out.2.weight'])[0]} output channels")
    if has_prefix(U + "input_hint_block.") or has_prefix("control_model."):
        raise _unsupported("a ControlNet")

    has_label = U + "label_emb.0.0.weight" in keys
    te1_xl = has_prefix(SDXL_TE1_PREFIX)
    te2_xl = has_prefix(SDXL_TE2_PREFIX)
    if has_label:
        if te1_xl and te2_xl:
            return "sdxl"
        if has_prefix("conditioner.embedders.0.model.") and not te2_xl:
            raise _unsupported("the SDXL refiner (OpenCLIP-bigG only, no CLIP-L)")
        if has_prefix(SD2_TE_PREFIX) or has_prefix("embedder.model.visual."):
            raise _unsupported("an SD2.1 unCLIP checkpoint (image-embedding conditioned)")
        if te2_xl or te1_xl:
            raise _unsupported("an SDXL-like checkpoint with only one of its two text encoders",
                               "A base SDXL checkpoint needs conditioner.embedders.0 (CLIP-L) and .1 (OpenCLIP-bigG).")
        raise _unsupported("a class/ADM-conditioned UNet without SDXL text encoders")

    # context dim / projection style from the first attention block
    ctx = None
    linear = None
    for k in sorted(keys):
        if k.startswith(U) and k.endswith(".attn2.to_k.weight"):
            ctx = _shape(sd[k])[1]
            pin = k.split(".transformer_blocks.")[0] + ".proj_in.weight"
            if pin in keys:
                linear = len(_shape(sd[pin])) == 2
            break
    if ctx is None:
        raise _unsupported("a UNet without cross-attention")

    if has_prefix(SD1_TE_PREFIX):
        tk = [k for k in keys if k.startswith(SD1_TE_PREFIX) and k.endswith("embeddings.token_embedding.weight")]
        if tk and _shape(sd[tk[0]])[1] != ctx:
            raise _unsupported(f"a CLIP-L-conditioned UNet whose context width ({ctx}) differs from the text "
                               f"encoder width ({_shape(sd[tk[0]])[1]})")
        return "sd1"
    if has_prefix(SD2_TE_PREFIX):
        if linear is False:
            raise _unsupported("an SD2-style checkpoint with convolutional proj_in (unknown variant)")
        return "sd2-v" if _sd2_is_v(sd, meta) else "sd2"
    if has_prefix("conditioner.embedders.0.model."):
        raise _unsupported("an SD2 checkpoint in SGM layout (conditioner.embedders.0.model.)")
    if te1_xl or te2_xl:
        raise _unsupported("an SDXL-like checkpoint without label_emb (size conditioning)")
    raise _unsupported(
        f"a UNet checkpoint without a text encoder (context width {ctx})",
        "Use a full single-file checkpoint that includes the text encoder(s) and VAE.")


def _sd2_is_v(sd: Mapping[str, Any], meta: Mapping[str, str]) -> bool:
    arch = meta.get(ARCH_METADATA_KEY)
    if arch:
        try:
            fam = json.loads(arch).get("family")
            if fam in ("sd2", "sd2-v"):
                return fam == "sd2-v"
        except (ValueError, AttributeError):
            pass
    pt = str(meta.get("modelspec.prediction_type", "")).lower()
    if pt in ("v", "v_prediction", "v-prediction"):
        return True
    if pt in ("epsilon", "eps"):
        return False
    if "768-v" in str(meta.get("modelspec.architecture", "")):
        return True
    k = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    v = sd.get(k)
    if isinstance(v, torch.Tensor):
        is_v = bool(torch.std(v.float(), unbiased=False) > 0.09)
        logger.info("SD2 checkpoint without prediction-type metadata: ComfyUI's norm1.bias heuristic says %s "
                    "(override with family='sd2' / 'sd2-v')", "v-prediction" if is_v else "epsilon")
        return is_v
    return False


def sd2_v_from_yaml(checkpoint_path: str) -> bool | None:
    """A1111 convention: "<stem>.yaml" beside the checkpoint with ``parameterization: "v"``."""
    stem = os.path.splitext(checkpoint_path)[0]
    for ext in (".yaml", ".yml"):
        p = stem + ext
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    text = f.read(1 << 20)
            except OSError:
                return None
            m = re.search(r"parameterization\s*:\s*[\"']?(\w+)", text)
            if m:
                return m.group(1).lower() == "v"
            return False
    return None
