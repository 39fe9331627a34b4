"""Training Options: the advanced training settings in one node, wired into Train LoRA's ``options`` input.

The node is built from a table (``TABLE``): one row per TrainConfig key, whose widget type and default
come from TrainConfig itself, so a new key is one line here. Append new rows at the end: saved workflows
store widget values by position.

Chaining: the optional ``options`` input takes another Training Options node's output. A node passes on
what it got and adds every setting it changes from its default; where two nodes set the same key, the
later one (nearer Train LoRA) wins. Train LoRA's own inputs win over all options. The output is checked
by building a TrainConfig, so a bad value is reported here, naming the setting.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

from ..training import config as cfg
from .spec import In, NodeError, NodeResult, NodeSpec, Out, node_id
from .train import OPTIONS as OPTIONS_TYPE

NONE = "none"  # network_weights: start from fresh adapters; reg_dataset: no regularization images
AUTO = "auto"  # family: detected from the checkpoint
_FIELDS = {f.name: f for f in dataclasses.fields(cfg.TrainConfig)}
_KINDS = {"bool": "BOOLEAN", "int": "INT", "float": "FLOAT", "float | None": "FLOAT", "str": "STRING"}


@dataclass(frozen=True)
class Option:
    key: str  # the TrainConfig field
    input: In  # the widget (named like the key)
    to_config: Callable[[Any, Any], Any] | None = None  # (widget value, host) -> TrainConfig value


def config_default(key: str):
    f = _FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def opt(key: str, tooltip: str, *, options=None, default=dataclasses.MISSING, kind=None, to_config=None,
        **widget) -> Option:
    """One row: a TrainConfig key as a widget. Type and default follow TrainConfig unless given."""
    if key not in _FIELDS:
        raise KeyError(f"TrainConfig has no key {key!r}")
    if default is dataclasses.MISSING:
        default = config_default(key)
    kind = kind or ("COMBO" if options is not None else _KINDS[_FIELDS[key].type])
    if options is not None and not callable(options):
        options = list(options)
    return Option(key, In(key, kind, default=default, options=options, optional=True, tooltip=tooltip, **widget),
                  to_config)


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


def _reg_folders(host) -> list[str]:
    from .dataset import image_folders

    return [NONE] + image_folders(host)


def _reg_dataset(value, host):
    if not value or value == NONE:
        return ""
    from .dataset import resolve_folder

    try:
        return resolve_folder(host, value)  # inside ComfyUI's input folder, like Load Dataset's folder
    except NodeError as e:
        raise NodeError(f"reg_dataset: {e}") from None


def _family(value, host):
    return None if value == AUTO else value


def _max_token_length(value, host):
    try:
        return int(value)
    except ValueError:
        raise NodeError(f"max_token_length: {value!r} is not one of {', '.join(map(str, cfg.MAX_TOKEN_LENGTHS))}") \
            from None


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
    opt("adapter", "lora, dora (weight-decomposed), loha, lokr (LyCORIS)", options=cfg.ADAPTERS),
    opt("target", "attention: to_q/k/v/out; attention_ff: + feed-forward and proj_in/out (kohya's default); "
                  "full: + ResNet convolutions (LoCon); custom: target_modules", options=cfg.TARGET_PRESETS),
    opt("target_modules", "for target = custom: a regex on module names or comma-separated names"),
    opt("conv_rank", "rank of the 3x3 convolutions with target full/custom (0: the LoRA rank)", min=0, max=1024),
    opt("conv_alpha", "alpha of the 3x3 convolutions (0: conv_rank)", min=0.0, max=1024.0, step=0.5),
    opt("rslora", "rank-stabilised scaling alpha/sqrt(rank) (lora/dora)"),
    opt("train_unet", "train adapters on the UNet"),
    opt("train_text_encoder", "also train adapters on the text encoder(s)"),
    opt("text_encoder_lr", "the text encoders' learning rate (0: half the learning_rate)", default=0.0,
        to_config=_text_encoder_lr, min=0.0, max=0.1, step=1e-6),
    opt("network_weights", "continue training from this LoRA file (its rank and alpha are used); none: fresh",
        options=_lora_files, default=NONE, to_config=_network_weights),
    # optimisation
    opt("optimizer", "adamw8bit needs bitsandbytes (CUDA, or >= 0.48 on the CPU), prodigy prodigyopt (use lr "
                     "about 1), lion lion-pytorch", options=cfg.OPTIMIZERS),
    opt("optimizer_args", 'extra optimizer arguments as JSON, e.g. {"betas": [0.9, 0.99]}', default="",
        kind="STRING", to_config=_optimizer_args),
    opt("weight_decay", "weight decay", min=0.0, max=1.0, step=0.001),
    opt("max_grad_norm", "gradient clipping (0: off)", min=0.0, max=100.0, step=0.1),
    opt("lr_scheduler", "learning-rate schedule", options=cfg.LR_SCHEDULERS),
    opt("lr_warmup_steps", "warmup steps, or a fraction of steps when below 1", min=0.0, max=1_000_000.0, step=0.01),
    opt("lr_scheduler_num_cycles", "cycles of cosine_with_restarts", min=1, max=1000),
    opt("lr_scheduler_power", "power of polynomial", min=0.0, max=10.0, step=0.1),
    opt("gradient_accumulation_steps", "micro-batches per optimizer step", min=1, max=1024),
    opt("loss_type", "mse, l1, huber, smooth_l1", options=cfg.LOSS_TYPES),
    opt("huber_c", "the huber / smooth_l1 parameter", min=0.0001, max=10.0, step=0.001),
    opt("min_snr_gamma", "min-SNR loss weighting (0: off; 5 is common)", min=0.0, max=100.0, step=0.5),
    opt("noise_offset", "noise offset (0: off; 0.05-0.1 for darker darks)", min=0.0, max=1.0, step=0.01),
    opt("min_timestep", "timesteps are drawn from [min_timestep, max_timestep)", min=0, max=999),
    opt("max_timestep", "timesteps are drawn from [min_timestep, max_timestep)", min=1, max=1000),
    opt("zero_terminal_snr", "rescale the betas so the last timestep has SNR 0 (v-prediction models)"),
    opt("attention", "attention implementation", options=cfg.ATTENTION_BACKENDS),
    opt("quantize_base", "4bit: QLoRA, the UNet's linear layers in NF4 through bitsandbytes (CUDA, or >= 0.48 on "
                         "the CPU)", options=cfg.QUANTIZE),
    # data
    opt("enable_bucket", "aspect-ratio buckets: each image trains near its own aspect ratio"),
    opt("min_bucket_reso", "smallest bucket side", min=64, max=4096, step=64),
    opt("max_bucket_reso", "largest bucket side", min=64, max=4096, step=64),
    opt("bucket_reso_steps", "bucket sides are multiples of this", min=8, max=512, step=8),
    opt("bucket_no_upscale", "never upscale small images to the bucket"),
    opt("flip", "random horizontal flip"),
    opt("center_crop", "centre crop (off: random crop; latents are then encoded every step)"),
    opt("shuffle_caption", "shuffle the caption's tags every sample"),
    opt("keep_tokens", "the first N tags stay in place and are never dropped", min=0, max=255),
    opt("caption_separator", "tag separator"),
    opt("caption_dropout_rate", "fraction of samples trained with an empty caption", min=0.0, max=1.0, step=0.01),
    opt("caption_tag_dropout_rate", "each tag is dropped with this probability", min=0.0, max=1.0, step=0.01),
    opt("caption_dropout_every_n_epochs", "every N-th epoch trains with empty captions (0: off)", min=0,
        max=100_000),
    opt("cache_latents", "memory, disk (reused by later runs) or none", options=cfg.CACHE_MODES),
    opt("cache_text_embeddings", "encode each caption once while the text encoders are frozen"),
    # runs
    opt("keep_last_n", "keep only the newest N step files and states (0: all)", min=0, max=100_000),
    opt("early_stopping_patience", "stop when the smoothed loss has not improved for N steps (0: off)", min=0,
        max=1_000_000),
    opt("early_stopping_min_delta", "the improvement that counts", min=0.0, max=10.0, step=0.0001),
    opt("early_stopping_smoothing", "EMA factor of the smoothed loss", min=0.0, max=0.999, step=0.001),
    # sample images (Train LoRA's sample_every / sample_prompt turn them on)
    opt("sample_negative_prompt", "negative prompt of the sample images", multiline=True),
    opt("sample_seed", "prompt i uses seed sample_seed + i", min=0, max=2**31 - 1, control_after_generate=False),
    opt("sample_steps", "sampler steps of the sample images", min=1, max=200),
    opt("sample_cfg", "guidance scale of the sample images", min=0.0, max=30.0, step=0.5),
    opt("sample_sampler", "sampler of the sample images", options=cfg.SAMPLERS),
    opt("sample_resolution", "sample image size (0: the training resolution)", min=0, max=4096, step=8),
    # kohya's loss / noise / network extras
    opt("huber_schedule", "how huber_c follows the timestep: constant, exponential, snr (kohya's default)",
        options=cfg.HUBER_SCHEDULES),
    opt("huber_scale", "multiplies the constant and exponential Huber schedules", min=0.0001, max=100.0, step=0.01),
    opt("debiased_estimation_loss", "weight each sample's loss by 1/sqrt(snr) (epsilon) or 1/(snr+1) (v)"),
    opt("noise_offset_random_strength", "each sample draws its noise offset uniformly from 0 to noise_offset"),
    opt("multires_noise_iterations", "pyramid noise levels (0: off; 6-10 is kohya's advice)", min=0, max=64),
    opt("multires_noise_discount", "weight decay per pyramid-noise level", min=0.0, max=1.0, step=0.01),
    opt("ip_noise_gamma", "input-perturbation noise (0: off; about 0.1)", min=0.0, max=1.0, step=0.01),
    opt("ip_noise_gamma_random_strength", "each sample draws its ip_noise_gamma uniformly from 0 to it"),
    opt("loraplus_lr_ratio", "LoRA+: the up matrices learn at lr * ratio (0: off; 16 is the paper's advice)",
        min=0.0, max=1000.0, step=0.5),
    opt("loraplus_unet_lr_ratio", "LoRA+ ratio for the UNet only (wins over loraplus_lr_ratio)", min=0.0,
        max=1000.0, step=0.5),
    opt("loraplus_text_encoder_lr_ratio", "LoRA+ ratio for the text encoders only (wins over loraplus_lr_ratio)",
        min=0.0, max=1000.0, step=0.5),
    opt("network_dropout", "dropout on the down projection's output (lora/dora)", min=0.0, max=0.99, step=0.01),
    opt("rank_dropout", "each rank channel of a sample dropped with this probability (lora/dora)", min=0.0,
        max=0.99, step=0.01),
    opt("module_dropout", "each LoRA module skipped for a sample with this probability (lora)", min=0.0, max=0.99,
        step=0.01),
    opt("scale_weight_norms", "max-norm regularisation of each module's change (0: off; 1 is common; lora)",
        min=0.0, max=100.0, step=0.1),
    # kohya's data extras
    opt("reg_dataset", "a folder of regularization (class) images inside ComfyUI's input folder; none: off",
        options=_reg_folders, default=NONE, to_config=_reg_dataset),
    opt("prior_loss_weight", "the reg images' loss is multiplied by this", min=0.0, max=100.0, step=0.05),
    opt("max_token_length", "tokens per caption: longer captions are encoded in 75-token windows",
        options=[str(n) for n in cfg.MAX_TOKEN_LENGTHS], default=str(cfg.TrainConfig.max_token_length),
        to_config=_max_token_length),
    opt("enable_wildcard", "{a|b|c} in a caption picks one option per sample; a multi-line caption a random line"),
    opt("token_warmup_min", "caption token warmup: the tags a caption starts with", min=0, max=255),
    opt("token_warmup_step", "the step by which captions reach full length (below 1: a fraction of steps; 0: off)",
        min=0.0, max=1_000_000.0, step=0.01),
    # model and speed
    opt("fp8_base", "store the frozen base weights in float8 (half the memory of bf16; not with dora or 4bit)"),
    opt("torch_compile", "compile the UNet: faster steps after a slow first one (minutes on a CPU)"),
    opt("family", "force the model family; auto: detected from the checkpoint", options=(AUTO, *cfg.FAMILIES),
        default=AUTO, to_config=_family),
    # runs
    opt("save_state", "with every save_every file, also write a resumable state (output/loratrainer_state), so "
                      "a crash or power cut can be resumed from there"),
    opt("save_state_on_stop", "when cancelled, write a resumable state"),
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
    unknown = sorted(set(out) - set(_FIELDS))
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
    caching, early stopping, samples)."""

    node_id = node_id("TrainingOptions")
    display_name = "Training Options (LoRA Trainer)"
    description = (
        "Advanced settings for Train LoRA: adapter (LoRA/DoRA/LoHa/LoKr), targets, text-encoder training, "
        "continue from a LoRA file, optimizer and schedule, loss, noise and timesteps, aspect buckets, caption "
        "handling, caching, early stopping, sample images. Wire it to Train LoRA's options input. Chain "
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

