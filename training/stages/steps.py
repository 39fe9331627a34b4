"""The optimizer steps: accumulate, step, log, stop early, sample, save checkpoints; resumable from a state."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..adapters import apply_max_norm
from ..buckets import BatchPlan
from ..loss import Objective
from ..state import restore_params
from ..validation import validation_steps
from . import export
from .context import RunContext, TrainingError
from .data import Data, text_condition
from .step import micro_step_loss
from .trainable import Trainable
from .validate import Validation, measure


@dataclass
class EarlyStopping:
    """The smoothed loss (an exponential moving average) and how long it has not improved."""

    ema: float | None = None
    best: float = math.inf
    since_best: int = 0

    def update(self, loss: float, smoothing: float, min_delta: float) -> None:
        self.ema = loss if self.ema is None else smoothing * self.ema + (1 - smoothing) * loss
        if self.ema < self.best - min_delta:
            self.best, self.since_best = self.ema, 0
        else:
            self.since_best += 1


@dataclass
class LoopResult:
    step: int  # the last optimizer step done
    losses: list = field(default_factory=list)
    stopped: bool = False  # the host asked to stop
    early_stopped: bool = False
    state_path: str | None = None
    checkpoints: list = field(default_factory=list)
    tracker: EarlyStopping = field(default_factory=EarlyStopping)
    validation: Validation | None = None  # the held-out images' losses and best step

    def extra_state(self) -> dict:
        """What a state file keeps of the loop besides the weights."""
        t = self.tracker
        extra = {"losses": list(self.losses), "ema": t.ema, "best": t.best, "since_best": t.since_best}
        if self.validation is not None:
            extra.update(self.validation.to_state())
        return extra


def resume(ctx: RunContext, base, trainable: Trainable, state: dict | None, validation: Validation | None = None) \
        -> LoopResult:
    """Where the loop starts: step 0, or a saved state's step with its weights, optimizer, losses and
    validation history."""
    if state is None:
        return LoopResult(step=0, validation=validation)
    restore_params(state, trainable.models(ctx, base))
    trainable.optimizer.load_state_dict(state["optimizer"])
    trainable.lr_scheduler.load_state_dict(state["lr_scheduler"])
    extra = state.get("extra", {})
    tracker = EarlyStopping(extra.get("ema"), extra.get("best", math.inf), extra.get("since_best", 0))
    if validation is not None:
        validation.restore(extra)
    result = LoopResult(step=int(state["step"]), losses=list(extra.get("losses", [])), tracker=tracker,
                        validation=validation)
    ctx.log(f"resumed from {state['path']} at step {result.step}")
    return result


def optimizer_step(ctx: RunContext, base, data: Data, trainable: Trainable, objective: Objective, plan: BatchPlan,
                   step: int, last_save: str | None) -> float:
    """Optimizer step ``step`` (1-based) over its micro-batches; returns the mean loss."""
    config, accelerator = ctx.config, ctx.accelerator
    models = [trainable.unet] if config.train_unet else list(base.text_encoders)
    step_loss = 0.0
    for j in range(config.gradient_accumulation_steps):
        with accelerator.accumulate(*models):
            # forward: the loss of this micro-batch (the global mean across processes, for the log)
            loss = micro_step_loss(ctx, base, data, trainable, objective, plan,
                                   (step - 1) * config.gradient_accumulation_steps + j)
            global_loss = accelerator.reduce(loss.detach().float(), "mean") if ctx.world > 1 else loss.detach()
            value = float(global_loss)
            if not math.isfinite(value):
                raise TrainingError(
                    f"the loss became {value} at step {step}; stopped without saving it. "
                    + (f"The last good save is {last_save}. " if last_save else "")
                    + "Lower learning_rate, or use fp32/bf16 instead of fp16."
                )
            # backward; on the last micro-batch, average the text encoders' gradients and clip
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if ctx.world > 1 and trainable.te_params:  # DDP wraps only the UNet
                    for p in trainable.te_params:
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= ctx.world
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable.all_params, config.max_grad_norm)
            # update (the accelerator skips it until the last micro-batch)
            trainable.optimizer.step()
            trainable.optimizer.zero_grad(set_to_none=True)
        step_loss += value / config.gradient_accumulation_steps
    trainable.lr_scheduler.step()
    if config.scale_weight_norms > 0:  # kohya's max-norm regularisation, after every optimizer step
        scaled, _, _ = apply_max_norm(trainable.models(ctx, base).values(), config.scale_weight_norms)
        ctx.stats["max_norm_scaled"] = ctx.stats.get("max_norm_scaled", 0) + scaled
    return step_loss


def train_steps(ctx: RunContext, base, data: Data, trainable: Trainable, objective: Objective,
                run: LoopResult, continuation=None) -> LoopResult:
    """Steps ``run.step + 1`` to ``steps``, or until the host stops the run or the loss stops improving."""
    config = ctx.config
    plan = BatchPlan(data.dataset.epoch_indices(), data.sizes if config.enable_bucket else None,
                     config.batch_size * ctx.world, config.seed)
    validation = run.validation
    ctx.emit({"type": "start", "total": config.steps, "images": data.dataset.num_images,
              "samples": data.dataset.num_samples, "processes": ctx.world, "device": str(ctx.device),
              "precision": ctx.run_device.precision, "precision_note": ctx.run_device.note,
              "start_step": run.step,
              "losses": list(run.losses),  # a resumed run's earlier losses, from its state
              "validation": [list(p) for p in validation.history] if validation is not None else []})

    def validate(step: int) -> bool:  # True: early stopping on the validation loss says stop
        if validation is None or validation.measured(step):
            return False
        return measure(ctx, base, trainable, objective, validation, step,
                       lambda captions: text_condition(ctx, base, data, captions),
                       lambda: export.lora_weights(ctx, base, data, trainable, step, continuation))

    watch_validation = config.early_stopping_metric == "validation"
    if validation is not None:
        validation.steps = set(validation_steps(config.steps, config.validate_every_n_steps, run.step))
        validate(run.step)  # before the first step (or the resumed one)
    if config.sample_every_n_steps and run.step == 0:
        export.sample(ctx, base, trainable, 0)
    for step in range(run.step + 1, config.steps + 1):
        last_save = run.state_path or (run.checkpoints[-1] if run.checkpoints else None)
        loss = optimizer_step(ctx, base, data, trainable, objective, plan, step, last_save)
        run.step = step
        run.losses.append(loss)
        ctx.emit({"type": "step", "step": step, "total": config.steps, "loss": loss,
                  "lr": trainable.optimizer.param_groups[0]["lr"], "elapsed": time.time() - ctx.started})
        if validation is not None and step in validation.steps and validate(step) and watch_validation:
            run.early_stopped = True
        if config.early_stopping_patience and not watch_validation:
            tracker = run.tracker
            tracker.update(loss, config.early_stopping_smoothing, config.early_stopping_min_delta)
            if tracker.since_best >= config.early_stopping_patience:
                run.early_stopped = True
                ctx.log(f"early stopping at step {step}: the smoothed loss has not improved for "
                        f"{tracker.since_best} steps (best {tracker.best:.5f})")
        if config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
            export.sample(ctx, base, trainable, step)
        if run.early_stopped:
            break
        if config.save_every_n_steps and step % config.save_every_n_steps == 0 and step < config.steps:
            run.checkpoints.append(export.save_checkpoint(
                ctx, step, lambda: export.lora_weights(ctx, base, data, trainable, step, continuation)))
            if config.save_state:
                run.state_path = export.save_run_state(ctx, base, trainable, step, run.extra_state())
            export.rotate(ctx)
        if ctx.stop():
            run.stopped = True
            break
    if validation is not None:  # an early stop or a cancel: the final file's metadata holds its value too
        validate(run.step)
        t = validation.tracker
        if config.keep_best and t.best_step == 0:
            ctx.log("keep_best: the untrained LoRA (step 0) kept the best validation loss; no _best file written")
    return run
