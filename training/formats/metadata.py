"""Training-run metadata for the safetensors header: kohya ``ss_*`` keys + SAI ``modelspec.*``.

All values written are strings (the safetensors header only holds str -> str).  A field left at
``None`` is simply not written, so the training loop fills in what it knows.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from .families import (
    ALL_FAMILIES,
    BASE_MODEL_VERSION,
    KOHYA_NETWORK_MODULE,
    DEFAULT_RESOLUTION,
    MODELSPEC_ARCHITECTURE,
    MODELSPEC_IMPLEMENTATION,
    PREDICTION_TYPE,
    check_family,
)

MODELSPEC_VERSION = "1.0.1"
PRECISION_NOTE_KEY = "lora_trainer.precision_note"  # ours: kohya has no key for a precision the device changed


@dataclass
class RunInfo:
    """What the trainer knows about a run; every field but ``family`` is optional."""

    family: str = "sd1"
    # network
    network_module: str = "networks.lora"
    network_dim: int | None = None
    network_alpha: float | None = None
    network_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"conv_dim": 4, "conv_alpha": 1}
    network_dropout: float | None = None
    train_unet: bool | None = None
    train_text_encoder: bool | None = None
    # base model
    base_model_name: str | None = None        # file name of the checkpoint (ss_sd_model_name)
    base_model_hash: str | None = None        # full sha256 of the checkpoint (ss_new_sd_model_hash)
    base_model_legacy_hash: str | None = None  # old 8-hex hash (ss_sd_model_hash)
    clip_skip: int | None = None
    # data
    resolution: int | tuple[int, int] | None = None  # int (square) or (width, height); None = family default
    num_train_images: int | None = None       # images x repeats
    num_reg_images: int | None = None
    dataset_dirs: dict[str, dict] | None = None       # {dir: {"n_repeats": n, "img_count": m}}
    reg_dataset_dirs: dict[str, dict] | None = None   # the same for regularization (class) image folders
    tag_frequency: dict[str, dict[str, int]] | None = None  # {dir: {tag: count}}
    bucket_info: dict | None = None
    enable_bucket: bool | None = None
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    shuffle_caption: bool | None = None
    keep_tokens: int | None = None
    flip_aug: bool | None = None
    cache_latents: bool | None = None
    caption_dropout_rate: float | None = None
    # progress
    steps: int | None = None
    epoch: int | None = None
    num_epochs: int | None = None
    max_train_steps: int | None = None
    num_batches_per_epoch: int | None = None
    batch_size: int | None = None
    total_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    # optimisation
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | list[float] | None = None
    optimizer: str | None = None              # e.g. "torch.optim.AdamW"
    optimizer_args: dict[str, Any] | None = None
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None
    max_grad_norm: float | None = None
    gradient_checkpointing: bool | None = None
    mixed_precision: str | None = None        # "no" | "fp16" | "bf16": what the run really trained in
    precision_note: str | None = None         # why that differs from the precision asked for (devices.py)
    seed: int | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    loss_type: str | None = None
    zero_terminal_snr: bool | None = None
    prior_loss_weight: float | None = None
    # validation and masked loss (issue 15)
    masked_loss: bool | None = None
    alpha_mask: bool | None = None
    validation_split: float | None = None
    validation_seed: int | None = None
    num_validation_images: int | None = None
    validation_loss: float | None = None       # the last validation loss measured
    validation_step: int | None = None         # ... and its step
    best_validation_loss: float | None = None  # the lowest (keep_best's <name>_best file is of that step)
    best_validation_step: int | None = None
    # run
    session_id: int | None = None             # None -> a random one, like kohya
    training_started_at: float | None = None  # unix time
    training_finished_at: float | None = None  # unix time; also modelspec.date (None -> now)
    output_name: str | None = None
    training_comment: str | None = None
    # modelspec
    title: str | None = None                  # None -> output_name -> "LoRA"
    description: str | None = None
    author: str | None = None
    license: str | None = None
    tags: list[str] | str | None = None
    trigger_words: list[str] | str | None = None  # -> modelspec.trigger_phrase
    usage_hint: str | None = None
    # anything else, written as given (values stringified; dict/list as JSON)
    extra: dict[str, Any] = field(default_factory=dict)


def _s(v: Any) -> str:
    """Stringify a metadata value the way kohya does (str(), JSON for containers)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _fmt_optimizer(name: str, args: dict | None) -> str:
    if not args:
        return name
    return f"{name}(" + ",".join(f"{k}={v}" for k, v in args.items()) + ")"


def _join_words(v: list[str] | str) -> str:
    if isinstance(v, str):
        return v
    return ", ".join(str(x) for x in v if str(x).strip())


def make_metadata(info: RunInfo) -> dict[str, str]:
    """``ss_*`` + ``modelspec.*`` header metadata, all values strings.

    The ``sshs_*`` hashes are added by :func:`save_lora_file` from the bytes it writes.
    """
    family = check_family(info.family, ALL_FAMILIES)
    md: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if value is not None:
            md[key] = value

    # network (also the kohya --no_metadata minimum set)
    network_module = info.network_module
    if network_module == "networks.lora":  # kohya's own module for the family, where it has one
        network_module = KOHYA_NETWORK_MODULE.get(family, network_module)
    put("ss_network_module", network_module)
    put("ss_network_dim", info.network_dim)
    put("ss_network_alpha", info.network_alpha)
    put("ss_network_args", json.dumps(info.network_args or {}))
    put("ss_network_dropout", info.network_dropout)
    if info.train_unet is not None and info.train_text_encoder is not None:
        put("ss_network_train_unet_only", bool(info.train_unet and not info.train_text_encoder))
        put("ss_network_train_text_encoder_only", bool(info.train_text_encoder and not info.train_unet))
    # model
    put("ss_base_model_version", BASE_MODEL_VERSION[family])
    put("ss_v2", family in ("sd2", "sd2-v"))
    put("ss_v_parameterization", family == "sd2-v")
    put("ss_sd_model_name", info.base_model_name)
    put("ss_new_sd_model_hash", info.base_model_hash)
    put("ss_sd_model_hash", info.base_model_legacy_hash)
    put("ss_clip_skip", info.clip_skip)

    # resolution
    res = info.resolution if info.resolution is not None else DEFAULT_RESOLUTION[family]
    w, h = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
    put("ss_resolution", f"({w}, {h})")

    # data
    put("ss_num_train_images", info.num_train_images)
    put("ss_num_reg_images", info.num_reg_images)
    put("ss_dataset_dirs", info.dataset_dirs)
    put("ss_reg_dataset_dirs", info.reg_dataset_dirs)
    put("ss_tag_frequency", info.tag_frequency)
    put("ss_bucket_info", info.bucket_info)
    put("ss_enable_bucket", info.enable_bucket)
    put("ss_min_bucket_reso", info.min_bucket_reso)
    put("ss_max_bucket_reso", info.max_bucket_reso)
    put("ss_shuffle_caption", info.shuffle_caption)
    put("ss_keep_tokens", info.keep_tokens)
    put("ss_flip_aug", info.flip_aug)
    put("ss_cache_latents", info.cache_latents)
    put("ss_caption_dropout_rate", info.caption_dropout_rate)
    # progress
    put("ss_steps", info.steps)
    put("ss_epoch", info.epoch)
    put("ss_num_epochs", info.num_epochs)
    put("ss_max_train_steps", info.max_train_steps)
    put("ss_num_batches_per_epoch", info.num_batches_per_epoch)
    put("ss_batch_size_per_device", info.batch_size)
    put("ss_total_batch_size", info.total_batch_size)
    put("ss_gradient_accumulation_steps", info.gradient_accumulation_steps)
    # optimisation
    put("ss_learning_rate", info.learning_rate)
    put("ss_unet_lr", info.unet_lr)
    put("ss_text_encoder_lr", info.text_encoder_lr)
    if info.optimizer is not None:
        put("ss_optimizer", _fmt_optimizer(info.optimizer, info.optimizer_args))
    put("ss_lr_scheduler", info.lr_scheduler)
    put("ss_lr_warmup_steps", info.lr_warmup_steps)
    put("ss_max_grad_norm", info.max_grad_norm)
    put("ss_gradient_checkpointing", info.gradient_checkpointing)
    put("ss_mixed_precision", info.mixed_precision)
    put(PRECISION_NOTE_KEY, info.precision_note)
    put("ss_seed", info.seed)
    put("ss_noise_offset", info.noise_offset)
    put("ss_min_snr_gamma", info.min_snr_gamma)
    put("ss_loss_type", info.loss_type)
    put("ss_zero_terminal_snr", info.zero_terminal_snr)
    put("ss_prior_loss_weight", info.prior_loss_weight)
    put("ss_masked_loss", info.masked_loss)
    put("ss_alpha_mask", info.alpha_mask)
    put("ss_validation_split", info.validation_split)
    put("ss_validation_seed", info.validation_seed)
    put("ss_num_validation_images", info.num_validation_images)
    put("ss_validation_loss", info.validation_loss)
    put("ss_validation_step", info.validation_step)
    put("ss_best_validation_loss", info.best_validation_loss)
    put("ss_best_validation_step", info.best_validation_step)
    # run
    session_id = info.session_id if info.session_id is not None else random.randint(0, 2**32 - 1)
    put("ss_session_id", session_id)
    put("ss_training_started_at", info.training_started_at)
    put("ss_training_finished_at", info.training_finished_at)
    put("ss_output_name", info.output_name)
    put("ss_training_comment", info.training_comment)

    # modelspec (SAI model spec 1.0.1)
    finished = info.training_finished_at if info.training_finished_at is not None else time.time()
    date = _dt.datetime.fromtimestamp(finished, tz=_dt.timezone.utc).replace(microsecond=0).isoformat()
    put("modelspec.sai_model_spec", MODELSPEC_VERSION)
    put("modelspec.architecture", MODELSPEC_ARCHITECTURE[family])
    put("modelspec.implementation", MODELSPEC_IMPLEMENTATION[family])
    put("modelspec.title", info.title or info.output_name or "LoRA")
    put("modelspec.resolution", f"{w}x{h}")
    put("modelspec.date", date)
    put("modelspec.prediction_type", PREDICTION_TYPE[family])
    put("modelspec.description", info.description)
    put("modelspec.author", info.author)
    put("modelspec.license", info.license)
    if info.tags:
        put("modelspec.tags", _join_words(info.tags))
    if info.trigger_words:
        put("modelspec.trigger_phrase", _join_words(info.trigger_words))
    put("modelspec.usage_hint", info.usage_hint)
    if info.clip_skip is not None:
        put("modelspec.encoder_layer", info.clip_skip)

    for k, v in (info.extra or {}).items():
        put(str(k), v)
    return {k: _s(v) for k, v in md.items()}


def kohya_extras_metadata(config) -> tuple[dict, dict]:
    """(``ss_network_args`` entries, other ``ss_*`` fields) for the loss / noise / network extras, named and
    stringified as kohya's train_network.py writes them; only options that are on."""
    network_args = {key: str(getattr(config, key)) for key in (
        "rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
        "loraplus_text_encoder_lr_ratio") if getattr(config, key)}
    fields = {}
    if config.network_dropout:
        fields["ss_network_dropout"] = config.network_dropout
    if config.multires_noise_iterations:
        fields["ss_multires_noise_iterations"] = config.multires_noise_iterations
        fields["ss_multires_noise_discount"] = config.multires_noise_discount
    if config.noise_offset and config.noise_offset_random_strength:
        fields["ss_noise_offset_random_strength"] = True
    if config.ip_noise_gamma:
        fields["ss_ip_noise_gamma"] = config.ip_noise_gamma
        fields["ss_ip_noise_gamma_random_strength"] = bool(config.ip_noise_gamma_random_strength)
    if config.debiased_estimation_loss:
        fields["ss_debiased_estimation"] = True
    if config.scale_weight_norms:
        fields["ss_scale_weight_norms"] = config.scale_weight_norms
    if config.loss_type in ("huber", "smooth_l1"):
        fields.update(ss_huber_schedule=config.huber_schedule, ss_huber_c=config.huber_c,
                      ss_huber_scale=config.huber_scale)
    return network_args, fields


def flow_metadata(config, guidance: float | None = None) -> dict:
    """A flow-matching run's timestep options as kohya's flux/sd3/lumina scripts write them (``ss_*``), and the
    guidance input the model was trained with (Flux.1 dev: ``ss_guidance_scale``)."""
    fields = {key: getattr(config, name) for key, name in (
        ("ss_timestep_sampling", "timestep_sampling"), ("ss_sigmoid_scale", "sigmoid_scale"),
        ("ss_discrete_flow_shift", "discrete_flow_shift"), ("ss_weighting_scheme", "weighting_scheme"),
        ("ss_logit_mean", "logit_mean"), ("ss_logit_std", "logit_std"), ("ss_mode_scale", "mode_scale"))}
    fields["ss_model_prediction_type"] = "raw"  # the velocity itself, as kohya's model_prediction_type raw
    if guidance is not None:
        fields["ss_guidance_scale"] = guidance
    return fields
