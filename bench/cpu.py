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


def run_ours(checkpoint, tokenizer, steps, rank, resolution, batch_size, seed):
    from ..training.config import TrainConfig
    from ..training.loop import train

    stamps = []

    def on_event(event):
        if event["type"] == "step":
            stamps.append(time.perf_counter())

    config = TrainConfig(
        checkpoint=checkpoint, tokenizer=tokenizer, dataset=SAMPLE, output_dir="", steps=steps, rank=rank,
        alpha=float(rank), learning_rate=1e-4, resolution=resolution, batch_size=batch_size, seed=seed, device="cpu",
    )
    with measured() as m:
        result = train(config, events=on_event)
    return {"seconds": m.seconds, "seconds_per_step": seconds_per_step(stamps), "peak_rss_bytes": m.peak_rss_bytes,
            "final_loss": result.losses[-1]}


def run_reference(checkpoint, tokenizer, steps, rank, resolution, batch_size, seed):
    stamps = []
    with measured() as m:
        losses = train_reference(checkpoint, tokenizer, SAMPLE, steps, rank, float(rank), resolution, batch_size, seed,
                                 on_step=lambda _: stamps.append(time.perf_counter()))
    return {"seconds": m.seconds, "seconds_per_step": seconds_per_step(stamps), "peak_rss_bytes": m.peak_rss_bytes,
            "final_loss": losses[-1]}


def bench_cpu(steps=100, rank=8, resolution=64, batch_size=2, seed=0, repeats=2) -> dict:
    """Ours vs reference on the tiny SD1.x model; runs alternate and the faster of ``repeats`` is kept."""
    from ..training.models import tiny_tokenizer_dir, write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = write_tiny_checkpoint(os.path.join(scratch, "tiny.safetensors"))
        args = (checkpoint, tiny_tokenizer_dir(), steps, rank, resolution, batch_size, seed)
        # warm-up: imports, allocator, thread pools
        run_ours(checkpoint, tiny_tokenizer_dir(), 3, rank, resolution, batch_size, seed)
        run_reference(checkpoint, tiny_tokenizer_dir(), 3, rank, resolution, batch_size, seed)
        ours, reference = [], []
        for _ in range(repeats):
            ours.append(run_ours(*args))
            reference.append(run_reference(*args))
    best_ours = min(ours, key=lambda r: r["seconds"])
    best_ref = min(reference, key=lambda r: r["seconds"])
    return {
        "name": "cpu: ours vs diffusers-example reference loop (tiny SD1.x)",
        "settings": {"steps": steps, "rank": rank, "resolution": resolution, "batch_size": batch_size, "seed": seed,
                     "repeats": repeats},
        "ours": best_ours,
        "reference": best_ref,
        "speedup_end_to_end": best_ref["seconds"] / best_ours["seconds"],
        "speedup_per_step": best_ref["seconds_per_step"] / best_ours["seconds_per_step"],
        "peak_rss_ratio": (best_ours["peak_rss_bytes"] / best_ref["peak_rss_bytes"])
        if best_ours["peak_rss_bytes"] and best_ref["peak_rss_bytes"] else None,
    }
