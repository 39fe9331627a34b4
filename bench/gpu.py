"""Benchmark 3: the training step on a GPU at real model sizes (random weights).

It times the step our loop runs once latents and text embeddings are cached: noise, UNet forward and
backward through the LoRA, gradient clipping and AdamW, under bf16 autocast. FLOPs per step come from
``torch.utils.flop_counter``; model FLOP utilisation (MFU) divides achieved FLOP/s by the device's dense
bf16 peak (known for H100/H200; None elsewhere).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

CASES = [("sd1", 512), ("sdxl", 1024)]


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def build_unet(family: str, device, dtype, unet_overrides: dict | None = None):
    from diffusers import UNet2DConditionModel

    from ..training.models import family_config

    config = dict(family_config(family)["unet"])
    config.update(unet_overrides or {})
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return UNet2DConditionModel(**config).to(device, dtype), config


def bench_step(family="sd1", resolution=512, batch_size=1, rank=16, gradient_checkpointing=False, steps=10,
               device=None, unet_overrides=None) -> dict:
    from ..training.adapters import attach_lora

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    unet, config = build_unet(family, device, torch.bfloat16, unet_overrides)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = attach_lora(unet, rank, float(rank))
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latent = resolution // 8
    sample = torch.randn(batch_size, config["in_channels"], latent, latent, device=device)
    context = torch.randn(batch_size, 77, config["cross_attention_dim"], device=device, dtype=torch.bfloat16)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch_size, pooled, device=device, dtype=torch.bfloat16),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size,
                                          device=device, dtype=torch.bfloat16)}
    timesteps = torch.randint(0, 1000, (batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = unet(sample.bfloat16(), timesteps, context, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), sample)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up (kernels, allocator)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = peak_flops(device)
    return {
        "family": family, "resolution": resolution, "batch_size": batch_size, "rank": rank,
        "gradient_checkpointing": gradient_checkpointing, "device": str(device),
        "seconds_per_step": seconds, "samples_per_second": batch_size / seconds,
        "tflop_per_step": flops / 1e12,
        "mfu": (flops / seconds / peak) if peak else None,
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def bench_gpu(batch_sizes=(1, 4, 8), rank=16) -> dict:
    if not torch.cuda.is_available():
        return {"name": "gpu: training step at real sizes", "skipped": "no CUDA device in this process"}
    rows = []
    for family, resolution in CASES:
        for checkpointing in (False, True):
            for batch_size in batch_sizes:
                try:
                    rows.append(bench_step(family, resolution, batch_size, rank, checkpointing))
                except torch.cuda.OutOfMemoryError:
                    rows.append({"family": family, "resolution": resolution, "batch_size": batch_size,
                                 "gradient_checkpointing": checkpointing, "error": "out of memory"})
                torch.cuda.empty_cache()
    return {"name": "gpu: training step at real sizes (bf16, random weights)", "rows": rows}
