"""Dataset and caches: the images with their buckets, the latent cache, the caption -> conditioning cache."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..buckets import assign_bucket, make_bucket_resolutions
from ..cache import LatentCache, TextCache
from ..dataset import Dataset, DatasetError, image_size, load_dataset, with_trigger
from ..models import encode_prompts
from .context import RunContext


@dataclass
class Data:
    dataset: Dataset
    sizes: list  # (width, height) each image is trained at
    bucket_info: dict | None  # "WxH" -> images, when bucketing
    random_crop: bool
    latent_cache: LatentCache | None  # None: images are encoded every step
    text_cache: TextCache | None  # None: captions are encoded every step
    captions_fixed: bool  # every caption is the same each epoch (so all can be encoded up front)


def load_data(ctx: RunContext) -> Dataset:
    """The dataset (and regularization images), refused when a global batch would not fit in it."""
    config = ctx.config
    dataset = load_dataset(config.dataset, config.reg_dataset or None)
    if dataset.reg_root:
        ctx.log(f"regularization images: {dataset.num_reg_images} with repeats in {config.reg_dataset}, "
                f"{dataset.num_reg_samples} per epoch beside {dataset.num_train_samples} train samples, "
                f"loss weight {config.prior_loss_weight:g}")
    if config.batch_size * ctx.world > dataset.num_samples:
        per = f" x {ctx.world} processes" if ctx.world > 1 else ""
        raise DatasetError(
            f"batch_size {config.batch_size}{per} is larger than the dataset ({dataset.num_samples} samples with "
            "repeats); lower batch_size, or add images or repeats (N_name folders)")
    for warning in dataset.warnings[:20]:
        ctx.log(f"warning: {warning}")
    return dataset


def training_sizes(ctx: RunContext, dataset: Dataset) -> tuple[list, dict | None]:
    """(width, height) per image, and the bucket counts when bucketing."""
    config = ctx.config
    originals = [image_size(item.image_path) for item in dataset.items]  # (w, h); also checks every image opens
    if not config.enable_bucket:
        return [(config.resolution, config.resolution)] * dataset.num_images, None
    buckets = None if config.bucket_no_upscale else make_bucket_resolutions(
        config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps)
    sizes = [assign_bucket(w, h, buckets, config.resolution, config.bucket_reso_steps, config.bucket_no_upscale)
             for w, h in originals]
    counts: dict = {}
    for s in sizes:
        counts[s] = counts.get(s, 0) + 1
    bucket_info = {f"{w}x{h}": n for (w, h), n in sorted(counts.items())}
    ctx.log(f"buckets (width x height: images): {bucket_info}")
    return sizes, bucket_info


def build_caches(ctx: RunContext, base, dataset: Dataset) -> Data:
    """Buckets, then the latents (encoded once unless crops are random) and the captions' conditionings."""
    config = ctx.config
    sizes, bucket_info = training_sizes(ctx, dataset)
    random_crop = not config.center_crop
    mode = config.cache_latents
    if random_crop and mode != "none":
        ctx.log("random crop: latents cannot be cached and are encoded every step")
        mode = "none"
    latent_cache = None
    if mode != "none":
        cache_dir = config.cache_dir or os.path.join(dataset.root, ".lora_trainer_cache")
        latent_cache = LatentCache(base, mode, cache_dir, config.flip, ctx.emit)
        latent_cache.build(dataset.items, sizes, ctx.device)
        ctx.stats["vae_calls"] += latent_cache.vae_calls
        ctx.stats["latent_cache_hits"] = latent_cache.hits
        if latent_cache.hits:
            ctx.log(f"latent cache: {latent_cache.hits} of {dataset.num_images} images reused, "
                    f"{latent_cache.vae_calls} encoded")
    captions_fixed = not (config.shuffle_caption or config.caption_dropout_rate > 0
                          or config.caption_tag_dropout_rate > 0 or config.caption_dropout_every_n_epochs > 0
                          or (config.enable_wildcard and dataset.has_caption_variants())
                          or config.token_warmup_steps() > 0)
    text_cache = TextCache(config.max_token_length) \
        if not config.train_text_encoder and config.cache_text_embeddings else None
    data = Data(dataset, sizes, bucket_info, random_crop, latent_cache, text_cache, captions_fixed)
    if text_cache is not None and captions_fixed:
        for encoder in base.text_encoders:
            encoder.to(ctx.device)
        for item in dataset.items:  # reg (class) images never get the trigger word
            text_condition(ctx, base, data, [with_trigger(item.caption, "" if item.is_reg else config.trigger_word)])
        for encoder in base.text_encoders:
            encoder.to("cpu")
    return data


def text_condition(ctx: RunContext, base, data: Data, captions: list[str]):
    """(hidden [B,77,ctx], pooled [B,proj] or None) for captions; cached when the encoders are frozen."""
    config = ctx.config
    if config.train_text_encoder:
        ctx.stats["text_encoder_calls"] += 1
        with ctx.accelerator.autocast():
            cond = encode_prompts(base, captions, max_token_length=config.max_token_length)
        pooled = cond.added_cond_kwargs["text_embeds"] if cond.added_cond_kwargs else None
        return cond.encoder_hidden_states, pooled
    hidden, pooled = [None] * len(captions), [None] * len(captions)
    missing = []
    for i, caption in enumerate(captions):
        entry = data.text_cache.get(caption) if data.text_cache is not None else None
        if entry is None:
            missing.append(i)
        else:
            hidden[i], pooled[i] = entry
    if missing:
        ctx.stats["text_encoder_calls"] += 1
        with torch.no_grad():
            cond = encode_prompts(base, [captions[i] for i in missing], max_token_length=config.max_token_length)
        for j, i in enumerate(missing):
            h = cond.encoder_hidden_states[j].float().cpu()
            p = cond.added_cond_kwargs["text_embeds"][j].float().cpu() if cond.added_cond_kwargs else None
            hidden[i], pooled[i] = h, p
            if data.text_cache is not None:
                data.text_cache.put(captions[i], h, p)
    return torch.stack(hidden), (torch.stack(pooled) if pooled[0] is not None else None)
