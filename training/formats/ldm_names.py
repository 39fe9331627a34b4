"""diffusers <-> original LDM / SAI ("single file") parameter names, written once.

The forward direction (diffusers -> LDM) is a pure function of a diffusers parameter name plus a few
structural numbers (layers_per_block, which up blocks have attention, number of VAE levels). The
reverse direction is obtained by building the forward map for every key of a diffusers model
skeleton and inverting it, so both directions are always consistent.

A map entry is ``diffusers_key -> (ldm_key, kind)`` where kind is one of
  "same"    tensor copied as is
  "conv1x1" diffusers Linear [out, in]  <-> LDM 1x1 conv [out, in, 1, 1]   (VAE mid-block attention)
  "qkv0"/"qkv1"/"qkv2"  q / k / v part of OpenCLIP's concatenated in_proj_weight / in_proj_bias
  "T"       stored transposed in LDM (OpenCLIP text_projection)
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "" and p is not None)


def _resnet_inner(rest: list[str]) -> list[str]:
    if rest and rest[0] in _RESNET_UNET:
        return _RESNET_UNET[rest[0]].split(".") + rest[1:]
    return rest


def _unet_structure(unet_or_config) -> tuple[int, list[bool]]:
    cfg = getattr(unet_or_config, "config", unet_or_config)
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    lpb = get("layers_per_block")
    if not isinstance(lpb, int):
        vals = set(lpb)
        if len(vals) != 1:
            raise ValueError(f"layers_per_block={lpb!r}: per-level counts are not representable in the LDM layout")
        lpb = vals.pop()
    up_attn = ["CrossAttn" in t for t in get("up_block_types")]
    return int(lpb), up_attn


def unet_path_to_ldm(path: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """Map a diffusers UNet parameter or module path (no "model.diffusion_model." prefix) to LDM."""
    p = path.split(".")
    L = layers_per_block
    head, rest = p[0], p[1:]

    def fail():
        raise ValueError(f"UNet path {path!r} has no equivalent in the LDM/SAI layout")

    if head == "conv_in":
        return _join("input_blocks.0.0", *rest)
    if head == "conv_norm_out":
        return _join("out.0", *rest)
    if head == "conv_out":
        return _join("out.2", *rest)
    if head in ("time_embedding", "add_embedding"):
        if not rest or rest[0] not in ("linear_1", "linear_2"):
            fail()
        base = "time_embed" if head == "time_embedding" else "label_emb.0"
        idx = 0 if rest[0] == "linear_1" else 2
        return _join(base, idx, *rest[1:])
    if head == "down_blocks":
        if len(rest) < 3:
            fail()
        i, kind, j, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            return _join("input_blocks", 1 + i * (L + 1) + j, 0, *_resnet_inner(tail))
        if kind == "attentions":
            return _join("input_blocks", 1 + i * (L + 1) + j, 1, *tail)
        if kind == "downsamplers" and j == 0:
            if not tail or tail[0] != "conv":
                fail()
            return _join("input_blocks", (i + 1) * (L + 1), 0, "op", *tail[1:])
        fail()
    if head == "mid_block":
        if len(rest) < 2:
            fail()
        kind, j, tail = rest[0], int(rest[1]), rest[2:]
        if kind == "resnets":
            return _join("middle_block", 2 * j, *_resnet_inner(tail))
        if kind == "attentions" and j == 0:
            return _join("middle_block.1", *tail)
        fail()
    if head == "up_blocks":
        if len(rest) < 3:
            fail()
        i, kind, j, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            return _join("output_blocks", i * (L + 1) + j, 0, *_resnet_inner(tail))
        if kind == "attentions":
            return _join("output_blocks", i * (L + 1) + j, 1, *tail)
        if kind == "upsamplers" and j == 0:
            return _join("output_blocks", i * (L + 1) + L, 2 if up_has_attention[i] else 1, *tail)
        fail()
    fail()


def unet_module_path_to_ldm(diffusers_module_path: str, unet) -> str:
    """diffusers UNet module path -> LDM/SAI module path (without "model.diffusion_model.").

    ``unet`` is a UNet2DConditionModel or its config. Works for any layers_per_block, e.g.
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" -> "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    for layers_per_block=2. A peft wrapper prefix ("base_model.model.") is accepted and dropped.
    """
    path = diffusers_module_path
    for pre in ("base_model.model.", "unet."):
        if path.startswith(pre):
            path = path[len(pre):]
    L, up_attn = _unet_structure(unet)
    return unet_path_to_ldm(path, L, up_attn)


def unet_key_map(diffusers_keys: Iterable[str], unet_or_config) -> dict[str, tuple[str, str]]:
    L, up_attn = _unet_structure(unet_or_config)
    return {k: (UNET_PREFIX + unet_path_to_ldm(k, L, up_attn), "same") for k in diffusers_keys}


# ---------------------------------------------------------------- VAE
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_path_to_ldm(path: str, num_levels: int) -> tuple[str, str]:
    p = path.split(".")
    side, rest = p[0], p[1:]
    if side not in ("encoder", "decoder"):
        return path, "same"  # quant_conv, post_quant_conv
    head = rest[0]
    tail = rest[1:]

    def resnet(t):
        if t and t[0] == "conv_shortcut":
            return ["nin_shortcut"] + t[1:]
        return t

    if head in ("conv_in", "conv_out"):
        return _join(side, head, *tail), "same"
    if head == "conv_norm_out":
        return _join(side, "norm_out", *tail), "same"
    if head in ("down_blocks", "up_blocks"):
        i, kind, j, t = int(tail[0]), tail[1], int(tail[2]), tail[3:]
        level = i if head == "down_blocks" else num_levels - 1 - i
        part = "down" if head == "down_blocks" else "up"
        if kind == "resnets":
            return _join(side, part, level, "block", j, *resnet(t)), "same"
        if kind in ("downsamplers", "upsamplers") and j == 0 and t[0] == "conv":
            return _join(side, part, level, "downsample" if kind == "downsamplers" else "upsample", *t), "same"
    if head == "mid_block":
        kind, j, t = tail[0], int(tail[1]), tail[2:]
        if kind == "resnets":
            return _join(side, "mid", f"block_{j + 1}", *resnet(t)), "same"
        if kind == "attentions" and j == 0:
            name = ".".join(t[:-1])
            if name in _VAE_ATTN:
                kind_ = "conv1x1" if (t[-1] == "weight" and name != "group_norm") else "same"
                return _join(side, "mid.attn_1", _VAE_ATTN[name], t[-1]), kind_
    raise ValueError(f"VAE path {path!r} has no equivalent in the LDM layout")


def vae_key_map(diffusers_keys: Iterable[str], vae_or_config) -> dict[str, tuple[str, str]]:
    cfg = getattr(vae_or_config, "config", vae_or_config)
    n = len(cfg["block_out_channels"] if isinstance(cfg, Mapping) else cfg.block_out_channels)
    out = {}
    for k in diffusers_keys:
        ldm, kind = vae_path_to_ldm(k, n)
        out[k] = (VAE_PREFIX + ldm, kind)
    return out


# ---------------------------------------------------------------- text encoders
def _strip_text_model(k: str) -> str:
    return k[len("text_model."):] if k.startswith("text_model.") else k


def hf_clip_key_map(diffusers_keys: Iterable[str], ldm_prefix: str) -> dict[str, tuple[str, str]]:
    """transformers CLIPTextModel(WithProjection) -> "<prefix>text_model.*" (CLIP-L in SD1 / SDXL TE1)."""
    out = {}
    for k in diffusers_keys:
        if k == "text_projection.weight":
            out[k] = (ldm_prefix + "text_projection.weight", "same")
        else:
            out[k] = (ldm_prefix + "text_model." + _strip_text_model(k), "same")
    return out


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_path_to_ldm(key: str) -> tuple[str, str]:
    k = _strip_text_model(key)
    if k == "embeddings.token_embedding.weight":
        return "token_embedding.weight", "same"
    if k == "embeddings.position_embedding.weight":
        return "positional_embedding", "same"
    if k.startswith("final_layer_norm."):
        return "ln_final." + k[len("final_layer_norm."):], "same"
    if k == "text_projection.weight":
        return "text_projection", "T"
    if k.startswith("encoder.layers."):
        p = k.split(".")
        n, rest = p[2], ".".join(p[3:])
        for qi, q in enumerate(("q_proj", "k_proj", "v_proj")):
            pre = f"self_attn.{q}."
            if rest.startswith(pre):
                return f"transformer.resblocks.{n}.attn.in_proj_{rest[len(pre):]}", f"qkv{qi}"
        for d, l in _OPEN_CLIP_LAYER.items():
            if rest.startswith(d + "."):
                return f"transformer.resblocks.{n}.{l}.{rest[len(d) + 1:]}", "same"
    raise ValueError(f"text-encoder key {key!r} has no equivalent in the OpenCLIP layout")


def open_clip_key_map(diffusers_keys: Iterable[str], ldm_prefix: str) -> dict[str, tuple[str, str]]:
    out = {}
    for k in diffusers_keys:
        ldm, kind = open_clip_path_to_ldm(k)
        out[k] = (ldm_prefix + ldm, kind)
    return out


def text_encoder_key_map(diffusers_keys, layout: str, ldm_prefix: str):
    if layout == "hf_clip":
        return hf_clip_key_map(diffusers_keys, ldm_prefix)
    if layout == "open_clip":
        return open_clip_key_map(diffusers_keys, ldm_prefix)
    raise ValueError(f"unknown text-encoder layout {layout!r}")


# ---------------------------------------------------------------- applying maps
def to_ldm(diffusers_sd: Mapping[str, torch.Tensor], key_map: Mapping[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply a forward map to a diffusers state dict."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    for k, v in diffusers_sd.items():
        ldm, kind = key_map[k]
        if kind == "same":
            out[ldm] = v
        elif kind == "conv1x1":
            out[ldm] = v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v
        elif kind == "T":
            out[ldm] = v.t().contiguous()
        elif kind.startswith("qkv"):
            qkv.setdefault(ldm, [None, None, None])[int(kind[3])] = v
        else:
            raise ValueError(kind)
    for ldm, parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"incomplete q/k/v for {ldm}")
        out[ldm] = torch.cat(parts, 0)
    return out


def from_ldm(ldm_sd: Mapping[str, torch.Tensor], key_map: Mapping[str, tuple[str, str]]):
    """Inverse of :func:`to_ldm`. Returns (diffusers_state_dict, missing_ldm_keys, used_ldm_keys)."""
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for dk, (ldm, kind) in key_map.items():
        if ldm not in ldm_sd:
            missing.append(ldm)
            continue
        used.add(ldm)
        v = ldm_sd[ldm]
        if kind == "same":
            out[dk] = v
        elif kind == "conv1x1":
            out[dk] = v.reshape(v.shape[0], v.shape[1]) if v.ndim == 4 else v
        elif kind == "T":
            out[dk] = v.t().contiguous()
        elif kind.startswith("qkv"):
            if v.shape[0] % 3:
                raise ValueError(f"{ldm}: first dimension {v.shape[0]} is not divisible by 3")
            out[dk] = v.chunk(3, 0)[int(kind[3])].contiguous()
        else:
            raise ValueError(kind)
    return out, sorted(set(missing)), used
