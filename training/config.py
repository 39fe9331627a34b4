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
TARGET_PRESETS = ("attention", "attention_ff", "full", "custom")
ADAPTERS = ("lora", "loha", "lokr", "dora")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "lion", "adafactor", "sgd")
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)
LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
CACHE_MODES = ("memory", "disk", "none")
ATTENTION_BACKENDS = ("sdpa", "eager")
QUANTIZE = ("none", "4bit")
SAMPLERS = ("euler", "euler_a", "ddim", "dpm++")
MAX_TOKEN_LENGTHS = (75, 150, 225)
DEVICES = ("auto", "cpu", "cuda", "mps")
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
EARLY_STOPPING_METRICS = ("train", "validation")


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
    # adapters
    adapter: str = "lora"
    target_modules: str = ""
    conv_rank: int = 0
    conv_alpha: float = 0.0
    rslora: bool = False
    train_unet: bool = True
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    network_weights: str = ""
    quantize_base: str = "none"
    # optimisation
    optimizer: str = "adamw"
    optimizer_args: dict = field(default_factory=dict)
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0.0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    loss_type: str = "mse"
    huber_c: float = 0.1
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    min_timestep: int = 0
    max_timestep: int = 1000
    zero_terminal_snr: bool = False
    # kohya's loss / noise / network extras (README "Optimisation" and "Adapter")
    huber_schedule: str = "constant"
    huber_scale: float = 1.0
    debiased_estimation_loss: bool = False
    noise_offset_random_strength: bool = False
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    loraplus_lr_ratio: float = 0.0
    loraplus_unet_lr_ratio: float = 0.0
    loraplus_text_encoder_lr_ratio: float = 0.0
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    scale_weight_norms: float = 0.0
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    # data
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    cache_latents: str = "memory"
    cache_dir: str = ""
    cache_text_embeddings: bool = True
    # kohya's data extras (README "Data")
    reg_dataset: str = ""
    prior_loss_weight: float = 1.0
    max_token_length: int = 75
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    fp8_base: bool = False
    torch_compile: bool = False
    # runs
    save_every_n_steps: int = 0
    keep_last_n: int = 0
    save_state: bool = False
    save_state_on_stop: bool = True
    state_dir: str = ""
    resume_from: str = ""
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    early_stopping_smoothing: float = 0.9
    sample_every_n_steps: int = 0
    sample_prompts: list = field(default_factory=list)
    sample_negative_prompt: str = ""
    sample_seed: int = 0
    sample_steps: int = 20
    sample_cfg: float = 7.0
    sample_sampler: str = "euler"
    sample_resolution: int = 0
    extra: dict = field(default_factory=dict)
    # --- validation and masked loss (issue 15) ---
    masked_loss: bool = False  # weight the loss per latent pixel by a mask (masks/<stem>.* or mask_dir)
    alpha_mask: bool = False  # the image's own alpha channel is its mask (implies masked loss)
    mask_dir: str = ""  # a folder of masks named like the images (default: masks/ beside the images)
    validation_split: float = 0.0  # below 1: a fraction of the images held out; 1 or more: a count of images
    validation_dataset: str = ""  # a folder of held-out images instead of validation_split
    validate_every_n_steps: int = 0  # 0: only before the first and after the last step
    validation_seed: int | None = None  # the held-out images and their noise; None: seed
    early_stopping_metric: str = "train"  # "validation": early stopping watches the validation loss
    keep_best: bool = False  # also write <name>_best.safetensors at the lowest validation loss

    @property
    def effective_text_encoder_lr(self) -> float:
        """The text encoders' learning rate: ``text_encoder_lr`` or half the UNet's."""
        return self.learning_rate / 2 if self.text_encoder_lr is None else float(self.text_encoder_lr)

    def token_warmup_steps(self) -> int:
        """``token_warmup_step`` as a step count (below 1: a fraction of ``steps``, floored as kohya does)."""
        w = float(self.token_warmup_step)
        return int(math.floor(w * self.steps)) if 0 < w < 1 else int(w)

    def warmup_steps(self) -> int:
        """``lr_warmup_steps`` as a step count (a value below 1 is a fraction of ``steps``)."""
        w = float(self.lr_warmup_steps)
        return int(round(w * self.steps)) if 0 < w < 1 else int(w)

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
        need(self.target != "custom" or bool(self.target_modules.strip()), "target_modules",
             "target = 'custom' needs target_modules: a regex or comma-separated module names")
        need(self.adapter in ADAPTERS, "adapter", f"use one of {', '.join(ADAPTERS)}")
        need(isinstance(self.conv_rank, int) and 0 <= self.conv_rank <= 1024, "conv_rank", "use 0 (= rank) to 1024")
        need(self.conv_alpha >= 0, "conv_alpha", "use 0 (= conv_rank) or a positive number")
        need(self.train_unet or self.train_text_encoder, "train_unet",
             "train the UNet, the text encoder(s) or both (train_text_encoder = true)")
        need(self.text_encoder_lr is None or 0 <= self.text_encoder_lr < 1, "text_encoder_lr",
             "use a number from 0 to 1, or leave it out for half the learning_rate")
        need(self.quantize_base in QUANTIZE, "quantize_base", f"use one of {', '.join(QUANTIZE)}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"use one of {', '.join(OPTIMIZERS)}")
        need(isinstance(self.optimizer_args, dict), "optimizer_args", "use a table, e.g. {betas = [0.9, 0.99]}")
        need(self.weight_decay >= 0, "weight_decay", "use 0 or a positive number")
        need(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"use one of {', '.join(LR_SCHEDULERS)}")
        need(0 <= self.lr_warmup_steps and (self.lr_warmup_steps < 1 or float(self.lr_warmup_steps).is_integer()),
             "lr_warmup_steps", "use a step count, or a fraction below 1 of steps")
        need(self.lr_scheduler_num_cycles >= 1, "lr_scheduler_num_cycles", "use 1 or more")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"use one of {', '.join(LOSS_TYPES)}")
        need(self.huber_c > 0, "huber_c", "use a positive number (0.1 is kohya's default)")
        need(self.min_snr_gamma >= 0, "min_snr_gamma", "use 0 (off) or a positive number (5 is common)")
        need(self.noise_offset >= 0, "noise_offset", "use 0 (off) or a small positive number (0.05-0.1)")
        need(self.huber_schedule in HUBER_SCHEDULES, "huber_schedule", f"use one of {', '.join(HUBER_SCHEDULES)}")
        need(self.huber_scale > 0, "huber_scale", "use a positive number (1.0 is kohya's default)")
        need(isinstance(self.multires_noise_iterations, int) and 0 <= self.multires_noise_iterations <= 64,
             "multires_noise_iterations", "use 0 (off) or a whole number (6-10 is kohya's advice)")
        need(0 <= self.multires_noise_discount <= 1, "multires_noise_discount",
             "use a number from 0 to 1 (kohya's default 0.3)")
        need(self.ip_noise_gamma >= 0, "ip_noise_gamma", "use 0 (off) or a small positive number (about 0.1)")
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            need(getattr(self, key) >= 0 and math.isfinite(getattr(self, key)), key,
                 "use 0 (off) or a positive ratio (16 is the LoRA+ paper's advice)")
            need(getattr(self, key) == 0 or self.adapter in ("lora", "dora"), key,
                 f"LoRA+ applies to adapter = 'lora' or 'dora', not {self.adapter!r}; set it to 0")
        for key in ("network_dropout", "rank_dropout", "module_dropout"):
            need(0 <= getattr(self, key) < 1, key, "use a probability from 0 (off) to below 1 (0.1 is common)")
        need((self.network_dropout == 0 and self.rank_dropout == 0) or self.adapter in ("lora", "dora"),
             "network_dropout" if self.network_dropout else "rank_dropout",
             f"applies to adapter = 'lora' or 'dora', not {self.adapter!r}; set it to 0")
        need(self.module_dropout == 0 or self.adapter == "lora", "module_dropout",
             f"applies to adapter = 'lora' only, not {self.adapter!r}; set it to 0")
        need(self.scale_weight_norms >= 0 and math.isfinite(self.scale_weight_norms), "scale_weight_norms",
             "use 0 (off) or a positive maximum norm (1.0 is common)")
        need(self.scale_weight_norms == 0 or self.adapter == "lora", "scale_weight_norms",
             f"max-norm regularisation applies to adapter = 'lora' only, not {self.adapter!r}; set it to 0")
        need(0 <= self.min_timestep < self.max_timestep <= 1000, "min_timestep",
             "use 0 <= min_timestep < max_timestep <= 1000")
        need(self.attention in ATTENTION_BACKENDS, "attention", f"use one of {', '.join(ATTENTION_BACKENDS)}")
        for key in ("min_bucket_reso", "max_bucket_reso"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 64, key, "use 64 or more")
        need(self.min_bucket_reso <= self.max_bucket_reso, "min_bucket_reso", "must not exceed max_bucket_reso")
        need(self.bucket_reso_steps >= 8 and self.bucket_reso_steps % 8 == 0, "bucket_reso_steps",
             "use a multiple of 8 (64 is usual)")
        need(self.keep_tokens >= 0, "keep_tokens", "use 0 or more")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            need(0 <= getattr(self, key) <= 1, key, "use a fraction from 0 to 1")
        need(self.caption_dropout_every_n_epochs >= 0, "caption_dropout_every_n_epochs", "use 0 (off) or more")
        need(self.cache_latents in CACHE_MODES, "cache_latents", f"use one of {', '.join(CACHE_MODES)}")
        need(isinstance(self.reg_dataset, str), "reg_dataset", "use a folder path, or \"\" for none")
        need(self.prior_loss_weight >= 0 and math.isfinite(self.prior_loss_weight), "prior_loss_weight",
             "use 0 or a positive number (1.0 is kohya's default)")
        need(self.max_token_length in MAX_TOKEN_LENGTHS, "max_token_length",
             f"use one of {', '.join(map(str, MAX_TOKEN_LENGTHS))} (tokens per caption)")
        need(isinstance(self.token_warmup_min, int) and self.token_warmup_min >= 0, "token_warmup_min",
             "use a whole number of tags, 0 or more (kohya's default 1)")
        need(0 <= self.token_warmup_step and (self.token_warmup_step < 1 or float(self.token_warmup_step).is_integer()),
             "token_warmup_step", "use 0 (off), a step count, or a fraction below 1 of steps")
        need(not self.fp8_base or self.adapter != "dora", "fp8_base",
             "DoRA reads the base weights directly and cannot use float8 ones; use adapter = 'lora', or "
             "fp8_base = false")
        need(not self.fp8_base or self.quantize_base == "none", "fp8_base",
             "the base is already quantized (quantize_base = '4bit'); use one of the two")
        for key in ("save_every_n_steps", "keep_last_n", "early_stopping_patience", "sample_every_n_steps"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "use 0 (off) or more")
        need(0 <= self.early_stopping_smoothing < 1, "early_stopping_smoothing", "use a number from 0 to below 1")
        need(isinstance(self.sample_prompts, list) and all(isinstance(p, str) for p in self.sample_prompts),
             "sample_prompts", "use a list of strings")
        need(self.sample_sampler in SAMPLERS, "sample_sampler", f"use one of {', '.join(SAMPLERS)}")
        from .sampling import PromptError, parse_prompt

        for line in self.sample_prompts:
            try:
                parse_prompt(line)
            except PromptError as e:
                raise ConfigError(f"sample_prompts: {e}") from None
        need(self.sample_steps >= 1, "sample_steps", "use 1 or more")
        need(self.sample_resolution == 0 or self.sample_resolution % 8 == 0, "sample_resolution",
             "use 0 (= resolution) or a multiple of 8")
        need(self.family is None or self.family in FAMILIES, "family",
             f"use one of {', '.join(FAMILIES)}, or leave it out to detect the family from the checkpoint")
        need(self.device in DEVICES or self.device.startswith("cuda:"), "device", f"use one of {', '.join(DEVICES)}")
        if self.output_name.lower().endswith(".safetensors"):
            self.output_name = self.output_name[: -len(".safetensors")]
        problem = output_name_problem(self.output_name)
        need(problem is None, "output_name", problem or "")
        # --- validation and masked loss (issue 15) ---
        for key in ("masked_loss", "alpha_mask", "keep_best"):
            need(isinstance(getattr(self, key), bool), key, "use true or false")
        for key in ("mask_dir", "validation_dataset"):
            need(isinstance(getattr(self, key), str), key, "use a folder path, or \"\" for none")
        need(not self.mask_dir or self.masked_loss, "mask_dir",
             "masks are only used with masked_loss = true; switch it on or clear mask_dir")
        split = self.validation_split
        need(isinstance(split, (int, float)) and not isinstance(split, bool) and math.isfinite(split) and split >= 0
             and (split < 1 or float(split).is_integer()), "validation_split",
             "use 0 (off), a fraction below 1 of the images (0.1), or a whole number of images (4)")
        need(not (split and self.validation_dataset), "validation_split",
             "use either validation_split or validation_dataset, not both")
        validating = bool(split or self.validation_dataset)
        need(isinstance(self.validate_every_n_steps, int) and not isinstance(self.validate_every_n_steps, bool)
             and self.validate_every_n_steps >= 0, "validate_every_n_steps", "use 0 (start and end only) or more")
        need(not self.validate_every_n_steps or validating, "validate_every_n_steps",
             "needs held-out images: set validation_split (e.g. 0.1) or validation_dataset")
        need(self.validation_seed is None or (isinstance(self.validation_seed, int)
                                              and not isinstance(self.validation_seed, bool)
                                              and self.validation_seed >= 0),
             "validation_seed", "use a whole number, 0 or more, or leave it out to use seed")
        need(self.early_stopping_metric in EARLY_STOPPING_METRICS, "early_stopping_metric",
             f"use one of {', '.join(EARLY_STOPPING_METRICS)}")
        need(self.early_stopping_metric == "train" or validating, "early_stopping_metric",
             "'validation' needs held-out images: set validation_split or validation_dataset")
        need(self.early_stopping_metric == "train" or self.early_stopping_patience > 0, "early_stopping_metric",
             "'validation' watches the validation loss for early stopping; set early_stopping_patience (steps)")
        need(not self.keep_best or validating, "keep_best",
             "keeps the LoRA of the best validation loss; set validation_split or validation_dataset")
        return self

    @property
    def effective_validation_seed(self) -> int:
        """The seed that picks the held-out images and draws their noise: ``validation_seed`` or ``seed``."""
        return self.seed if self.validation_seed is None else int(self.validation_seed)

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
            if f.name in kwargs and f.type in ("float", "float | None") and isinstance(kwargs[f.name], int) \
                    and not isinstance(kwargs[f.name], bool):
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
        for key in ("checkpoint", "dataset", "output_dir", "tokenizer", "network_weights", "resume_from", "cache_dir",
                    "state_dir", "reg_dataset", "mask_dir", "validation_dataset"):
            value = getattr(config, key)
            if value and not os.path.isabs(value):
                setattr(config, key, os.path.normpath(os.path.join(base, value)))
        return config

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values.pop("extra")
        return values
