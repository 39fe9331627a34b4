"""Dataset and caches: the images with their buckets, the latent cache, the caption -> conditioning cache."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..buckets import assign_bucket, make_bucket_resolutions
from ..cache import LatentCache, TextCache
from ..dataset import Dataset, DatasetError, image_size, with_trigger
from ..models import encode_prompts
from ..models.hosted import is_hosted
from ..validation import load_training_sets
from .context import RunContext
from .validate import Validation, build_validation


@dataclass
class Data:
    dataset: Dataset
    sizes: list  # (width, height) each image is trained at
    bucket_info: dict | None  # "WxH" -> images, when bucketing
    random_crop: bool
    latent_cache: LatentCache | None  # None: images are encoded every step
    text_cache: TextCache | None  # None: captions are encoded every step
    captions_fixed: bool  # every caption is the same each epoch (so all can be encoded up front)
    validation: Validation | None = None  # the held-out images (validation_split / validation_dataset)

    @property
    def captions_encoded_once(self) -> bool:
        """Every caption's conditioning is cached before the first step, so the text encoders are not needed
        during the steps."""
        return self.text_cache is not None and self.captions_fixed


def load_data(ctx: RunContext) -> tuple[Dataset, Dataset | None]:
    """(the dataset with its regularization images, the held-out validation images or None); refused when a
    global batch would not fit, or masked loss finds no mask."""
    config = ctx.config
    dataset, held_out = load_training_sets(config)
    if held_out is not None:
        ctx.log(f"validation set: {held_out.num_images} images "
                + (f"from {config.validation_dataset}" if config.validation_dataset
                   else f"held out of the dataset (validation_split = {config.validation_split:g})"))
    if config.masked_loss:
        train_images = [item for item in dataset.items if not item.is_reg]
        masked = sum(1 for item in train_images if item.mask_path)
        if not masked and not config.alpha_mask:
            where = config.mask_dir or os.path.join(config.dataset, "masks")
            raise DatasetError(f"masked_loss: no masks found in {where} (masks/ beside the images, or mask_dir): "
                               "add masks named like the images, set alpha_mask for transparent images, or turn "
                               "masked_loss off")
        if masked < len(train_images):
            ctx.log(f"masked loss: {len(train_images) - masked} of {len(train_images)} images have no mask and "
                    "train whole")
    if dataset.reg_root:
        ctx.log(f"regularization images: {dataset.num_reg_images} with repeats in {config.reg_dataset}, "
                f"{dataset.num_reg_samples} per epoch beside {dataset.num_train_samples} train samples, "
                f"loss weight {config.prior_loss_weight:g}")
    if config.batch_size * ctx.world > dataset.num_samples:
        per = f" x {ctx.world} processes" if ctx.world > 1 else ""
        raise DatasetError(
            f"batch_size {config.batch_size}{per} is larger than the dataset ({dataset.num_samples} samples with "
            "repeats); lower batch_size, or add images or repeats (N_name folders)")
    for warning in [*dataset.warnings, *(held_out.warnings if held_out is not None else [])][:20]:
        ctx.log(f"warning: {warning}")
    return dataset, held_out


def training_sizes(ctx: RunContext, dataset: Dataset, log: bool = True) -> tuple[list, dict | None]:
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
    if log:
        ctx.log(f"buckets (width x height: images): {bucket_info}")
    return sizes, bucket_info


def build_caches(ctx: RunContext, base, dataset: Dataset, held_out: Dataset | None = None,
                 scheduler=None) -> Data:
    """Buckets, then the latents (encoded once unless crops are random), the held-out validation images
    (``scheduler``: the objective's, for the validation timesteps) and the captions' conditionings."""
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
        latent_cache = LatentCache(base, mode, cache_dir, config.flip, ctx.emit, masked_loss=config.masked_loss,
                                   alpha_mask=config.alpha_mask)
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
    validation = None
    if held_out is not None:
        validation = build_validation(ctx, base, held_out, training_sizes(ctx, held_out, log=False)[0],
                                      scheduler or base.noise_scheduler)
    data = Data(dataset, sizes, bucket_info, random_crop, latent_cache, text_cache, captions_fixed, validation)
    if data.captions_encoded_once:
        for encoder in base.text_encoders:
            encoder.to(ctx.device)
        for item in dataset.items:  # reg (class) images never get the trigger word
            text_condition(ctx, base, data, [with_trigger(item.caption, "" if item.is_reg else config.trigger_word)])
        for sample in (validation.samples if validation is not None else []):  # their plain captions
            text_condition(ctx, base, data, [sample.conditioning[0]])
        for encoder in base.text_encoders:
            encoder.to("cpu")
    return data


def text_condition(ctx: RunContext, base, data: Data, captions: list[str]):
    """(hidden [B,77,ctx], pooled [B,proj] or None) for captions; cached when the encoders are frozen. A hosted
    model's conditionings are its own objects: (a list with one per caption, None)."""
    config = ctx.config
    if is_hosted(base):
        return hosted_conditionings(ctx, base, data, captions), None
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


def hosted_conditionings(ctx: RunContext, base, data: Data, captions: list[str]) -> list:
    """A hosted model's conditioning per caption, each encoded once while the cache holds it."""
    out = [data.text_cache.get(caption) if data.text_cache is not None else None for caption in captions]
    missing = [i for i, entry in enumerate(out) if entry is None]
    if missing:
        ctx.stats["text_encoder_calls"] += 1
        with torch.no_grad():
            encoded = base.encode_captions([captions[i] for i in missing])
        for i, conditioning in zip(missing, encoded):
            out[i] = (conditioning, None)
            if data.text_cache is not None:
                data.text_cache.put(captions[i], conditioning, None)
    return [entry[0] for entry in out]
