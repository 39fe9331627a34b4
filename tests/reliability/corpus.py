"""The bad-input corpus: every file is generated at test time (nothing binary is checked in).

Each ``write_*`` function writes one kind of awkward input into a folder and returns its path. The
reliability tests (tests/test_reliability_*.py) feed them to the dataset loader, the model loader and
the nodes, and check the outcome: either it works (CMYK, 16-bit, palette, RGBA, EXIF-rotated,
animated: first frame) or it fails with an error that names the file and what to do, and nothing is
written.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib

import numpy as np
from PIL import Image

# -- images ---------------------------------------------------------------------------------------


def write_png(path, size=(32, 24), color=(200, 10, 10), mode="RGB") -> str:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.new(mode, size, color).save(path)
    return os.fspath(path)


def write_zero_byte(path) -> str:
    open(path, "wb").close()
    return os.fspath(path)


def write_truncated(path, fmt="PNG", size=(64, 64)) -> str:
    """A real image cut in half (noise, so the data part is large enough to cut)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return os.fspath(path)


def write_text_as_image(path) -> str:
    with open(path, "w") as f:
        f.write("this is a text file renamed to an image\n")
    return os.fspath(path)


def write_cmyk_jpeg(path, cmyk=(0, 255, 255, 0)) -> str:
    """A CMYK JPEG (pure red in CMYK: no cyan, full magenta and yellow)."""
    Image.new("CMYK", (32, 32), cmyk).save(path, "JPEG", quality=95)
    return os.fspath(path)


def write_png16(path) -> str:
    """A 16-bit greyscale PNG: a horizontal ramp from black to white."""
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)
    array = np.tile(ramp, (32, 1))
    Image.fromarray(array).save(path)
    return os.fspath(path)


def write_palette(path) -> str:
    """A palette (P) PNG, left half red, right half blue."""
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    img.paste((0, 0, 255), (16, 0, 32, 32))
    img.convert("P", palette=Image.ADAPTIVE, colors=4).save(path)
    return os.fspath(path)


def write_rgba(path) -> str:
    """An RGBA PNG: left half opaque green, right half fully transparent (should become white)."""
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((0, 200, 0, 255), (0, 0, 16, 32))
    img.save(path)
    return os.fspath(path)


def write_exif_rotated(path) -> str:
    """A landscape JPEG stored sideways with EXIF Orientation=6 (viewers rotate it 90 degrees clockwise).

    Stored pixels: 48 wide x 32 high, red band in the stored top rows. Shown upright it is 32 wide x
    48 high with the red band on the right-hand side.
    """
    img = Image.new("RGB", (48, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 48, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return os.fspath(path)


def write_animated(path, fmt) -> str:
    """Animated GIF/WebP: first frame red, second frame blue."""
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return os.fspath(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_png(path, width=20000, height=20000) -> str:
    """A valid ``width`` x ``height`` 1-bit black PNG written row by row (~50 MB of zeros deflated to a
    few hundred KB), without ever holding the image in memory."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    chunks = []
    block = row * 256
    rows_left = height
    while rows_left:
        n = min(256, rows_left)
        chunks.append(compressor.compress(block if n == 256 else row * n))
        rows_left -= n
    chunks.append(compressor.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        f.write(_png_chunk(b"IDAT", b"".join(chunks)))
        f.write(_png_chunk(b"IEND", b""))
    return os.fspath(path)


def write_caption(path, text: str, encoding="utf-8") -> str:
    with open(path, "wb") as f:
        f.write(text.encode(encoding))
    return os.fspath(path)


# -- checkpoints and LoRAs ------------------------------------------------------------------------


def write_unsupported_checkpoint(path) -> str:
    """A safetensors file shaped like no supported family (a DiT-style transformer)."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(48, 16),
        "model.diffusion_model.x_embedder.proj.weight": torch.zeros(16, 16, 2, 2),
        "model.diffusion_model.final_layer.linear.weight": torch.zeros(64, 16),
    }
    save_file(tensors, path)
    return os.fspath(path)


def write_truncated_copy(source, path, keep=0.5) -> str:
    with open(source, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return os.fspath(path)


class _Exploit:
    """Unpickling this runs code: it creates ``marker`` (what a malicious .ckpt would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_pickle(path, marker) -> str:
    """A .ckpt whose unpickling (with plain ``torch.load(weights_only=False)``) creates ``marker``."""
    import torch

    payload = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
               "exploit": _Exploit(os.fspath(marker))}
    with open(path, "wb") as f:
        # the same container torch.save writes, with a reduce-based payload inside
        torch.save(payload, f, pickle_module=pickle)
    return os.fspath(path)


def sdxl_lora_tensors(rank=4):
    """A kohya LoRA shaped for SDXL: attn2.to_k reads the 2048-wide SDXL context, TE names lora_te1/te2."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    modules = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v": (640, 2048),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }
    for name, (out_f, in_f) in modules.items():
        out[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.01
        out[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out
