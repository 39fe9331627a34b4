"""The base model: what the pipeline needs from one, and the provider that loads it from a checkpoint file.

Any base model meets one small protocol (/work/shared/design.md, "Two sources of a base model"): the modules
to put adapters on (``unet``, ``text_encoders``), a forward pass from (noisy latent, timestep, conditioning)
to the model's output (``predict``), its parameterisation (``prediction_type``, read by ``loss.Objective``)
and its schedule, and what turns images and captions into latents and conditionings (``vae``, encoded by
``cache.py``; ``encode_prompts``). ``models.load_base_model`` provides it for SD1.x/SD2/SDXL checkpoint files
(what the CLI and ``accelerate launch`` use); a host that already holds a model passes its own object as
``train(base=...)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .. import devices
from ..models import load_base_model
from .context import RunContext


class BaseModel(Protocol):
    family: str  # names the file's keys and metadata (formats/)
    prediction_type: str  # a key of loss.PARAMETERISATIONS
    noise_scheduler: Any  # the training schedule (alphas_cumprod, add_noise)
    unet: torch.nn.Module  # the denoiser adapters attach to
    text_encoders: list  # trained with train_text_encoder
    vae: Any  # latents of the dataset (cache.encode_distribution)
    source: str


def load_base(ctx: RunContext, base: BaseModel | None) -> BaseModel:
    """The host's model, or the checkpoint file's (diffusers provider)."""
    config = ctx.config
    if base is None:
        ctx.log(f"loading {config.checkpoint}")
        base = load_base_model(config.checkpoint, config.tokenizer, family=config.family)
    ctx.log(f"model family {base.family}, device {devices.describe(ctx.device)}, "
            f"precision {ctx.run_device.precision}, "
            f"processes {ctx.world}, adapter {config.adapter} ({config.target}), optimizer {config.optimizer}")
    if config.zero_terminal_snr and base.prediction_type != "v_prediction":
        ctx.log("warning: zero_terminal_snr with an epsilon-prediction model; it is meant for v-prediction")
    return base


def predict(base: BaseModel, unet, noisy, timesteps, hidden, pooled, time_ids, device, dtype):
    """The denoiser's output for a batch. SDXL also takes the pooled text embedding and the size/crop ids."""
    added = None
    if base.family == "sdxl":
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
    return unet(noisy, timesteps, hidden.to(device, dtype), added_cond_kwargs=added).sample
