"""The base model: what the pipeline needs from one, and the provider that loads it from a checkpoint file.

Any base model meets one small protocol (/work/shared/design.md, "Two sources of a base model"): the modules
to put adapters on (``unet``, ``text_encoders``), a forward pass from (noisy latent, timestep, conditioning)
to the model's output (``predict``), its parameterisation (``prediction_type``, read by ``loss.Objective``)
and its schedule, and what turns images and captions into latents and conditionings (``vae``, encoded by
``cache.py``; ``encode_prompts``). ``models.load_base_model`` provides it for SD1.x/SD2/SDXL checkpoint files
(what the CLI and ``accelerate launch`` use); a host that already holds a model passes its own object as
``train(base=...)``: a ``models.hosted.HostedModel``, which does the model-specific work itself.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .. import devices
from ..models import load_base_model
from ..models.hosted import is_hosted
from .context import RunContext, TrainingError

# settings of the checkpoint-file path that a model the host holds does not take (yet), and what to do instead
NOT_FOR_HOSTED = {
    "train_text_encoder": "the text encoders of a MODEL input stay frozen; train_text_encoder = false",
    "quantize_base": "the model is trained in the precision the host loaded it in; load it in fp8 with the "
                     "loader's weight_dtype instead, and quantize_base = none",
    "fp8_base": "the model is trained in the precision the host loaded it in; load it in fp8 with the "
                "loader's weight_dtype instead, and fp8_base = false",
    "torch_compile": "torch_compile = false",
}


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
    if is_hosted(base):
        check_hosted_settings(config, base)
    elif config.blocks_to_swap not in (0, "auto"):
        raise TrainingError(f"blocks_to_swap = {config.blocks_to_swap}: block swap moves the transformer blocks of "
                            "the DiT models trained through Train LoRA's model input (Flux.1, SD3, ...); an "
                            f"{base.family} UNet from a checkpoint file trains without it: blocks_to_swap = 0")
    if config.zero_terminal_snr and base.prediction_type != "v_prediction":
        ctx.log("warning: zero_terminal_snr with an epsilon-prediction model; it is meant for v-prediction")
    return base


def predict(base: BaseModel, unet, noisy, timesteps, hidden, pooled, time_ids, device, dtype):
    """The denoiser's output for a batch. SDXL also takes the pooled text embedding and the size/crop ids; a
    hosted model takes its own conditionings (``hidden``: one per sample) and runs its own forward."""
    if is_hosted(base):
        return base.predict(noisy, timesteps, hidden, time_ids)
    added = None
    if base.family == "sdxl":
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
    return unet(noisy, timesteps, hidden.to(device, dtype), added_cond_kwargs=added).sample


def check_hosted_settings(config, base) -> None:
    """A TrainingError naming the first setting a hosted model cannot train with (:data:`NOT_FOR_HOSTED`)."""
    for key, advice in NOT_FOR_HOSTED.items():
        value = getattr(config, key)
        if value and value != "none":
            raise TrainingError(f"{key} = {value!r} is not available when training the model ComfyUI holds "
                                f"({base.family}): {advice}")
