"""Benchmark 2: our trainer against ComfyUI core's TrainLoraNode, both inside one ComfyUI process.

ComfyUI is imported in-process from COMFYUI_DIR (no server): its checkpoint loader, VAE and CLIP feed
core's node the latents and conditioning it needs, while our trainer reads the same checkpoint and
images itself. Seconds per step come from two runs of different lengths, (t_long - t_short) /
(steps_long - steps_short), so model loading and caching do not count as steps for either side.
"""

from __future__ import annotations

import os
import sys
import tempfile

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


def time_core(node, model, latents, positive, steps, rank, seed):
    import torch

    with measured() as m, torch.inference_mode():  # nodes run under inference_mode in ComfyUI
        out = node.train(model, latents, positive, 1, steps, 1, 1e-4, rank, "AdamW", "MSE", seed, "bf16", "bf16",
                         "LoRA", False, "[None]")
    return m, out[2]["loss"]


def time_ours(checkpoint, tokenizer, steps, rank, resolution, seed):
    import torch

    from ..training.config import TrainConfig
    from ..training.loop import train

    config = TrainConfig(checkpoint=checkpoint, tokenizer=tokenizer, dataset=SAMPLE, output_dir="", steps=steps,
                         rank=rank, alpha=float(rank), learning_rate=1e-4, resolution=resolution, batch_size=1,
                         seed=seed, precision="bf16", device="cpu", flip=False)
    with measured() as m, torch.inference_mode():
        result = train(config)
    return m, result.losses


def bench_comfy_core(comfyui_dir: str, short=2, long=6, rank=8, resolution=64, seed=0) -> dict:
    """Both trainers, bf16, batch 1, rank ``rank``, the same random SD1.5-shaped checkpoint and images."""
    comfy_sd, nodes_train = import_comfyui(comfyui_dir)
    from ..training.models import build_components, write_checkpoint

    tokenizer = os.path.join(comfyui_dir, "comfy", "sd1_tokenizer")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = os.path.join(scratch, "random-sd15.safetensors")
        write_checkpoint(build_components("sd1", seed=0), checkpoint)
        model, latents, positive = core_inputs(comfy_sd, checkpoint, resolution)
        node = nodes_train.TrainLoraNode()
        core_short, _ = time_core(node, model, latents, positive, short, rank, seed)
        core_long, core_losses = time_core(node, model, latents, positive, long, rank, seed)
        ours_short, _ = time_ours(checkpoint, tokenizer, short, rank, resolution, seed)
        ours_long, our_losses = time_ours(checkpoint, tokenizer, long, rank, resolution, seed)
    core_step = (core_long.seconds - core_short.seconds) / (long - short)
    ours_step = (ours_long.seconds - ours_short.seconds) / (long - short)
    return {
        "name": "comfyui: ours vs core TrainLoraNode (random SD1.5-shaped checkpoint, same process)",
        "settings": {"steps": [short, long], "rank": rank, "resolution": resolution, "batch_size": 1,
                     "precision": "bf16", "core_gradient_checkpointing": False,
                     "targets": "core: every Linear/Conv + norms/biases (its fixed behaviour); ours: attention"},
        "core": {"seconds_per_step": core_step, "seconds_long_run": core_long.seconds,
                 "peak_rss_bytes": core_long.peak_rss_bytes, "final_loss": core_losses[-1]},
        "ours": {"seconds_per_step": ours_step, "seconds_long_run": ours_long.seconds,
                 "peak_rss_bytes": ours_long.peak_rss_bytes, "final_loss": our_losses[-1]},
        "step_time_ratio": ours_step / core_step,
    }
