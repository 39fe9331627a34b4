"""The training run, top to bottom: dataset -> caches -> base model -> adapters -> loop -> export.

Hosts (the ComfyUI nodes, the CLI) call ``train(config, events=..., should_stop=...)``. Events are plain
dicts: ``log`` {message}, ``cache`` {done, total}, ``start`` {total, images, samples, processes, device,
precision (what the device trains in), precision_note (why that differs from the setting, or ''), start_step,
losses (a resumed run's losses up to start_step, kept in its state), validation ([step, loss] so far)},
``step`` {step, total, loss, lr, elapsed}, ``checkpoint`` {step, path} (a LoRA saved every N steps),
``state`` {step, path} (a resumable state), ``sample`` {step, images: [PIL], prompts, paths},
``validation`` {step, loss, best, best_step, per_timestep} (the held-out images' loss, before the first step,
every ``validate_every_n_steps`` and after the last; a ``checkpoint`` with kind ``best`` follows a new best
under ``keep_best``), ``saved`` {path} (the final LoRA), ``done`` {steps, seconds, stopped, early_stopped}. ``should_stop`` is
polled once per optimizer step and ends the run early, keeping what was learned (and, with
``save_state_on_stop``, a state to resume from with ``resume_from``).

The same seed gives the same run whatever the batch layout or the number of processes, and a run resumed at
step N draws exactly what an uninterrupted run would have drawn (seeds.py). Under ``accelerate launch`` each
process takes its slice of the global batch. The stages are in ``training/stages/``, the objective in
``loss.py``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from .bnb_gate import bitsandbytes_hidden_unless, needs_bitsandbytes
from .config import TrainConfig
from .continuation import Continuation
from .loss import Objective
from .optim import OptionalDependencyError
from .seeds import sample_generator  # noqa: F401 (tests draw a sample's generator from here)
from .stages import export
from .stages.base import load_base
from .stages.context import TrainingError, output_path, start_run
from .stages.data import build_caches, load_data
from .stages.steps import resume, train_steps
from .stages.trainable import attach_trainable, place_base
from .stages.validate import check_best_path
from .state import check_compatible, load_state

__all__ = ["train", "TrainResult", "TrainingError", "sample_generator"]


@dataclass
class TrainResult:
    lora: object  # formats.LoraWeights
    path: str | None
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: bool = False  # the host asked to stop (Cancel, Ctrl-C)
    seconds: float = 0.0
    config: TrainConfig | None = None
    early_stopped: bool = False  # the smoothed loss stopped improving (early_stopping_patience)
    state_path: str | None = None  # the last resumable state written, if any
    checkpoints: list = field(default_factory=list)  # LoRA files saved every N steps
    stats: dict = field(default_factory=dict)  # cache hits, VAE calls, processes, ...
    validation: list = field(default_factory=list)  # [(step, validation loss)]
    best_validation_step: int | None = None
    best_validation_loss: float | None = None
    best_path: str | None = None  # keep_best's <name>_best.safetensors


def train(config: TrainConfig, base=None, events=None, should_stop=None) -> TrainResult:
    """Run one training from ``config``; see the module docstring. Returns the LoRA and its file."""
    config.validate(model_given=base is not None)
    # Hosts such as ComfyUI run nodes under inference_mode; autograd needs it off, and every tensor on
    # the backward path must be created (models loaded, caches built) inside this block.
    with torch.inference_mode(False), torch.enable_grad(), bitsandbytes_hidden_unless(needs_bitsandbytes(config)):
        try:
            return _train(config, base, events or (lambda event: None), should_stop or (lambda: False))
        except OptionalDependencyError as e:
            raise TrainingError(str(e)) from None


def _train(config: TrainConfig, base, emit, stop) -> TrainResult:
    # setup: device, precision, processes; the output file and a file or state to continue from
    ctx = start_run(config, emit, stop)
    path = output_path(ctx.config)
    check_best_path(ctx.config)
    continuation = Continuation(config.network_weights) if config.network_weights else None
    if continuation is not None:  # adapter, rank and alpha come from the file
        ctx = dataclasses.replace(ctx, config=continuation.resolve(ctx.config))
    state = load_state(ctx.config.resume_from) if ctx.config.resume_from else None
    if state is not None:
        check_compatible(state, ctx.trajectory_config())
    # dataset, base model, caches
    dataset, held_out = load_data(ctx)
    base = load_base(ctx, base)
    objective = Objective.for_run(ctx.config, base.noise_scheduler, base.prediction_type)
    data = build_caches(ctx, base, dataset, held_out, objective.scheduler)
    # adapters on the placed base, optimizer, schedule
    place_base(ctx, base, data)
    trainable = attach_trainable(ctx, base, continuation)
    # the loop
    run = train_steps(ctx, base, data, trainable, objective, resume(ctx, base, trainable, state, data.validation), continuation)
    # export
    ctx.accelerator.wait_for_everyone()
    trainable.unet.eval()
    if trainable.dropout is not None:  # the model goes back to the host without the dropout hooks
        trainable.dropout.remove()
    weights = export.lora_weights(ctx, base, data, trainable, run.step, continuation)
    cfg = ctx.config
    if path and ((run.stopped and cfg.save_state_on_stop) or (cfg.save_state and not run.stopped)):
        run.state_path = export.save_run_state(ctx, base, trainable, run.step, run.extra_state())
    written = export.save_final(ctx, path, weights, run.step, run.stopped)
    ctx.accelerator.wait_for_everyone()
    seconds = time.time() - ctx.started
    ctx.stats["processes"] = ctx.world
    ctx.emit({"type": "done", "steps": run.step, "seconds": seconds, "stopped": run.stopped,
              "early_stopped": run.early_stopped})
    v = data.validation
    return TrainResult(weights, written, run.losses, run.step, run.stopped, seconds, cfg,
                       early_stopped=run.early_stopped, state_path=run.state_path,
                       checkpoints=[c for c in run.checkpoints if c], stats=dict(ctx.stats),
                       validation=list(v.history) if v else [],
                       best_validation_step=v.tracker.best_step if v else None,
                       best_validation_loss=v.tracker.best if v and v.tracker.best_step is not None else None,
                       best_path=v.best_path if v else None)
