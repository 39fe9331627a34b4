"""Training Options: the advanced training settings in one node, wired into Train LoRA's ``options`` input.

The node is built from a table (``TABLE``): one row per TrainConfig key, whose widget type, default,
tooltip, range and choices come from the field's own description (training/config.py), so a new key is
one line here. Append new rows at the end: saved workflows store widget values by position.

Chaining: the optional ``options`` input takes another Training Options node's output. A node passes on
what it got and adds every setting it changes from its default; where two nodes set the same key, the
later one (nearer Train LoRA) wins. Train LoRA's own inputs win over all options. The output is checked
by building a TrainConfig, so a bad value is reported here, naming the setting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from ..training import config as cfg
from .fields import FIELDS, config_default, config_input
from .spec import OPTIONS as OPTIONS_TYPE
from .spec import In, NodeError, NodeResult, NodeSpec, Out, node_id

NONE = "none"  # network_weights: start from fresh adapters; a folder option (reg_dataset, mask_dir, ...): none
AUTO = "auto"  # family: detected from the checkpoint


@dataclass(frozen=True)
class Option:
    key: str  # the TrainConfig field
    input: In  # the widget (named like the key)
    to_config: Callable[[Any, Any], Any] | None = None  # (widget value, host) -> TrainConfig value


def opt(key: str, *, to_config=None, **overrides) -> Option:
    """One row: a TrainConfig key as an optional widget; type, default, tooltip, range and choices follow
    the field (training/config.py) unless given."""
    if key not in FIELDS:
        raise KeyError(f"TrainConfig has no key {key!r}")
    return Option(key, config_input(key, optional=True, **overrides), to_config)


def _text_encoder_lr(value, host):
    return float(value) if value else None  # 0: half the UNet's learning rate (TrainConfig's None)


def _lora_files(host) -> list[str]:
    return [NONE] + [n for n in host.lora_names() if n.lower().endswith(".safetensors")]


def _network_weights(value, host):
    if not value or value == NONE:
        return ""
    try:
        return host.lora_path(value)
    except NodeError as e:
        raise NodeError(f"network_weights: {e}") from None


def _input_folders(host) -> list[str]:
    from .dataset import image_folders

    return [NONE] + image_folders(host)


def _input_folder(key: str):
    """to_config of a folder chosen inside ComfyUI's input folder (like Load Dataset's folder); none: ""."""

    def to_config(value, host):
        if not value or value == NONE:
            return ""
        from .dataset import resolve_folder

        try:
            return resolve_folder(host, value)
        except NodeError as e:
            raise NodeError(f"{key}: {e}") from None

    return to_config


def _input_folder_option(key: str) -> Option:
    return opt(key, options=_input_folders, default=NONE, to_config=_input_folder(key))


def _validation_seed(value, host):
    return int(value) or None  # 0: the run's seed (TrainConfig's None)


def _family(value, host):
    return None if value == AUTO else value


def _max_token_length(value, host):
    try:
        return int(value)
    except ValueError:
        raise NodeError(f"max_token_length: {value!r} is not one of {', '.join(map(str, cfg.MAX_TOKEN_LENGTHS))}") \
            from None


# blocks_to_swap's choices on the node: off, auto, then even counts up to Flux.1's 38
BLOCK_SWAP_OPTIONS = ["0", cfg.SWAP_CHOICES[0], *(str(n) for n in range(2, 39, 2))]


def _blocks_to_swap(value, host):
    return value if value == cfg.SWAP_CHOICES[0] else int(value)


def _optimizer_args(value, host):
    text = (value or "").strip()
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise NodeError(f"optimizer_args: not valid JSON ({e.msg} at character {e.pos}); "
                        'write an object such as {"betas": [0.9, 0.99], "eps": 1e-8}') from None
    if not isinstance(parsed, dict):
        raise NodeError('optimizer_args: write a JSON object such as {"betas": [0.9, 0.99]}')
    return parsed


# Order = widget order. Append new rows at the end.
TABLE = [
    # adapter
    opt("adapter"),
    opt("target"),
    opt("target_modules"),
    opt("conv_rank"),
    opt("conv_alpha"),
    opt("rslora"),
    opt("train_unet"),
    opt("train_text_encoder"),
    opt("text_encoder_lr", default=0.0, to_config=_text_encoder_lr),
    opt("network_weights", options=_lora_files, default=NONE, to_config=_network_weights),
    # optimisation
    opt("optimizer"),
    opt("optimizer_args", default="", kind="STRING", to_config=_optimizer_args),
    opt("weight_decay"),
    opt("max_grad_norm"),
    opt("lr_scheduler"),
    opt("lr_warmup_steps"),
    opt("lr_scheduler_num_cycles"),
    opt("lr_scheduler_power"),
    opt("gradient_accumulation_steps"),
    opt("loss_type"),
    opt("huber_c"),
    opt("min_snr_gamma"),
    opt("noise_offset"),
    opt("min_timestep"),
    opt("max_timestep"),
    opt("zero_terminal_snr"),
    opt("attention"),
    opt("quantize_base"),
    # data
    opt("enable_bucket"),
    opt("min_bucket_reso"),
    opt("max_bucket_reso"),
    opt("bucket_reso_steps"),
    opt("bucket_no_upscale"),
    opt("flip"),
    opt("center_crop"),
    opt("shuffle_caption"),
    opt("keep_tokens"),
    opt("caption_separator"),
    opt("caption_dropout_rate"),
    opt("caption_tag_dropout_rate"),
    opt("caption_dropout_every_n_epochs"),
    opt("cache_latents"),
    opt("cache_text_embeddings"),
    # runs
    opt("keep_last_n"),
    opt("early_stopping_patience"),
    opt("early_stopping_min_delta"),
    opt("early_stopping_smoothing"),
    # sample images (Train LoRA's sample_every / sample_prompt turn them on)
    opt("sample_negative_prompt", multiline=True),
    opt("sample_seed", control_after_generate=False),
    opt("sample_steps"),
    opt("sample_cfg"),
    opt("sample_sampler"),
    opt("sample_resolution"),
    # kohya's loss / noise / network extras
    opt("huber_schedule"),
    opt("huber_scale"),
    opt("debiased_estimation_loss"),
    opt("noise_offset_random_strength"),
    opt("multires_noise_iterations"),
    opt("multires_noise_discount"),
    opt("ip_noise_gamma"),
    opt("ip_noise_gamma_random_strength"),
    opt("loraplus_lr_ratio"),
    opt("loraplus_unet_lr_ratio"),
    opt("loraplus_text_encoder_lr_ratio"),
    opt("network_dropout"),
    opt("rank_dropout"),
    opt("module_dropout"),
    opt("scale_weight_norms"),
    # kohya's data extras
    _input_folder_option("reg_dataset"),
    opt("prior_loss_weight"),
    opt("max_token_length", options=[str(n) for n in cfg.MAX_TOKEN_LENGTHS],
        default=str(cfg.TrainConfig.max_token_length), to_config=_max_token_length),
    opt("enable_wildcard"),
    opt("token_warmup_min"),
    opt("token_warmup_step"),
    # model and speed
    opt("fp8_base"),
    opt("torch_compile"),
    opt("family", options=(AUTO, *cfg.FAMILIES), default=AUTO, to_config=_family),
    # runs
    opt("save_state"),
    opt("save_state_on_stop"),
    # validation and masked loss (issue 15)
    opt("masked_loss"),
    opt("alpha_mask"),
    _input_folder_option("mask_dir"),
    opt("validation_split"),
    _input_folder_option("validation_dataset"),
    opt("validate_every_n_steps"),
    opt("validation_seed", kind="INT", default=0, to_config=_validation_seed, control_after_generate=False),
    opt("early_stopping_metric"),
    opt("keep_best"),
    # the model input's DiT families (flow matching, block swap)
    opt("timestep_sampling"),
    opt("sigmoid_scale"),
    opt("discrete_flow_shift"),
    opt("weighting_scheme"),
    opt("logit_mean"),
    opt("logit_std"),
    opt("mode_scale"),
    opt("blocks_to_swap", kind="COMBO", options=BLOCK_SWAP_OPTIONS, default="0", to_config=_blocks_to_swap),
]
ROWS = {row.key: row for row in TABLE}


def _coerce(row: Option, value):
    kind = row.input.kind
    try:
        if kind == "INT":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "FLOAT":
            return float(value)
        if kind == "BOOLEAN":
            if isinstance(value, str):
                return value.strip().lower() in ("true", "1", "yes", "on")
            return bool(value)
        if kind in ("STRING", "COMBO"):
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise NodeError(f"{row.key}: {value!r} is not a valid {kind.lower()}") from None
    return value


def options_from_inputs(host, values: dict, upstream: dict | None = None) -> dict:
    """The options dict for Train LoRA: ``upstream`` plus every setting changed from its default."""
    out = dict(upstream or {})
    unknown = sorted(set(out) - set(FIELDS))
    if unknown:
        raise NodeError(f"options: unknown setting(s) {', '.join(unknown)} from the upstream node")
    for row in TABLE:
        if row.key not in values or values[row.key] is None:
            continue  # not given (an API prompt may leave keys out): the default, i.e. no change
        value = _coerce(row, values[row.key])
        if row.to_config is not None:
            value = row.to_config(value, host)
        if value != config_default(row.key):
            out[row.key] = value
    try:
        cfg.TrainConfig(checkpoint="-", dataset="-", **out).validate()
    except cfg.ConfigError as e:
        raise NodeError(str(e)) from None
    return out


class TrainingOptions(NodeSpec):
    """Advanced settings for Train LoRA (adapter type, optimizer, schedule, loss, noise, buckets, captions,
    caching, early stopping, samples, validation, masked loss)."""

    node_id = node_id("TrainingOptions")
    display_name = "Training Options (LoRA Trainer)"
    description = (
        "Advanced settings for Train LoRA: adapter (LoRA/DoRA/LoHa/LoKr), targets, text-encoder training, "
        "continue from a LoRA file, optimizer and schedule, loss, noise and timesteps, aspect buckets, caption "
        "handling, caching, early stopping, sample images, validation loss (held-out images, keep_best) and masked "
        "loss. Wire it to Train LoRA's options input. Chain "
        "several: each adds the settings it changes from their defaults; the one nearer Train LoRA wins."
    )
    inputs = [
        In("options", OPTIONS_TYPE, optional=True, tooltip="settings from another Training Options node (chained)"),
        *[row.input for row in TABLE],
    ]
    outputs = [Out("options", OPTIONS_TYPE, "wire to Train LoRA's options input (or to another Training Options node)")]

    @classmethod
    def execute(cls, host, options=None, **values) -> NodeResult:
        out = options_from_inputs(host, values, options)
        text = ", ".join(f"{k}={v!r}" for k, v in out.items()) or "all defaults"
        return NodeResult((out,), ui={"text": [text]})

