"""Sample images from the in-memory model during training (diffusers pipelines, fixed seeds)."""

from __future__ import annotations

import torch

SAMPLER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def make_pipeline(base, unet, text_encoders, sampler: str):
    import diffusers

    scheduler = getattr(diffusers, SAMPLER_CLASSES[sampler]).from_config(base.noise_scheduler.config)
    if base.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
            tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=unet, scheduler=scheduler,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=base.vae, text_encoder=text_encoders[0], tokenizer=base.tokenizers[0], unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(base, unet, text_encoders, prompts: list[str], *, negative_prompt: str = "", seed: int = 0,
                  steps: int = 20, cfg: float = 7.0, sampler: str = "euler", size: int = 512, device="cpu",
                  autocast=None) -> list:
    """One PIL image per prompt; prompt i uses seed ``seed + i``. Models are left where they were."""
    import contextlib

    moved = []
    for module in [base.vae, *text_encoders]:
        if next(module.parameters()).device != torch.device(device):
            moved.append((module, next(module.parameters()).device))
            module.to(device)
    was_training = unet.training
    unet.eval()
    for te in text_encoders:
        te.eval()
    try:
        pipe = make_pipeline(base, unet, text_encoders, sampler)
        images = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            with autocast() if autocast else contextlib.nullcontext():
                out = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                           guidance_scale=cfg, height=size, width=size, generator=generator, output_type="pil")
            images.append(out.images[0])
        return images
    finally:
        for module, where in moved:
            module.to(where)
        if was_training:
            unet.train()
