"""Tiny random diffusion models of every DiT family, built from ComfyUI's own classes and loaded back through
ComfyUI's own loader (``comfy.sd.load_diffusion_model_state_dict``), for in-process integration tests.

Each builder instantiates the family's ComfyUI module (``comfy.ldm...``) at a tiny width with seeded random
weights and returns its state dict: the real key names (Flux/Chroma norms renamed to the ``.scale`` of the
original files), so ComfyUI's model detection recognises the family from the keys and reads the sizes it
infers from the shapes (Flux: hidden size, depth, context/vector widths, guidance_in; SD3: depth = width/64,
pos_embed, y/context widths; Lumina2: dim, depth, caption width; Qwen-Image: depth, input channels).

ComfyUI's detection fixes the widths it cannot read from a full-size file's shapes (Chroma's approximator:
5120 wide, 5 layers; Lumina2's heads and rope axes unless dim is 2304 or 3840; Qwen-Image's 24 heads of 128
and 3584-wide text input). For those families ``SUPPLEMENT`` lists the fields that detection is told, only
those, through :func:`told_sizes`, after detection itself named the family.

Needs COMFYUI_DIR on sys.path (the caller imports comfy first).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

CONTEXT_DIM = 64  # text-encoder width the tiny models read (a T5 / Gemma / Qwen stand-in)
POOLED_DIM = 32   # pooled CLIP width (Flux vector_in, SD3 y)


@dataclass
class TinyModel:
    family: str                      # our family id (nodes/comfy_model.py)
    state_dict: dict
    supplement: dict = field(default_factory=dict)  # config fields detection is told (see module doc)
    image_model: str | None = None   # what ComfyUI's detection must say before it is told anything
    pooled: bool = False             # the family reads a pooled text vector
    latent_channels: int = 16


def _randomize(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("norm.weight") or k.endswith("norm.scale") or ".norm" in k and k.endswith(".weight") and v.ndim == 1:
            out[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v.shape[1] if v.ndim >= 2 else 1
            out[k] = torch.randn(v.shape, generator=g) * (0.5 / max(1.0, fan_in) ** 0.5 if v.ndim >= 2 else 0.02)
    return out


def _ops():
    import comfy.ops

    return comfy.ops.disable_weight_init


def _bfl_names(sd: dict) -> dict:
    """ComfyUI loads Flux/Chroma's ``*_norm.scale`` as ``.weight``; write them as the original files do."""
    return {(k[: -len(".weight")] + ".scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
            for k, v in sd.items()}


def flux(guidance: bool = True, seed: int = 0) -> TinyModel:
    import comfy.ldm.flux.model as m

    net = m.Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM,
                 context_in_dim=CONTEXT_DIM, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2,
                 depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                 guidance_embed=guidance, txt_ids_dims=[], operations=_ops())
    return TinyModel("flux-dev" if guidance else "flux-schnell", _bfl_names(_randomize(net, seed)), {}, "flux",
                     pooled=True)


def sd3(seed: int = 0) -> TinyModel:
    import comfy.ldm.modules.diffusionmodules.mmdit as m

    net = m.OpenAISignatureMMDITWrapper(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=POOLED_DIM,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
        pos_embed_max_size=16, num_patches=256, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
        operations=_ops())
    return TinyModel("sd3", _randomize(net, seed), {}, None, pooled=True)


def chroma(seed: int = 0) -> TinyModel:
    import comfy.ldm.chroma.model as m

    net = m.Chroma(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=CONTEXT_DIM,
                   hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=2,
                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=128,
                   hidden_dim=64, n_layers=1, txt_ids_dims=[], vec_in_dim=None, operations=_ops())
    return TinyModel("chroma", _bfl_names(_randomize(net, seed)), {"out_dim": 128, "hidden_dim": 64, "n_layers": 1},
                     "chroma")


def lumina2(seed: int = 0) -> TinyModel:
    import comfy.ldm.lumina.model as m

    told = {"n_heads": 2, "n_kv_heads": 1, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512],
            "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0, "n_refiner_layers": 1}
    net = m.NextDiT(patch_size=2, in_channels=16, dim=64, n_layers=2, qk_norm=True, cap_feat_dim=CONTEXT_DIM,
                    operations=_ops(), **told)
    return TinyModel("lumina2", _randomize(net, seed), told, "lumina2")


def qwen_image(seed: int = 0) -> TinyModel:
    import comfy.ldm.qwen_image.model as m

    told = {"attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM,
            "axes_dims_rope": (8, 12, 12)}
    net = m.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                        operations=_ops(), **told)
    return TinyModel("qwen-image", _randomize(net, seed), told, "qwen_image")


BUILDERS = {
    "flux-dev": lambda: flux(True),
    "flux-schnell": lambda: flux(False),
    "sd3": sd3,
    "chroma": chroma,
    "lumina2": lumina2,
    "qwen-image": qwen_image,
}


@contextlib.contextmanager
def told_sizes(tiny: TinyModel):
    """While loading ``tiny``: ComfyUI's ``detect_unet_config`` runs as is, must name the family's image model,
    and its answer gets ``tiny.supplement`` on top (nothing else)."""
    import comfy.model_detection as md

    if not tiny.supplement:
        yield
        return
    real = md.detect_unet_config

    def detect(state_dict, key_prefix, *args, **kwargs):
        config = real(state_dict, key_prefix, *args, **kwargs)
        if config is not None and tiny.image_model is not None:
            assert config.get("image_model") == tiny.image_model, (config, tiny.image_model)
            config = {**config, **tiny.supplement}
        return config

    md.detect_unet_config = detect
    try:
        yield
    finally:
        md.detect_unet_config = real


def load(tiny: TinyModel):
    """The ModelPatcher ComfyUI's Load Diffusion Model path makes of ``tiny`` (float32, CPU)."""
    import comfy.sd

    with told_sizes(tiny):
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(tiny.state_dict), model_options={"dtype": torch.float32})
    if patcher is None:
        raise AssertionError(f"ComfyUI did not recognise the tiny {tiny.family} state dict")
    return patcher
