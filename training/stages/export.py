"""Export: the trained adapters as a kohya LoRA file with its metadata, every-N-steps checkpoints and states,
and sample images."""

from __future__ import annotations

import glob
import os
import re
from datetime import datetime, timezone
from typing import Callable

from ..formats import LoraWeights, RunInfo, kohya_state_dict_from_models, make_metadata, save_lora_file
from ..formats.metadata import flow_metadata, kohya_extras_metadata
from ..models.hosted import is_hosted
from ..sampling import parse_prompt, sample_images
from ..state import save_state, state_path
from ..validation import validation_run_info
from .context import RunContext, TrainingError
from .data import Data
from .trainable import Trainable


def adapter_tensors(ctx: RunContext, base, trainable: Trainable, continuation=None) -> dict:
    """The trained modules' tensors under kohya names (plus a continued file's diff/diff_b changes)."""
    config = ctx.config
    unet = ctx.accelerator.unwrap_model(trainable.unet) if config.train_unet else None
    tes = list(base.text_encoders) if config.train_text_encoder else []
    try:
        if is_hosted(base):  # named by the host model's module paths (formats/names.comfy_unet_name)
            tensors = base.adapter_tensors()
        else:
            tensors = kohya_state_dict_from_models(base.family, unet=unet, text_encoders=tes)
        if continuation is not None:  # the file's diff/diff_b changes, kept as they were
            tensors.update({k: v.clone() for k, v in continuation.passthrough.items()})
        return tensors
    except NotImplementedError as e:
        raise TrainingError(f"adapter = {config.adapter!r}: the trained weights cannot be written yet ({e})") \
            from None


def lora_weights(ctx: RunContext, base, data: Data, trainable: Trainable, step: int, continuation=None) -> LoraWeights:
    """The LoRA after ``step`` optimizer steps, with kohya's ``ss_*`` metadata."""
    config, dataset = ctx.config, data.dataset
    tensors = adapter_tensors(ctx, base, trainable, continuation)
    network_args = {"target": config.target, "adapter": config.adapter}
    if config.target == "custom":
        network_args["target_modules"] = config.target_modules
    if config.conv_rank:
        network_args.update(conv_dim=config.conv_rank, conv_alpha=config.conv_alpha or config.conv_rank)
    if config.rslora:
        network_args["rslora"] = True
    extra_args, extra_fields = kohya_extras_metadata(config)
    network_args.update(extra_args)
    global_batch = config.batch_size * ctx.world
    optimizer = getattr(trainable.optimizer, "optimizer", trainable.optimizer)  # the accelerator wraps it
    info = RunInfo(
        family=base.family,
        output_name=config.output_name,
        network_dim=config.rank,
        network_alpha=config.alpha,
        base_model_name=os.path.basename(config.checkpoint or base.source or ""),
        resolution=config.resolution,
        steps=step,
        max_train_steps=config.steps,
        epoch=(step * global_batch * config.gradient_accumulation_steps + dataset.num_samples - 1)
        // dataset.num_samples,
        learning_rate=config.learning_rate,
        unet_lr=config.learning_rate if config.train_unet else None,
        text_encoder_lr=config.effective_text_encoder_lr if config.train_text_encoder else None,
        optimizer=type(optimizer).__module__ + "." + type(optimizer).__name__,
        optimizer_args={"weight_decay": config.weight_decay, **config.optimizer_args},
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.warmup_steps(),
        train_unet=config.train_unet,
        train_text_encoder=config.train_text_encoder,
        cache_latents=data.latent_cache is not None,
        flip_aug=config.flip,
        enable_bucket=config.enable_bucket,
        min_bucket_reso=config.min_bucket_reso if config.enable_bucket else None,
        max_bucket_reso=config.max_bucket_reso if config.enable_bucket else None,
        bucket_info={"buckets": data.bucket_info} if data.bucket_info else None,
        shuffle_caption=config.shuffle_caption,
        keep_tokens=config.keep_tokens,
        caption_dropout_rate=config.caption_dropout_rate,
        total_batch_size=global_batch * config.gradient_accumulation_steps,
        seed=config.seed,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        gradient_checkpointing=config.gradient_checkpointing,
        mixed_precision=ctx.run_device.mixed_precision,  # what was really used (devices.plan)
        precision_note=ctx.run_device.note or None,
        noise_offset=config.noise_offset or None,
        min_snr_gamma=config.min_snr_gamma or None,
        loss_type=config.loss_type,
        zero_terminal_snr=config.zero_terminal_snr,
        num_train_images=dataset.num_train_samples,
        num_reg_images=dataset.num_reg_images,
        reg_dataset_dirs=dataset.reg_dirs if dataset.reg_root else None,
        prior_loss_weight=config.prior_loss_weight,
        dataset_dirs=dataset.subsets(),
        tag_frequency=dataset.tag_frequency(),
        trigger_words=[config.trigger_word] if config.trigger_word else [],
        training_started_at=ctx.started_at.timestamp(),
        training_finished_at=datetime.now(timezone.utc).timestamp(),
        network_args=network_args,
        **validation_run_info(config, data.validation.tracker if data.validation else None,
                              data.validation.images if data.validation else 0),
    )
    info.extra.update(extra_fields)  # ss_multires_noise_iterations, ss_huber_schedule, ... (kohya's names)
    if base.prediction_type == "flow":
        info.extra.update(flow_metadata(config, getattr(base, "guidance", None)))
    return LoraWeights(tensors=tensors, metadata=make_metadata(info), family=base.family)


def save_run_state(ctx: RunContext, base, trainable: Trainable, step: int, extra: dict) -> str | None:
    """A resumable state (adapters, optimizer, schedule, ``extra``) after ``step``; its path, or None."""
    config = ctx.config
    folder = config.state_dir or config.output_dir
    if not folder:
        return None
    path = state_path(folder, config.output_name, step)
    if ctx.is_main:
        save_state(path, step=step, models=trainable.models(ctx, base), optimizer=trainable.optimizer,
                   lr_scheduler=trainable.lr_scheduler, extra=extra, config=ctx.trajectory_config())
        ctx.emit({"type": "state", "step": step, "path": path})
    return path


def save_checkpoint(ctx: RunContext, step: int, weights: Callable[[], LoraWeights]) -> str | None:
    """``<name>_step<N>.safetensors``; ``weights`` builds the LoRA (on the main process only)."""
    config = ctx.config
    if not config.output_dir:
        return None
    path = os.path.join(config.output_dir, f"{config.output_name}_step{step}.safetensors")
    if ctx.is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        save_lora_file(path, weights(), overwrite=True)
        ctx.emit({"type": "checkpoint", "step": step, "path": path})
    return path


def save_final(ctx: RunContext, path: str | None, weights: LoraWeights, step: int, stopped: bool) -> str | None:
    """The finished (or ``_interrupted_step<N>``) LoRA file; the path every process reports."""
    if not path:
        return None
    if stopped:
        root, ext = os.path.splitext(path)
        path = f"{root}_interrupted_step{step}{ext}"
    if not ctx.is_main:
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    written = save_lora_file(path, weights, overwrite=ctx.config.overwrite)
    ctx.emit({"type": "saved", "path": written})
    return written


def _rotate(folder: str, pattern: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` files matching ``<prefix>_step<N><suffix>``; returns deleted."""
    regex = re.compile(r"(\d+)\D*$")
    found = []
    for path in glob.glob(os.path.join(folder, pattern)):
        m = regex.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    found.sort()
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for path in doomed:
        try:
            os.remove(path)
        except OSError:
            pass
    return doomed


def rotate(ctx: RunContext):
    """Keep the newest ``keep_last_n`` checkpoints and states."""
    config = ctx.config
    if ctx.is_main and config.keep_last_n > 0 and config.output_dir:
        name = glob.escape(config.output_name)
        _rotate(config.output_dir, f"{name}_step*.safetensors", config.keep_last_n)
        _rotate(config.state_dir or config.output_dir, f"{name}_state_step*.pt", config.keep_last_n)


def sample(ctx: RunContext, base, trainable: Trainable, step: int):
    """Preview images of the sample prompts with the adapters as trained so far."""
    config = ctx.config
    if not config.sample_prompts or not ctx.is_main:
        return
    size = config.sample_resolution or config.resolution
    if is_hosted(base):  # the host's own sampler on the model being trained
        images = []
        for line in config.sample_prompts:
            prompt = parse_prompt(line)
            images += base.sample(
                [prompt.prompt], config.sample_negative_prompt if prompt.negative_prompt is None
                else prompt.negative_prompt, config.sample_seed if prompt.seed is None else prompt.seed,
                prompt.steps or config.sample_steps, config.sample_cfg if prompt.cfg is None else prompt.cfg,
                prompt.sampler or config.sample_sampler, prompt.width or size, prompt.height or size)
    else:
        images = sample_images(
            base, ctx.accelerator.unwrap_model(trainable.unet), list(base.text_encoders), list(config.sample_prompts),
            negative_prompt=config.sample_negative_prompt, seed=config.sample_seed, steps=config.sample_steps,
            cfg=config.sample_cfg, sampler=config.sample_sampler, size=size, device=ctx.device,
            autocast=ctx.accelerator.autocast, max_token_length=config.max_token_length,
        )
    paths = []
    if config.output_dir:
        folder = os.path.join(config.output_dir, f"{config.output_name}_samples")
        os.makedirs(folder, exist_ok=True)
        for i, image in enumerate(images):
            paths.append(os.path.join(folder, f"step{step:06d}_{i:02d}.png"))
            image.save(paths[-1])
    ctx.emit({"type": "sample", "step": step, "images": images,
              "prompts": [parse_prompt(p).prompt for p in config.sample_prompts], "paths": paths})
