"""Setup: what every stage of one run shares (config, device, precision, processes, events, counters)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from .. import devices
from ..adapters import check_quantize_available
from ..config import TrainConfig
from ..optim import make_optimizer


class TrainingError(RuntimeError):
    pass


@dataclass
class RunContext:
    config: TrainConfig
    run_device: devices.RunDevice  # where and in what precision the run trains (what was asked: config)
    accelerator: object
    user_emit: Callable[[dict], None]
    stop: Callable[[], bool]
    started: float = field(default_factory=time.time)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    stats: dict = field(default_factory=lambda: {"vae_calls": 0, "latent_cache_hits": 0, "text_encoder_calls": 0})

    @property
    def device(self) -> torch.device:
        return self.run_device.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.run_device.dtype

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def emit(self, event: dict):
        if self.is_main:  # one process speaks for all
            self.user_emit(event)

    def log(self, message: str):
        self.emit({"type": "log", "message": message})

    def trajectory_config(self) -> dict:
        """The settings a resumed run must share with the run that saved the state."""
        values = self.config.to_dict()
        values["num_processes"] = self.world
        return values


def make_accelerator(config: TrainConfig, run_device: devices.RunDevice):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The precision is fixed per AcceleratorState; a host that trains several times in one process
    # (ComfyUI, the tests) must be free to change it between runs.
    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**run_device.accelerator_kwargs(),
                       gradient_accumulation_steps=config.gradient_accumulation_steps)


def start_run(config: TrainConfig, emit, stop) -> RunContext:
    """Check what can be checked before a model is loaded, then set up the device and the accelerator."""
    started, started_at = time.time(), datetime.now(timezone.utc)
    try:  # the device, and the precision it really trains in (a precision it lacks is replaced, with a note)
        run_device = devices.plan(config.device, config.precision)
    except (devices.DeviceError, devices.PrecisionError) as e:
        raise TrainingError(str(e)) from None
    if config.quantize_base == "4bit":
        check_quantize_available(run_device.device, run_device.dtype)
    if config.optimizer in ("adamw8bit", "prodigy", "lion"):  # fail before loading a model
        make_optimizer(config.optimizer, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-4, 0.0,
                       config.optimizer_args, run_device.device)
    accelerator = make_accelerator(config, run_device)
    if accelerator.num_processes > 1:  # under accelerate launch each process trains on its own device
        run_device = dataclasses.replace(run_device, device=accelerator.device)
    ctx = RunContext(config, run_device, accelerator, emit, stop, started, started_at)
    if run_device.note:  # said once, before anything loads: the CLI prints it, the node shows it
        ctx.log(run_device.note)
    return ctx


def output_path(config: TrainConfig) -> str | None:
    """The final LoRA file; refused up front if it exists and overwrite is off."""
    if not config.output_dir:
        return None
    path = os.path.join(config.output_dir, config.output_name + ".safetensors")
    if os.path.exists(path) and not config.overwrite:
        raise FileExistsError(f"{path} already exists; choose another output name or enable overwrite")
    return path
