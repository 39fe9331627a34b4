"""The training configuration: one dataclass, loaded from TOML or built by a host, checked up front.

Every field is documented in the README's "Configuration keys" table; the same names are the TOML keys
and the Train LoRA node's inputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

PRECISIONS = ("fp32", "bf16", "fp16")
TARGET_PRESETS = ("attention",)
DEVICES = ("auto", "cpu", "cuda", "mps")


_RESERVED_NAMES = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file name inside the output folder, or None if it can."""
    if not name or not name.strip():
        return "give the LoRA a name"
    if "\0" in name or any(ord(c) < 32 for c in name):
        return "control characters are not allowed"
    if "/" in name or "\\" in name or name in (".", "..") or ":" in name:
        return "use a plain file name: no folders, '..', ':' or drive letters"
    if name != name.strip() or name.endswith("."):
        return "no leading/trailing spaces or trailing dots"
    if name.split(".")[0].lower() in _RESERVED_NAMES:
        return f"'{name}' is a reserved device name on Windows; choose another"
    if len(name.encode()) > 200:
        return "use a name shorter than 200 bytes"
    return None


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and says what to use instead."""


@dataclass
class TrainConfig:
    checkpoint: str = ""
    dataset: str = ""
    output_dir: str = "."
    output_name: str = "my_lora"
    tokenizer: str | None = None
    steps: int = 500
    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 1e-4
    resolution: int = 512
    batch_size: int = 1
    seed: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    target: str = "attention"
    center_crop: bool = True
    flip: bool = True
    device: str = "auto"
    overwrite: bool = False
    trigger_word: str = ""
    family: str | None = None
    log_every: int = 10
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        def need(cond, key, message):
            if not cond:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: {message}")

        need(bool(self.checkpoint), "checkpoint", "set it to a .safetensors checkpoint or a diffusers folder")
        need(bool(self.dataset), "dataset", "set it to a folder of images with captions")
        need(isinstance(self.steps, int) and self.steps >= 1, "steps", "use a whole number of at least 1")
        need(isinstance(self.rank, int) and 1 <= self.rank <= 1024, "rank", "use a whole number from 1 to 1024")
        need(self.alpha > 0 and math.isfinite(self.alpha), "alpha", "use a positive number (commonly equal to rank)")
        need(
            0 < self.learning_rate < 1 and math.isfinite(self.learning_rate),
            "learning_rate",
            "use a positive number below 1 (1e-4 is a common start)",
        )
        need(
            isinstance(self.resolution, int) and 64 <= self.resolution <= 4096 and self.resolution % 8 == 0,
            "resolution",
            "use a multiple of 8 from 64 to 4096 (512 for SD1.x, 1024 for SDXL)",
        )
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "use 1 or more")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "use 1 or more")
        need(self.max_grad_norm >= 0, "max_grad_norm", "use 0 (off) or a positive number")
        need(self.precision in PRECISIONS, "precision", f"use one of {', '.join(PRECISIONS)}")
        need(self.target in TARGET_PRESETS, "target", f"use one of {', '.join(TARGET_PRESETS)}")
        need(self.device in DEVICES or self.device.startswith("cuda:"), "device", f"use one of {', '.join(DEVICES)}")
        if self.output_name.lower().endswith(".safetensors"):
            self.output_name = self.output_name[: -len(".safetensors")]
        problem = output_name_problem(self.output_name)
        need(problem is None, "output_name", problem or "")
        return self

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; the README lists the keys this version reads"
            )
        kwargs = dict(values)
        for f in dataclasses.fields(cls):
            if f.name in kwargs and f.type in ("float",) and isinstance(kwargs[f.name], int):
                kwargs[f.name] = float(kwargs[f.name])
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str) -> "TrainConfig":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        base = os.path.dirname(os.path.abspath(path))
        config = cls.from_dict(values, source=path)
        # Relative paths in a config file are relative to that file, not to the shell's folder.
        for key in ("checkpoint", "dataset", "output_dir", "tokenizer"):
            value = getattr(config, key)
            if value and not os.path.isabs(value):
                setattr(config, key, os.path.normpath(os.path.join(base, value)))
        return config

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values.pop("extra")
        return values
