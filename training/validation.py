"""Validation loss: held-out images, a deterministic evaluator, and the best-step bookkeeping.

As kohya's ``docs/validation.md`` (PR #1903) does it, the validation loss moves only when the LoRA does:
every evaluation uses the same held-out images, the same fixed timesteps (kohya's 10, 350, 500, 650, 990,
spread over the trained timestep range) and the same noise per (held-out image, timestep), drawn from
generators seeded by (validation seed, image id, timestep index), not from a batch stream; no dropout, no
caption augmentation (the loop passes the plain caption), centre crop, no flip, the latent distribution's
mean, under ``no_grad``. Losses are summed per (image, timestep) in a fixed order, so the value does not
depend on the batch size.

The loop plugs its model in through ``predict_fn(noisy_latents, timesteps, conditionings) -> prediction``
and a :class:`TargetRule` (how a family noises latents and what its prediction targets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .dataset import Dataset, DatasetError, add_regularization, load_dataset, load_reg_dataset, mask_to_latent
from .loss import apply_loss_mask

VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)  # kohya's fixed list, on a 1000-step schedule
_MASK63 = (1 << 63) - 1
_SALT_SPLIT, _SALT_NOISE = 8_081, 9_091


# -------------------------------------------------------------------------------- the held-out images
def validation_count(num_images: int, split: float) -> int:
    """Images held out: ``split`` below 1 is a fraction (rounded, at least 1), from 1 a count. At least one
    image must stay to train on."""
    if split <= 0:
        return 0
    count = max(1, round(num_images * split)) if split < 1 else int(split)
    if count >= num_images:
        raise DatasetError(
            f"validation_split = {split:g} holds out {count} of the {num_images} training images; at least one "
            "must stay to train on. Lower validation_split, or add images")
    return count


def split_validation(dataset: Dataset, split: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): ``validation_count`` train images chosen by ``seed``, whatever their order on
    disk (drawn over the paths sorted). Held-out images leave the training set with all their repeats. The
    validation set lists each image once (repeats 1). Split before adding regularization images."""
    if any(item.is_reg for item in dataset.items):
        raise ValueError("split_validation: split before add_regularization (load_training_sets does), so the "
                         "reg repeats balance the images that train")
    candidates = sorted((item.image_path, i) for i, item in enumerate(dataset.items))
    count = validation_count(len(candidates), split)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + _SALT_SPLIT) & _MASK63)
    order = torch.randperm(len(candidates), generator=generator).tolist()
    held = {candidates[j][1] for j in order[:count]}
    train_items = [item for i, item in enumerate(dataset.items) if i not in held]
    val_items = [dataclasses.replace(dataset.items[i], repeats=1) for i in sorted(held)]
    train = dataclasses.replace(dataset, items=train_items)
    validation = Dataset(dataset.root, val_items)
    return train, validation


def load_training_sets(config) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None) for a TrainConfig: the dataset (with ``mask_dir``), less the held-out
    images of ``validation_split``, then balanced against ``reg_dataset`` (so the reg repeats match the
    images that train); or ``validation_dataset``, a folder read like the dataset (masks/ beside its images)."""
    dataset = load_dataset(config.dataset, None, config.mask_dir or None)
    validation = None
    if config.validation_dataset:
        folder = load_dataset(config.validation_dataset)
        validation = Dataset(folder.root, [dataclasses.replace(item, repeats=1) for item in folder.items],
                             [f"validation_dataset: {w}" for w in folder.warnings])
    elif config.validation_split:
        dataset, validation = split_validation(dataset, config.validation_split, config.effective_validation_seed)
    if config.reg_dataset:
        dataset = add_regularization(dataset, load_reg_dataset(config.reg_dataset))
    return dataset, validation


def validation_timesteps(min_timestep: int = 0, max_timestep: int = 1000, num_train_timesteps: int = 1000) \
        -> list[int]:
    """kohya's fixed timesteps mapped onto the trained range [min_timestep, max_timestep), in order, without
    repeats."""
    span = max_timestep - min_timestep
    out = []
    for t in VALIDATION_TIMESTEPS:
        value = min_timestep + int(t * span / num_train_timesteps)
        value = min(max(value, min_timestep), max_timestep - 1)
        if value not in out:
            out.append(value)
    return out


def validation_noise(seed: int, sample_id: int, timestep_index: int, shape) -> torch.Tensor:
    """The fixed noise of one held-out image at one of the fixed timesteps (CPU, float32)."""
    generator = torch.Generator().manual_seed(
        (seed * 1_000_003 + sample_id * 7_919 + timestep_index * 104_729 + _SALT_NOISE * 65_537) & _MASK63)
    return torch.randn(tuple(shape), generator=generator)


# -------------------------------------------------------------------------------- noising and targets
@dataclass(frozen=True)
class TargetRule:
    """How a family noises a latent at a timestep and what its prediction is compared with."""

    noisy: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, noise, t) -> input
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, noise, t) -> target


def ddpm_rule(scheduler, prediction_type: str) -> TargetRule:
    """SD1.x/SD2.x/SDXL: DDPM noising; the target is the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction type {prediction_type!r}: use 'epsilon' or 'v_prediction'")

    def target(latents, noise, t):
        return scheduler.get_velocity(latents, noise, t) if prediction_type == "v_prediction" else noise

    return TargetRule(lambda latents, noise, t: scheduler.add_noise(latents, noise, t), target)


def flow_rule(num_train_timesteps: int = 1000) -> TargetRule:
    """Rectified flow (SD3, Flux, ...): sigma = t / T, input (1 - sigma) x + sigma n, target n - x."""

    def sigma(t, like):
        return (t.to(like.device, torch.float32) / num_train_timesteps).view(-1, *([1] * (like.dim() - 1)))

    return TargetRule(lambda x, n, t: (1 - sigma(t, x)) * x + sigma(t, x) * n, lambda x, n, t: n - x)


# -------------------------------------------------------------------------------- the evaluator
@dataclass
class ValidationSample:
    """One held-out image as the evaluator sees it."""

    sample_id: int  # stable across evaluations (its index in the validation set): seeds its noise
    latent: torch.Tensor  # [C, h, w]: the VAE distribution's mean (centre crop, no flip)
    conditioning: Any  # passed through to predict_fn (e.g. the text embeddings of the plain caption)
    mask: torch.Tensor | None = None  # [1, h, w] (or pixel size) in [0, 1] with masked loss


def build_samples(items, sizes: list[tuple[int, int]], encode: Callable, condition: Callable, *,
                  masked_loss: bool = False, alpha_mask: bool = False) -> list[ValidationSample]:
    """ValidationSamples for the held-out ``items`` at their training ``sizes`` (width, height): centre
    crop, no flip, the mask through the same crop (:func:`dataset.training_pixels`) reduced to latent size.
    ``encode(pixels [1, 3, H, W]) -> (mean, std)`` (cache.encode_distribution); ``condition(item, pixels)``
    -> what predict_fn gets for it: the plain caption (trigger word, no shuffle, no dropout) and, for SDXL,
    the time ids from ``pixels.original_size`` and ``pixels.crop_top_left`` (a dataset.TrainingPixels)."""
    from .dataset import training_pixels

    out = []
    for sample_id, (item, (width, height)) in enumerate(zip(items, sizes)):
        pixels = training_pixels(item, width, height, masked_loss=masked_loss, alpha_mask=alpha_mask)
        mean, _ = encode(pixels.pixels.unsqueeze(0))
        latent = mean[0].float().cpu()
        mask = None if pixels.mask is None else mask_to_latent(pixels.mask, tuple(latent.shape[-2:]))
        out.append(ValidationSample(sample_id, latent, condition(item, pixels), mask))
    return out


@dataclass
class ValidationResult:
    loss: float  # the mean over every (image, timestep)
    per_timestep: dict[int, float] = field(default_factory=dict)
    per_sample: dict[int, float] = field(default_factory=dict)  # sample_id -> mean over the timesteps


def mse_elements(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()) ** 2


@contextlib.contextmanager
def eval_mode(*modules):
    """Modules in eval mode (dropout off) for the block, then back to what they were."""
    modules = [m for m in modules if m is not None]
    states = [(m, [(sub, sub.training) for sub in m.modules()]) for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for _, subs in states:
            for sub, training in subs:
                sub.training = training


def evaluate(predict_fn: Callable, samples: list[ValidationSample], timesteps: list[int], rule: TargetRule, *,
             seed: int, batch_size: int = 1, element_loss: Callable = mse_elements, device=None,
             dtype: torch.dtype | None = None) -> ValidationResult:
    """The validation loss of ``samples`` at each of ``timesteps`` (see the module docstring).

    ``predict_fn(noisy [B, C, h, w], timesteps [B] (long), conditionings: list) -> prediction [B, C, h, w]``
    runs the model; it is called under ``no_grad`` with up to ``batch_size`` (image, timestep) pairs of one
    latent size. ``element_loss(prediction, target) -> [B, C, h, w]`` (default squared error); masks weight
    it as in training (:func:`loss.apply_loss_mask`). ``dtype``: the model's input dtype.
    """
    if not samples or not timesteps:
        raise ValueError("validation needs at least one held-out image and one timestep")
    if batch_size < 1:
        raise ValueError("batch_size must be 1 or more")
    if len({s.sample_id for s in samples}) != len(samples):
        raise ValueError("validation samples need distinct sample_id values (they seed the noise)")
    jobs = [(s, j, t) for s in samples for j, t in enumerate(timesteps)]
    losses: dict[tuple[int, int], float] = {}
    with torch.no_grad():
        start = 0
        while start < len(jobs):
            shape = tuple(jobs[start][0].latent.shape)
            chunk = []
            while start < len(jobs) and len(chunk) < batch_size and tuple(jobs[start][0].latent.shape) == shape:
                chunk.append(jobs[start])
                start += 1
            latents = torch.stack([s.latent.float() for s, _, _ in chunk]).to(device)
            noise = torch.stack([validation_noise(seed, s.sample_id, j, shape) for s, j, _ in chunk]).to(device)
            t = torch.tensor([t for _, _, t in chunk], dtype=torch.long, device=device)
            noisy = rule.noisy(latents, noise, t)
            prediction = predict_fn(noisy.to(dtype) if dtype is not None else noisy, t,
                                    [s.conditioning for s, _, _ in chunk])
            target = rule.target(latents, noise, t)
            masks = None
            if any(s.mask is not None for s, _, _ in chunk):  # each at latent size, so pixel masks mix too
                masks = torch.stack([mask_to_latent(s.mask.float(), shape[-2:]) if s.mask is not None
                                     else torch.ones(1, *shape[-2:]) for s, _, _ in chunk]).to(device)
            per = apply_loss_mask(element_loss(prediction, target), masks)
            for (s, j, _), value in zip(chunk, per.double().cpu().tolist()):
                losses[(s.sample_id, j)] = value
    ordered = sorted(losses)
    per_timestep = {t: math.fsum(losses[(s.sample_id, j)] for s in samples) / len(samples)
                    for j, t in enumerate(timesteps)}
    per_sample = {s.sample_id: math.fsum(losses[(s.sample_id, j)] for j in range(len(timesteps))) / len(timesteps)
                  for s in samples}
    return ValidationResult(math.fsum(losses[k] for k in ordered) / len(ordered), per_timestep, per_sample)


# -------------------------------------------------------------------------------- best step, early stopping
@dataclass
class BestTracker:
    """The best (lowest) value of a metric and its step; early stopping after ``patience`` steps without an
    improvement of more than ``min_delta`` (patience 0: never). Saved in a resumable state as ``to_dict``."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    last: float | None = None
    last_step: int | None = None

    def update(self, step: int, value: float) -> bool:
        """Record ``value`` at ``step``; True when it is a new best (then keep_best saves the LoRA)."""
        self.last, self.last_step = float(value), int(step)
        if math.isfinite(value) and value < self.best - self.min_delta:
            self.best, self.best_step = float(value), int(step)
            return True
        return False

    def should_stop(self, step: int) -> bool:
        """Patience is counted in steps since the best value (or since the first value, none being best)."""
        if self.patience <= 0 or self.last_step is None:
            return False
        since = step - (self.best_step if self.best_step is not None else 0)
        return since >= self.patience

    def to_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "last": self.last, "last_step": self.last_step}

    @classmethod
    def from_dict(cls, values: dict, patience: int = 0, min_delta: float = 0.0) -> "BestTracker":
        return cls(patience, min_delta, float(values.get("best", math.inf)), values.get("best_step"),
                   values.get("last"), values.get("last_step"))


def validation_steps(total_steps: int, every: int, start_step: int = 0) -> list[int]:
    """The steps after which the validation loss is measured: ``start_step`` (before training; 0 for a new
    run), every ``every`` steps, and the last step."""
    steps = {start_step, total_steps}
    if every > 0:
        steps.update(range(every * (start_step // every + 1), total_steps, every))
    return sorted(s for s in steps if start_step <= s <= total_steps)


def best_path(output_dir: str, output_name: str) -> str:
    """Where ``keep_best`` writes the LoRA of the best validation step."""
    return os.path.join(output_dir, f"{output_name}_best.safetensors")


def validation_run_info(config, tracker: BestTracker | None, num_validation_images: int = 0) -> dict:
    """The formats.RunInfo fields of issue 15 (``ss_masked_loss``, ``ss_validation_loss``,
    ``ss_best_validation_step``, ...) for ``RunInfo(**...)``; fields that do not apply are left out."""
    out: dict = {}
    if config.masked_loss:
        out["masked_loss"] = True
    if config.alpha_mask:
        out["alpha_mask"] = True
    if num_validation_images:
        out["num_validation_images"] = num_validation_images
        out["validation_seed"] = config.effective_validation_seed
        if config.validation_split:
            out["validation_split"] = config.validation_split
    if tracker is not None and tracker.last is not None:
        out["validation_loss"], out["validation_step"] = tracker.last, tracker.last_step
        if tracker.best_step is not None:
            out["best_validation_loss"], out["best_validation_step"] = tracker.best, tracker.best_step
    return out
