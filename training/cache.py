"""Latent and text-embedding caches.

Latents: the VAE's distribution (mean and std, already scaled) per image, its mirror image too when
``flip`` is on, keyed by the image file's content, the VAE's weights, the training size and the crop. A
training sample draws its latent as ``mean + std * eps`` with eps from the sample's own generator, so the
cache does not depend on the seed. Entries live in memory (shared by runs in one process, e.g. ComfyUI,
up to ``MEMORY_LIMIT_BYTES``) and, with ``cache_latents = "disk"``, in ``cache_dir`` as safetensors files,
so a second run skips the VAE.

Text embeddings: per caption, in memory, for the run, when the text encoders are frozen; keyed by the
exact caption text and ``max_token_length`` (so varying captions, e.g. wildcards or shuffles, only hit
when the same text comes again).

Regularization images are dataset items like the others: their latents are keyed the same way.

Loss masks (``masked_loss`` / ``alpha_mask``) are cached with the latents, already at latent size, for both
orientations: the key then also holds where the mask comes from and the mask file's content (an alpha
mask is in the image's content), so switching masks on or off, or editing a mask, encodes again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict

import torch

from .dataset import file_digest, mask_source, mask_to_latent, training_pixels
from .models.hosted import is_hosted

CACHE_VERSION = "1"  # entries without a mask keep their keys from before masks existed
MEMORY_LIMIT_BYTES = 2 << 30
_MEMORY: "OrderedDict[str, dict[str, torch.Tensor]]" = OrderedDict()
_MEMORY_BYTES = [0]


def clear_memory_cache() -> None:
    _MEMORY.clear()
    _MEMORY_BYTES[0] = 0


def _remember(key: str, entry: dict[str, torch.Tensor]) -> None:
    if key in _MEMORY:
        return
    size = sum(t.numel() * t.element_size() for t in entry.values())
    _MEMORY[key] = entry
    _MEMORY_BYTES[0] += size
    while _MEMORY_BYTES[0] > MEMORY_LIMIT_BYTES and len(_MEMORY) > 1:
        _, old = _MEMORY.popitem(last=False)
        _MEMORY_BYTES[0] -= sum(t.numel() * t.element_size() for t in old.values())


def model_fingerprint(module) -> str:
    """sha256 over a module's tensors (names, shapes, dtypes, bytes); memoised on the module."""
    cached = getattr(module, "_lora_trainer_fingerprint", None)
    if cached:
        return cached
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    value = digest.hexdigest()
    try:
        module._lora_trainer_fingerprint = value
    except Exception:  # pragma: no cover
        pass
    return value


def latent_key(image_path: str, vae_fingerprint: str, size: tuple[int, int], crop: str, flip: bool,
               mask: str = "") -> str:
    """``mask``: "" (masks off) or :func:`mask_key`."""
    digest = hashlib.sha256()
    parts = [CACHE_VERSION, file_digest(image_path), vae_fingerprint, f"{size[0]}x{size[1]}", crop, str(flip)]
    if mask:
        parts.append(mask)
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:40]


def mask_key(item, masked_loss: bool, alpha_mask: bool) -> str:
    """The mask's part of an item's cache key: its source, and the mask file's content for a file."""
    source = mask_source(item, masked_loss, alpha_mask)
    if source is None:
        return ""
    return f"mask:file:{file_digest(item.mask_path)}" if source == "file" else f"mask:{source}"


def _write_atomic(path: str, entry: dict[str, torch.Tensor]) -> None:
    """Temp file, then rename, without formats.safetensors_io.write_atomically's fsyncs: an entry a crash
    damaged is rebuilt on read (:func:`_read`), and a fsync per image would slow the first pass."""
    from safetensors.torch import save_file

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in entry.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception:  # a damaged entry is rebuilt
        return None


@torch.no_grad()
def encode_distribution(base, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled (mean, std) of the VAE's latent distribution for pixels [B,3,H,W] in [-1, 1]."""
    if is_hosted(base):  # the host's VAE, in the host's way
        return base.encode_latents(pixels)
    vae = base.vae
    device = next(vae.parameters()).device
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    return ((dist.mean - shift) * scale).float().cpu(), (dist.std * scale).float().cpu()


class LatentCache:
    """Latent distributions per dataset item at its training size (centre crop)."""

    def __init__(self, base, mode: str, cache_dir: str, flip: bool, emit=None, masked_loss: bool = False,
                 alpha_mask: bool = False):
        self.base = base
        self.mode = mode
        self.cache_dir = cache_dir
        self.flip = flip
        self.masked_loss, self.alpha_mask = masked_loss, alpha_mask
        self.emit = emit or (lambda event: None)
        self.entries: dict[int, dict[str, torch.Tensor]] = {}
        self.vae_calls = 0
        self.hits = 0

    def build(self, items, sizes: list[tuple[int, int]], device) -> None:
        hosted = is_hosted(self.base)  # the host places its VAE itself
        vae_fp = self.base.latent_fingerprint() if hosted else model_fingerprint(self.base.vae)
        on_device = False
        for index, (item, size) in enumerate(zip(items, sizes)):
            key = latent_key(item.image_path, vae_fp, size, "center", self.flip,
                             mask_key(item, self.masked_loss, self.alpha_mask))
            entry = _MEMORY.get(key)
            path = os.path.join(self.cache_dir, key + ".safetensors") if self.mode == "disk" else None
            if entry is None and path and os.path.isfile(path):
                entry = _read(path)
            if entry is None:
                if not on_device and not hosted:
                    self.base.vae.to(device)
                    on_device = True
                sample = training_pixels(item, size[0], size[1], masked_loss=self.masked_loss,
                                         alpha_mask=self.alpha_mask)
                pixels = sample.pixels.unsqueeze(0)
                batch = torch.cat([pixels, sample.flipped().pixels.unsqueeze(0)]) if self.flip else pixels
                mean, std = encode_distribution(self.base, batch)
                self.vae_calls += 1
                (orig_h, orig_w), (top, left) = sample.original_size, sample.crop_top_left
                entry = {"mean": mean[0], "std": std[0],
                         "crop": torch.tensor([orig_h, orig_w, top, left], dtype=torch.int64)}
                if self.flip:
                    entry["flipped_mean"], entry["flipped_std"] = mean[1], std[1]
                if sample.mask is not None:
                    latent_size = tuple(mean.shape[-2:])
                    entry["mask"] = mask_to_latent(sample.mask, latent_size)
                    if self.flip:
                        entry["flipped_mask"] = mask_to_latent(sample.flipped().mask, latent_size)
                if path:
                    try:
                        _write_atomic(path, entry)
                    except OSError as e:
                        self.emit({"type": "log", "message": f"warning: cannot write latent cache {path}: {e}"})
            else:
                self.hits += 1
            _remember(key, entry)
            self.entries[index] = entry
            self.emit({"type": "cache", "done": index + 1, "total": len(items)})
        if on_device:
            self.base.vae.to("cpu")

    def get(self, index: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.entries[index]
        if flipped:
            return entry["flipped_mean"], entry["flipped_std"]
        return entry["mean"], entry["std"]

    def mask(self, index: int, flipped: bool) -> torch.Tensor | None:
        """The item's loss mask at latent size [1, h, w] (None when masks are off)."""
        return self.entries[index].get("flipped_mask" if flipped else "mask")

    def crop_info(self, index: int) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in self.entries[index]["crop"].tolist())


class TextCache:
    """Text-encoder outputs per caption (frozen text encoders), in memory for one run."""

    def __init__(self, max_token_length: int = 75, limit: int = 4096):
        self.entries: "OrderedDict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]" = OrderedDict()
        self.max_token_length = int(max_token_length)
        self.limit = limit
        self.encoder_calls = 0

    def key(self, caption: str) -> tuple[int, str]:
        return (self.max_token_length, caption)

    def get(self, caption: str):
        key = self.key(caption)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, caption: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> None:
        self.entries[self.key(caption)] = (hidden, pooled)
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)
