"""Validation: the held-out images as fixed samples, the deterministic evaluation of the LoRA being trained
(training/validation.py), its best step (``keep_best``, early stopping on the validation loss)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..dataset import Dataset, with_trigger
from ..formats import save_lora_file
from .. import flow
from ..models.hosted import is_hosted
from ..validation import (BestTracker, ValidationSample, best_path, build_samples, eval_mode, evaluate, flow_rule,
                          validation_run_info, validation_timesteps)
from .base import predict
from .context import RunContext


@dataclass
class Validation:
    """The held-out images of a run, ready to evaluate, and what the run has measured on them."""

    images: int
    samples: list[ValidationSample]
    timesteps: list[int]
    steps: set  # the optimizer steps after which the loss is measured (0: before the first)
    tracker: BestTracker
    history: list = field(default_factory=list)  # [(step, loss)]
    best_path: str | None = None  # keep_best's file, once written

    def measured(self, step: int) -> bool:
        return any(s == step for s, _ in self.history)

    def to_state(self) -> dict:
        return {"validation": self.tracker.to_dict(), "validation_history": [list(p) for p in self.history]}

    def restore(self, extra: dict) -> None:
        t = self.tracker
        if "validation" in extra:
            self.tracker = BestTracker.from_dict(extra["validation"], t.patience, t.min_delta)
        self.history = [(int(s), float(v)) for s, v in extra.get("validation_history", [])]

    def run_info(self, config) -> dict:
        return validation_run_info(config, self.tracker, self.images)


def check_best_path(config) -> None:
    """keep_best never replaces a user's file unless overwrite is on (as the main file); a resumed run
    continues its own best file."""
    if config.keep_best and config.output_dir and not config.resume_from:
        path = best_path(config.output_dir, config.output_name)
        if os.path.exists(path) and not config.overwrite:
            raise FileExistsError(f"{path} already exists (keep_best writes it); choose another output name or "
                                  "enable overwrite")


def build_validation(ctx: RunContext, base, held_out: Dataset | None, sizes: list, objective_scheduler) \
        -> Validation | None:
    """The held-out images encoded once (centre crop, no flip, masks at latent size), with the VAE on the
    device for the while; their plain caption (trigger word, no augmentation) is what they are conditioned on."""
    if held_out is None or not held_out.items:
        return None
    config = ctx.config
    hosted = is_hosted(base)  # the host places its VAE itself
    if not hosted:
        base.vae.to(ctx.device)

    def condition(item, pixels):
        height, width = pixels.pixels.shape[-2:]
        return with_trigger(item.caption, config.trigger_word), (*pixels.original_size, *pixels.crop_top_left,
                                                                 height, width)

    def encode(pixels):
        from ..cache import encode_distribution

        return encode_distribution(base, pixels)

    with torch.no_grad():
        samples = build_samples(held_out.items, sizes, encode, condition, masked_loss=config.masked_loss,
                                alpha_mask=config.alpha_mask)
    if not hosted:
        base.vae.to("cpu")  # place_base puts it back where the run needs it
    patience = config.early_stopping_patience if config.early_stopping_metric == "validation" else 0
    # flow models: the same fixed points on the 1000-step grid, as noise levels t / 1000 (kohya)
    timesteps = validation_timesteps(config.min_timestep, config.max_timestep,
                                     objective_scheduler.config.num_train_timesteps if objective_scheduler is not None
                                     else flow.NUM_TRAIN_TIMESTEPS)
    ctx.log(f"validation: {len(samples)} held-out images "
            f"({'validation_dataset ' + config.validation_dataset if config.validation_dataset else 'validation_split'}"
            f"), timesteps {timesteps}, measured before the first step"
            + (f", every {config.validate_every_n_steps} steps" if config.validate_every_n_steps else "")
            + " and after the last")
    return Validation(len(samples), samples, timesteps, set(), BestTracker(patience, config.early_stopping_min_delta))


def measure(ctx: RunContext, base, trainable, objective, validation: Validation, step: int, text_condition,
            lora_weights) -> bool:
    """The validation loss after ``step``: recorded, emitted, and with ``keep_best`` the LoRA of a new best
    step written (``lora_weights()`` builds it). ``text_condition(captions) -> (hidden, pooled)`` encodes the
    plain captions (again at each evaluation, so a trained text encoder counts). Every process evaluates
    (same value; early stopping stays in step); the main one emits and writes. Returns whether early
    stopping on the validation loss says stop."""
    config, device, dtype = ctx.config, ctx.device, ctx.weight_dtype
    unet = ctx.accelerator.unwrap_model(trainable.unet)

    rule = objective
    if objective.parameterisation.name == "flow":  # validation timesteps are on the 1000-step grid
        rule = flow_rule(flow.NUM_TRAIN_TIMESTEPS)

    def predict_fn(noisy, t, conds):
        if rule is not objective:
            t = t.float() / flow.NUM_TRAIN_TIMESTEPS
        captions, time_ids = zip(*conds)
        hidden, pooled = text_condition(list(captions))
        return predict(base, unet, noisy, t, hidden, pooled, torch.tensor(time_ids, dtype=torch.float32),
                       device, dtype)

    with eval_mode(unet, *base.text_encoders), ctx.accelerator.autocast():
        result = evaluate(predict_fn, validation.samples, validation.timesteps, rule,
                          seed=config.effective_validation_seed, batch_size=config.batch_size, device=device,
                          dtype=dtype)
    improved = validation.tracker.update(step, result.loss)
    validation.history.append((step, result.loss))
    t = validation.tracker
    ctx.emit({"type": "validation", "step": step, "loss": result.loss, "best": t.best, "best_step": t.best_step,
              "per_timestep": dict(result.per_timestep)})
    if improved and config.keep_best and step > 0 and config.output_dir:
        path = best_path(config.output_dir, config.output_name)
        if ctx.is_main:
            os.makedirs(config.output_dir, exist_ok=True)
            save_lora_file(path, lora_weights(), overwrite=True)  # our own file (checked at the start)
            ctx.emit({"type": "checkpoint", "kind": "best", "step": step, "path": path})
        validation.best_path = path
    if t.should_stop(step):
        ctx.log(f"early stopping at step {step}: the validation loss has not improved for {step - (t.best_step or 0)}"
                f" steps (best {t.best:.5f} at step {t.best_step})")
        return True
    return False
