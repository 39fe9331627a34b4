"""Tiny random models (tests, CPU smoke runs) and reduced "ComfyUI-detectable" random checkpoints.

Tiny models use exactly the architecture constants of their family (GroupNorm(32), the family's
attention-head rule, activations), only smaller widths/depths, so a written tiny checkpoint goes through
the same shape-inference path as a real one.
"""
from __future__ import annotations

import os

import torch

from .families import FAMILIES, family_config
from .loader import BaseModel, apply_tokenizer_padding, make_scheduler, make_text_encoder, make_unet, make_vae, \
    tiny_tokenizer_dir, write_checkpoint

TINY_VOCAB_SIZE = 546  # len(tiny_tokenizer)


# per family: UNet widths/levels/depths, VAE, text encoders (hidden, layers, intermediate[, projection])
_TINY = {
    "sd1": dict(block_out_channels=[32, 64], attention=[True, False], layers_per_block=1, depth=[1, 1],
                te=[dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)]),
    "sd2": dict(block_out_channels=[32, 64], attention=[False, True], layers_per_block=1, depth=[1, 1],
                te=[dict(hidden_size=64, num_hidden_layers=3, intermediate_size=128)]),
    "sdxl": dict(block_out_channels=[32, 64], attention=[False, True], layers_per_block=1, depth=[1, 2],
                 addition_time_embed_dim=8,
                 te=[dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128),
                     dict(hidden_size=128, num_hidden_layers=3, intermediate_size=256, projection_dim=128)]),
}
_TINY["sd2-v"] = _TINY["sd2"]
_TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)

# ComfyUI-detectable reduced models: real widths (model_channels 320, real text encoders, real VAE),
# fewer UNet levels/blocks.
_REDUCED = {
    "sd1": dict(block_out_channels=[320, 640], attention=[True, False], layers_per_block=1, depth=[1, 1]),
    "sd2": dict(block_out_channels=[320, 640], attention=[True, False], layers_per_block=1, depth=[1, 1]),
    "sdxl": dict(block_out_channels=[320, 640], attention=[False, True], layers_per_block=1, depth=[1, 2]),
}
_REDUCED["sd2-v"] = _REDUCED["sd2"]


def _unet_config(fam: dict, spec: dict, cross_dim: int, pooled_dim: int | None, sample_size: int) -> dict:
    cfg = dict(fam["unet"])
    ch = list(spec["block_out_channels"])
    attn = list(spec["attention"])
    heads = fam["unet_heads"]
    head_cfg = heads["num_heads"] if "num_heads" in heads else [max(1, c // heads["head_channels"]) for c in ch]
    depth = list(spec["depth"])
    cfg.update(block_out_channels=ch, layers_per_block=spec["layers_per_block"],
               down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
               up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
               cross_attention_dim=cross_dim, attention_head_dim=head_cfg,
               transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
               sample_size=sample_size, time_embedding_dim=None)
    if fam["family"] == "sdxl":
        t = int(spec.get("addition_time_embed_dim", cfg["addition_time_embed_dim"]))
        cfg.update(addition_time_embed_dim=t, projection_class_embeddings_input_dim=pooled_dim + 6 * t)
    return cfg


def _build(family: str, spec: dict, vae_spec: dict | None, seed: int, default_resolution: int, tiny: bool,
           perturb: bool):
    from transformers import CLIPTokenizer
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    fam = family_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tes = []
        te_cfgs = []
        for i, entry in enumerate(fam["text_encoders"]):
            cfg = dict(entry["config"])
            te_spec = spec.get("te")
            if te_spec is not None:
                cfg.update(te_spec[i])
                cfg["num_attention_heads"] = cfg["hidden_size"] // int(entry["head_channels"])
            if "vocab_size" in spec:
                cfg["vocab_size"] = spec["vocab_size"]
            te_cfgs.append(cfg)
            tes.append(make_text_encoder(entry["class"], cfg))
        cross = sum(c["hidden_size"] for c in te_cfgs)
        pooled = te_cfgs[-1]["projection_dim"] if family == "sdxl" else None
        vcfg = dict(fam["vae"])
        if vae_spec:
            n = len(vae_spec["block_out_channels"])
            vcfg.update(block_out_channels=list(vae_spec["block_out_channels"]),
                        layers_per_block=vae_spec["layers_per_block"],
                        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
        vcfg["sample_size"] = default_resolution
        vsf = 2 ** (len(vcfg["block_out_channels"]) - 1)
        ucfg = _unet_config(fam, spec, cross, pooled, default_resolution // vsf)
        unet = make_unet(ucfg)
        vae = make_vae(vcfg)
        if perturb:
            # make every tensor distinct (norm weights/biases are all ones/zeros at init), so name-mapping
            # mistakes cannot hide behind equal values
            for m in [unet, vae] + tes:
                with torch.no_grad():
                    for p in m.parameters():
                        if p.ndim == 1:
                            p.add_(torch.randn_like(p) * 0.05)
    for m in [unet, vae] + tes:
        m.eval()
    toks = []
    for entry in fam["text_encoders"]:
        tok = CLIPTokenizer.from_pretrained(tiny_tokenizer_dir(), local_files_only=True)
        toks.append(apply_tokenizer_padding(tok, entry["pad"]))
    pred = fam["prediction_type"]
    return BaseModel(family=family, unet=unet, vae=vae, text_encoders=tes, tokenizers=toks,
                     noise_scheduler=make_scheduler(fam, pred), prediction_type=pred, source="<memory>",
                     default_resolution=default_resolution, is_tiny=tiny)


def build_tiny_components(family: str = "sd1", seed: int = 0):
    """Tiny random BaseModel for ``family`` (CPU, well under a second; UNet < 2M params, 64 px default)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    spec = dict(_TINY[family], vocab_size=TINY_VOCAB_SIZE)
    return _build(family, spec, _TINY_VAE, seed, 64, tiny=True, perturb=True)


def build_components(family: str = "sd1", seed: int = 0, **size_overrides):
    """Random model with the family's real widths (model_channels 320, full text encoder(s), full VAE) but a
    reduced UNet (default block_out_channels (320, 640), layers_per_block 1), so ComfyUI detects an SD1.5
    checkpoint from it. Overrides: block_out_channels, attention (per level bools), layers_per_block, depth
    (per-level transformer depth), te (list of CLIPTextConfig overrides per encoder), vocab_size,
    vae_block_out_channels, vae_layers_per_block, default_resolution, addition_time_embed_dim.
    Uses the bundled tiny tokenizer (its ids fit the real 49408-token vocabulary)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    spec = dict(_REDUCED[family])
    vae_spec = None
    o = dict(size_overrides)
    if "vae_block_out_channels" in o or "vae_layers_per_block" in o:
        base_vae = family_config(family)["vae"]
        vae_spec = dict(block_out_channels=o.pop("vae_block_out_channels", base_vae["block_out_channels"]),
                        layers_per_block=o.pop("vae_layers_per_block", base_vae["layers_per_block"]))
    res = int(o.pop("default_resolution", family_config(family)["default_resolution"]))
    if "block_out_channels" in o and "attention" not in o:
        n = len(o["block_out_channels"])
        o["attention"] = ([False] + [True] * (n - 1)) if family == "sdxl" else ([True] * (n - 1) + [False])
    if "block_out_channels" in o and "depth" not in o:
        o["depth"] = [1] * len(o["block_out_channels"])
    unknown = set(o) - {"block_out_channels", "attention", "layers_per_block", "depth", "te", "vocab_size",
                        "addition_time_embed_dim"}
    if unknown:
        raise TypeError(f"unknown size overrides: {sorted(unknown)}")
    spec.update(o)
    return _build(family, spec, vae_spec, seed, res, tiny=False, perturb=False)


def write_tiny_checkpoint(path, family: str = "sd1", seed: int = 0) -> str:
    """Write a tiny random single-file checkpoint (LDM/SAI layout) for ``family``; returns the path."""
    path = os.fspath(path)
    write_checkpoint(build_tiny_components(family, seed), path)
    return path
