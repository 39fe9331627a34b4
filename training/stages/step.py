"""One micro-batch: each sample's draws (flip, timestep, noise, caption) from its own generators, then the
model's prediction and the objective's loss."""

from __future__ import annotations

import numpy as np
import torch

from ..buckets import BatchPlan
from ..cache import encode_distribution
from ..dataset import mask_to_latent, process_caption, training_pixels
from ..loss import Objective, draw_noise
from ..seeds import SALT_CAPTION, SALT_CROP, SALT_DROPOUT, SALT_LATENT, SALT_NOISE, draw_seed, sample_generator
from .base import predict
from .context import RunContext
from .data import Data, text_condition
from .trainable import Trainable


def make_sample(ctx: RunContext, base, data: Data, objective: Objective, sample_number: int, item_index: int,
                step: int) -> dict:
    """Training sample ``sample_number`` (dataset item ``item_index``) at 0-based optimizer step ``step``."""
    config = ctx.config
    item = data.dataset.items[item_index]
    generator = sample_generator(config.seed, sample_number)  # draws the flip, the timestep, the noise
    flip = config.flip and bool(torch.randint(0, 2, (1,), generator=generator))
    width, height = data.sizes[item_index]
    if data.latent_cache is not None:
        mean, std = data.latent_cache.get(item_index, flip)
        mask = data.latent_cache.mask(item_index, flip)
        orig_h, orig_w, top, left = data.latent_cache.crop_info(item_index)
    else:  # the image and its mask through one crop box and one flip
        rng = np.random.default_rng(draw_seed(config.seed, sample_number, SALT_CROP, 2**31 - 1)) \
            if data.random_crop else None
        pixels = training_pixels(item, width, height, crop="random" if rng else "center", rng=rng, flip=flip,
                                 masked_loss=config.masked_loss, alpha_mask=config.alpha_mask)
        (orig_h, orig_w), (top, left) = pixels.original_size, pixels.crop_top_left
        mean, std = encode_distribution(base, pixels.pixels.unsqueeze(0))
        mean, std = mean[0], std[0]
        mask = None if pixels.mask is None else mask_to_latent(pixels.mask, tuple(mean.shape[-2:]))
        ctx.stats["vae_calls"] += 1
    # after the flip and before the noise in the sample's stream (flux_shift reads the latent's size)
    timestep = objective.draw_timestep(generator, mean.shape)
    noise, input_noise = draw_noise(mean.shape, generator, sample_generator(config.seed, sample_number, SALT_NOISE),
                                    config)
    eps = torch.randn(mean.shape, generator=sample_generator(config.seed, sample_number, SALT_LATENT))
    latent = mean + std * eps
    epoch = sample_number // data.dataset.num_samples
    caption = process_caption(
        item.caption, trigger="" if item.is_reg else config.trigger_word, shuffle=config.shuffle_caption,
        keep_tokens=config.keep_tokens, wildcard=config.enable_wildcard, lines=item.caption_lines,
        step=step, token_warmup_min=config.token_warmup_min, token_warmup_step=config.token_warmup_steps(),
        separator=config.caption_separator, dropout_rate=config.caption_dropout_rate,
        tag_dropout_rate=config.caption_tag_dropout_rate,
        drop_all=config.caption_dropout_every_n_epochs > 0 and (epoch + 1) % config.caption_dropout_every_n_epochs == 0,
        generator=sample_generator(config.seed, sample_number, SALT_CAPTION),
    )
    return {"latent": latent, "noise": noise, "input_noise": input_noise, "timestep": timestep, "caption": caption,
            "time_ids": (orig_h, orig_w, top, left, height, width), "mask": mask}


def micro_step_loss(ctx: RunContext, base, data: Data, trainable: Trainable, objective: Objective, plan: BatchPlan,
                    micro_index: int) -> torch.Tensor:
    """This process's loss for global micro-batch ``micro_index`` (scaled so DDP's mean is the global mean)."""
    config, device, dtype = ctx.config, ctx.device, ctx.weight_dtype
    # this process's slice of the global batch; reg images weigh prior_loss_weight
    batch = plan.micro_batch(micro_index)
    local = batch[ctx.rank * config.batch_size:(ctx.rank + 1) * config.batch_size]
    weights = [config.prior_loss_weight if data.dataset.items[i].is_reg else 1.0 for _, i in local]
    if not local:  # a short bucket batch left this process nothing: keep DDP in step, weight 0
        local, weights = batch[:1], [0.0]
    step = micro_index // config.gradient_accumulation_steps  # 0-based optimizer step
    samples = [make_sample(ctx, base, data, objective, n, i, step) for n, i in local]
    if trainable.dropout is not None:  # per-sample LoRA dropout masks (also for checkpointing's recomputation)
        trainable.dropout.set_seeds([draw_seed(config.seed, n, SALT_DROPOUT, 2**62) for n, _ in local])

    # sample latents, noise and timesteps; encode the captions
    latents = torch.stack([s["latent"] for s in samples]).to(device)
    noise = torch.stack([s["noise"] for s in samples]).to(device)
    timesteps = torch.cat([s["timestep"] for s in samples]).to(device)
    hidden, pooled = text_condition(ctx, base, data, [s["caption"] for s in samples])
    time_ids = torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32)

    # add noise (ip_noise_gamma perturbs the input noise only) and build the target
    input_noise = torch.stack([s["input_noise"] for s in samples]).to(device)
    noisy = objective.noisy(latents, input_noise, timesteps).to(dtype)
    target = objective.target(latents, noise, timesteps)

    # predict, and weigh each sample's loss
    prediction = predict(base, trainable.unet, noisy, timesteps, hidden, pooled, time_ids, device, dtype)
    masks = None  # masked loss: [B, 1, h, w] at latent size; a sample without a mask trains whole
    if any(s["mask"] is not None for s in samples):
        masks = torch.stack([s["mask"] if s["mask"] is not None else torch.ones(1, *latents.shape[-2:])
                             for s in samples]).to(device)
    per = objective.per_sample(prediction, target, timesteps, masks)
    return (per * torch.tensor(weights, device=per.device)).sum() * ctx.world / len(batch)
