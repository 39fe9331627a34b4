"""Sample images from the in-memory model during training (diffusers pipelines, fixed seeds).

A prompt may carry its own settings in kohya's inline syntax (``line_to_prompt_dict``):
``a dog --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a`` sets the negative prompt, width,
height, seed, CFG scale, steps and sampler of that prompt; the rest come from the ``sample_*`` keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .models import encode_prompts

SAMPLER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None
    sampler: str | None = None


_FLAGS = (  # (flag, field, pattern, convert); "ss" before "s" so that "--ss" is not read as "--s"
    ("ss", "sampler", r"\S+", str),
    ("w", "width", r"\d+", int),
    ("h", "height", r"\d+", int),
    ("d", "seed", r"\d+", int),
    ("l", "cfg", r"\d+(?:\.\d*)?|\.\d+", float),
    ("s", "steps", r"\d+", int),
    ("n", "negative_prompt", r".*", str),
)


class PromptError(ValueError):
    """A sample prompt whose inline settings cannot be read; the message names the prompt and the flag."""


def parse_prompt(line: str) -> SamplePrompt:
    """kohya's per-prompt settings: the text before the first `` --`` is the prompt; then ``--n`` negative,
    ``--w``/``--h`` size (rounded down to a multiple of 8, at least 64, as kohya does), ``--d`` seed,
    ``--l`` CFG scale, ``--s`` steps (1-1000), ``--ss`` sampler. Unknown flags are ignored as in kohya (``--g``,
    ``--cn``, ...); a known flag with a bad value raises PromptError."""
    parts = line.split(" --")
    out = SamplePrompt(prompt=parts[0].strip())
    for part in parts[1:]:
        part = part.strip()
        name, _, value = part.partition(" ")
        for flag, field_name, pattern, convert in _FLAGS:
            if name.lower() != flag:
                continue
            value = value.strip()
            if not re.fullmatch(pattern, value) or (field_name != "negative_prompt" and not value):
                raise PromptError(f"sample prompt {line!r}: --{flag} needs "
                                  + ({"w": "a width in pixels", "h": "a height in pixels", "d": "a whole-number seed",
                                      "l": "a CFG scale such as 7.5", "s": "a step count", "ss": "a sampler name"}
                                     .get(flag, "a value")) + f", not {value!r}")
            setattr(out, field_name, convert(value))
            break
    if out.width is not None:
        out.width = max(64, out.width - out.width % 8)
    if out.height is not None:
        out.height = max(64, out.height - out.height % 8)
    if out.steps is not None:
        out.steps = max(1, min(1000, out.steps))
    if out.sampler is not None and out.sampler not in SAMPLER_CLASSES:
        raise PromptError(f"sample prompt {line!r}: --ss {out.sampler!r} is not a sampler here; use one of "
                          f"{', '.join(SAMPLER_CLASSES)}")
    return out


def long_prompt_embeddings(base, pipe, prompt: str, negative: str, max_token_length: int, device) -> dict:
    """Pipeline keyword arguments with the prompt and negative encoded as in training (``max_token_length``
    windows), so that a sample sees the whole prompt as the LoRA did."""
    cond = encode_prompts(base, [prompt, negative], max_token_length=max_token_length)
    hidden = cond.encoder_hidden_states.to(device)
    kwargs = {"prompt_embeds": hidden[:1], "negative_prompt_embeds": hidden[1:]}
    if base.family == "sdxl":
        pooled = cond.added_cond_kwargs["text_embeds"].to(device)
        kwargs.update(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
        if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            # as the SDXL pipeline does for an empty negative prompt
            kwargs["negative_prompt_embeds"] = torch.zeros_like(hidden[1:])
            kwargs["negative_pooled_prompt_embeds"] = torch.zeros_like(pooled[1:])
    return kwargs


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
                  autocast=None, max_token_length: int = 75) -> list:
    """One PIL image per prompt; prompt i uses seed ``seed + i`` unless it sets ``--d``; each prompt's inline
    settings (``parse_prompt``) override the defaults given here. Models are left where they were."""
    import contextlib

    parsed = [parse_prompt(p) if isinstance(p, str) else p for p in prompts]
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
        pipes = {}
        images = []
        for i, p in enumerate(parsed):
            name = p.sampler or sampler
            if name not in pipes:
                pipes[name] = make_pipeline(base, unet, text_encoders, name)
            pipe = pipes[name]
            negative = p.negative_prompt if p.negative_prompt is not None else negative_prompt
            generator = torch.Generator(device="cpu").manual_seed(p.seed if p.seed is not None else seed + i)
            if max_token_length > 75:
                text = long_prompt_embeddings(base, pipe, p.prompt, negative or "", max_token_length, device)
            else:
                text = {"prompt": p.prompt, "negative_prompt": negative or None}
            with autocast() if autocast else contextlib.nullcontext():
                out = pipe(**text, num_inference_steps=p.steps or steps,
                           guidance_scale=p.cfg if p.cfg is not None else cfg, height=p.height or size,
                           width=p.width or size, generator=generator, output_type="pil")
            images.append(out.images[0])
        return images
    finally:
        for module, where in moved:
            module.to(where)
        if was_training:
            unet.train()
