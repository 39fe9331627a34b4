"""Before training: peak memory and time for the chosen settings, and what to change when it won't fit.

Pure functions (no ComfyUI): the Train LoRA node feeds them the checkpoint's tensor shapes (read from
the file header, nothing loaded) and the device's free memory from ComfyUI's model_management
(``get_free_memory(device)``, whatever the device), and refuses to start a run that cannot fit, naming the
settings to change, instead of running out of memory an hour in. A device that reports no free figure
gets the estimate without a verdict, and the summary says so. On the CPU and MPS the whole model lives in
the one system memory; the time estimate is given for CUDA/ROCm GPUs by name and the CPU, and left out
on XPU and MPS, for which there is no calibrated figure.

The model of memory follows the measured/analytic figures in the project's reference notes
(landscape-and-performance.md §5, §8): UNet weights in the training precision, LoRA parameters with
fp32 gradients and two AdamW moments, activations per sample that grow with the pixel count (SD1.5:
~1.1 GiB at 512 px in bf16 with memory-efficient attention; SDXL: ~8.3 GiB at 1024 px; gradient
checkpointing keeps ~13 % of that), the latent-caching phase (VAE encoding at the training size), and
~0.5 GiB of CUDA context. It is deliberately on the high side (+10 %): a refusal that could have fit
costs a setting change; a crash an hour in costs the hour.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace

from ..training.devices import shares_system_memory
from ..training.formats.ldm_names import UNET_PREFIX, VAE_PREFIX

GiB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# activations per sample at the family's reference pixel count, bf16, memory-efficient attention
ACTIVATIONS = {  # family: (reference side in px, GiB without checkpointing, GiB with checkpointing)
    "sd1": (512, 1.1, 0.29),
    "sd2": (512, 1.1, 0.29),
    "sd2-v": (512, 1.1, 0.29),
    "sdxl": (1024, 8.3, 1.05),
}
# forward FLOPs per latent position per UNet parameter (calibrated to SD1.5@512: 0.80 TFLOP, SDXL@1024: 6.76)
FLOPS_PER_PARAM_POSITION = {"sd1": 0.114, "sd2": 0.114, "sd2-v": 0.114, "sdxl": 0.080}
TRAIN_STEP_FACTOR = 2.15  # a LoRA step costs ~2.15 forward passes; checkpointing adds one more
CHECKPOINTING_FACTOR = 1.47
CONTEXT_BYTES = int(0.5 * GiB)
MARGIN = 1.10
# dense bf16 TFLOP/s by device name (datasheets); fp32 runs at ~1/8 of that without TF32
DEVICE_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("4090", 165.0), ("4080", 97.0), ("3090", 71.0), ("3080", 59.0), ("A6000", 155.0), ("A10", 125.0),
    ("L4", 121.0), ("V100", 125.0), ("T4", 65.0),
]
MFU = 0.15  # single-GPU utilisation seen for LoRA training at small batch sizes (9-21 % reported)
STEP_OVERHEAD = {"cuda": 0.03, "cpu": 0.0}  # seconds per micro-batch of launch/Python overhead


@dataclass
class ModelShape:
    """What the estimate needs to know about a checkpoint (from its tensor shapes only)."""

    family: str
    unet_params: int
    text_encoder_params: int
    vae_params: int
    model_channels: int = 320
    attention_modules: list[tuple[int, int]] = field(default_factory=list)  # (in, out) per LoRA target

    def lora_params(self, rank: int) -> int:
        return sum(rank * (i + o) for i, o in self.attention_modules)


@dataclass
class Settings:
    resolution: int
    batch_size: int
    rank: int
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    steps: int = 1
    fp8_base: bool = False  # frozen weights in float8 (1 byte each), whatever they were loaded in
    optimizer: str = "adamw"  # adamw8bit: 8-bit moments (2 bytes per LoRA parameter instead of 8)
    blocks_to_swap: int = 0  # DiT families: kohya's count (training/block_swap.py swap_selection)


@dataclass
class Estimate:
    peak_bytes: int
    parts: dict[str, int]
    phase: str  # "training" or "caching": the phase that sets the peak
    seconds_per_step: float | None
    total_seconds: float | None
    free_bytes: int | None
    fits: bool
    suggestions: list[str]
    device: str
    memory_note: str = ""  # what the free figure means, or why there is none (MPS, DirectML)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
        line = f"estimated peak memory {gib(self.peak_bytes)} on {self.device}"
        if self.free_bytes is not None:
            line += f" ({gib(self.free_bytes)} free)"
        else:
            line += " (no free-memory figure: not checked)"
        if self.memory_note:
            line += f"; {self.memory_note}"
        if self.total_seconds is not None:
            line += f", roughly {_duration(self.total_seconds)} for the run ({self.seconds_per_step:.2f} s/step, +-2x)"
        return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- reading a checkpoint's shapes ---------------------------------------------------------------------
TARGETS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


def model_shape_from_shapes(shapes: dict[str, tuple], family: str) -> ModelShape:
    """``shapes``: tensor name -> shape for an LDM/SAI single-file checkpoint (as ComfyUI users have)."""
    unet = te = vae = 0
    attention = []
    for key, shape in shapes.items():
        n = 1
        for d in shape:
            n *= int(d)
        if key.startswith(UNET_PREFIX):
            unet += n
            if "transformer_blocks" in key and key.endswith(TARGETS) and len(shape) == 2:
                attention.append((int(shape[1]), int(shape[0])))
        elif key.startswith(VAE_PREFIX):
            vae += n
        elif key.startswith(("cond_stage_model.", "conditioner.")):
            te += n
    first = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    channels = int(first[0]) if first else 320
    return ModelShape(family, unet, te, vae, channels, attention)


def read_model_shape(path: str, family: str | None = None) -> ModelShape:
    """Tensor shapes from a .safetensors header (no tensor is read), family detected unless given."""
    import os

    if os.path.isdir(path):
        raise ValueError("diffusers folders: no header-only estimate")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        metadata = f.metadata() or {}
    if family is None:
        from ..training.models import detect_family

        family = detect_family(shapes, metadata)
    return model_shape_from_shapes(shapes, family)


# -- the estimate --------------------------------------------------------------------------------------
def device_tflops(device_type: str, device_name: str = "", cpu_count: int = 4) -> float | None:
    """Dense bf16 peak of the device in TFLOP/s (a rough table; unknown CUDA/ROCm GPUs count as 100);
    None for XPU and MPS, which have no calibrated figure here."""
    if device_type == "cpu":
        return 0.05 * max(1, cpu_count)  # measured order of magnitude for fp32 convs on CPU cores
    if device_type != "cuda":
        return None
    for needle, value in DEVICE_TFLOPS:
        if needle.lower() in device_name.lower():
            return value
    return 100.0


def estimate(
    model: ModelShape,
    settings: Settings,
    free_bytes: int | None,
    device_type: str = "cuda",
    device_name: str = "",
    cpu_count: int = 4,
    suggest: bool = True,
    memory_note: str = "",
) -> Estimate:
    s = settings
    if isinstance(model, DitShape):
        return _estimate_dit(model, settings, free_bytes, device_type, device_name, cpu_count, suggest, memory_note)
    gpu = device_type != "cpu"
    weight_bytes = BYTES["fp32"] if device_type == "cpu" else BYTES.get(s.precision, 4)
    if s.fp8_base:
        weight_bytes = 1
    act_bytes = 4 if (s.precision == "fp32" or device_type == "cpu") else 2
    ref_side, act_plain, act_ckpt = ACTIVATIONS.get(model.family, ACTIVATIONS["sd1"])
    pixels = (s.resolution / ref_side) ** 2
    width = model.model_channels / 320  # tiny test models have far narrower layers
    per_sample = (act_ckpt if s.gradient_checkpointing else act_plain) * GiB * pixels * width * act_bytes / 2
    lora = model.lora_params(s.rank)
    parts = {
        "unet_weights": model.unet_params * weight_bytes,
        "lora_params_grads_adam": lora * lora_bytes_per_param(s.optimizer),
        "activations": int(per_sample * s.batch_size),
        "context": CONTEXT_BYTES if gpu else 0,
    }
    # the caching phase: the VAE (fp32) encodes the image and its mirror at the training size
    latent_side = s.resolution
    vae_activation = 2 * 3 * 128 * latent_side * latent_side * 4 * width
    caching = model.vae_params * 4 + vae_activation + parts["context"]
    if shares_system_memory(device_type):
        # on the CPU and MPS the whole model lives in the same memory (loaded there before anything moves)
        parts["text_encoders_vae"] = (model.text_encoder_params + model.vae_params) * 4
        caching += model.unet_params * 4 + model.text_encoder_params * 4
    training = sum(parts.values())
    phase = "training" if training >= caching else "caching"
    peak = int(max(training, caching) * MARGIN)
    if phase == "caching":
        parts["vae_encode"] = int(vae_activation)

    latent_positions = (s.resolution // 8) ** 2
    fwd = FLOPS_PER_PARAM_POSITION.get(model.family, 0.1) * 2 * model.unet_params * latent_positions
    step_flops = fwd * TRAIN_STEP_FACTOR * (CHECKPOINTING_FACTOR if s.gradient_checkpointing else 1.0)
    step_flops *= s.batch_size * s.gradient_accumulation_steps
    peak_tflops = device_tflops(device_type, device_name, cpu_count)
    if device_type == "cuda" and s.precision == "fp32":
        peak_tflops /= 8
    seconds = None
    if peak_tflops:
        seconds = step_flops / (peak_tflops * 1e12 * (MFU if gpu else 1.0))
        seconds += STEP_OVERHEAD.get(device_type, 0.0) * s.gradient_accumulation_steps
    fits = free_bytes is None or peak <= free_bytes
    result = Estimate(
        peak_bytes=peak,
        parts={k: int(v) for k, v in parts.items()},
        phase=phase,
        seconds_per_step=seconds,
        total_seconds=seconds * s.steps if seconds is not None else None,
        free_bytes=free_bytes,
        fits=fits,
        suggestions=[],
        device=device_name or device_type,
        memory_note=memory_note,
    )
    if suggest and not fits:
        result.suggestions = suggestions(model, settings, free_bytes, device_type, device_name, cpu_count)
    return result


def suggestions(model, settings: Settings, free_bytes, device_type, device_name="", cpu_count=4) -> list[str]:
    """Setting changes that lower the peak, each with the peak it gives; those that fit come first."""
    if isinstance(model, DitShape):
        return _dit_suggestions(model, settings, free_bytes, device_type, device_name, cpu_count)
    s = settings
    options: list[tuple[str, Settings]] = []
    if s.batch_size > 1:
        smaller = max(1, s.batch_size // 2)
        options.append(
            (
                f"batch_size {s.batch_size} -> {smaller} (raise gradient_accumulation_steps to keep the effective batch)",
                replace(s, batch_size=smaller),
            )
        )
        if smaller > 1:
            options.append((f"batch_size {s.batch_size} -> 1", replace(s, batch_size=1)))
    if not s.gradient_checkpointing:
        options.append(("gradient_checkpointing on (about 30-45 % slower)", replace(s, gradient_checkpointing=True)))
    if s.precision == "fp32" and device_type != "cpu":
        options.append(("precision fp32 -> bf16", replace(s, precision="bf16")))
    for lower in (s.resolution * 3 // 4 // 64 * 64, s.resolution // 2 // 64 * 64):
        if 64 <= lower < s.resolution:
            options.append((f"resolution {s.resolution} -> {lower}", replace(s, resolution=lower)))
    combined = replace(s, batch_size=1, gradient_checkpointing=True, precision="bf16" if device_type != "cpu" else s.precision)
    if combined != s:
        options.append(("all of: batch_size 1, gradient_checkpointing on, precision bf16", combined))
    rows = []
    for text, changed in options:
        e = estimate(model, changed, free_bytes, device_type, device_name, cpu_count, suggest=False)
        if e.peak_bytes < estimate(model, s, free_bytes, device_type, device_name, cpu_count, suggest=False).peak_bytes:
            rows.append((not e.fits, e.peak_bytes, f"{text}: ~{e.peak_bytes / GiB:.1f} GiB" + (" (fits)" if e.fits else "")))
    rows.sort(key=lambda r: (r[0], r[1] if r[0] else -r[1]))  # fitting: least change first; others: best first
    return [r[2] for r in rows]


def refusal_message(est: Estimate) -> str:
    gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    lines = [
        f"this run would need about {gib(est.peak_bytes)} of memory at its peak ({est.phase}), but "
        f"{est.device} has {gib(est.free_bytes or 0)} free; it would run out of memory. Change:",
    ]
    lines += [f"  - {s}" for s in est.suggestions] or ["  - a smaller resolution or batch_size"]
    lines.append(
        "  (breakdown: " + ", ".join(f"{k} {gib(v)}" for k, v in est.parts.items()) + "; "
        "memory_limit_gb sets another budget than the free memory)"
    )
    if est.memory_note:
        lines.append(f"  ({est.memory_note})")
    return "\n".join(lines)


# -- DiT families (SD3/SD3.5, Flux.1, Chroma, Lumina2, Z-Image, Qwen-Image) --------------------------------
# The model ComfyUI loaded is measured from its own tensors (``dit_shape_from_model``; or from the names and
# shapes of a state dict, ``dit_shape_from_shapes``): the parameters of every transformer block, the rest, the
# hidden size and the LoRA targets. Text encoders and the VAE are off the GPU during the steps (conditionings
# and latents are computed once, then they are offloaded), so they do not count; ComfyUI streams them in
# partially while caching if memory is short.
#
# Activations: bytes that autograd keeps per token, per hidden unit, per block, for a bf16 forward with
# memory-efficient attention. The figure follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in
# Large Transformer Models", §4.1: 34 bytes per token per hidden unit per layer in 16 bit, 5·a·s/h more
# without flash attention), less the three dropout masks (none here), plus the adaLN modulation (the
# normalised input and the gated output are saved: +4) and LoRA's rank-sized intermediates (negligible): a
# Flux double block or an MMDiT/Qwen block runs one such layer per token (36); Flux's single block has the
# parallel attention+MLP, whose concatenated 5h input of linear2 is saved too (40); the Lumina/Z-Image block's
# SwiGLU feed-forward saves w1 and w3 outputs and their product (48 with a 4h feed-forward, 44 for Z-Image's
# 8/3 h). With per-block checkpointing only each block's inputs are kept (2 bytes per token per hidden unit
# per residual stream) plus one block's recomputation and its backward (RECOMPUTE_WORKSPACE x its
# activations). The figures are checked against kohya's published Flux.1 tiers (sd-scripts
# docs/flux_train_network.md, "Recommended Settings by GPU Memory": fp8 base, checkpointing, batch 1, 1024 px:
# 24 GB fits batch 2; 16 GB with block swap; 12 GB with 16 blocks swapped and 8-bit AdamW; 8 GB with 28) in
# tests/test_estimate_dit.py, and measured on a GPU by tests/test_gpu_flux_memory.py.
DIT_ACTIVATION_BYTES = {  # block list -> saved bytes per token per hidden unit (bf16, no checkpointing)
    "double_blocks": 36, "single_blocks": 40, "joint_blocks": 36, "transformer_blocks": 36,
    "layers": 48, "noise_refiner": 48, "context_refiner": 48, "siglip_refiner": 48,
}
RECOMPUTE_WORKSPACE = 1.25  # the recomputed block's activations plus its activation gradients (x of them)
# text tokens in a training caption's conditioning (kohya's defaults: Flux t5xxl_max_token_length 512 for dev,
# 256 for schnell; SD3 CLIP 77 + T5 256; Lumina2 Gemma 256; Z-Image and Qwen-Image: LLM captions, ~512)
TEXT_TOKENS = {"flux-dev": 512, "flux-schnell": 256, "chroma": 512, "sd3": 333, "sd3.5-medium": 333,
               "sd3.5-large": 333, "lumina2": 256, "z-image": 512, "qwen-image": 512}
# No margin on top: the model as it stands reproduces kohya's measured Flux.1 tiers within ~2 % (README
# "Memory"), and a margin would refuse their 12 GB recipe on a 12 GB card, where theirs runs.
DIT_MARGIN = 1.0
SWAP_IN_FLIGHT = 2  # swapped blocks on the device at once (training/block_swap.py plan_swap)
PCIE_BYTES_PER_S = 20e9  # host->device copies of swapped blocks (PCIe 4.0 x16, pinned), overlapped with compute
_BLOCK_KEY = re.compile(r"^(double_blocks|single_blocks|joint_blocks|layers|noise_refiner|context_refiner|"
                        r"siglip_refiner|transformer_blocks)\.(\d+)\.")
_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def lora_bytes_per_param(optimizer: str) -> int:
    """A trained LoRA parameter: fp32 value + fp32 gradient + the optimizer's state (AdamW two fp32 moments;
    bitsandbytes' 8-bit AdamW one byte each)."""
    return 4 + 4 + (2 if optimizer == "adamw8bit" else 8)


@dataclass
class DitShape:
    """What the estimate needs to know about a DiT: parameters per transformer block (execution order), the
    rest, hidden size, LoRA targets, and the bytes per weight as loaded (bf16 2, fp8 1)."""

    family: str
    hidden: int
    blocks: list[tuple[str, int]]  # (block list, parameters) per block
    other_params: int
    lora_modules: list[tuple[int, int]] = field(default_factory=list)  # (in, out) of each block Linear
    weight_bytes: float = 2.0

    @property
    def params(self) -> int:
        return self.other_params + sum(n for _, n in self.blocks)

    def lora_params(self, rank: int) -> int:
        return sum(rank * (i + o) for i, o in self.lora_modules)

    def block_lists(self) -> list[tuple[str, int]]:
        lists: list[tuple[str, int]] = []
        for name, _ in self.blocks:
            if lists and lists[-1][0] == name:
                lists[-1] = (name, lists[-1][1] + 1)
            else:
                lists.append((name, 1))
        return lists

    def max_blocks_to_swap(self) -> int:
        from ..training.block_swap import max_blocks_to_swap

        return max_blocks_to_swap(self.block_lists())

    def swapped(self, blocks_to_swap: int) -> list[int]:
        from ..training.block_swap import swap_selection

        return swap_selection(self.block_lists(), blocks_to_swap)


def dit_shape_from_shapes(shapes: dict[str, tuple], family: str, weight_bytes: float = 2.0) -> DitShape:
    """``shapes``: tensor name -> shape of a DiT's state dict (ComfyUI's names, with or without the
    ``model.diffusion_model.`` prefix). Blocks are counted in the order of their lists (BLOCK_LISTS)."""
    from ..training.dit_blocks import BLOCK_LISTS, FAMILY_ARCHITECTURE

    order = BLOCK_LISTS[FAMILY_ARCHITECTURE[family]]
    per_block: dict[tuple[str, int], int] = {}
    other, lora, widths = 0, [], {}
    for key, shape in shapes.items():
        for prefix in _DIT_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        n = 1
        for d in shape:
            n *= int(d)
        match = _BLOCK_KEY.match(key)
        if match and match.group(1) in order:
            block = (match.group(1), int(match.group(2)))
            per_block[block] = per_block.get(block, 0) + n
            if key.endswith(".weight") and len(shape) == 2:
                lora.append((int(shape[1]), int(shape[0])))
                widths[int(shape[1])] = widths.get(int(shape[1]), 0) + 1
        else:
            other += n
    if not per_block:
        raise ValueError(f"{family}: no transformer blocks ({', '.join(order)}) among the tensor names")
    blocks = [(name, per_block[(name, i)]) for name, i in sorted(per_block, key=lambda b: (order.index(b[0]), b[1]))]
    hidden = max(widths, key=widths.get)  # the width most block Linears read
    return DitShape(family, hidden, blocks, other, lora, weight_bytes)


def dit_shape_from_model(diffusion_model, family: str) -> DitShape:
    """From the loaded model itself (ComfyUI's ``model.diffusion_model``): names, shapes, and the bytes per
    frozen weight as they are held (fp8 1, bf16 2). With adapters attached (the base frozen), the trained
    parameters are left out: the LoRA term counts them; a model not yet frozen is counted whole."""
    shapes, frozen_bytes, frozen = {}, 0, 0
    params = list(diffusion_model.named_parameters())
    some_frozen = any(not p.requires_grad for _, p in params)
    for name, p in params:
        if p.requires_grad and some_frozen:
            continue
        shapes[name.replace(".base_layer.", ".")] = tuple(p.shape)  # peft's wrapped Linear
        frozen_bytes += p.numel() * p.element_size()
        frozen += p.numel()
    return dit_shape_from_shapes(shapes, family, frozen_bytes / frozen if frozen else 2.0)


def _dit_activations(model: DitShape, s: Settings, act_bytes: int) -> int:
    tokens = (s.resolution // 16) ** 2 + TEXT_TOKENS.get(model.family, 512)  # 2x2 patches of the /8 latent
    unit = tokens * model.hidden * act_bytes / 2  # one byte-per-hidden-unit at this precision
    per_block = [DIT_ACTIVATION_BYTES[name] * unit for name, _ in model.blocks]
    if not s.gradient_checkpointing:
        return int(sum(per_block) * s.batch_size)
    inputs = len(model.blocks) * 2 * unit  # each block's input hidden states, kept for its recomputation
    return int((inputs + max(per_block) * RECOMPUTE_WORKSPACE) * s.batch_size)


def _estimate_dit(model: DitShape, s: Settings, free_bytes, device_type, device_name, cpu_count, suggest,
                  memory_note) -> Estimate:
    gpu = device_type != "cpu"
    act_bytes = 4 if (s.precision == "fp32" or not gpu) else 2
    weight_bytes = 1 if s.fp8_base else model.weight_bytes
    swapped = set(model.swapped(s.blocks_to_swap)) if s.blocks_to_swap else set()
    sizes = [n for _, n in model.blocks]
    in_flight = sum(sorted((sizes[i] for i in swapped), reverse=True)[:SWAP_IN_FLIGHT])
    resident = model.other_params + sum(n for i, n in enumerate(sizes) if i not in swapped) + in_flight
    parts = {
        "weights": int(resident * weight_bytes),
        "lora_params_grads_optimizer": model.lora_params(s.rank) * lora_bytes_per_param(s.optimizer),
        "activations": _dit_activations(model, s, act_bytes),
        "context": CONTEXT_BYTES if gpu else 0,
    }
    if weight_bytes != act_bytes:
        # ComfyUI casts each frozen weight to the compute dtype for its op, and autograd keeps the cast copy for
        # the input gradient: every block's without checkpointing, one recomputed block's with it
        cast = max(sizes) if s.gradient_checkpointing else sum(sizes)
        parts["weights_cast_for_compute"] = int(cast * act_bytes)
    peak = int(sum(parts.values()) * DIT_MARGIN)

    tokens = (s.resolution // 16) ** 2 + TEXT_TOKENS.get(model.family, 512)
    block_params = sum(sizes)
    fwd = 2 * block_params * tokens + 4 * tokens * tokens * model.hidden * len(sizes)  # linears + attention
    step_flops = fwd * TRAIN_STEP_FACTOR * (CHECKPOINTING_FACTOR if s.gradient_checkpointing else 1.0)
    step_flops *= s.batch_size * s.gradient_accumulation_steps
    peak_tflops = device_tflops(device_type, device_name, cpu_count)
    if peak_tflops and device_type == "cuda" and s.precision == "fp32":
        peak_tflops /= 8
    seconds = None
    if peak_tflops:
        seconds = step_flops / (peak_tflops * 1e12 * (MFU if gpu else 1.0))
        if swapped and gpu:  # two visits per swapped block; the copies overlap the compute, the excess waits
            copy = 2 * sum(sizes[i] for i in swapped) * weight_bytes * s.gradient_accumulation_steps / PCIE_BYTES_PER_S
            seconds = max(seconds, copy)
        seconds += STEP_OVERHEAD.get(device_type, 0.0) * s.gradient_accumulation_steps
    fits = free_bytes is None or peak <= free_bytes
    result = Estimate(
        peak_bytes=peak, parts=parts, phase="training", seconds_per_step=seconds,
        total_seconds=seconds * s.steps if seconds is not None else None, free_bytes=free_bytes, fits=fits,
        suggestions=[], device=device_name or device_type, memory_note=memory_note,
    )
    if suggest and not fits:
        result.suggestions = _dit_suggestions(model, s, free_bytes, device_type, device_name, cpu_count)
    return result


def pick_blocks_to_swap(model: DitShape, settings: Settings, free_bytes: int, device_type: str = "cuda") -> int | None:
    """``blocks_to_swap = "auto"``: the fewest blocks whose swap makes the estimate fit ``free_bytes`` (0 when
    it fits as it is); None when even the most the model allows does not."""
    for n in range(model.max_blocks_to_swap() + 1):
        if estimate(model, replace(settings, blocks_to_swap=n), free_bytes, device_type, suggest=False).fits:
            return n
    return None


# changes to a DiT run, cheapest first: what each costs in speed or result (none, a little, ~1.5x, copies)
_DIT_CHANGES = (
    ("optimizer", "adamw8bit", "optimizer adamw8bit"),
    # the DiT families train the model ComfyUI loaded, in the dtype it loaded it in (fp8_base is the checkpoint
    # path's): the loader's weight_dtype is the setting to change
    ("fp8_base", True, "the model loaded in fp8 (Load Diffusion Model: weight_dtype fp8_e4m3fn)"),
    ("gradient_checkpointing", True, "gradient_checkpointing on"),
)


def _dit_suggestions(model: DitShape, s: Settings, free_bytes, device_type, device_name="", cpu_count=4) -> list[str]:
    """The smallest changes that fit, cheapest first ("gradient_checkpointing on + blocks_to_swap 16 +
    optimizer adamw8bit"), each with its peak; then, if none fits, what comes closest."""
    gib = lambda b: f"~{b / GiB:.1f} GiB"  # noqa: E731
    available = [c for c in _DIT_CHANGES if getattr(s, c[0]) != c[1] and
                 not (c[0] == "fp8_base" and model.weight_bytes <= 1)]
    rows = []
    for mask in range(1 << len(available)):
        chosen = [c for i, c in enumerate(available) if mask >> i & 1]
        changed = replace(s, **{key: value for key, value, _ in chosen})
        cost = sum(1 << i for i, c in enumerate(_DIT_CHANGES) if c in chosen)
        swap = s.blocks_to_swap
        if free_bytes is not None:
            picked = pick_blocks_to_swap(model, changed, free_bytes, device_type) if device_type != "cpu" else None
            swap = max(swap, picked) if picked is not None else model.max_blocks_to_swap()
        texts = [text for _, _, text in chosen]
        if swap != s.blocks_to_swap:
            changed = replace(changed, blocks_to_swap=swap)
            texts.append(f"blocks_to_swap {swap}")
            # block swap: slower steps, the more bytes copied per step the slower (fp8 weights copy half)
            sizes = [n for _, n in model.blocks]
            copied = sum(sizes[i] for i in model.swapped(swap)) * (1 if changed.fp8_base else model.weight_bytes)
            cost += 8 + 8 * copied / (2 * model.params)
        if not texts:
            continue
        e = estimate(model, changed, free_bytes, device_type, device_name, cpu_count, suggest=False)
        rows.append((not e.fits, cost if e.fits else e.peak_bytes, " + ".join(texts) + f": {gib(e.peak_bytes)}"
                     + (" (fits)" if e.fits else "")))
    if s.batch_size > 1:
        changed = replace(s, batch_size=1)
        e = estimate(model, changed, free_bytes, device_type, device_name, cpu_count, suggest=False)
        rows.append((not e.fits, 100 if e.fits else e.peak_bytes,
                     f"batch_size {s.batch_size} -> 1 (raise gradient_accumulation_steps to keep the effective batch)"
                     f": {gib(e.peak_bytes)}" + (" (fits)" if e.fits else "")))
    rows.sort(key=lambda r: (r[0], r[1]))
    fitting = [r[2] for r in rows if not r[0]]
    return fitting[:3] if fitting else [r[2] for r in rows[:3]] + [
        f"resolution {s.resolution} -> {s.resolution * 3 // 4 // 64 * 64} with the above"]


# -- reference shapes: the published architectures, for the README table (no checkpoint needed) ------------
def _linear(shapes: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (out, inp)
    if bias:
        shapes[f"{name}.bias"] = (out,)


def _flux_shapes(chroma: bool = False, guidance: bool = True, h: int = 3072, doubles: int = 19, singles: int = 38,
                 head: int = 128) -> dict:
    """comfy/ldm/flux/layers.py DoubleStreamBlock / SingleStreamBlock (mlp_ratio 4), model.py; Chroma without the
    per-block modulation, with its distilled guidance approximator (chroma/model.py)."""
    sd: dict = {}
    for i in range(doubles):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            if not chroma:
                _linear(sd, f"{p}_mod.lin", 6 * h, h)
            _linear(sd, f"{p}_attn.qkv", 3 * h, h)
            _linear(sd, f"{p}_attn.proj", h, h)
            _linear(sd, f"{p}_mlp.0", 4 * h, h)
            _linear(sd, f"{p}_mlp.2", h, 4 * h)
            sd[f"{p}_attn.norm.query_norm.scale"] = sd[f"{p}_attn.norm.key_norm.scale"] = (head,)
    for i in range(singles):
        p = f"single_blocks.{i}"
        _linear(sd, f"{p}.linear1", 7 * h, h)
        _linear(sd, f"{p}.linear2", h, 5 * h)
        if not chroma:
            _linear(sd, f"{p}.modulation.lin", 3 * h, h)
        sd[f"{p}.norm.query_norm.scale"] = sd[f"{p}.norm.key_norm.scale"] = (head,)
    _linear(sd, "img_in", h, 64)
    _linear(sd, "txt_in", h, 4096)
    _linear(sd, "final_layer.linear", 64, h)
    if chroma:
        _linear(sd, "distilled_guidance_layer.in_proj", 5120, 64)
        for j in range(5):
            _linear(sd, f"distilled_guidance_layer.layers.{j}.in_layer", 5120, 5120)
            _linear(sd, f"distilled_guidance_layer.layers.{j}.out_layer", 5120, 5120)
        _linear(sd, "distilled_guidance_layer.out_proj", h, 5120)
    else:
        _linear(sd, "final_layer.adaLN_modulation.1", 2 * h, h)
        for emb, width in (("time_in", 256), ("vector_in", 768)) + ((("guidance_in", 256),) if guidance else ()):
            _linear(sd, f"{emb}.in_layer", h, width)
            _linear(sd, f"{emb}.out_layer", h, h)
    return sd


def _mmdit_shapes(depth: int, pos_embed_max: int, self_attn_layers: int = 0) -> dict:
    """comfy/ldm/modules/diffusionmodules/mmdit.py: hidden 64·depth, the last context block pre-only; MMDiT-X
    (SD3.5 Medium) adds a second self-attention to the first ``self_attn_layers`` x blocks."""
    h = 64 * depth
    sd: dict = {}
    for i in range(depth):
        for s in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{s}"
            pre_only = s == "context_block" and i == depth - 1
            dual = s == "x_block" and i < self_attn_layers
            _linear(sd, f"{p}.adaLN_modulation.1", (2 if pre_only else 9 if dual else 6) * h, h)
            _linear(sd, f"{p}.attn.qkv", 3 * h, h)
            if not pre_only:
                _linear(sd, f"{p}.attn.proj", h, h)
                _linear(sd, f"{p}.mlp.fc1", 4 * h, h)
                _linear(sd, f"{p}.mlp.fc2", h, 4 * h)
            if dual:
                _linear(sd, f"{p}.attn2.qkv", 3 * h, h)
                _linear(sd, f"{p}.attn2.proj", h, h)
    sd["pos_embed"] = (1, pos_embed_max * pos_embed_max, h)
    sd["x_embedder.proj.weight"] = (h, 16, 2, 2)
    _linear(sd, "context_embedder", h, 4096)
    _linear(sd, "y_embedder.mlp.0", h, 2048)
    _linear(sd, "y_embedder.mlp.2", h, h)
    _linear(sd, "t_embedder.mlp.0", h, 256)
    _linear(sd, "t_embedder.mlp.2", h, h)
    _linear(sd, "final_layer.linear", 64, h)
    _linear(sd, "final_layer.adaLN_modulation.1", 2 * h, h)
    return sd


def _nextdit_shapes(h: int, layers: int, kv_heads: int, heads: int, ffn: int, mod_in: int, cap: int) -> dict:
    """comfy/ldm/lumina/model.py JointTransformerBlock (qkv with grouped kv heads, SwiGLU w1/w2/w3), two
    noise refiners (modulated) and two context refiners."""
    sd: dict = {}
    kv = h // heads * kv_heads
    for name, count, modulated in (("context_refiner", 2, False), ("noise_refiner", 2, True), ("layers", layers, True)):
        for i in range(count):
            p = f"{name}.{i}"
            _linear(sd, f"{p}.attention.qkv", h + 2 * kv, h, bias=False)
            _linear(sd, f"{p}.attention.out", h, h, bias=False)
            _linear(sd, f"{p}.feed_forward.w1", ffn, h, bias=False)
            _linear(sd, f"{p}.feed_forward.w2", h, ffn, bias=False)
            _linear(sd, f"{p}.feed_forward.w3", ffn, h, bias=False)
            for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
                sd[f"{p}.{norm}.weight"] = (h,)
            if modulated:
                _linear(sd, f"{p}.adaLN_modulation.1", 4 * h, mod_in)
    _linear(sd, "x_embedder", h, 64)
    _linear(sd, "cap_embedder.1", h, cap)
    _linear(sd, "t_embedder.mlp.0", mod_in, 256)
    _linear(sd, "t_embedder.mlp.2", mod_in, mod_in)
    _linear(sd, "final_layer.linear", 64, h)
    _linear(sd, "final_layer.adaLN_modulation.1", h, mod_in)
    return sd


def _qwen_image_shapes(h: int = 3072, depth: int = 60) -> dict:
    """comfy/ldm/qwen_image/model.py QwenImageTransformerBlock (joint attention, two 4h GELU MLPs, 6h
    modulations), Qwen2.5-VL 3584-wide text input."""
    sd: dict = {}
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        for s in ("img", "txt"):
            _linear(sd, f"{p}.{s}_mod.1", 6 * h, h)
            _linear(sd, f"{p}.{s}_mlp.net.0.proj", 4 * h, h)
            _linear(sd, f"{p}.{s}_mlp.net.2", h, 4 * h)
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(sd, f"{p}.attn.{name}", h, h)
    _linear(sd, "img_in", h, 64)
    sd["txt_norm.weight"] = (3584,)
    _linear(sd, "txt_in", h, 3584)
    _linear(sd, "time_text_embed.timestep_embedder.linear_1", h, 256)
    _linear(sd, "time_text_embed.timestep_embedder.linear_2", h, h)
    _linear(sd, "norm_out.linear", 2 * h, h)
    _linear(sd, "proj_out", 64, h)
    return sd


REFERENCE_DIT_SHAPES = {  # family -> the published architecture's tensor shapes (ComfyUI's names)
    "flux-dev": lambda: _flux_shapes(),
    "flux-schnell": lambda: _flux_shapes(guidance=False),
    "chroma": lambda: _flux_shapes(chroma=True),
    "sd3": lambda: _mmdit_shapes(24, 192),
    "sd3.5-medium": lambda: _mmdit_shapes(24, 384, self_attn_layers=13),
    "sd3.5-large": lambda: _mmdit_shapes(38, 192),
    "lumina2": lambda: _nextdit_shapes(2304, 26, kv_heads=8, heads=24, ffn=9216, mod_in=1024, cap=2304),
    "z-image": lambda: _nextdit_shapes(3840, 30, kv_heads=30, heads=30, ffn=10240, mod_in=256, cap=2560),
    "qwen-image": lambda: _qwen_image_shapes(),
}
# SD families as the existing estimate models them (tests/test_nodes_ui.py: the SDXL base checkpoint's counts)
REFERENCE_SD_SHAPES = {
    "sdxl": lambda: ModelShape("sdxl", unet_params=2_567_463_684, text_encoder_params=817_000_000,
                               vae_params=83_653_863, model_channels=320,
                               attention_modules=[(1280, 1280)] * 560 + [(2048, 1280)] * 140),
}


def reference_shape(family: str, weight_bytes: float = 2.0):
    """The published architecture of ``family`` as the estimate sees it (bf16 weights unless told)."""
    if family in REFERENCE_SD_SHAPES:
        return REFERENCE_SD_SHAPES[family]()
    return dit_shape_from_shapes(REFERENCE_DIT_SHAPES[family](), family, weight_bytes)


# -- the README's memory table (generated: it cannot drift from the estimate) ------------------------------
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TABLE_BEGIN = "<!-- BEGIN memory table: generated by `python -m comfyui_lora_trainer.nodes.estimate` -->"
TABLE_END = "<!-- END memory table -->"
TABLE_FAMILIES = (("sdxl", "SDXL"), ("sd3.5-medium", "SD3.5 Medium"), ("sd3.5-large", "SD3.5 Large"),
                  ("flux-dev", "Flux.1 dev"), ("chroma", "Chroma"), ("lumina2", "Lumina Image 2.0"),
                  ("z-image", "Z-Image"), ("qwen-image", "Qwen-Image"))
TABLE_COLUMNS = (  # (heading, settings changed from bf16 / batch 1 / rank 16 / 1024 px / AdamW)
    ("bf16 weights", {}),
    ("fp8 weights", dict(fp8_base=True)),
    ("fp8 + checkpointing", dict(fp8_base=True, gradient_checkpointing=True)),
    ("... + adamw8bit", dict(fp8_base=True, gradient_checkpointing=True, optimizer="adamw8bit")),
    ("... + blocks_to_swap 16", dict(fp8_base=True, gradient_checkpointing=True, optimizer="adamw8bit",
                                     blocks_to_swap=16)),
    ("... + blocks_to_swap 28", dict(fp8_base=True, gradient_checkpointing=True, optimizer="adamw8bit",
                                     blocks_to_swap=28)),
)
# kohya sd-scripts docs/flux_train_network.md, "Recommended Settings by GPU Memory" (Flux.1, fp8 base,
# gradient checkpointing, cached text encoder outputs and latents); None: "use --blocks_to_swap" without N
KOHYA_FLUX_TIERS = (
    (24, "basic settings (batch size 2)", dict(batch_size=2)),
    (16, "batch size 1 + `--blocks_to_swap`", dict(blocks_to_swap=None)),
    (12, "`--blocks_to_swap 16` + 8-bit AdamW", dict(blocks_to_swap=16, optimizer="adamw8bit")),
    (10, "`--blocks_to_swap 22` + 8-bit AdamW", dict(blocks_to_swap=22, optimizer="adamw8bit")),
    (8, "`--blocks_to_swap 28` + 8-bit AdamW", dict(blocks_to_swap=28, optimizer="adamw8bit")),
)
TABLE_BASE = Settings(resolution=1024, batch_size=1, rank=16, precision="bf16")


def _table_peak(model, changes: dict) -> str:
    swap = changes.get("blocks_to_swap", 0)
    if swap and (not isinstance(model, DitShape) or swap > model.max_blocks_to_swap()):
        return "-"
    return f"{estimate(model, replace(TABLE_BASE, **changes), None, 'cuda').peak_bytes / GiB:.1f}"


def memory_table() -> str:
    """The README's tables: estimated peaks (GiB) per family and setting, and kohya's Flux.1 tiers beside
    ours."""
    lines = [
        "| model (1024 px, batch 1, LoRA rank 16, all block Linears) | params | "
        + " | ".join(h for h, _ in TABLE_COLUMNS) + " |",
        "|---|---|" + "---|" * len(TABLE_COLUMNS),
    ]
    for family, label in TABLE_FAMILIES:
        model = reference_shape(family)
        params = model.unet_params if isinstance(model, ModelShape) else model.params
        lines.append(f"| {label} | {params / 1e9:.1f} B | "
                     + " | ".join(_table_peak(model, c) for _, c in TABLE_COLUMNS) + " |")
    flux = reference_shape("flux-dev")
    lines += ["", "| GPU (kohya's tier) | kohya's settings for Flux.1 LoRA | our estimate, same settings |",
              "|---|---|---|"]
    base = dict(fp8_base=True, gradient_checkpointing=True)
    for gb, text, changes in KOHYA_FLUX_TIERS:
        settings = replace(TABLE_BASE, **base, **{k: v for k, v in changes.items() if v is not None})
        if "blocks_to_swap" in changes and changes["blocks_to_swap"] is None:
            n = pick_blocks_to_swap(flux, settings, gb * 10**9)
            settings = replace(settings, blocks_to_swap=n or 0)
            text += f" (the fewest that fit: {n})"
        peak = estimate(flux, settings, None, "cuda").peak_bytes
        verdict = "fits" if peak <= gb * 10**9 else "does not fit"
        lines.append(f"| {gb} GB ({gb * 10**9 / GiB:.1f} GiB) | {text} | {peak / GiB:.1f} GiB: {verdict} |")
    return "\n".join(lines)


def generated_block() -> str:
    return f"{TABLE_BEGIN}\n{memory_table()}\n{TABLE_END}"


def current_block(text: str) -> str | None:
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    return text[start:end + len(TABLE_END)] if start >= 0 and end > start else None


def main(argv=None) -> int:
    """Refresh the README's memory table (``--check``: only report whether it is up to date)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--path", default=README)
    args = parser.parse_args(argv)
    with open(args.path, encoding="utf-8") as f:
        text = f.read()
    current = current_block(text)
    if current is None:
        print(f"{args.path}: no memory table markers ({TABLE_BEGIN})")
        return 1
    if current == generated_block():
        print(f"{args.path}: memory table up to date")
        return 0
    if args.check:
        print(f"{args.path}: memory table out of date; run python -m comfyui_lora_trainer.nodes.estimate")
        return 1
    tmp = args.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text.replace(current, generated_block()))
    os.replace(tmp, args.path)
    print(f"{args.path}: updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
