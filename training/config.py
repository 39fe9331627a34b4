"""The training configuration: one dataclass, loaded from TOML or built by a host, checked up front.

Each field describes itself (``setting``: help, range, choices, as peft's ``field(metadata=...)``); the
Training Options and Train LoRA widgets, ``validate()`` and the key tables of docs/configuration.md
(``training/config_docs.py``) are built from that description. The field names are the TOML keys and
the nodes' input names.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .flow import TIMESTEP_SAMPLING, WEIGHTING_SCHEMES, FlowTimesteps
from .formats.families import FAMILIES
from .sampling import PromptError, parse_prompt

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
DEVICES = ("auto", "cpu", "cuda", "xpu", "mps")  # auto: CUDA/ROCm, then XPU, then MPS, then the CPU (devices.py)
INDEXED_DEVICES = ("cuda", "xpu")  # these also take an index: cuda:1, xpu:0 (what ComfyUI hands the node)


def is_indexed_device(name) -> bool:
    """cuda:N / xpu:N: a device of INDEXED_DEVICES with its index."""
    kind, colon, index = str(name).partition(":")
    return kind in INDEXED_DEVICES and colon == ":" and index.isdigit()


def is_device_name(name) -> bool:
    """Whether ``name`` is a valid ``device`` setting: one of DEVICES, or cuda:N / xpu:N."""
    return name in DEVICES or is_indexed_device(name)
EARLY_STOPPING_METRICS = ("train", "validation")
SWAP_CHOICES = ("auto", 0)  # blocks_to_swap besides other counts; auto: picked by the estimate (nodes/estimate.py)


def is_block_count(value) -> bool:
    """A ``blocks_to_swap`` count: a whole number >= 0 (0: off)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


GROUPS = {  # each field's `group`: its table's heading in docs/configuration.md, in table order
    "model": "Model, data, output",
    "adapter": "Adapter",
    "optimisation": "Optimisation",
    "data": "Data",
    "flow": "Flow matching (SD3/SD3.5, Flux.1, Chroma, Lumina2, Qwen-Image)",
    "runs": "Saving, resuming, stopping, samples",
    "validation": "Validation and masked loss",
}
_RULES = ("min", "max", "gt", "lt", "multiple_of", "choices")


def setting(default=dataclasses.MISSING, help: str = "", *, factory=None, group: str, doc: str | None = None,
            default_doc: str | None = None, min=None, max=None, gt=None, lt=None, multiple_of=None, choices=None,
            optional: bool = False, advice: str | None = None, widget: dict | None = None,
            also: tuple | None = None):
    """A TrainConfig field that describes itself, as peft's ``field(metadata={"help": ...})``.

    help: one line (node tooltips); doc: the longer text of docs/configuration.md (default: help);
    default_doc: the default as the docs show it where the value alone says too little.
    min/max (inclusive), gt/lt (exclusive), multiple_of, choices: what ``validate()`` accepts, and the
    widgets' range unless ``widget`` narrows it for the UI (min/max/step, inside the accepted range).
    optional: None is accepted too; advice: appended to the refusal message.
    also: (predicate, text): values outside ``choices`` that are accepted too, and how the rule says so
    (``device``: cuda:N / xpu:N beside the names).
    """
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}")
    metadata = {"help": help, "group": group, "doc": doc or help, "optional": optional}
    for key, value in (("default_doc", default_doc), ("min", min), ("max", max), ("gt", gt), ("lt", lt),
                       ("multiple_of", multiple_of), ("choices", choices), ("advice", advice), ("widget", widget), ("also", also)):
        if value is not None:
            metadata[key] = tuple(value) if key == "choices" else value
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def rule_text(meta: dict, whole: bool) -> str:
    """What a field accepts, as the refusal message says it: 'use a whole number from 1 to 1024'."""
    if "choices" in meta:
        text = f"use one of {', '.join(map(str, meta['choices']))}"
        if "also" in meta:
            text += f", or {meta['also'][1]}"
    else:
        noun = f"a multiple of {meta['multiple_of']}" if "multiple_of" in meta else \
            "a whole number" if whole else "a number"
        low = f"{_number(meta['min'])}" if "min" in meta else None
        above = f"above {_number(meta['gt'])}" if "gt" in meta else None
        high = f"{_number(meta['max'])}" if "max" in meta else None
        below = f"below {_number(meta['lt'])}" if "lt" in meta else None
        if low is not None and (high or below):
            bounds = f"from {low} to {high or below}"
        elif above and (high or below):
            bounds = f"{above} and {below or 'at most ' + high}"
        elif low is not None:
            bounds = f"of at least {low}"
        elif high:
            bounds = f"of at most {high}"
        else:
            bounds = above or below or ""
        text = f"use {noun} {bounds}".rstrip()
    return f"{text} ({meta['advice']})" if meta.get("advice") else text


def _is_whole(f) -> bool:
    return f.type in ("int", "int | None")


_TYPE_RULES = {"bool": (bool, "use true or false"), "str": (str, 'use text (a path or a name; "" for none)')}


def field_problem(f, value) -> str | None:
    """Why ``value`` breaks field ``f``'s own rules (range, choices, type), or None."""
    meta = f.metadata
    if value is None and meta.get("optional"):
        return None
    if f.type in _TYPE_RULES and "choices" not in meta:
        kind, message = _TYPE_RULES[f.type]
        return None if isinstance(value, kind) else message
    if not any(key in meta for key in _RULES):
        return None
    try:
        if "choices" in meta:
            ok = value in meta["choices"] or ("also" in meta and meta["also"][0](value))
        else:
            ok = isinstance(value, int) if _is_whole(f) else \
                isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and ("min" not in meta or value >= meta["min"]) and ("max" not in meta or value <= meta["max"]) \
                and ("gt" not in meta or value > meta["gt"]) and ("lt" not in meta or value < meta["lt"]) \
                and ("multiple_of" not in meta or value % meta["multiple_of"] == 0)
    except TypeError:
        ok = False
    return None if ok else rule_text(meta, _is_whole(f))


# rules several fields share
_LORAPLUS_RATIO = dict(group="adapter", min=0, advice="0: off; 16 is the LoRA+ paper's advice",
                       widget=dict(max=1000.0, step=0.5))
_FLOW = FlowTimesteps()  # kohya's defaults, kept by the math module
_DROPOUT = dict(group="adapter", min=0, lt=1, advice="0: off; 0.1 is common", widget=dict(max=0.99, step=0.01))


@dataclass
class TrainConfig:
    checkpoint: str = setting(
        "",
        "single-file `.safetensors` checkpoint in the original (LDM/SAI) layout, or a diffusers folder; SD1.x, "
        "SD2.x (epsilon and v) and SDXL base are detected from the keys, other families are refused by name",
        default_doc="(required)", group="model",
    )
    dataset: str = setting(
        "",
        "folder of captioned images (layouts as in the README's walkthrough; `N_name` folders repeat their images "
        "N times)",
        default_doc="(required)", group="model",
    )
    output_dir: str = setting(".", "folder the LoRA (and checkpoints, states, samples) is written to", group="model")
    output_name: str = setting(
        "my_lora",
        "file name without extension; never overwrites unless `overwrite = true`",
        group="model",
    )
    tokenizer: str | None = setting(
        None,
        "folder of a CLIP tokenizer (`vocab.json`, `merges.txt`); needed unless the checkpoint folder has one",
        group="model",
    )
    steps: int = setting(500, "optimizer steps", group="optimisation", min=1, widget=dict(max=1000000))
    rank: int = setting(16, "LoRA rank (dim)", doc="rank (dim)", group="adapter", min=1, max=1024)
    alpha: float = setting(
        16.0,
        "scale = alpha / rank",
        doc="alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) with `rslora`)",
        group="adapter", gt=0, advice="commonly equal to rank", widget=dict(min=0.01, max=1024.0, step=0.5),
    )
    learning_rate: float = setting(
        0.0001,
        "the UNet's learning rate",
        group="optimisation", gt=0, lt=1, advice="1e-4 is a common start", widget=dict(min=1e-07, max=0.1, step=1e-05),
    )
    resolution: int = setting(
        512,
        "training size in pixels (with buckets: the training area is resolution²)",
        group="data", min=64, max=4096, multiple_of=8, advice="512 for SD1.x, 1024 for SDXL", widget=dict(step=64),
    )
    batch_size: int = setting(
        1,
        "images per micro-batch (per process)",
        group="optimisation", min=1, widget=dict(max=64),
    )
    seed: int = setting(
        0,
        "seeds the adapter init, data order, flips, crops, captions, noise and timesteps: same seed, same result, "
        "whatever the number of processes",
        group="optimisation", widget=dict(min=0, max=9223372036854775807),
    )
    gradient_accumulation_steps: int = setting(
        1,
        "micro-batches per optimizer step",
        group="optimisation", min=1, widget=dict(max=1024),
    )
    max_grad_norm: float = setting(
        1.0,
        "gradient clipping (0: off)",
        doc="gradient clipping (0 turns it off)",
        group="optimisation", min=0, advice="0: off", widget=dict(max=100.0, step=0.1),
    )
    precision: str = setting(
        "fp32",
        "`fp32`, `bf16` (mixed precision through accelerate) or `fp16` (with loss scaling); adapter weights stay "
        "fp32. A precision the device cannot run is replaced and said aloud (fp16 on the CPU: fp32)",
        doc=(
            "`fp32`, `bf16` (mixed precision through accelerate) or `fp16` (with loss scaling); adapter weights stay "
            "fp32. A precision the device cannot run is replaced and said once (log, node status line, "
            "`lora_trainer.precision_note` in the file): fp16 on the CPU trains in fp32, bf16 on a GPU without it in "
            "fp16 (docs/devices.md)"
        ),
        group="optimisation", choices=PRECISIONS,
    )
    target: str = setting(
        "attention",
        "attention: to_q/k/v/out; attention_ff: + feed-forward and proj_in/out (kohya's default); full: + ResNet "
        "convolutions (LoCon); custom: target_modules",
        doc=(
            "`attention`: the UNet's `to_q`, `to_k`, `to_v`, `to_out.0`; `attention_ff`: kohya's default, plus the "
            "feed-forward (`ff.net.0.proj`, `ff.net.2`) and `proj_in`/`proj_out`; `full`: plus the ResNet and "
            "sampler convolutions (LoCon); `custom`: `target_modules`"
        ),
        group="adapter", choices=TARGET_PRESETS,
    )
    center_crop: bool = setting(
        True,
        "centre crop (off: random crop; latents are then encoded every step)",
        doc="centre crop after scaling to cover; false: random crop (latents are then encoded every step)",
        group="data",
    )
    flip: bool = setting(
        True,
        "random horizontal flip",
        doc="random horizontal flip (both orientations' latents are cached)",
        group="data",
    )
    device: str = setting(
        "auto",
        "`auto`: CUDA (or ROCm), then XPU, then MPS, then the CPU; under `accelerate launch` each process uses its "
        "own",
        doc=(
            "`auto`: CUDA (or ROCm, which torch reports as CUDA), then Intel XPU, then Apple MPS, then the CPU; or a "
            "device by name. A precision the device cannot run is replaced and said aloud (log, node status, "
            "`lora_trainer.precision_note` in the file; docs/devices.md). Under `accelerate launch` "
            "each process uses its own"
        ),
        group="model", choices=DEVICES, also=(is_indexed_device, "cuda:N / xpu:N"),
    )
    overwrite: bool = setting(
        False,
        "replace an existing file of that name",
        doc="allow replacing an existing output file",
        group="model",
    )
    trigger_word: str = setting(
        "",
        "prepended to every caption",
        doc="put first in every caption that lacks it; recorded in the metadata",
        group="data",
    )
    family: str | None = setting(
        None,
        "force the model family; auto: detected from the checkpoint",
        doc="force the model family (`sd1`, `sd2`, `sd2-v`, `sdxl`) instead of detecting it",
        default_doc="auto", group="model", choices=FAMILIES, optional=True,
        advice="or leave it out to detect the family from the checkpoint",
    )
    log_every: int = setting(10, "print a progress line every N steps", group="model")
    adapter: str = setting(
        "lora",
        "lora, dora (weight-decomposed), loha, lokr (LyCORIS)",
        doc="`lora`, `dora` (weight-decomposed LoRA), `loha`, `lokr` (all through peft)",
        group="adapter", choices=ADAPTERS,
    )
    target_modules: str = setting(
        "",
        "for target = custom: a regex on module names or comma-separated names",
        doc=(
            'for `target = "custom"`: a regex on full module names (`.*attn2\\.to_k$`) or comma-separated names '
            "(`to_q, to_v`)"
        ),
        group="adapter",
    )
    conv_rank: int = setting(
        0,
        "rank of the 3x3 convolutions with target full/custom (0: the LoRA rank)",
        doc="rank of the 3x3 convolutions with `full`/`custom` (0: same as `rank`)",
        group="adapter", min=0, max=1024, advice="0: rank",
    )
    conv_alpha: float = setting(
        0.0,
        "alpha of the 3x3 convolutions (0: conv_rank)",
        doc="alpha of the 3x3 convolutions (0: same as `conv_rank`)",
        group="adapter", min=0, advice="0: conv_rank", widget=dict(max=1024.0, step=0.5),
    )
    rslora: bool = setting(
        False,
        "rank-stabilised scaling alpha/sqrt(rank) (lora/dora)",
        doc="rank-stabilised LoRA scaling (`lora`/`dora` only)",
        group="adapter",
    )
    train_unet: bool = setting(True, "train adapters on the UNet", doc="train an adapter on the UNet", group="adapter")
    train_text_encoder: bool = setting(
        False,
        "also train adapters on the text encoder(s)",
        doc=(
            "also train adapters on the text encoder(s) (both on SDXL): attention, plus the MLP unless `target = "
            '"attention"`'
        ),
        group="adapter",
    )
    text_encoder_lr: float | None = setting(
        None,
        "the text encoders' learning rate (0: half the learning_rate)",
        doc="the text encoders' learning rate",
        default_doc="half `learning_rate`", group="adapter", min=0, lt=1, optional=True,
        advice="or leave it out for half the learning_rate",
        widget=dict(max=0.1, step=1e-06),
    )
    network_weights: str = setting(
        "",
        "continue training from this LoRA file (its rank and alpha are used); none: fresh",
        doc=(
            "continue training from an existing LoRA file in any key style the importer reads (kohya, LyCORIS "
            "LoRA/LoCon/LoHa/LoKr/DoRA, diffusers/peft, ComfyUI-native, core Train LoRA node files; "
            "SD1.x/SD2/SDXL). The run starts from exactly the file's weight changes. `adapter`, `rank`, `alpha`, "
            "`conv_rank`, `conv_alpha` left at their defaults are taken from the file (per module; ranks and "
            "alphas may differ between modules); a set `adapter` or `rank`/`conv_rank` that disagrees with the "
            "file is an error naming the file; a set `alpha` is kept and the file's scale folded into its weights. "
            "The run trains its `target` preset plus every module of the file; a file with text-encoder modules "
            "turns `train_text_encoder` on. `diff`/`diff_b` changes (the core node writes them for biases and "
            "norms) are added to the base weights and written unchanged into the result. Refused: Tucker LoCon "
            "(`lora_mid`), input-axis DoRA, files mixing adapter types or made for another model family "
            "(`training/continuation.py`). `resume_from` instead restores a whole run"
        ),
        group="adapter",
    )
    quantize_base: str = setting(
        "none",
        "4bit: QLoRA, the UNet's linear layers in NF4 through bitsandbytes (CUDA, or >= 0.48 on the CPU)",
        doc=(
            "`4bit`: QLoRA, the UNet's linear layers in NF4 through bitsandbytes (CUDA, or the CPU with "
            "bitsandbytes >= 0.48; bitsandbytes is asked to run a small 4-bit layer on the device before the model "
            "loads, and a device it cannot serve is refused with a message). The base weights are held in 4 bit; "
            "the LoRA is an ordinary one"
        ),
        group="adapter", choices=QUANTIZE,
    )
    optimizer: str = setting(
        "adamw",
        "adamw8bit needs bitsandbytes (CUDA, or >= 0.48 on the CPU), prodigy prodigyopt (use lr about 1), lion "
        "lion-pytorch",
        doc=(
            "`adamw`, `adamw8bit` (bitsandbytes: CUDA, or the CPU with >= 0.48; tensors under its `min_8bit_size`, "
            "4096 elements, keep 32-bit states), `prodigy` (needs `prodigyopt`; use lr about 1), `lion` (needs "
            "`lion-pytorch`), `adafactor`, `sgd`; a missing package is named in the error"
        ),
        group="optimisation", choices=OPTIMIZERS,
    )
    optimizer_args: dict = setting(
        factory=dict,
        help='extra optimizer arguments as JSON, e.g. {"betas": [0.9, 0.99]}',
        doc="extra optimizer arguments, e.g. `{betas = [0.9, 0.99], eps = 1e-8}`",
        group="optimisation",
    )
    weight_decay: float = setting(0.01, "weight decay", group="optimisation", min=0, widget=dict(max=1.0, step=0.001))
    lr_scheduler: str = setting(
        "constant",
        "learning-rate schedule",
        doc=(
            "`constant`, `constant_with_warmup`, `linear`, `cosine`, `cosine_with_restarts`, `polynomial` "
            "(`diffusers.optimization`)"
        ),
        group="optimisation", choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: float = setting(
        0.0,
        "warmup steps, or a fraction of steps when below 1",
        group="optimisation", min=0, widget=dict(max=1000000.0, step=0.01),
    )
    lr_scheduler_num_cycles: int = setting(
        1,
        "cycles of cosine_with_restarts",
        group="optimisation", min=1, widget=dict(max=1000),
    )
    lr_scheduler_power: float = setting(
        1.0,
        "power of polynomial",
        group="optimisation", widget=dict(min=0.0, max=10.0, step=0.1),
    )
    loss_type: str = setting(
        "mse",
        "mse, l1, huber, smooth_l1",
        doc="`mse`, `l1`, `huber` (kohya's `2c(sqrt(d²+c²)-c)`), `smooth_l1`",
        group="optimisation", choices=LOSS_TYPES,
    )
    huber_c: float = setting(
        0.1,
        "the huber / smooth_l1 parameter",
        doc="the Huber / smooth-L1 parameter",
        group="optimisation", gt=0, advice="0.1 is kohya's default", widget=dict(min=0.0001, max=10.0, step=0.001),
    )
    min_snr_gamma: float = setting(
        0.0,
        "min-SNR loss weighting (0: off; 5 is common)",
        doc="min-SNR-gamma loss weighting (epsilon: `min(snr,γ)/snr`, v: `min(snr,γ)/(snr+1)`); 0 is off, 5 is "
        "common",
        group="optimisation", min=0, advice="0: off; 5 is common", widget=dict(max=100.0, step=0.5),
    )
    noise_offset: float = setting(
        0.0,
        "noise offset (0: off; 0.05-0.1 for darker darks)",
        doc="adds `offset * N(0,1)` per sample and channel to the noise (darker darks, brighter brights)",
        group="optimisation", min=0, advice="0: off; 0.05-0.1", widget=dict(max=1.0, step=0.01),
    )
    min_timestep: int = setting(
        0,
        "timesteps are drawn from [min_timestep, max_timestep)",
        doc="timesteps are drawn uniformly from `min_timestep` (inclusive) to `max_timestep` (exclusive)",
        group="optimisation", min=0, widget=dict(max=999),
    )
    max_timestep: int = setting(
        1000,
        "timesteps are drawn from [min_timestep, max_timestep)",
        doc="timesteps are drawn uniformly from `min_timestep` (inclusive) to `max_timestep` (exclusive)",
        group="optimisation", max=1000, widget=dict(min=1),
    )
    zero_terminal_snr: bool = setting(
        False,
        "rescale the betas so the last timestep has SNR 0 (v-prediction models)",
        doc="rescale the betas so the last timestep has SNR 0 (meant for v-prediction models)",
        group="optimisation",
    )
    huber_schedule: str = setting(
        "constant",
        "how huber_c follows the timestep: constant, exponential, snr (kohya's default)",
        doc=(
            "how the Huber / smooth-L1 parameter follows the timestep (kohya's; kohya's own default is `snr`): "
            "`constant` (`huber_c * huber_scale`), `exponential` (`huber_scale` at t = 0 decaying to `huber_c * "
            "huber_scale` at t = 1000), `snr` (`(1 - huber_c)/(1 + sigma_t)² + huber_c`: about 1 at low noise, "
            "`huber_c` at high noise)"
        ),
        group="optimisation", choices=HUBER_SCHEDULES,
    )
    huber_scale: float = setting(
        1.0,
        "multiplies the constant and exponential Huber schedules",
        doc="multiplies the `constant` and `exponential` schedules",
        group="optimisation", gt=0, advice="1.0 is kohya's default", widget=dict(min=0.0001, max=100.0, step=0.01),
    )
    debiased_estimation_loss: bool = setting(
        False,
        "weight each sample's loss by 1/sqrt(snr) (epsilon) or 1/(snr+1) (v)",
        doc=(
            "weight each sample's loss by `1/sqrt(snr)` (epsilon) or `1/(snr+1)` (v), snr clipped at 1000 "
            "(kohya's); combines with `min_snr_gamma`"
        ),
        group="optimisation",
    )
    noise_offset_random_strength: bool = setting(
        False,
        "each sample draws its noise offset uniformly from 0 to noise_offset",
        doc="each sample uses a strength drawn uniformly from 0 to `noise_offset`",
        group="optimisation",
    )
    multires_noise_iterations: int = setting(
        0,
        "pyramid noise levels (0: off; 6-10 is kohya's advice)",
        doc=(
            "multi-resolution (pyramid) noise: add this many levels of lower-resolution noise (each 2-4x smaller, "
            "weighted `discount^i`), then renormalise per sample (0: off; 6-10 is kohya's advice)"
        ),
        group="optimisation", min=0, max=64, advice="0: off; 6-10 is kohya's advice",
    )
    multires_noise_discount: float = setting(
        0.3,
        "weight decay per pyramid-noise level",
        doc="the weight decay per pyramid level",
        group="optimisation", min=0, max=1, advice="kohya's default 0.3", widget=dict(step=0.01),
    )
    ip_noise_gamma: float = setting(
        0.0,
        "input-perturbation noise (0: off; about 0.1)",
        doc=(
            "input perturbation: the noised latent gets `gamma * N(0,1)` more noise while the target stays the "
            "same (0: off; about 0.1)"
        ),
        group="optimisation", min=0, advice="0: off; about 0.1", widget=dict(max=1.0, step=0.01),
    )
    ip_noise_gamma_random_strength: bool = setting(
        False,
        "each sample draws its ip_noise_gamma uniformly from 0 to it",
        doc="each sample uses a strength drawn uniformly from 0 to `ip_noise_gamma`",
        group="optimisation",
    )
    loraplus_lr_ratio: float = setting(
        0.0,
        "LoRA+: the up matrices learn at lr * ratio (0: off; 16 is the paper's advice)",
        doc=(
            "LoRA+: the up (B) matrices learn at `lr * ratio` in their own optimizer group, the down (A) matrices "
            "at `lr` (0: off; 16 is the paper's advice; `lora`/`dora`). With `prodigy` only the first group's lr "
            "counts"
        ),
        **_LORAPLUS_RATIO,
    )
    loraplus_unet_lr_ratio: float = setting(
        0.0,
        "LoRA+ ratio for the UNet only (wins over loraplus_lr_ratio)",
        doc="the same ratio for the UNet only; wins over `loraplus_lr_ratio` (as in kohya)",
        **_LORAPLUS_RATIO,
    )
    loraplus_text_encoder_lr_ratio: float = setting(
        0.0,
        "LoRA+ ratio for the text encoders only (wins over loraplus_lr_ratio)",
        doc="the same ratio for the text encoders only; wins over `loraplus_lr_ratio` (as in kohya)",
        **_LORAPLUS_RATIO,
    )
    network_dropout: float = setting(
        0.0,
        "dropout on the down projection's output (lora/dora)",
        doc=(
            "kohya's dropout on the down projection's output: each element zeroed with this probability while "
            "training (`lora`/`dora`)"
        ),
        **_DROPOUT,
    )
    rank_dropout: float = setting(
        0.0,
        "each rank channel of a sample dropped with this probability (lora/dora)",
        doc="each rank channel of a sample zeroed with this probability, the update scaled up to match (`lora`/`dora`)",
        **_DROPOUT,
    )
    module_dropout: float = setting(
        0.0,
        "each LoRA module skipped for a sample with this probability (lora)",
        doc=(
            "each LoRA module skipped for a sample with this probability (`lora`). The three dropouts draw per "
            "sample (same run whatever the batch layout or processes); never at sampling, inference or export"
        ),
        **_DROPOUT,
    )
    scale_weight_norms: float = setting(
        0.0,
        "max-norm regularisation of each module's change (0: off; 1 is common; lora)",
        doc=(
            "max-norm regularisation: after every optimizer step, a module whose delta `scale * B @ A` has a norm "
            "above this is scaled back to it (0: off; 1 is common; `lora`)"
        ),
        group="adapter", min=0, advice="0: off; 1.0 is common", widget=dict(max=100.0, step=0.1),
    )
    gradient_checkpointing: bool = setting(
        False,
        "recompute activations in the backward pass: far less memory, about 30-45 % slower",
        doc=(
            "recompute activations in the backward pass (UNet and trained text encoders): less memory, ~1.5x "
            "slower, same result"
        ),
        group="optimisation",
    )
    attention: str = setting(
        "sdpa",
        "attention implementation",
        doc="`sdpa` (PyTorch scaled-dot-product attention) or `eager`",
        group="optimisation", choices=ATTENTION_BACKENDS,
    )
    enable_bucket: bool = setting(
        False,
        "aspect-ratio buckets: each image trains near its own aspect ratio",
        doc=(
            "aspect-ratio buckets as kohya: each image trains at the bucket nearest its aspect ratio; batches are "
            "drawn per bucket"
        ),
        group="data",
    )
    min_bucket_reso: int = setting(
        256,
        "smallest bucket side",
        group="data", min=64, widget=dict(max=4096, step=64),
    )
    max_bucket_reso: int = setting(
        1024,
        "largest bucket side",
        group="data", min=64, widget=dict(max=4096, step=64),
    )
    bucket_reso_steps: int = setting(
        64,
        "bucket sides are multiples of this",
        group="data", min=8, multiple_of=8, advice="64 is usual", widget=dict(max=512, step=8),
    )
    bucket_no_upscale: bool = setting(
        False,
        "never upscale small images to the bucket",
        doc="never upscale: small images keep their size (floored to the step), large ones shrink to the area",
        group="data",
    )
    shuffle_caption: bool = setting(
        False,
        "shuffle the caption's tags every sample",
        doc="shuffle the caption's tags (split at `caption_separator`) per sample",
        group="data",
    )
    keep_tokens: int = setting(
        0,
        "the first N tags stay in place and are never dropped",
        group="data", min=0, widget=dict(max=255),
    )
    caption_separator: str = setting(",", "tag separator", group="data")
    caption_dropout_rate: float = setting(
        0.0,
        "fraction of samples trained with an empty caption",
        group="data", min=0, max=1, widget=dict(step=0.01),
    )
    caption_tag_dropout_rate: float = setting(
        0.0,
        "each tag is dropped with this probability",
        doc="each (non-kept) tag is dropped with this probability",
        group="data", min=0, max=1, widget=dict(step=0.01),
    )
    caption_dropout_every_n_epochs: int = setting(
        0,
        "every N-th epoch trains with empty captions (0: off)",
        doc="every N-th epoch trains with empty captions",
        group="data", min=0, advice="0: off", widget=dict(max=100000),
    )
    cache_latents: str = setting(
        "memory",
        "memory, disk (reused by later runs) or none",
        doc=(
            "`memory`, `disk` (safetensors files in `cache_dir`, reused by later runs) or `none`; keyed by image "
            "content, VAE weights, size and crop, so a second run skips the VAE"
        ),
        group="data", choices=CACHE_MODES,
    )
    cache_dir: str = setting("", "folder of the disk latent cache", default_doc="`<dataset>/.lora_trainer_cache`",
                             group="data")
    cache_text_embeddings: bool = setting(
        True,
        "encode each caption once while the text encoders are frozen",
        doc=(
            "encode each caption once when the text encoders are frozen (up front when captions are fixed); "
            "entries are keyed by the exact caption text and `max_token_length`, so shuffled, wildcard or warmup "
            "captions only reuse an entry for the same text"
        ),
        group="data",
    )
    reg_dataset: str = setting(
        "",
        "a folder of regularization (class) images inside ComfyUI's input folder; none: off",
        doc=(
            "kohya's `--reg_data_dir`: a folder of regularization (class) images, read like `dataset` (`N_class` "
            "subfolders repeat N times; without a caption file the class name is the caption; the trigger word is "
            "never added). As in kohya, their repeats are raised or cut so that each epoch holds as many reg "
            "samples as train samples (the epoch doubles); their latents are cached like the others'"
        ),
        group="data",
    )
    prior_loss_weight: float = setting(
        1.0,
        "the reg images' loss is multiplied by this",
        doc="the loss of reg samples is multiplied by this (kohya's `--prior_loss_weight`)",
        group="data", min=0, advice="1.0 is kohya's default", widget=dict(max=100.0, step=0.05),
    )
    max_token_length: int = setting(
        75,
        "tokens per caption: longer captions are encoded in 75-token windows",
        doc=(
            "`75`, `150` or `225` tokens per caption (kohya's `--max_token_length`): longer captions are cut into "
            "75-token windows, each wrapped in BOS/EOS and encoded separately, then joined (1 + 75n + 1 positions: "
            "152 or 227, as kohya); on SDXL both encoders, pooled embedding from the first window. 75 truncates. "
            "Samples use the same windows"
        ),
        group="data", choices=MAX_TOKEN_LENGTHS, advice="tokens per caption",
    )
    enable_wildcard: bool = setting(
        False,
        "{a|b|c} in a caption picks one option per sample; a multi-line caption a random line",
        doc=(
            "kohya's `--enable_wildcard`: `{a|b|c}` in a caption becomes one option per sample, and a "
            "multi-line caption file gives a random line (`{{`/`}}` are literal braces); drawn from each sample's "
            "own seed, so runs with other batch layouts, process counts or resumes see the same captions"
        ),
        group="data",
    )
    token_warmup_min: int = setting(
        1,
        "caption token warmup: the tags a caption starts with",
        doc="kohya's caption token warmup: the tags (after `keep_tokens`) a caption starts with",
        group="data", min=0, advice="kohya's default 1", widget=dict(max=255),
    )
    token_warmup_step: float = setting(
        0.0,
        "the step by which captions reach full length (below 1: a fraction of steps; 0: off)",
        doc=(
            "the step by which captions reach their full length, growing linearly from `token_warmup_min` (a value "
            "below 1 is a fraction of `steps`; 0 is off)"
        ),
        group="data", min=0, widget=dict(max=1000000.0, step=0.01),
    )
    timestep_sampling: str = setting(
        _FLOW.timestep_sampling,
        "flow models: how each sample's noise level is drawn (flux_shift is recommended for Flux)",
        doc=(
            "flow-matching models only (kohya's `--timestep_sampling`): `sigma` (the `weighting_scheme` density on "
            "the 1000-step grid, shifted by `discrete_flow_shift`; kohya's default, the SD3 way), `uniform`, "
            "`sigmoid` (logit-normal: sigmoid(`sigmoid_scale` * N(0,1))), `shift` (sigmoid, then shifted by "
            "`discrete_flow_shift`), `flux_shift` (sigmoid, then shifted by mu from the image size; recommended "
            "for Flux), `nextdit_shift` (uniform, then shifted by mu; Lumina2). Epsilon/v models draw timesteps "
            "from `min_timestep`..`max_timestep` instead"
        ),
        group="flow", choices=TIMESTEP_SAMPLING,
    )
    sigmoid_scale: float = setting(
        _FLOW.sigmoid_scale,
        "flow models: scale of the normal draw before the sigmoid (sigmoid, shift, flux_shift)",
        doc=(
            "scale of the normal draw before the sigmoid (`sigmoid`, `shift`, `flux_shift`); larger spreads the "
            "noise levels towards 0 and 1 (kohya's `--sigmoid_scale`)"
        ),
        group="flow", min=0.001, max=100.0, widget=dict(step=0.01),
    )
    discrete_flow_shift: float = setting(
        _FLOW.discrete_flow_shift,
        "flow models: shift s of sigma -> s*sigma / (1 + (s-1)*sigma) for sigma and shift sampling",
        doc=(
            "shift s of the noise level, sigma -> s*sigma / (1 + (s-1)*sigma), for `sigma` and `shift` sampling; "
            "above 1 favours noisier levels (kohya's `--discrete_flow_shift`; 3.0 as SD3)"
        ),
        group="flow", min=0.001, max=100.0, widget=dict(step=0.05),
    )
    weighting_scheme: str = setting(
        _FLOW.weighting_scheme,
        "flow models: loss weight per noise level (sigma_sqrt, cosmap) or, with sigma sampling, its density",
        doc=(
            "flow-matching loss weight per noise level (`sigma_sqrt`: 1/sigma^2, `cosmap`: 2/(pi(1-2s+2s^2)); "
            "`none`, `logit_normal` and `mode` weigh 1) and, for `timestep_sampling = sigma`, the density it "
            "draws from (`logit_normal`, `mode`; the others uniform). kohya's and diffusers' `--weighting_scheme`"
        ),
        group="flow", choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = setting(
        _FLOW.logit_mean,
        "flow models: mean of the normal draw of weighting_scheme = logit_normal",
        group="flow", min=-10.0, max=10.0, widget=dict(step=0.01),
    )
    logit_std: float = setting(
        _FLOW.logit_std,
        "flow models: standard deviation of the normal draw of weighting_scheme = logit_normal",
        group="flow", min=0.001, max=10.0, widget=dict(step=0.01),
    )
    mode_scale: float = setting(
        _FLOW.mode_scale,
        "flow models: scale of the mode density (weighting_scheme = mode)",
        group="flow", min=-10.0, max=10.0, widget=dict(step=0.01),
    )
    fp8_base: bool = setting(
        False,
        "store the frozen base weights in float8 (half the memory of bf16; not with dora or 4bit)",
        doc=(
            "kohya's `--fp8_base`: the frozen Linear/Conv weights of the UNet and text encoders are stored in "
            "`float8_e4m3fn` (1 byte each) and upcast layer by layer in the forward pass (to the bf16/fp16 compute "
            "dtype, or fp32); adapter weights keep their dtype. Works on the CPU too; not with `dora` or "
            "`quantize_base`"
        ),
        group="adapter",
    )
    torch_compile: bool = setting(
        False,
        "compile the UNet: faster steps after a slow first one (minutes on a CPU)",
        doc=(
            "compile the UNet with `torch.compile` (kohya's `--torch_compile`): faster steps after a slow first "
            "one (minutes on a CPU); refused with a message where it cannot work (unsupported Python/platform, no "
            "C++ compiler for the CPU)"
        ),
        group="adapter",
    )
    blocks_to_swap: int | str = setting(
        0,
        "DiT families: keep the weights of the last N transformer blocks in CPU memory, copied to the GPU only "
        "while they run (0: off; auto: the fewest that fit the free memory)",
        doc=(
            "block swap (kohya's `--blocks_to_swap`) for the DiT families (SD3/SD3.5, Flux.1, Chroma, Lumina2, "
            "Z-Image, Qwen-Image): the frozen weights of the last N transformer blocks (counted as kohya counts "
            "them: on Flux.1 and Chroma the last N/2 double and N single blocks, up to 38) stay in pinned CPU "
            "memory and are copied to the GPU before each block's forward and backward, the next block's copy overlapped on a second CUDA stream. "
            "Same result, slower steps; best with `gradient_checkpointing`. `auto`: the smallest N with which the "
            "memory estimate fits the free memory (`training/block_swap.py`)"
        ),
        group="optimisation", choices=SWAP_CHOICES, also=(is_block_count, "another whole number of blocks"),
        advice="0: off",
    )
    save_every_n_steps: int = setting(
        0,
        "also write `<output_name>_step<N>.safetensors` every N steps (0: off)",
        group="runs", min=0, advice="0: off", widget=dict(max=1000000),
    )
    keep_last_n: int = setting(
        0,
        "keep only the newest N step files and states (0: all)",
        doc="keep only the newest N step files and states (0: keep all)",
        group="runs", min=0, advice="0: off", widget=dict(max=100000),
    )
    save_state: bool = setting(
        False,
        "with every save_every file, also write a resumable state (output/loratrainer_state), so a crash or power "
        "cut can be resumed from there",
        doc=(
            "with every step file and at the end, write `<output_name>_state_step<N>.pt`: adapter, optimizer, "
            "scheduler, RNG, step (the data order follows from seed and step)"
        ),
        group="runs",
    )
    save_state_on_stop: bool = setting(
        True,
        "when cancelled, write a resumable state",
        doc="when stopped (Cancel, Ctrl-C), also write the state",
        group="runs",
    )
    state_dir: str = setting(
        "",
        "folder for the state files (the Train LoRA node uses ComfyUI's `output/loratrainer_state`)",
        default_doc="`output_dir`", group="runs",
    )
    resume_from: str = setting(
        "",
        "a state file (or a folder: its newest) to continue the run from; ends with the same weights as an "
        "uninterrupted run. Settings that shape the run (seed, batch size, rank, ...) must match; `steps` may grow",
        group="runs",
    )
    early_stopping_patience: int = setting(
        0,
        "stop when the smoothed loss has not improved for N steps (0: off)",
        doc="stop when the smoothed loss has not improved for N steps (0: off); the LoRA is saved as usual",
        group="runs", min=0, advice="0: off", widget=dict(max=1000000),
    )
    early_stopping_min_delta: float = setting(
        0.0,
        "the improvement that counts",
        group="runs", widget=dict(min=0.0, max=10.0, step=0.0001),
    )
    early_stopping_smoothing: float = setting(
        0.9,
        "EMA factor of the smoothed loss",
        group="runs", min=0, lt=1, widget=dict(max=0.999, step=0.001),
    )
    sample_every_n_steps: int = setting(
        0,
        "sample images from the model being trained every N steps (and before the first) into `<output_name>_samples/`",
        group="runs", min=0, advice="0: off", widget=dict(max=1000000),
    )
    sample_prompts: list = setting(
        factory=list,
        help='prompts, one image each (`["sks dog on a beach", "sks dog, portrait"]`); kohya\'s inline settings '
        "override the `sample_*` keys for one prompt: `a dog --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss "
        "euler_a` (negative prompt, width, height, seed, CFG, steps, sampler; sizes rounded down to a multiple of "
        "8, at least 64)",
        group="runs",
    )
    sample_negative_prompt: str = setting(
        "",
        "negative prompt of the sample images",
        doc="negative prompt for the samples",
        group="runs",
    )
    sample_seed: int = setting(
        0,
        "prompt i uses seed sample_seed + i",
        doc="prompt i uses seed `sample_seed + i`, the same at every sampling",
        group="runs", widget=dict(min=0, max=2147483647),
    )
    sample_steps: int = setting(
        20,
        "sampler steps of the sample images",
        doc="sampler steps",
        group="runs", min=1, widget=dict(max=200),
    )
    sample_cfg: float = setting(
        7.0,
        "guidance scale of the sample images",
        doc="classifier-free guidance scale",
        group="runs", widget=dict(min=0.0, max=30.0, step=0.5),
    )
    sample_sampler: str = setting(
        "euler",
        "sampler of the sample images",
        doc="`euler`, `euler_a`, `ddim`, `dpm++`",
        group="runs", choices=SAMPLERS,
    )
    sample_resolution: int = setting(
        0,
        "sample image size (0: the training resolution)",
        doc="sample size (0: `resolution`)",
        group="runs", min=0, multiple_of=8, advice="0: resolution", widget=dict(max=4096, step=8),
    )
    masked_loss: bool = setting(
        False,
        "weight the loss per latent pixel by each image's mask (masks/ beside the images, or mask_dir): white "
        "trains, black is ignored",
        doc=(
            "kohya's `--masked_loss`: weight the loss per latent pixel by each image's mask: a same-stem image in a "
            "`masks/` folder beside the images (or in `mask_dir`); white trains, black is ignored, grey weights "
            "(R channel; 127 is about 0.5). The mask is cropped, flipped and bucketed exactly as its image, then "
            "reduced to latent size (area average); images without a mask train whole. As in kohya the masked "
            "loss is averaged over all latent pixels, so a mostly black mask also lowers the loss's scale"
        ),
        group="validation",
    )
    alpha_mask: bool = setting(
        False,
        "an image's alpha channel is its loss mask (transparent: ignored); implies masked loss",
        doc=(
            "kohya's `alpha_mask`: an image's alpha channel is its mask (transparent: ignored); an image without "
            "alpha trains whole. Implies masked loss; a mask file, with `masked_loss`, wins over the alpha"
        ),
        group="validation",
    )
    mask_dir: str = setting(
        "",
        "a folder of masks named like the images, instead of masks/ beside them (needs masked_loss)",
        doc=(
            "a folder of masks named like the images (same relative path and stem, or the stem alone), instead of "
            "`masks/` beside them; needs `masked_loss`"
        ),
        group="validation",
    )
    validation_split: float = setting(
        0.0,
        "images held out to measure a validation loss: below 1 a fraction (0.1), from 1 a count (4); 0: off",
        doc=(
            "hold images out of training to measure a validation loss: below 1 a fraction of the images (0.1), "
            "from 1 a count (4). Chosen from `validation_seed`; a held-out image never trains, with none of its "
            "repeats (regularization images are never held out)"
        ),
        group="validation", min=0, advice="0: off; a fraction below 1 (0.1) or a whole number of images (4)",
        widget=dict(max=10000.0, step=0.01),
    )
    validation_dataset: str = setting(
        "",
        "a folder of validation images (read like the dataset) instead of validation_split",
        doc="a folder of validation images (read like `dataset`) instead of `validation_split`",
        group="validation",
    )
    validate_every_n_steps: int = setting(
        0,
        "measure the validation loss every N steps (always before the first step and after the last)",
        doc=(
            "measure the validation loss every N steps; it is always measured before the first step and after "
            "the last. Deterministic as kohya's `validation.md`: fixed timesteps (10, 350, 500, 650, 990 spread "
            "over the timestep range), noise seeded per held-out image, centre crop, no flip, no dropout, no "
            "caption augmentation, no gradients: the curve moves only when the LoRA does, whatever the batch size"
        ),
        group="validation", min=0, advice="0: only before the first and after the last step",
        widget=dict(max=1000000),
    )
    validation_seed: int | None = setting(
        None,
        "picks the held-out images and seeds their noise (none, or 0 on the Training Options node: the run's seed)",
        doc=(
            "picks the held-out images and seeds their noise; fix it to compare runs with different `seed`s on "
            "the same images"
        ),
        default_doc="`seed`", group="validation", min=0, optional=True, advice="or leave it out to use seed",
        widget=dict(max=9223372036854775807),
    )
    early_stopping_metric: str = setting(
        "train",
        "what early stopping watches: the smoothed training loss, or the validation loss",
        doc=(
            "`validation`: `early_stopping_patience` watches the validation loss (steps since its best) instead of "
            "the smoothed training loss"
        ),
        group="validation", choices=EARLY_STOPPING_METRICS,
    )
    keep_best: bool = setting(
        False,
        "also write <name>_best.safetensors, the LoRA at the lowest validation loss",
        doc="also write `<output_name>_best.safetensors`, the LoRA at the step of the lowest validation loss",
        group="validation",
    )
    extra: dict = field(default_factory=dict)

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

    def validate(self, model_given: bool = False) -> "TrainConfig":
        """Each field against its own rules (``setting``), then the rules between fields; ConfigError names
        the first key that cannot work and says what to use. ``model_given``: the host passes the model to
        train (ComfyUI's MODEL input), so no checkpoint file is read."""

        def need(cond, key, message):
            if not cond:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: {message}")

        need(model_given or bool(self.checkpoint), "checkpoint",
             "set it to a .safetensors checkpoint or a diffusers folder")
        need(bool(self.dataset), "dataset", "set it to a folder of images with captions")
        for f in dataclasses.fields(self):
            problem = field_problem(f, getattr(self, f.name))
            need(problem is None, f.name, problem)
        need(self.target != "custom" or bool(self.target_modules.strip()), "target_modules",
             "target = 'custom' needs target_modules: a regex or comma-separated module names")
        need(self.train_unet or self.train_text_encoder, "train_unet",
             "train the UNet, the text encoder(s) or both (train_text_encoder = true)")
        need(isinstance(self.optimizer_args, dict), "optimizer_args", "use a table, e.g. {betas = [0.9, 0.99]}")
        need(self.lr_warmup_steps < 1 or float(self.lr_warmup_steps).is_integer(),
             "lr_warmup_steps", "use a step count, or a fraction below 1 of steps")
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            need(getattr(self, key) == 0 or self.adapter in ("lora", "dora"), key,
                 f"LoRA+ applies to adapter = 'lora' or 'dora', not {self.adapter!r}; set it to 0")
        need((self.network_dropout == 0 and self.rank_dropout == 0) or self.adapter in ("lora", "dora"),
             "network_dropout" if self.network_dropout else "rank_dropout",
             f"applies to adapter = 'lora' or 'dora', not {self.adapter!r}; set it to 0")
        need(self.module_dropout == 0 or self.adapter == "lora", "module_dropout",
             f"applies to adapter = 'lora' only, not {self.adapter!r}; set it to 0")
        need(self.scale_weight_norms == 0 or self.adapter == "lora", "scale_weight_norms",
             f"max-norm regularisation applies to adapter = 'lora' only, not {self.adapter!r}; set it to 0")
        need(self.min_timestep < self.max_timestep, "min_timestep", "use 0 <= min_timestep < max_timestep <= 1000")
        need(self.min_bucket_reso <= self.max_bucket_reso, "min_bucket_reso", "must not exceed max_bucket_reso")
        need(self.token_warmup_step < 1 or float(self.token_warmup_step).is_integer(),
             "token_warmup_step", "use 0 (off), a step count, or a fraction below 1 of steps")
        need(not self.fp8_base or self.adapter != "dora", "fp8_base",
             "DoRA reads the base weights directly and cannot use float8 ones; use adapter = 'lora', or "
             "fp8_base = false")
        need(not self.fp8_base or self.quantize_base == "none", "fp8_base",
             "the base is already quantized (quantize_base = '4bit'); use one of the two")
        need(isinstance(self.sample_prompts, list) and all(isinstance(p, str) for p in self.sample_prompts),
             "sample_prompts", "use a list of strings")
        for line in self.sample_prompts:
            try:
                parse_prompt(line)
            except PromptError as e:
                raise ConfigError(f"sample_prompts: {e}") from None
        if self.output_name.lower().endswith(".safetensors"):
            self.output_name = self.output_name[: -len(".safetensors")]
        problem = output_name_problem(self.output_name)
        need(problem is None, "output_name", problem or "")
        need(not self.mask_dir or self.masked_loss, "mask_dir",
             "masks are only used with masked_loss = true; switch it on or clear mask_dir")
        need(self.validation_split < 1 or float(self.validation_split).is_integer(), "validation_split",
             "use 0 (off), a fraction below 1 of the images (0.1), or a whole number of images (4)")
        need(not (self.validation_split and self.validation_dataset), "validation_split",
             "use either validation_split or validation_dataset, not both")
        need(not self.validate_every_n_steps or self.validating, "validate_every_n_steps",
             "needs held-out images: set validation_split (e.g. 0.1) or validation_dataset")
        need(self.early_stopping_metric == "train" or self.validating, "early_stopping_metric",
             "'validation' needs held-out images: set validation_split or validation_dataset")
        need(self.early_stopping_metric == "train" or self.early_stopping_patience > 0, "early_stopping_metric",
             "'validation' watches the validation loss for early stopping; set early_stopping_patience (steps)")
        need(not self.keep_best or self.validating, "keep_best",
             "keeps the LoRA of the best validation loss; set validation_split or validation_dataset")
        return self

    @property
    def validating(self) -> bool:
        """Whether the run measures a validation loss (held-out images or a validation folder)."""
        return bool(self.validation_split or self.validation_dataset)

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
                f"{source}: unknown key(s) {', '.join(unknown)}; docs/configuration.md lists the keys this version "
                "reads"
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
