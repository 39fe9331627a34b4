"""Tiny random diffusion models of every DiT family, built from ComfyUI's own classes and loaded back through
ComfyUI's own loader (``comfy.sd.load_diffusion_model_state_dict``), for in-process integration tests.

Each builder instantiates the family's ComfyUI module (``comfy.ldm...``) at a tiny width with seeded random
weights and returns its state dict: the real key names (Flux/Chroma norms renamed to the ``.scale`` of the
original files), so ComfyUI's model detection recognises the family from the keys and reads the sizes it
infers from the shapes (Flux: hidden size, depth, context/vector widths, guidance_in; SD3: depth = width/64,
pos_embed, y/context widths; Lumina2: dim, depth, caption width; Qwen-Image: depth, input channels).

ComfyUI's detection fixes some widths a full-size file has anyway (0.33: Chroma's approximator, 5120 wide
and 5 layers; Lumina2's heads and rope axes unless dim is 2304 or 3840; Qwen-Image's 24 heads of 128 and
3584-wide text input; 0.3.64 also Flux's 3072 width, 24 heads and 4096-wide context). :func:`told_sizes`
lets ComfyUI's own detection run, checks that it named the family, and tells it only the fields of the tiny
model's config that it got wrong (recorded in ``TinyModel.told``); the model class, loader, key mapping and
everything after are ComfyUI's unchanged.

Needs COMFYUI_DIR on sys.path (the caller imports comfy first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from dataclasses import dataclass, field

import torch

CONTEXT_DIM = 64  # text-encoder width the tiny models read (a T5 / Gemma / Qwen stand-in)
POOLED_DIM = 32   # pooled CLIP width (Flux vector_in, SD3 y)


@dataclass
class TinyModel:
    family: str                      # our family id (nodes/comfy_model.py)
    state_dict: dict
    config: dict                     # the size arguments the module was built with
    image_model: str | None = None   # what ComfyUI's detection must say before it is told anything
    pooled: bool = False             # the family reads a pooled CLIP vector
    told: dict = field(default_factory=dict)  # after load(): the fields detection was told (module doc)


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


def _accepted(kwargs: dict, *targets) -> dict:
    """The part of ``kwargs`` this ComfyUI version's classes take (0.3.64's Flux has no ``txt_ids_dims``,
    its NextDiT no ``rope_theta``): a dataclass's fields or a function's parameters."""
    names = set()
    for t in targets:
        if dataclasses.is_dataclass(t):
            names |= {f.name for f in dataclasses.fields(t)}
        else:
            names |= set(inspect.signature(t).parameters)
    return {k: v for k, v in kwargs.items() if k in names}


def _ops():
    import comfy.ops

    return comfy.ops.disable_weight_init


def _bfl_names(sd: dict) -> dict:
    """ComfyUI loads Flux/Chroma's ``*_norm.scale`` as ``.weight``; write them as the original files do."""
    return {(k[: -len(".weight")] + ".scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
            for k, v in sd.items()}


def flux(guidance: bool = True, seed: int = 0) -> TinyModel:
    import comfy.ldm.flux.model as m

    params = dict(in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM, context_in_dim=CONTEXT_DIM,
                  hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=2,
                  axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=guidance,
                  txt_ids_dims=[])
    params = _accepted(params, m.FluxParams)
    net = m.Flux(image_model="flux", operations=_ops(), **params)
    return TinyModel("flux-dev" if guidance else "flux-schnell", _bfl_names(_randomize(net, seed)), params, "flux",
                     pooled=True)


def sd3(seed: int = 0) -> TinyModel:
    import comfy.ldm.modules.diffusionmodules.mmdit as m

    params = dict(patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=POOLED_DIM,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
                  pos_embed_max_size=16, num_patches=256)
    net = m.OpenAISignatureMMDITWrapper(input_size=None, operations=_ops(), **params)
    return TinyModel("sd3", _randomize(net, seed), params, None, pooled=True)


def sd35_medium(seed: int = 0) -> TinyModel:
    """SD3.5 Medium's MMDiT-X: SD3's joint blocks, the first of them with a second self-attention on the image
    stream (``x_block_self_attn_layers``), which is how ComfyUI and we tell it from SD3."""
    import comfy.ldm.modules.diffusionmodules.mmdit as m

    params = dict(patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=POOLED_DIM,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
                  pos_embed_max_size=16, num_patches=256, x_block_self_attn_layers=[0], qk_norm="rms")
    net = m.OpenAISignatureMMDITWrapper(input_size=None, operations=_ops(), **params)
    return TinyModel("sd3.5-medium", _randomize(net, seed), params, None, pooled=True)


def chroma(seed: int = 0) -> TinyModel:
    import comfy.ldm.chroma.model as m

    params = dict(in_channels=64, out_channels=64, context_in_dim=CONTEXT_DIM, hidden_size=128, mlp_ratio=4.0,
                  num_heads=1, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                  qkv_bias=True, in_dim=64, out_dim=128, hidden_dim=64, n_layers=1, txt_ids_dims=[],
                  vec_in_dim=None)
    params = _accepted(params, m.ChromaParams)
    net = m.Chroma(image_model="chroma", operations=_ops(), **params)
    return TinyModel("chroma", _bfl_names(_randomize(net, seed)), params, "chroma")


def lumina2(seed: int = 0) -> TinyModel:
    import comfy.ldm.lumina.model as m

    params = _accepted({"patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 2, "qk_norm": True,
                        "cap_feat_dim": CONTEXT_DIM, "n_heads": 2, "n_kv_heads": 1, "axes_dims": [8, 12, 12],
                        "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
                        "n_refiner_layers": 1}, m.NextDiT)
    net = m.NextDiT(operations=_ops(), **params)
    return TinyModel("lumina2", _randomize(net, seed), params, "lumina2")


def qwen_image(seed: int = 0) -> TinyModel:
    import comfy.ldm.qwen_image.model as m

    params = {"in_channels": 64, "num_layers": 2, "attention_head_dim": 32,  # patch 2, 16 out: the defaults
              "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM, "axes_dims_rope": (8, 12, 12)}
    net = m.QwenImageTransformer2DModel(operations=_ops(), **params)
    return TinyModel("qwen-image", _randomize(net, seed), params, "qwen_image")


def text_extras(tiny: TinyModel, tokens: int, generator: torch.Generator) -> dict:
    """The CONDITIONING extras ComfyUI's own text encoders give the family: a pooled CLIP vector (Flux, SD3),
    ``pooled_output = None`` (Chroma's T5 alone), the token mask (Lumina2's Gemma; 0.3.64's Lumina2 reads
    the caption length from it)."""
    if tiny.pooled:
        return {"pooled_output": torch.randn(1, POOLED_DIM, generator=generator)}
    if tiny.family == "chroma":
        return {"pooled_output": None}
    if tiny.family == "lumina2":
        return {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}
    return {}


BUILDERS = {
    "flux-dev": lambda: flux(True),
    "flux-schnell": lambda: flux(False),
    "sd3": sd3,
    "sd3.5-medium": sd35_medium,
    "chroma": chroma,
    "lumina2": lumina2,
    "qwen-image": qwen_image,
}


@contextlib.contextmanager
def told_sizes(tiny: TinyModel):
    """While loading ``tiny``: ComfyUI's ``detect_unet_config`` runs as is, must name the family's image model,
    and gets the tiny config's fields it answered differently (or not at all) on top; nothing else."""
    import comfy.model_detection as md

    real = md.detect_unet_config

    def detect(state_dict, key_prefix, *args, **kwargs):
        config = real(state_dict, key_prefix, *args, **kwargs)
        if config is None:
            return config
        if tiny.image_model is not None:
            assert config.get("image_model") == tiny.image_model, (config, tiny.image_model)
        tiny.told = {k: v for k, v in tiny.config.items() if k not in config or _differs(config[k], v)}
        return {**config, **tiny.told}

    md.detect_unet_config = detect
    try:
        yield
    finally:
        md.detect_unet_config = real


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) != list(b)
    return a != b


def load(tiny: TinyModel, dtype: torch.dtype = torch.float32):
    """The ModelPatcher ComfyUI's Load Diffusion Model path makes of ``tiny`` (CPU; ``dtype``: its weight_dtype,
    e.g. torch.float8_e4m3fn, with which ComfyUI stores the weights in fp8 and casts them per operation)."""
    import comfy.sd

    with told_sizes(tiny):
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(tiny.state_dict), model_options={"dtype": dtype})
    if patcher is None:
        raise AssertionError(f"ComfyUI did not recognise the tiny {tiny.family} state dict")
    return patcher


# --------------------------------------------------------------------------------------------------------------
# Stand-ins for the graph's CLIP and VAE (the tiny diffusion models read 64-wide text and 16/64-channel latents,
# which no real text encoder or VAE of ComfyUI's gives at a test's size). They keep ComfyUI's interfaces: CLIP's
# tokenize / encode_from_tokens_scheduled returning a CONDITIONING, VAE's encode(IMAGE) / decode(latent) and its
# first_stage_model. Deterministic: the same text or image gives the same tensors.
# --------------------------------------------------------------------------------------------------------------
class StandInClip:
    """Each word a fixed random CONTEXT_DIM vector (seeded by its bytes), the family's extras as its real
    encoders give them (:func:`text_extras`; the pooled vector is the mean word vector's first POOLED_DIM)."""

    def __init__(self, tiny: TinyModel):
        import comfy.model_patcher

        self.tiny = tiny
        self.calls = 0
        # what ComfyUI loads and unloads for a CLIP: a ModelPatcher around its encoder (here a stand-in module)
        self.patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(CONTEXT_DIM, CONTEXT_DIM),
                                                        load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))

    def tokenize(self, text):
        words = text.split() or [""]
        return {"words": [[(w, 1.0) for w in words]]}

    def _vector(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(word.encode()[:7].ljust(7, b"\0"), "little") + len(word)
        return torch.randn(CONTEXT_DIM, generator=torch.Generator().manual_seed(seed))

    def encode_from_tokens_scheduled(self, tokens):
        self.calls += 1
        words = [w for w, _ in tokens["words"][0]]
        cond = torch.stack([self._vector(w) for w in words])[None]
        extras = text_extras(self.tiny, cond.shape[1], torch.Generator().manual_seed(0))
        if extras.get("pooled_output") is not None:
            extras["pooled_output"] = cond.mean(1)[:, :POOLED_DIM].clone()
        return [[cond, extras]]


class StandInVae:
    """An 8x-downscaling linear 'VAE' with ComfyUI's VAE interface: IMAGE [B, H, W, 3] in [0, 1] -> latents
    [B, C, H/8, W/8] (a fixed random 3*64 -> C projection of each 8x8 patch; [B, C, 1, h, w] for a 3-D latent
    format) and back (the pseudo-inverse)."""

    def __init__(self, channels: int, dimensions: int = 2, seed: int = 0):
        self.first_stage_model = torch.nn.Linear(3 * 64, channels, bias=False)
        with torch.no_grad():
            self.first_stage_model.weight.copy_(torch.randn(channels, 3 * 64, generator=torch.Generator().manual_seed(seed)) / 8)
        self.dimensions = dimensions
        self.encodes = 0

    def encode(self, pixels):
        self.encodes += 1
        b, h, w, _ = pixels.shape
        patches = pixels[..., :3].float().reshape(b, h // 8, 8, w // 8, 8, 3).permute(0, 1, 3, 2, 4, 5)
        latent = self.first_stage_model(patches.reshape(b, h // 8, w // 8, 3 * 64)).permute(0, 3, 1, 2)
        return latent.unsqueeze(2) if self.dimensions == 3 else latent

    def decode(self, latent):
        if latent.dim() == 5:
            latent = latent[:, :, 0]
        b, c, h, w = latent.shape
        inverse = torch.linalg.pinv(self.first_stage_model.weight.float())
        patches = (latent.permute(0, 2, 3, 1).float() @ inverse.T).reshape(b, h, w, 8, 8, 3)
        return patches.permute(0, 1, 3, 2, 4, 5).reshape(b, h * 8, w * 8, 3).clamp(0, 1)


def apply_lora_file(comfy_lib, patcher, lora: dict, clip=None):
    """``lora`` (a written file's tensors) applied to ``patcher`` (and ``clip``) by ComfyUI's own
    ``load_lora_for_models`` at strength 1, with nothing logged as not loaded (asserted); the patched model as a
    prepared ComfyBaseModel, whose ``patcher.patches`` are what ComfyUI patched."""
    from comfyui_lora_trainer.nodes.comfy_model import ComfyBaseModel

    with unloaded_lora_keys() as not_loaded:
        patched, _ = comfy_lib.sd.load_lora_for_models(patcher, clip, lora, 1.0, 1.0 if clip is not None else 0.0)
    assert not not_loaded, not_loaded[:5]
    provider = ComfyBaseModel(patched, clip)
    provider.prepare()
    return provider


@contextlib.contextmanager
def unloaded_lora_keys():
    """Yields a list that collects what ComfyUI's LoRA loading logs as not loaded ("lora key not loaded: ...",
    "... NOT LOADED") while the block runs."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "lora key not loaded" in message or "NOT LOADED" in message:
                found.append(message)

    handler = Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield found
    finally:
        logging.getLogger().removeHandler(handler)


def _unet_patcher(config_class: str, unet_config: dict, seed: int, state_dict_hint: dict | None = None):
    """A tiny UNet model as ComfyUI holds one: its own model config class (``comfy.supported_models``) and
    BaseModel around a 2-level UNet with seeded random weights, in a ModelPatcher on the CPU. ComfyUI's detection
    would not name a UNet this small (it matches the full models' channel counts and context widths), so the
    config class is picked here; everything after is ComfyUI's (``state_dict_hint``: the keys its
    ``model_type`` reads to choose eps or v)."""
    import comfy.model_patcher
    import comfy.supported_models

    base = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
        "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": CONTEXT_DIM,
        "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    config = getattr(comfy.supported_models, config_class)({**base, **unet_config})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state_dict_hint or {}, "")
    model.diffusion_model.load_state_dict(_randomize(model.diffusion_model, seed))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def sdxl_patcher(seed: int = 0):
    """A tiny SDXL (comfy.supported_models.SDXL / comfy.model_base.SDXL: eps, the size-conditioned ADM vector);
    reads a CONTEXT_DIM-wide context and a POOLED_DIM pooled vector (StandInClip)."""
    return _unet_patcher("SDXL", {"model_channels": 32, "num_head_channels": 16, "num_classes": "sequential",
                                  "adm_in_channels": POOLED_DIM + 6 * 256}, seed)


def sd2_patcher(v_prediction: bool, seed: int = 0):
    """A tiny SD2.x (comfy.supported_models.SD20), v-prediction (SD2.x 768-v) or eps (512-base), as ComfyUI's
    own SD20.model_type picks it: from the spread of the last output block's norm bias (given here)."""
    hint = {"output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.linspace(-1, 1, 8) if v_prediction
            else torch.zeros(8)}
    return _unet_patcher("SD20", {"model_channels": 64}, seed, hint)


def z_image_patcher(seed: int = 0):
    """A tiny Z-Image (ComfyUI 0.33's comfy.supported_models.ZImage: Lumina2's NextDiT with z_image_modulation,
    time_scale 1000, rope theta 256), or None where the ComfyUI version has no Z-Image (0.3.64 predates it).
    Detection names a NextDiT Z-Image by its 3840 width alone, so the config class is picked here (as for the
    UNets); the width is 256, the least its 256-wide modulation input allows. Reads CONTEXT_DIM-wide captions."""
    import comfy.model_patcher
    import comfy.supported_models

    if not hasattr(comfy.supported_models, "ZImage"):
        return None
    config = comfy.supported_models.ZImage({
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
        "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
        "qk_norm": True, "cap_feat_dim": CONTEXT_DIM})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    model.diffusion_model.load_state_dict(_randomize(model.diffusion_model, seed))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
