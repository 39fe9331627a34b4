"""BaseModel, offline loading of single-file (LDM/SAI) checkpoints and diffusers folders, and writing
single-file checkpoints.

Sizes are inferred from tensor shapes; the shipped configs/*.json only provide what shapes cannot tell
(norm groups, attention-head rule, activations, scheduler, prediction type, VAE scaling factor).
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..formats.ldm_names import (
    UNET_PREFIX,
    VAE_PREFIX,
    from_ldm,
    text_encoder_key_map,
    to_ldm,
    unet_key_map,
    vae_key_map,
)
from ..formats.safetensors_io import write_atomically
from .families import (
    ARCH_METADATA_KEY,
    FAMILIES,
    SD1_TE_PREFIX,
    UnsupportedModelError,
    detect_family,
    family_config,
    sd2_v_from_yaml,
)

logger = logging.getLogger(__name__)

PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class BaseModel:
    family: str                       # "sd1" | "sd2" | "sd2-v" | "sdxl"
    unet: Any                         # diffusers UNet2DConditionModel
    vae: Any                          # diffusers AutoencoderKL
    text_encoders: list               # [CLIPTextModel] or [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list                  # CLIPTokenizer per text encoder (model_max_length 77, family padding)
    noise_scheduler: Any              # DDPMScheduler with the family's prediction_type
    prediction_type: str              # "epsilon" | "v_prediction"
    source: str                       # path it was loaded from ("<memory>" when built)
    default_resolution: int           # 512 sd1/sd2, 768 sd2-v, 1024 sdxl (tiny models: 64)
    # extras (not in the contract's required fields)
    is_tiny: bool = False
    # True for a diffusers SD2 folder whose 23-layer text encoder already dropped OpenCLIP's last layer:
    # then its last hidden state (after final_layer_norm) *is* the penultimate-layer conditioning.
    te_last_layer_dropped: bool = False
    metadata: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------ shape inference
def _idx_set(keys, prefix: str) -> list[int]:
    out = set()
    n = len(prefix)
    for k in keys:
        if k.startswith(prefix):
            head = k[n:].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _count(keys, prefix: str) -> int:
    idx = _idx_set(keys, prefix)
    if idx and idx != list(range(len(idx))):
        raise ValueError(f"non-contiguous block indices under {prefix!r}: {idx}")
    return len(idx)


def _sub(shapes: Mapping[str, tuple], prefix: str) -> dict[str, tuple]:
    n = len(prefix)
    return {k[n:]: v for k, v in shapes.items() if k.startswith(prefix)}


def infer_unet_config(u: Mapping[str, tuple], fam: dict, te_projection_dim: int | None = None) -> dict:
    """UNet2DConditionModel config from LDM UNet key shapes (keys without "model.diffusion_model.")."""
    cfg = dict(fam["unet"])
    w = u["input_blocks.0.0.weight"]
    c0, in_ch = int(w[0]), int(w[1])
    keys = list(u)
    n_in = _count(keys, "input_blocks.")
    ops = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in u]
    L = ops[0] - 1 if ops else n_in - 1
    nlev = len(ops) + 1
    if L < 1 or ops != [(i + 1) * (L + 1) for i in range(nlev - 1)] or n_in != nlev * (L + 1):
        raise ValueError(f"unexpected UNet block layout: {n_in} input blocks, downsamplers at {ops}")
    first = [1 + i * (L + 1) for i in range(nlev)]
    channels = [int(u[f"input_blocks.{b}.0.out_layers.3.weight"][0]) for b in first]
    attn = [f"input_blocks.{b}.1.proj_in.weight" in u for b in first]
    depth = [_count(keys, f"input_blocks.{b}.1.transformer_blocks.") for b in first]
    n_out = _count(keys, "output_blocks.")
    if n_out != nlev * (L + 1):
        raise ValueError(f"unexpected UNet block layout: {n_out} output blocks for {nlev} levels x {L + 1}")
    if "middle_block.1.proj_in.weight" not in u:
        raise UnsupportedModelError("UNet without a middle-block transformer is not supported")
    mid_depth = _count(keys, "middle_block.1.transformer_blocks.")
    tl = [d if a else None for d, a in zip(depth, attn)]
    if tl[-1] is None:
        tl[-1] = mid_depth
    elif tl[-1] != mid_depth:
        raise UnsupportedModelError(f"middle-block transformer depth {mid_depth} differs from the last level's {tl[-1]}")
    tl = [1 if t is None else t for t in tl]
    ctx = None
    linear = None
    for b, a in zip(first, attn):
        if a:
            ctx = int(u[f"input_blocks.{b}.1.transformer_blocks.0.attn2.to_k.weight"][1])
            linear = len(u[f"input_blocks.{b}.1.proj_in.weight"]) == 2
            break
    if ctx is None:
        ctx = int(u["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1])
        linear = len(u["middle_block.1.proj_in.weight"]) == 2
    heads = fam["unet_heads"]
    if "num_heads" in heads:
        head_cfg: Any = int(heads["num_heads"])
        for c in channels:
            if c % head_cfg:
                raise ValueError(f"UNet width {c} is not divisible by the family's {head_cfg} attention heads")
    else:
        hc = int(heads["head_channels"])
        head_cfg = [max(1, c // hc) for c in channels]
        for c, a in zip(channels + [channels[-1]], attn + [True]):
            if a and c % hc:
                raise ValueError(f"UNet width {c} is not a multiple of the family's attention head size {hc}")
    cfg.update(
        in_channels=in_ch,
        out_channels=int(u["out.2.weight"][0]),
        block_out_channels=channels,
        layers_per_block=L,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        cross_attention_dim=ctx,
        use_linear_projection=linear,
        attention_head_dim=head_cfg,
        transformer_layers_per_block=tl[0] if len(set(tl)) == 1 else tl,
    )
    te_dim = int(u["time_embed.0.weight"][0])
    cfg["time_embedding_dim"] = None if te_dim == 4 * c0 else te_dim
    if "label_emb.0.0.weight" in u:
        adm = int(u["label_emb.0.0.weight"][1])
        if te_projection_dim is None or (adm - te_projection_dim) % 6 or adm <= te_projection_dim:
            raise ValueError(f"cannot split SDXL size-conditioning input width {adm} (pooled width {te_projection_dim})")
        cfg["projection_class_embeddings_input_dim"] = adm
        cfg["addition_time_embed_dim"] = (adm - te_projection_dim) // 6
    return cfg


def infer_vae_config(v: Mapping[str, tuple], fam: dict) -> dict:
    cfg = dict(fam["vae"])
    keys = list(v)
    n = _count(keys, "encoder.down.")
    if n == 0:
        raise ValueError("no VAE encoder blocks")
    channels = [int(v[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in range(n)]
    cfg.update(
        in_channels=int(v["encoder.conv_in.weight"][1]),
        out_channels=int(v["decoder.conv_out.weight"][0]),
        latent_channels=int(v["encoder.conv_out.weight"][0]) // 2,
        block_out_channels=channels,
        layers_per_block=_count(keys, "encoder.down.0.block."),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in v,
        use_quant_conv="quant_conv.weight" in v,
        use_post_quant_conv="post_quant_conv.weight" in v,
    )
    return cfg


def infer_te_config(t: Mapping[str, tuple], entry: dict) -> dict:
    """CLIPTextConfig kwargs from the encoder's key shapes (keys relative to its LDM prefix)."""
    cfg = dict(entry["config"])
    keys = list(t)
    if entry["layout"] == "hf_clip":
        vocab, hidden = t["text_model.embeddings.token_embedding.weight"]
        maxpos = t["text_model.embeddings.position_embedding.weight"][0]
        layers = _count(keys, "text_model.encoder.layers.")
        inter = t["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        proj = t["text_projection.weight"][0] if "text_projection.weight" in t else None
    else:
        vocab, hidden = t["token_embedding.weight"]
        maxpos = t["positional_embedding"][0]
        layers = _count(keys, "transformer.resblocks.")
        inter = t["transformer.resblocks.0.mlp.c_fc.weight"][0]
        proj = t["text_projection"][1] if "text_projection" in t else None
    hc = int(entry["head_channels"])
    if hidden % hc:
        raise ValueError(f"text-encoder width {hidden} is not a multiple of the head size {hc}")
    cfg.update(vocab_size=int(vocab), hidden_size=int(hidden), max_position_embeddings=int(maxpos),
               num_hidden_layers=int(layers), intermediate_size=int(inter), num_attention_heads=int(hidden) // hc)
    if entry["class"] == "CLIPTextModelWithProjection":
        if proj is None:
            raise ValueError("text_projection missing")
        cfg["projection_dim"] = int(proj)
    elif proj is not None:
        cfg["projection_dim"] = int(proj)
    return cfg


# ------------------------------------------------------------------ component construction
def make_unet(cfg: dict):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_config(cfg)


def make_vae(cfg: dict):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_config(cfg)


def make_text_encoder(class_name: str, cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "_name_or_path")}
    conf = CLIPTextConfig(**kw)
    cls = CLIPTextModelWithProjection if class_name == "CLIPTextModelWithProjection" else CLIPTextModel
    return cls(conf)


def make_scheduler(fam: dict, prediction_type: str | None = None):
    from diffusers import DDPMScheduler
    cfg = dict(fam["scheduler"])
    if prediction_type:
        cfg["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(cfg)


def apply_tokenizer_padding(tok, pad: str):
    tok.model_max_length = 77
    if pad == "eos":
        tok.pad_token = tok.eos_token
    elif pad == "zero":
        tok.pad_token = tok.convert_ids_to_tokens(0)
    else:
        raise ValueError(pad)
    return tok


def _is_tokenizer_dir(d) -> bool:
    d = os.fspath(d)
    return os.path.isfile(os.path.join(d, "tokenizer.json")) or (
        os.path.isfile(os.path.join(d, "vocab.json")) and os.path.isfile(os.path.join(d, "merges.txt")))


def load_tokenizers(tokenizer_dir: str | list, fam: dict) -> list:
    from transformers import CLIPTokenizer
    dirs = tokenizer_dir if isinstance(tokenizer_dir, (list, tuple)) else [tokenizer_dir] * len(fam["text_encoders"])
    out = []
    for d, entry in zip(dirs, fam["text_encoders"]):
        if not _is_tokenizer_dir(d):
            raise ValueError(f"tokenizer folder {d!r} has no vocab.json + merges.txt or tokenizer.json (expected a "
                             f"CLIPTokenizer folder, e.g. ComfyUI's comfy/sd1_tokenizer)")
        tok = CLIPTokenizer.from_pretrained(d, model_max_length=77, local_files_only=True)
        out.append(apply_tokenizer_padding(tok, entry["pad"]))
    return out


# ------------------------------------------------------------------ reading files
def _safetensors_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a valid safetensors file, or truncated (header claims {n} bytes, "
                             f"file has {size}). Re-download or re-copy the file.")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e}). Re-download or re-copy the file.") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + (max(ends) if ends else 0)
    if size < need:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, the header needs {need}). "
                         f"Re-download or re-copy the file.")
    return header, n


def read_checkpoint(path: str, dtype=None) -> tuple[dict, dict]:
    """(state_dict, metadata) of a .safetensors file or a weights-only-loadable pickle."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in PICKLE_EXTS:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure
            raise ValueError(
                f"{path}: refusing to load this pickle checkpoint: it cannot be read with torch.load(weights_only=True) "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Convert it to .safetensors "
                f"with a tool you trust and load that instead.") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: pickle does not contain a state dict")
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if dtype is not None:
            sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        return sd, {}
    header, _ = _safetensors_header(path)
    from safetensors import safe_open
    sd = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                t = f.get_tensor(k)
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                sd[k] = t
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e}). "
                         f"Re-download or re-copy the file.") from None
    return sd, meta


def read_shapes(path: str) -> tuple[dict, dict]:
    """(key -> shape, metadata) of a .safetensors file without reading tensor data."""
    header, _ = _safetensors_header(path)
    meta = header.get("__metadata__", {}) or {}
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}, meta


# ------------------------------------------------------------------ loading
# keys that real checkpoints carry but no diffusers component uses
_IGNORED_PATTERNS = [
    r"^model_ema\.", r"^betas$", r"^alphas_cumprod(_prev)?$", r"^sqrt_.*", r"^log_one_minus_alphas_cumprod$",
    r"^posterior_.*", r"^logvar$", r"^lvlb_weights$", r"^first_stage_model\.loss\.", r"\.position_ids$",
    r"^cond_stage_model\.model\.text_projection$", r"\.logit_scale$", r"^cond_stage_model\.model\.visual\.",
    r"^conditioner\.embedders\.1\.model\.visual\.", r"^cond_stage_model\.model\.attn_mask$",
    r"\.attn_mask$", r"^model\.diffusion_model\.(scaled_fp8|__.*)$",
]
_IGNORED_RE = re.compile("|".join(_IGNORED_PATTERNS))


def _arch_hint(meta: Mapping[str, str]) -> dict:
    raw = meta.get(ARCH_METADATA_KEY)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


def _resolve_family(detected: str, requested: str | None, path: str) -> str:
    if requested is None:
        return detected
    if requested not in FAMILIES:
        raise ValueError(f"unknown family {requested!r}; expected one of {', '.join(FAMILIES)}")
    base = lambda f: "sd2" if f == "sd2-v" else f  # noqa: E731
    if base(requested) != base(detected):
        raise ValueError(f"{path}: family {requested!r} was requested but the checkpoint looks like {detected!r}")
    return requested


def _assign(model, sd: dict, what: str, path: str):
    """load_state_dict(assign=True) into a meta-initialised model; every parameter must be provided."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: {what} tensors do not match the inferred architecture; "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: {what} tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    bad = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if bad:
        raise ValueError(f"{path}: {what} parameters were left unloaded: {bad[:8]}")
    return model


def _empty(fn, *args):
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        return fn(*args)


def _tokenizer_beside(path: str) -> list[str] | None:
    d = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    for cand in (os.path.join(d, stem + "_tokenizer"), os.path.join(d, "tokenizer")):
        if os.path.isdir(cand) and _is_tokenizer_dir(cand):
            return [cand]
    return None


def tiny_tokenizer_dir() -> str:
    """The bundled tiny CLIP BPE tokenizer folder (byte-level vocab + a few merges, model_max_length 77)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer")


def _pick_tokenizers(tokenizer_dir, beside, is_tiny, fam, path):
    if tokenizer_dir is not None:
        src = tokenizer_dir
    elif beside:
        src = beside if len(beside) == len(fam["text_encoders"]) else beside[0]
    elif is_tiny:
        src = tiny_tokenizer_dir()
    else:
        raise ValueError(
            f"{path}: no CLIP tokenizer found. Pass tokenizer_dir= a CLIPTokenizer folder (inside ComfyUI: "
            f"comfy/sd1_tokenizer), or put a 'tokenizer' folder (vocab.json, merges.txt) beside the checkpoint.")
    return load_tokenizers(src, fam)


def _check_vocab(tokenizers, text_encoders, path):
    for tok, te in zip(tokenizers, text_encoders):
        if len(tok) > te.config.vocab_size:
            raise ValueError(f"{path}: the tokenizer has {len(tok)} tokens but the text encoder only "
                             f"{te.config.vocab_size}; wrong tokenizer folder?")


def move_module(module, device, dtype=None):
    """``module.to(device, dtype)``. diffusers' ModelMixin.to warns "modules ... should be kept in float32: []"
    on any dtype argument, also for models that keep no module in float32 (the list is empty); for those
    torch's own ``Module.to`` does the same cast without it."""
    if dtype is None:
        return module.to(device=device)
    if not getattr(module, "_keep_in_fp32_modules", None):
        return torch.nn.Module.to(module, device=device, dtype=dtype)
    return module.to(device=device, dtype=dtype)


def _finish(model, dtype, device):
    # tensors were already cast to ``dtype`` while reading; only move (diffusers warns on .to(dtype))
    model.to(device=device)
    model.eval()
    return model


def load_base_model(path, tokenizer_dir=None, family=None, dtype=torch.float32, device="cpu") -> BaseModel:
    """Load a single-file LDM/SAI checkpoint (.safetensors; .ckpt only if weights_only-loadable) or a
    diffusers folder, offline. See the module docstring."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_diffusers_folder(path, tokenizer_dir, family, dtype, device)
    sd, meta = read_checkpoint(path, dtype=dtype)
    # SD1 checkpoints without the "text_model." level (old transformers layout)
    for k in [k for k in sd if k.startswith(SD1_TE_PREFIX) and not k.startswith(SD1_TE_PREFIX + "text_model.")]:
        sd[SD1_TE_PREFIX + "text_model." + k[len(SD1_TE_PREFIX):]] = sd.pop(k)
    try:
        detected = detect_family(sd, meta)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None
    if detected == "sd2" and family is None:
        if sd2_v_from_yaml(path):
            detected = "sd2-v"
    fam_id = _resolve_family(detected, family, path)
    fam = family_config(fam_id)
    hint = _arch_hint(meta)
    is_tiny = bool(hint.get("tiny"))

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    used: set[str] = set()

    # text encoders first (SDXL UNet needs TE2's projection width)
    te_cfgs = []
    for entry in fam["text_encoders"]:
        sub = _sub(shapes, entry["ldm_prefix"])
        if not sub:
            raise ValueError(f"{path}: no text-encoder tensors under {entry['ldm_prefix']!r}")
        te_cfgs.append(infer_te_config(sub, entry))
    proj = te_cfgs[-1].get("projection_dim") if fam_id == "sdxl" else None
    unet_cfg = infer_unet_config(_sub(shapes, UNET_PREFIX), fam, proj)
    if not _sub(shapes, VAE_PREFIX):
        raise ValueError(f"{path}: no VAE tensors (first_stage_model.*); use a full checkpoint with a baked-in VAE")
    vae_cfg = infer_vae_config(_sub(shapes, VAE_PREFIX), fam)
    default_res = int(hint.get("default_resolution") or fam["default_resolution"])
    vsf = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    unet_cfg["sample_size"] = default_res // vsf
    vae_cfg["sample_size"] = default_res

    def load_part(make, cfg_args, key_map_fn, what):
        model = _empty(make, *cfg_args)
        kmap = key_map_fn(model.state_dict().keys())
        dsd, missing, u = from_ldm(sd, kmap)
        if missing:
            raise ValueError(f"{path}: {what} is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        used.update(u)
        return _finish(_assign(model, dsd, what, path), dtype, device)

    unet = load_part(make_unet, (unet_cfg,), lambda ks: unet_key_map(ks, unet_cfg), "UNet")
    vae = load_part(make_vae, (vae_cfg,), lambda ks: vae_key_map(ks, vae_cfg), "VAE")
    tes = []
    for i, (entry, cfg) in enumerate(zip(fam["text_encoders"], te_cfgs)):
        tes.append(load_part(make_text_encoder, (entry["class"], cfg),
                             lambda ks, e=entry: text_encoder_key_map(ks, e["layout"], e["ldm_prefix"]),
                             f"text encoder {i + 1}"))

    prefixes = (UNET_PREFIX, VAE_PREFIX) + tuple(e["ldm_prefix"] for e in fam["text_encoders"])
    leftover = [k for k in sd if k not in used and not _IGNORED_RE.search(k)]
    unexpected = [k for k in leftover if k.startswith(prefixes)]
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} unexpected tensor(s) for a {fam_id} checkpoint, e.g. "
                         f"{unexpected[:5]}; the file does not match the {fam_id} architecture")
    if leftover:
        logger.warning("%s: ignoring %d tensor(s) outside the model components, e.g. %s", path, len(leftover), leftover[:5])
    del sd

    tokenizers = _pick_tokenizers(tokenizer_dir, _tokenizer_beside(path), is_tiny, fam, path)
    _check_vocab(tokenizers, tes, path)
    pred = fam["prediction_type"]
    return BaseModel(family=fam_id, unet=unet, vae=vae, text_encoders=tes, tokenizers=tokenizers,
                     noise_scheduler=make_scheduler(fam, pred), prediction_type=pred, source=path,
                     default_resolution=default_res, is_tiny=is_tiny, metadata=dict(meta),
                     te_last_layer_dropped=bool(hint.get("te_last_layer_dropped", False)))


def _load_diffusers_folder(path, tokenizer_dir, family, dtype, device) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"{path}: a folder must be a diffusers model (model_index.json with unet/, vae/, "
                         f"text_encoder/ subfolders)")
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    for sub in ("unet", "vae", "text_encoder"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"{path}: diffusers folder has no {sub}/ subfolder")
    try:
        with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
            ucfg = json.load(f)
        with open(os.path.join(path, "text_encoder", "config.json"), encoding="utf-8") as f:
            tcfg = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: incomplete diffusers folder ({e})") from None
    sched_cfg = {}
    sp = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sp):
        with open(sp, encoding="utf-8") as f:
            sched_cfg = json.load(f)
    has_te2 = os.path.isdir(os.path.join(path, "text_encoder_2"))
    cls_name = index.get("_class_name", "")
    if ucfg.get("in_channels", 4) != 4:
        raise UnsupportedModelError(f"{path}: a UNet with {ucfg.get('in_channels')} input channels (inpainting/edit "
                                    f"model) is not supported yet")
    if "Refiner" in cls_name or (ucfg.get("addition_embed_type") == "text_time" and not has_te2):
        raise UnsupportedModelError(f"{path}: this looks like the SDXL refiner, which is not supported yet")
    if ucfg.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise UnsupportedModelError(f"{path}: {ucfg.get('_class_name')} models are not supported yet")
    if ucfg.get("addition_embed_type") == "text_time" and has_te2:
        detected = "sdxl"
    elif ucfg.get("addition_embed_type") or ucfg.get("class_embed_type"):
        raise UnsupportedModelError(f"{path}: an extra-conditioned UNet ({cls_name}) is not supported yet")
    elif tcfg.get("hidden_act") == "quick_gelu":
        detected = "sd1"
    else:
        detected = "sd2-v" if sched_cfg.get("prediction_type") == "v_prediction" else "sd2"
    if detected == "sdxl" and sched_cfg.get("prediction_type") == "v_prediction":
        raise UnsupportedModelError(f"{path}: SDXL v-prediction models are not supported yet")
    fam_id = _resolve_family(detected, family, path)
    fam = family_config(fam_id)
    kw = dict(torch_dtype=dtype, local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"), **kw)
        vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"), **kw)
        tes = [CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), **kw)]
        if fam_id == "sdxl":
            tes.append(CLIPTextModelWithProjection.from_pretrained(os.path.join(path, "text_encoder_2"), **kw))
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot load diffusers folder: {e}") from None
    for name, m in [("unet", unet), ("vae", vae)] + [(f"text_encoder{i}", t) for i, t in enumerate(tes)]:
        bad = [n for n, p in m.named_parameters() if p.device.type == "meta"]
        if bad:
            raise ValueError(f"{path}: {name} has unloaded parameters {bad[:5]}")
        _finish(m, dtype, device)
    if tokenizer_dir is None:
        subs = ["tokenizer", "tokenizer_2"][: len(tes)]
        cands = [os.path.join(path, s) for s in subs]
        if all(os.path.isdir(c) and _is_tokenizer_dir(c) for c in cands):
            tokenizer_dir = cands
    tokenizers = _pick_tokenizers(tokenizer_dir, None, False, fam, path)
    _check_vocab(tokenizers, tes, path)
    pred = fam["prediction_type"]
    scfg = dict(fam["scheduler"])
    for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "timestep_spacing",
              "rescale_betas_zero_snr"):
        if k in sched_cfg:
            scfg[k] = sched_cfg[k]
    scfg["prediction_type"] = pred
    dropped = fam_id in ("sd2", "sd2-v") and tes[0].config.num_hidden_layers == 23
    return BaseModel(family=fam_id, unet=unet, vae=vae, text_encoders=tes, tokenizers=tokenizers,
                     noise_scheduler=DDPMScheduler.from_config(scfg), prediction_type=pred, source=path,
                     default_resolution=int(fam["default_resolution"]), te_last_layer_dropped=dropped)


# ------------------------------------------------------------------ writing
def ldm_state_dict(base: BaseModel) -> dict[str, torch.Tensor]:
    """All components of ``base`` as one LDM/SAI-layout state dict."""
    fam = family_config(base.family)
    out: dict[str, torch.Tensor] = {}

    def plain(model, what):
        sd = model.state_dict()
        bad = [k for k in sd if "lora_" in k or ".base_layer." in k or "hada_" in k or "lokr_" in k]
        if bad:
            raise ValueError(f"{what} has adapter layers attached ({bad[0]}); remove or merge them before writing a checkpoint")
        return sd

    u = plain(base.unet, "UNet")
    out.update(to_ldm(u, unet_key_map(u.keys(), base.unet)))
    v = plain(base.vae, "VAE")
    out.update(to_ldm(v, vae_key_map(v.keys(), base.vae)))
    if len(base.text_encoders) != len(fam["text_encoders"]):
        raise ValueError(f"{base.family} needs {len(fam['text_encoders'])} text encoder(s), got {len(base.text_encoders)}")
    for i, (te, entry) in enumerate(zip(base.text_encoders, fam["text_encoders"])):
        t = plain(te, f"text encoder {i + 1}")
        out.update(to_ldm(t, text_encoder_key_map(t.keys(), entry["layout"], entry["ldm_prefix"])))
    return out


def write_checkpoint(base: BaseModel, path, overwrite: bool = True) -> None:
    """Save ``base`` as a single-file safetensors checkpoint in the LDM/SAI layout (atomic write; with
    ``overwrite=False`` an existing ``path`` raises FileExistsError)."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    fam = family_config(base.family)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in ldm_state_dict(base).items()}
    res = int(base.default_resolution)
    hint = {"family": base.family, "default_resolution": res, "tiny": bool(base.is_tiny)}
    if base.te_last_layer_dropped:
        hint["te_last_layer_dropped"] = True
    meta = {
        ARCH_METADATA_KEY: json.dumps(hint),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam["modelspec_architecture"],
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if base.family == "sdxl"
                                     else "diffusers"),
        "modelspec.title": os.path.splitext(os.path.basename(path))[0],
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon",
    }
    write_atomically(path, lambda tmp: save_file(sd, tmp, metadata=meta), overwrite=overwrite)
