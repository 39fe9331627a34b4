"""Benchmark 2: our trainer against ComfyUI core's TrainLoraNode, both inside one ComfyUI process.

ComfyUI is imported in-process from COMFYUI_DIR (no server): its checkpoint loader, VAE and CLIP feed
core's node the latents and conditioning it needs, while our trainer reads the same checkpoint and
images itself. Seconds per step are the median gap between the ends of consecutive steps on each side
(core's per-step loss callback, our ``step`` events), so model loading, caching and saving do not count as
steps for either side. (An earlier version took (t_long - t_short) / (steps_long - steps_short) over two
whole runs; under load the noise in loading time swamped the few seconds of training and gave 9.1 s/step
for a loop that takes 0.1 s/step.)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager

from .cpu import seconds_per_step
from .measure import measured

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "sample_dataset")


def import_comfyui(comfyui_dir: str):
    if comfyui_dir not in sys.path:
        sys.path.insert(0, comfyui_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read by model_management at import
    comfy.cli_args.args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401
    import comfy.sd
    import comfy_extras.nodes_train as nodes_train

    return comfy.sd, nodes_train


def comfyui_version(comfyui_dir: str) -> str | None:
    try:
        from comfyui_version import __version__

        return __version__
    except ImportError:
        return None


def core_inputs(comfy_sd, checkpoint, resolution):
    import torch

    with torch.inference_mode():  # as ComfyUI's executor runs the loader and encoder nodes
        return _core_inputs(comfy_sd, checkpoint, resolution)


def _core_inputs(comfy_sd, checkpoint, resolution):
    import torch

    from ..training.dataset import load_dataset, load_image, resize_and_crop

    model, clip, vae = comfy_sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    items = load_dataset(SAMPLE).items
    pixels = []
    for item in items:
        image, _ = resize_and_crop(load_image(item.image_path), resolution, resolution)
        pixels.append(torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(resolution, resolution, 3) / 255)
    latents = vae.encode(torch.stack(pixels))
    positive = [clip.encode_from_tokens_scheduled(clip.tokenize(item.caption))[0] for item in items]
    return model, {"samples": latents}, positive


def rss_figures(m) -> dict:
    """Peak RSS, and its growth during the call: core's model was loaded before the call (by ComfyUI's
    checkpoint loader, as in a real graph) and stays resident during our runs, so growth is the fair figure."""
    growth = m.peak_rss_bytes - m.rss_before_bytes if m.peak_rss_bytes and m.rss_before_bytes else None
    return {"peak_rss_bytes": m.peak_rss_bytes, "peak_rss_growth_bytes": growth}


@contextmanager
def core_step_stamps(nodes_train, stamps: list):
    """Record a timestamp at the end of every core training step: core's sampler calls ``loss_callback`` once
    per step right after ``loss.backward()``, so the gaps between calls are its seconds per step."""
    original = nodes_train.TrainSampler.__init__

    def patched(self, loss_fn, optimizer, loss_callback=None, *args, **kwargs):
        def stamped(loss):
            stamps.append(time.perf_counter())
            if loss_callback is not None:
                loss_callback(loss)

        original(self, loss_fn, optimizer, stamped, *args, **kwargs)

    nodes_train.TrainSampler.__init__ = patched
    try:
        yield
    finally:
        nodes_train.TrainSampler.__init__ = original


def run_core(nodes_train, model, latents, positive, steps, rank, seed) -> dict:
    """Core's TrainLoraNode with the bench's settings; returns its loss map. 0.3.64: a V1 node, ``train(...)``
    with positional inputs, returning (model, lora, loss, steps). 0.33: a V3 node whose ``execute`` takes every
    input as a list (``is_input_list``: one latent batch, one conditioning list with an entry per image) and
    returns (lora, loss, steps)."""
    node = nodes_train.TrainLoraNode
    if hasattr(node, "train"):
        out = node().train(model, latents, positive, 1, steps, 1, 1e-4, rank, "AdamW", "MSE", seed, "bf16", "bf16",
                           "LoRA", False, "[None]")
    else:
        inputs = dict(model=model, latents=latents, positive=positive, batch_size=1, steps=steps,
                      grad_accumulation_steps=1, learning_rate=1e-4, rank=rank, optimizer="AdamW",
                      loss_function="MSE", seed=seed, training_dtype="bf16", lora_dtype="bf16",
                      quantized_backward=False, algorithm="LoRA", gradient_checkpointing=False, checkpoint_depth=1,
                      offloading=False, existing_lora="[None]", bucket_mode=False, bypass_mode=False)
        out = node.execute(**{name: [value] for name, value in inputs.items()}).result
    return next(value for value in out if isinstance(value, dict) and "loss" in value)


def time_core(nodes_train, model, latents, positive, steps, rank, seed):
    import torch

    stamps = []
    with core_step_stamps(nodes_train, stamps), measured() as m, torch.inference_mode():
        loss = run_core(nodes_train, model, latents, positive, steps, rank, seed)
    return {"seconds_per_step": seconds_per_step(stamps), "seconds_node": m.seconds, **rss_figures(m),
            "final_loss": loss["loss"][-1]}


def time_ours(checkpoint, tokenizer, steps, rank, resolution, seed, target="attention"):
    import torch

    from ..training.config import TrainConfig
    from ..training.loop import train

    stamps = []
    config = TrainConfig(checkpoint=checkpoint, tokenizer=tokenizer, dataset=SAMPLE, output_dir="", steps=steps,
                         rank=rank, alpha=float(rank), learning_rate=1e-4, resolution=resolution, batch_size=1,
                         seed=seed, precision="bf16", device="cpu", flip=False, target=target)
    on_event = lambda event: stamps.append(time.perf_counter()) if event["type"] == "step" else None  # noqa: E731
    with measured() as m, torch.inference_mode():  # as ComfyUI runs our node
        result = train(config, events=on_event)
    return {"seconds_per_step": seconds_per_step(stamps), "seconds_node": m.seconds, **rss_figures(m),
            "final_loss": result.losses[-1]}


def bench_comfy_core(comfyui_dir: str, steps=12, rank=8, resolution=64, seed=0, repeats=2) -> dict:
    """Both trainers, bf16, batch 1, rank ``rank``, the same random SD1.5-shaped checkpoint and images.

    Seconds per step are the median gap between step ends (the first step is left out), so loading, caching
    and saving count for neither side; ``seconds_node`` is the whole call. Runs alternate and the faster of
    ``repeats`` is kept. Core trains LoRA on every Linear/Conv (its fixed behaviour), ours by default on the
    attention layers only, so ours is also run with ``target = "full"`` (attention, feed-forward and ResNet
    convolutions) for a like-for-like row.
    """
    comfy_sd, nodes_train = import_comfyui(comfyui_dir)
    from ..training.models import build_components, write_checkpoint

    tokenizer = os.path.join(comfyui_dir, "comfy", "sd1_tokenizer")
    runs = {"core": [], "ours": [], "ours_full": []}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = os.path.join(scratch, "random-sd15.safetensors")
        write_checkpoint(build_components("sd1", seed=0), checkpoint)
        model, latents, positive = core_inputs(comfy_sd, checkpoint, resolution)
        time_core(nodes_train, model, latents, positive, 2, rank, seed)  # warm-up: allocator, thread pools
        for _ in range(repeats):
            runs["core"].append(time_core(nodes_train, model, latents, positive, steps, rank, seed))
            runs["ours"].append(time_ours(checkpoint, tokenizer, steps, rank, resolution, seed))
            runs["ours_full"].append(time_ours(checkpoint, tokenizer, steps, rank, resolution, seed, "full"))
    best = {side: min(rows, key=lambda r: r["seconds_per_step"]) for side, rows in runs.items()}
    return {
        "name": "comfyui: ours vs core TrainLoraNode (random SD1.5-shaped checkpoint, same process)",
        "comfyui_version": comfyui_version(comfyui_dir),
        "settings": {"steps": steps, "rank": rank, "resolution": resolution, "batch_size": 1, "precision": "bf16",
                     "repeats": repeats, "core_gradient_checkpointing": False,
                     "targets": "core: every Linear/Conv + norms/biases (its fixed behaviour); "
                                "ours: attention (default), ours_full: attention + feed-forward + ResNet convs"},
        **best,
        "step_time_ratio": best["ours"]["seconds_per_step"] / best["core"]["seconds_per_step"],
        "step_time_ratio_full": best["ours_full"]["seconds_per_step"] / best["core"]["seconds_per_step"],
    }
