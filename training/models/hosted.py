"""A base model its host already holds and trains in place (ComfyUI's MODEL, CLIP and VAE; nodes/comfy_model.py).

The checkpoint-file provider (``loader.BaseModel``) hands the loop diffusers modules; a hosted model hands it its
own objects and does the model-specific work itself, in the model's own code: the loop draws the timesteps and
noise and computes the loss (``loss.Objective``), the hosted model turns images into latents, captions into
conditionings and a noisy latent into the model's output. The backend never imports the host: it only calls the
methods below. Stages ask :func:`is_hosted` where the two providers differ.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class HostedModel(Protocol):
    family: str  # names the file's keys and metadata (formats/families.py ALL_FAMILIES)
    prediction_type: str  # a key of loss.PARAMETERISATIONS: epsilon, v_prediction or flow
    noise_scheduler: Any  # the DDPM schedule (alphas_cumprod, add_noise) of epsilon/v models; None for flow
    unet: torch.nn.Module  # the denoiser the adapters go on, the host's own module
    text_encoders: list  # the text encoders trained with it: none (captions are encoded once)
    source: str  # what the metadata names as the base model

    def place(self, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool,
              keep_text_encoders: bool) -> None:
        """The denoiser on ``device`` for training; the VAE off it, and the text encoders too unless
        ``keep_text_encoders`` (captions encoded every step)."""

    def text_encoder_bytes(self) -> int | None:
        """The text encoders' size, for what keeping them beside the model costs."""

    def swap_blocks(self, blocks_to_swap: int, device: torch.device) -> None:
        """Keep the frozen weights of ``blocks_to_swap`` transformer blocks off ``device`` between their uses
        (training/block_swap.py); called once the adapters are attached."""

    def adapter_pattern(self, target: str) -> str:
        """A regex (peft ``target_modules``) over ``unet``'s module paths for a target preset."""

    def latent_fingerprint(self) -> str:
        """Identifies the image -> latent encoding (the latent cache's key)."""

    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the latents, in the denoiser's space, of pixels [B, 3, H, W] in [-1, 1]; CPU float32."""

    def encode_captions(self, captions: list[str]) -> list:
        """One conditioning per caption, opaque to the loop (kept on the CPU, cached per caption)."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditionings: list,
                sizes: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's output in the model's parameterisation for ``noisy`` as ``loss.Objective.noisy``
        makes it (DDPM timesteps, or flow noise levels sigma in [0, 1]); gradients flow to the adapters.
        ``sizes``: [B, 6] (original height, width, crop top, left, target height, width) per sample, for
        models conditioned on them (SDXL)."""

    def adapter_tensors(self) -> dict:
        """The trained adapters as a kohya LoRA's tensors (formats/export.py ``export_diffusion_model``)."""

    def sample(self, prompts: list[str], negative_prompt: str, seed: int, steps: int, cfg: float, sampler: str,
               width: int, height: int) -> list:
        """Preview images (PIL) of the model as trained so far, made the way the host samples."""

    def release(self) -> None:
        """The model back to its host as it was: block swap and checkpointing undone, adapters removed, frozen,
        in eval mode."""


def is_hosted(base) -> bool:
    return isinstance(base, HostedModel)
