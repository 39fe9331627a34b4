"""Setup: what every stage of one run shares (config, device, precision, processes, events, counters)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from ..adapters import check_quantize_available
from ..config import TrainConfig
from ..optim import make_optimizer

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    pass


@dataclass
class RunContext:
    config: TrainConfig
    device: torch.device
    weight_dtype: torch.dtype
    accelerator: object
    user_emit: Callable[[dict], None]
    stop: Callable[[], bool]
    started: float = field(default_factory=time.time)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    stats: dict = field(default_factory=lambda: {"vae_calls": 0, "latent_cache_hits": 0, "text_encoder_calls": 0})

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def make_accelerator(config: TrainConfig, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The precision is fixed per AcceleratorState; a host that trains several times in one process
    # (ComfyUI, the tests) must be free to change it between runs.
    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        mixed_precision=PRECISION_TO_ACCELERATE[config.precision],
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=device.type == "cpu",
    )


def start_run(config: TrainConfig, emit, stop) -> RunContext:
    """Check what can be checked before a model is loaded, then set up the device and the accelerator."""
    started, started_at = time.time(), datetime.now(timezone.utc)
    device = resolve_device(config.device)
    weight_dtype = WEIGHT_DTYPES[config.precision]
    if device.type == "cpu" and weight_dtype == torch.float16:
        raise TrainingError("precision = 'fp16' needs a GPU (fp16 loss scaling is CUDA-only); "
                            "use 'bf16' or 'fp32' on the CPU")
    if config.quantize_base == "4bit":
        check_quantize_available(device, weight_dtype)
    if config.optimizer in ("adamw8bit", "prodigy", "lion"):  # fail before loading a model
        make_optimizer(config.optimizer, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-4, 0.0,
                       config.optimizer_args, device)
    accelerator = make_accelerator(config, device)
    if accelerator.num_processes > 1:
        device = accelerator.device
    return RunContext(config, device, weight_dtype, accelerator, emit, stop, started, started_at)


def output_path(config: TrainConfig) -> str | None:
    """The final LoRA file; refused up front if it exists and overwrite is off."""
    if not config.output_dir:
        return None
    path = os.path.join(config.output_dir, config.output_name + ".safetensors")
    if os.path.exists(path) and not config.overwrite:
        raise FileExistsError(f"{path} already exists; choose another output name or enable overwrite")
    return path
