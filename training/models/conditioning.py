"""Text and image conditioning for the supported families."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor            # [B, 77, ctx]
    added_cond_kwargs: dict | None = None          # SDXL: {"text_embeds": pooled [B, proj], "time_ids": [B, 6]}

    def to(self, device=None, dtype=None) -> "Conditioning":
        ehs = self.encoder_hidden_states.to(device=device, dtype=dtype)
        add = None
        if self.added_cond_kwargs is not None:
            add = {k: v.to(device=device, dtype=dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(ehs, add)

    def __len__(self) -> int:
        return int(self.encoder_hidden_states.shape[0])


def _device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [B, 77] with the tokenizer's own (family) padding token."""
    enc = tokenizer(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return enc.input_ids


def _final_layer_norm(te):
    ln = getattr(te, "final_layer_norm", None)
    if ln is None:
        ln = te.text_model.final_layer_norm
    return ln


def encode_prompts(base, captions: list[str], sizes=None) -> Conditioning:
    """Encode captions the way ComfyUI/kohya condition each family.

    sd1: last hidden state of CLIP-L. sd2/sd2-v: penultimate layer + final_layer_norm. sdxl: penultimate
    hidden states of TE1 and TE2 (no final norm) concatenated, pooled projected TE2 output as text_embeds and
    time_ids from ``sizes`` = [(orig_h, orig_w, crop_top, crop_left, target_h, target_w)] per caption (one
    tuple is broadcast; default: square at base.default_resolution, no crop). Grad flows when enabled.
    """
    captions = [c if isinstance(c, str) else str(c) for c in captions]
    if not captions:
        raise ValueError("encode_prompts needs at least one caption")
    fam = base.family
    if fam == "sd1":
        te, tok = base.text_encoders[0], base.tokenizers[0]
        ids = tokenize(tok, captions).to(_device(te))
        return Conditioning(te(ids).last_hidden_state, None)
    if fam in ("sd2", "sd2-v"):
        te, tok = base.text_encoders[0], base.tokenizers[0]
        ids = tokenize(tok, captions).to(_device(te))
        if getattr(base, "te_last_layer_dropped", False):
            return Conditioning(te(ids).last_hidden_state, None)
        out = te(ids, output_hidden_states=True)
        return Conditioning(_final_layer_norm(te)(out.hidden_states[-2]), None)
    if fam == "sdxl":
        te1, te2 = base.text_encoders
        ids1 = tokenize(base.tokenizers[0], captions).to(_device(te1))
        ids2 = tokenize(base.tokenizers[1], captions).to(_device(te2))
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids2, output_hidden_states=True)
        h2 = o2.hidden_states[-2]
        pooled = o2.text_embeds
        ehs = torch.cat([h1, h2.to(h1.device, h1.dtype)], dim=-1)
        b = len(captions)
        if sizes is None:
            r = int(base.default_resolution)
            sizes = [(r, r, 0, 0, r, r)]
        sizes = [tuple(int(x) for x in s) for s in sizes]
        if any(len(s) != 6 for s in sizes):
            raise ValueError("sizes entries must be (orig_h, orig_w, crop_top, crop_left, target_h, target_w)")
        if len(sizes) == 1 and b > 1:
            sizes = sizes * b
        if len(sizes) != b:
            raise ValueError(f"got {len(sizes)} sizes for {b} captions")
        time_ids = torch.tensor(sizes, dtype=ehs.dtype, device=ehs.device)
        return Conditioning(ehs, {"text_embeds": pooled.to(ehs.device), "time_ids": time_ids})
    raise ValueError(f"unknown family {fam!r}")


def encode_images(base, pixels: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
    """VAE-encode pixels [B,3,H,W] in [-1, 1] -> latents * vae.config.scaling_factor.

    Samples the latent distribution (kohya behaviour); sample=False returns its mean.
    """
    vae = base.vae
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels [B,3,H,W], got {tuple(pixels.shape)}")
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if pixels.shape[-1] % f or pixels.shape[-2] % f:
        raise ValueError(f"image size {tuple(pixels.shape[-2:])} must be a multiple of {f}")
    p = pixels.to(device=_device(vae), dtype=vae.dtype)
    dist = vae.encode(p).latent_dist
    lat = dist.sample(generator=generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        lat = lat - shift
    return lat * vae.config.scaling_factor
