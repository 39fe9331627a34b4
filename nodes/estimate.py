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

from dataclasses import asdict, dataclass, field, replace

from ..training.devices import shares_system_memory

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
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
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
    gpu = device_type != "cpu"
    weight_bytes = BYTES["fp32"] if device_type == "cpu" else BYTES.get(s.precision, 4)
    act_bytes = 4 if (s.precision == "fp32" or device_type == "cpu") else 2
    ref_side, act_plain, act_ckpt = ACTIVATIONS.get(model.family, ACTIVATIONS["sd1"])
    pixels = (s.resolution / ref_side) ** 2
    width = model.model_channels / 320  # tiny test models have far narrower layers
    per_sample = (act_ckpt if s.gradient_checkpointing else act_plain) * GiB * pixels * width * act_bytes / 2
    lora = model.lora_params(s.rank)
    parts = {
        "unet_weights": model.unet_params * weight_bytes,
        "lora_params_grads_adam": lora * 16,
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
