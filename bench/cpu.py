"""Benchmark 1: our trainer against the diffusers-example reference loop, tiny model, CPU."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from .measure import measured
from .reference_loop import train_reference

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "sample_dataset")


def seconds_per_step(stamps: list[float]) -> float:
    """Median gap between consecutive step ends (the first step, which pays warm-up, is left out)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def photo_sized_copy(folder: str, size: int) -> str:
    """The sample dataset with every image upscaled to ``size`` x ``size`` PNG, as users' photos are: a loop
    that decodes and resizes its images every step (the reference) pays for their size, a cached one does not."""
    import shutil

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(SAMPLE)):
        source = os.path.join(SAMPLE, name)
        if name.lower().endswith(".png"):
            with Image.open(source) as image:
                image.convert("RGB").resize((size, size), Image.LANCZOS).save(os.path.join(folder, name))
        else:
            shutil.copy(source, os.path.join(folder, name))
    return folder


def row(m, stamps, final_loss) -> dict:
    return {"seconds": m.seconds, "cpu_seconds": m.cpu_seconds, "seconds_per_step": seconds_per_step(stamps),
            "peak_rss_bytes": m.peak_rss_bytes, "final_loss": final_loss}


def run_ours(checkpoint, tokenizer, steps, rank, resolution, batch_size, seed, dataset=SAMPLE):
    from ..training.config import TrainConfig
    from ..training.loop import train

    stamps = []

    def on_event(event):
        if event["type"] == "step":
            stamps.append(time.perf_counter())

    config = TrainConfig(
        checkpoint=checkpoint, tokenizer=tokenizer, dataset=dataset, output_dir="", steps=steps, rank=rank,
        alpha=float(rank), learning_rate=1e-4, resolution=resolution, batch_size=batch_size, seed=seed, device="cpu",
    )
    with measured() as m:
        result = train(config, events=on_event)
    return row(m, stamps, result.losses[-1])


def run_reference(checkpoint, tokenizer, steps, rank, resolution, batch_size, seed, dataset=SAMPLE):
    stamps = []
    with measured() as m:
        losses = train_reference(checkpoint, tokenizer, dataset, steps, rank, float(rank), resolution, batch_size, seed,
                                 on_step=lambda _: stamps.append(time.perf_counter()))
    return row(m, stamps, losses[-1])


def bench_cpu(steps=100, rank=8, resolution=64, batch_size=2, seed=0, repeats=2, source_size=None) -> dict:
    """Ours vs reference on the tiny SD1.x model; runs alternate and the faster of ``repeats`` is kept.

    ``source_size``: train on copies of the sample images upscaled to that many pixels (None: the bundled
    96 px images)."""
    from ..training.models import tiny_tokenizer_dir, write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = write_tiny_checkpoint(os.path.join(scratch, "tiny.safetensors"))
        dataset = photo_sized_copy(os.path.join(scratch, "photos"), source_size) if source_size else SAMPLE
        args = (checkpoint, tiny_tokenizer_dir(), steps, rank, resolution, batch_size, seed, dataset)
        # warm-up: imports, allocator, thread pools
        run_ours(checkpoint, tiny_tokenizer_dir(), 3, rank, resolution, batch_size, seed, dataset)
        run_reference(checkpoint, tiny_tokenizer_dir(), 3, rank, resolution, batch_size, seed, dataset)
        ours, reference = [], []
        for _ in range(repeats):
            ours.append(run_ours(*args))
            reference.append(run_reference(*args))
    best_ours = min(ours, key=lambda r: r["seconds"])
    best_ref = min(reference, key=lambda r: r["seconds"])
    return {
        "name": "cpu: ours vs diffusers-example reference loop (tiny SD1.x, "
                + (f"sample images upscaled to {source_size} px)" if source_size else "bundled 96 px sample images)"),
        "settings": {"steps": steps, "rank": rank, "resolution": resolution, "batch_size": batch_size, "seed": seed,
                     "repeats": repeats, "source_size": source_size or 96},
        "ours": best_ours,
        "reference": best_ref,
        "speedup_end_to_end": best_ref["seconds"] / best_ours["seconds"],
        "speedup_per_step": best_ref["seconds_per_step"] / best_ours["seconds_per_step"],
        "speedup_cpu_seconds": best_ref["cpu_seconds"] / best_ours["cpu_seconds"],
        "peak_rss_ratio": (best_ours["peak_rss_bytes"] / best_ref["peak_rss_bytes"])
        if best_ours["peak_rss_bytes"] and best_ref["peak_rss_bytes"] else None,
    }
