"""Text and image conditioning for the supported families."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor            # [B, 77, ctx] (152 / 227 with max_token_length)
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


MAX_TOKEN_LENGTHS = (75, 150, 225)


def tokenize_chunks(tokenizer, captions: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids [B, n, 77]: kohya's long captions (``max_token_length`` 150 / 225 -> n = 2 / 3).

    The caption is tokenized to ``max_token_length + 2`` ids (BOS, text, EOS, padding) and cut into
    75-token windows, each wrapped in the BOS and the last id (EOS or padding), as kohya's
    ``TokenizeStrategy._get_input_ids`` does; for zero-padded tokenizers (SD2, SDXL's second) a window
    that ends in text gets an EOS and one that starts with padding an EOS first. 75 gives [B, 1, 77].
    """
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, not {max_token_length!r}")
    if max_token_length == 75:
        return tokenize(tokenizer, captions).unsqueeze(1)
    window = 77
    ids = tokenizer(list(captions), padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for row in ids:
        chunks = []
        for i in range(1, max_token_length + 2 - window + 2, window - 2):
            chunk = torch.cat([row[:1], row[i:i + window - 2], row[-1:]])
            if pad != eos:
                if chunk[-2] != eos and chunk[-2] != pad:
                    chunk[-1] = eos
                if chunk[1] == pad:
                    chunk[1] = eos
            chunks.append(chunk)
        rows.append(torch.stack(chunks))
    return torch.stack(rows)


def merge_chunks(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """[B*n, 77, D] per-window states -> [B, 1 + 75n + 1, D]: the first window's BOS, every window's 75 text
    positions, the last window's final position (kohya's ``encode_tokens``: 152 for 150, 227 for 225)."""
    if n == 1:
        return hidden
    window = hidden.shape[1]
    h = hidden.reshape(hidden.shape[0] // n, n * window, hidden.shape[-1])
    parts = [h[:, :1]] + [h[:, i:i + window - 2] for i in range(1, n * window, window)] + [h[:, -1:]]
    return torch.cat(parts, dim=1)


def _final_layer_norm(te):
    ln = getattr(te, "final_layer_norm", None)
    if ln is None:
        ln = te.text_model.final_layer_norm
    return ln


def encode_prompts(base, captions: list[str], sizes=None, max_token_length: int = 75) -> Conditioning:
    """Encode captions the way ComfyUI/kohya condition each family.

    sd1: last hidden state of CLIP-L. sd2/sd2-v: penultimate layer + final_layer_norm. sdxl: penultimate
    hidden states of TE1 and TE2 (no final norm) concatenated, pooled projected TE2 output as text_embeds and
    time_ids from ``sizes`` = [(orig_h, orig_w, crop_top, crop_left, target_h, target_w)] per caption (one
    tuple is broadcast; default: square at base.default_resolution, no crop). Grad flows when enabled.
    ``max_token_length`` 150 / 225 encodes 2 / 3 windows of 75 tokens (``tokenize_chunks``) and joins them
    (``merge_chunks``): 152 / 227 positions; SDXL's pooled embedding comes from the first window, as in kohya.
    """
    captions = [c if isinstance(c, str) else str(c) for c in captions]
    if not captions:
        raise ValueError("encode_prompts needs at least one caption")
    fam = base.family

    def ids_for(tokenizer, te):
        ids = tokenize_chunks(tokenizer, captions, max_token_length)
        return ids.reshape(-1, ids.shape[-1]).to(_device(te)), ids.shape[1]

    if fam == "sd1":
        te, tok = base.text_encoders[0], base.tokenizers[0]
        ids, n = ids_for(tok, te)
        return Conditioning(merge_chunks(te(ids).last_hidden_state, n), None)
    if fam in ("sd2", "sd2-v"):
        te, tok = base.text_encoders[0], base.tokenizers[0]
        ids, n = ids_for(tok, te)
        if getattr(base, "te_last_layer_dropped", False):
            return Conditioning(merge_chunks(te(ids).last_hidden_state, n), None)
        out = te(ids, output_hidden_states=True)
        return Conditioning(merge_chunks(_final_layer_norm(te)(out.hidden_states[-2]), n), None)
    if fam == "sdxl":
        te1, te2 = base.text_encoders
        ids1, n = ids_for(base.tokenizers[0], te1)
        ids2, _ = ids_for(base.tokenizers[1], te2)
        h1 = merge_chunks(te1(ids1, output_hidden_states=True).hidden_states[-2], n)
        o2 = te2(ids2, output_hidden_states=True)
        h2 = merge_chunks(o2.hidden_states[-2], n)
        pooled = o2.text_embeds[::n]
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
