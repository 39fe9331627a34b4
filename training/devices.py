"""Every device-specific call of the trainer, in one place: CUDA (and ROCm, which torch presents as CUDA),
Intel XPU, Apple MPS and the CPU.

Code on a path every device takes asks this module instead of calling ``torch.cuda.*`` (or any other
backend) itself: which device ``auto`` means, whether autocast runs a dtype there, a generator on the
device, emptying caches, synchronising, free/total memory, pinned memory, fused AdamW, and which
precision a run really trains in (``resolve_precision``). Each device type has one ``DeviceOps`` object;
``for_device(device)`` returns it. Tests replace them with ``override(...)`` to run the whole matrix on the
CPU: a fake MPS or XPU whose ``torch.cuda`` is made to raise shows any CUDA-only call left on a shared path.

Precision decisions (``resolve_precision``), said aloud by the caller (log, node status, file metadata):

=========  ==================  ======================================================================
device     asked               trains in
=========  ==================  ======================================================================
any        fp32                fp32
CPU        bf16                bf16 (CPU autocast; slow on CPUs without AVX512-BF16/AMX, but exact)
CPU        fp16                fp32, with a note: the CPU has no fast fp16 arithmetic and fp16 needs
                               loss scaling; fp32 is what it runs best (bf16 is its mixed precision)
CUDA/ROCm  fp16                fp16 (autocast + loss scaling)
CUDA/ROCm  bf16                bf16 where the GPU does it natively (NVIDIA compute capability 8.0+,
                               AMD MI200/RDNA3+), else fp16 with loss scaling, with a note
XPU        bf16 / fp16         as asked where torch's XPU autocast runs the dtype; bf16 falls back to
                               fp16, fp16 to fp32, each with a note
MPS        bf16                bf16 where torch's MPS autocast runs it (recent torch on macOS 14+),
                               else fp16 where that runs, else fp32, with a note
MPS        fp16                fp16 where torch's MPS autocast runs it, else fp32, with a note
=========  ==================  ======================================================================

fp32 runs everywhere, so no precision is refused for the device; an unknown name raises PrecisionError
naming the ``precision`` setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass

import torch

from .config import TrainConfig, field_problem

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _refusal(key: str, value) -> str | None:
    """The config field's own refusal for ``value`` ('device = ...: use one of ...'), or None if accepted."""
    problem = field_problem(_FIELDS[key], value)
    return f"{key} = {value!r}: {problem}" if problem else None

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# accelerate's names (Accelerator(mixed_precision=...)) and kohya's ss_mixed_precision values
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
AUTO_ORDER = ("cuda", "xpu", "mps", "cpu")  # what device = 'auto' tries, first available wins
SHARED_MEMORY = ("cpu", "mps")  # the model, the data and everything else share the system's memory


class DeviceError(ValueError):
    """A device setting that cannot work here; the message names the setting and what to do."""


class PrecisionError(ValueError):
    """A precision setting that cannot work; the message names ``precision`` and what to use."""


@dataclass(frozen=True)
class MemoryInfo:
    """Free and total bytes of a device; None where the device reports no such figure (``note`` says why)."""

    free: int | None
    total: int | None
    note: str = ""


def device_type(device) -> str:
    """'cuda', 'xpu', 'mps', 'cpu' (or another torch device type) for a torch.device, a name or None (cpu)."""
    if device is None:
        return "cpu"
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _autocast_probe(kind: str, dtype: torch.dtype) -> bool:
    """Whether torch's autocast runs ``dtype`` on device type ``kind``: torch disables autocast with a
    warning (instead of raising) for a dtype a backend lacks, so build one and see."""
    try:
        if not torch.amp.is_autocast_available(kind):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(torch.autocast(device_type=kind, dtype=dtype)._enabled)
    except Exception:  # an unknown device type on this torch build
        return False


class DeviceOps:
    """The device-specific calls for one device type. This base class is the conservative behaviour of a
    device type this module does not know (fp32 only, no fused kernels, no memory figures); each backend
    subclass says what its device can do. Nothing here touches ``torch.cuda`` unless the type is CUDA."""

    type = "unknown"
    label = "unknown"

    def is_available(self) -> bool:
        return True

    def backend(self) -> str:
        """What the device is called in messages: CUDA, ROCm, XPU, MPS, CPU."""
        return self.label

    def name(self, device) -> str:
        return str(device)

    def autocast_supports(self, dtype: torch.dtype) -> bool:
        return _autocast_probe(self.type, dtype)

    def bf16_supported(self, device) -> bool:
        return False

    def fp16_supported(self, device) -> bool:
        """fp16 mixed precision: autocast in fp16, with loss scaling."""
        return False

    def generator(self, device, seed: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(int(seed))

    def empty_cache(self) -> None:
        pass

    def synchronize(self, device) -> None:
        pass

    def memory(self, device) -> MemoryInfo:
        return MemoryInfo(None, None, f"{self.type} reports no memory figures")

    def pin_memory(self) -> bool:
        """Whether page-locked host memory speeds up copies to this device."""
        return False

    def fused_adamw(self) -> bool:
        return False


class CpuOps(DeviceOps):
    type = "cpu"
    label = "CPU"

    def bf16_supported(self, device) -> bool:
        return self.autocast_supports(torch.bfloat16)

    def fp16_supported(self, device) -> bool:
        """CPUs have no fast fp16 arithmetic and fp16 needs loss scaling: fp32 is used instead."""
        return False

    def memory(self, device) -> MemoryInfo:
        try:
            import psutil

            vm = psutil.virtual_memory()
            return MemoryInfo(int(vm.available), int(vm.total), "system memory (shared with everything else)")
        except ImportError:
            return MemoryInfo(None, None, "the CPU's free memory is unknown here (psutil is not installed)")

    def fused_adamw(self) -> bool:
        return _torch_at_least(2, 4)  # torch's fused AdamW has a CPU kernel since 2.4


class CudaOps(DeviceOps):
    """NVIDIA CUDA, and AMD ROCm: a HIP build of torch presents its GPUs as 'cuda' devices."""

    type = "cuda"
    label = "CUDA"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def backend(self) -> str:
        return "ROCm" if getattr(torch.version, "hip", None) else "CUDA"

    def name(self, device) -> str:
        return f"{device} ({torch.cuda.get_device_name(device)}, {self.backend()})"

    def bf16_supported(self, device) -> bool:
        try:  # native bf16 only: emulated bf16 on older cards is far slower than fp16
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.3 has no including_emulation
            return bool(torch.cuda.is_bf16_supported())

    def fp16_supported(self, device) -> bool:
        return True

    def generator(self, device, seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(seed))

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def synchronize(self, device) -> None:
        torch.cuda.synchronize(device)

    def memory(self, device) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(device)
        return MemoryInfo(int(free), int(total))

    def pin_memory(self) -> bool:
        return True

    def fused_adamw(self) -> bool:
        return _torch_at_least(2, 0)


class XpuOps(DeviceOps):
    """Intel GPUs (torch's native 'xpu' backend)."""

    type = "xpu"
    label = "XPU"

    def is_available(self) -> bool:
        return hasattr(torch, "xpu") and torch.xpu.is_available()

    def name(self, device) -> str:
        return f"{device} ({torch.xpu.get_device_name(device)}, XPU)"

    def bf16_supported(self, device) -> bool:
        try:
            native = torch.xpu.is_bf16_supported()
        except AttributeError:  # older torch: autocast decides alone
            native = True
        except RuntimeError:  # a torch build without XPU
            native = False
        return bool(native) and self.autocast_supports(torch.bfloat16)

    def fp16_supported(self, device) -> bool:
        return self.autocast_supports(torch.float16)

    def generator(self, device, seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(seed))

    def empty_cache(self) -> None:
        torch.xpu.empty_cache()

    def synchronize(self, device) -> None:
        torch.xpu.synchronize(device)

    def memory(self, device) -> MemoryInfo:
        if hasattr(torch.xpu, "mem_get_info"):
            free, total = torch.xpu.mem_get_info(device)
            return MemoryInfo(int(free), int(total))
        total = int(torch.xpu.get_device_properties(device).total_memory)
        return MemoryInfo(total - int(torch.xpu.memory_reserved(device)), total,
                          "free = total less what this process's torch reserved (this torch has no mem_get_info)")

    def pin_memory(self) -> bool:
        return True

    def fused_adamw(self) -> bool:
        return False  # not every torch release has the XPU kernel; the foreach default is safe


class MpsOps(DeviceOps):
    """Apple Silicon GPUs (Metal Performance Shaders): unified memory shared with the system."""

    type = "mps"
    label = "MPS"

    def is_available(self) -> bool:
        return torch.backends.mps.is_available()

    def bf16_supported(self, device) -> bool:
        try:  # bf16 on Metal needs macOS 14; raises on a torch build without MPS
            macos14 = torch.backends.mps.is_macos_or_newer(14, 0)
        except (AttributeError, RuntimeError):
            macos14 = False
        return bool(macos14) and self.autocast_supports(torch.bfloat16)

    def fp16_supported(self, device) -> bool:
        return self.autocast_supports(torch.float16)

    def generator(self, device, seed: int) -> torch.Generator:
        return torch.Generator(device="mps").manual_seed(int(seed))

    def empty_cache(self) -> None:
        torch.mps.empty_cache()

    def synchronize(self, device) -> None:
        torch.mps.synchronize()

    def memory(self, device) -> MemoryInfo:
        limit = getattr(torch.mps, "recommended_max_memory", None)
        return MemoryInfo(None, int(limit()) if limit else None,
                          "MPS shares the system's memory and reports no free figure of its own")


def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (major, minor)


_DEFAULT_OPS: dict[str, DeviceOps] = {ops.type: ops for ops in (CudaOps(), XpuOps(), MpsOps(), CpuOps())}
_ops: dict[str, DeviceOps] = dict(_DEFAULT_OPS)


def for_device(device) -> DeviceOps:
    """The DeviceOps for ``device`` (a torch.device, a name such as 'cuda:1', or a type). A type this
    module does not know gets DeviceOps' conservative behaviour: fp32, no fused kernels, no pinned memory."""
    kind = device_type(device)
    ops = _ops.get(kind)
    if ops is not None:
        return ops
    unknown = DeviceOps()
    unknown.type, unknown.label = kind, kind
    return unknown


@contextlib.contextmanager
def override(**ops: DeviceOps):
    """Replace the DeviceOps of some device types for the ``with`` block (tests: ``override(mps=FakeMps())``)."""
    saved = dict(_ops)
    _ops.update(ops)
    try:
        yield
    finally:
        _ops.clear()
        _ops.update(saved)


# -- the calls shared code makes ----------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device for a ``device`` setting. 'auto' picks CUDA (or ROCm), then XPU, then MPS, then
    the CPU; a named device that is not available here raises DeviceError naming the setting."""
    if name == "auto":
        return torch.device(next(kind for kind in AUTO_ORDER if for_device(kind).is_available()))
    problem = _refusal("device", name)
    if problem:
        raise DeviceError(problem)
    device = torch.device(name)
    ops = for_device(device)
    if not ops.is_available():
        what = "CUDA or ROCm" if device.type == "cuda" else ops.backend()
        raise DeviceError(f"device = {name!r}: no {what} device is available here; use device = 'auto' or 'cpu'")
    return device


def describe(device) -> str:
    """The device for a log line: 'cuda:0 (NVIDIA H100, CUDA)', 'cuda:0 (AMD Instinct MI300X, ROCm)', 'mps'."""
    try:
        return for_device(device).name(device)
    except Exception:  # a name lookup must never end a run
        return str(device)


def backend(device) -> str:
    return for_device(device).backend()


def autocast_device_type(device) -> str:
    """The ``device_type`` for torch.autocast on ``device`` ('cuda' on ROCm as well)."""
    return device_type(device)


def autocast_supports(device, dtype: torch.dtype) -> bool:
    """Whether torch's autocast runs ``dtype`` on ``device``'s type in this torch build."""
    return for_device(device).autocast_supports(dtype)


def autocast_dtype(device) -> torch.dtype | None:
    """The dtype autocast currently casts to on ``device``'s type, or None when autocast is off there."""
    kind = autocast_device_type(device)
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # torch < 2.4 takes no device type; a type without autocast
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return None


def generator(device, seed: int) -> torch.Generator:
    """A torch.Generator seeded with ``seed`` that draws on ``device``."""
    return for_device(device).generator(device, seed)


def empty_cache(device) -> None:
    """Give the device's cached, unused blocks back (nothing to do on the CPU)."""
    for_device(device).empty_cache()


def synchronize(device) -> None:
    """Wait for the device's queued work (timings); nothing to do on the CPU."""
    for_device(device).synchronize(device)


def memory_info(device) -> MemoryInfo:
    """Free/total bytes of ``device``; a None figure (MPS's free memory) comes with a note saying why."""
    try:
        return for_device(device).memory(device)
    except Exception as e:  # a backend that cannot answer: say so rather than guess
        return MemoryInfo(None, None, f"{device} reports no memory figures ({type(e).__name__}: {e})")


def host_memory_info(device, free: int | None, total: int | None) -> MemoryInfo:
    """A host's own free/total figures for ``device`` (ComfyUI's get_free_memory/get_total_memory), with
    what they mean: on the CPU and MPS they are the system's available memory, shared with everything else."""
    kind = device_type(device)
    if kind not in _DEFAULT_OPS:  # e.g. DirectML ('privateuseone'): ComfyUI's free figure is a placeholder
        return MemoryInfo(None, total, f"{kind} reports no free-memory figure; the estimate cannot check the fit")
    note = ""
    if kind == "mps":
        note = "MPS shares the system's memory: the free figure is the system's available memory"
    elif kind == "cpu":
        note = "the free figure is the system's available memory"
    return MemoryInfo(None if free is None else int(free), None if total is None else int(total), note)


def shares_system_memory(device) -> bool:
    """The CPU and MPS keep the model, the data and the rest of the system in one memory."""
    return device_type(device) in SHARED_MEMORY


def pin_memory_available(device) -> bool:
    """Whether a DataLoader feeding ``device`` should pin host memory (CUDA, ROCm and XPU do; MPS, CPU not)."""
    return for_device(device).pin_memory()


def fused_adamw_available(device) -> bool:
    """Whether torch.optim.AdamW(fused=True) has a kernel for ``device`` (CPU and CUDA; not MPS, XPU)."""
    return for_device(device).fused_adamw()


def precision_supported(precision: str, device) -> bool:
    """Whether ``device`` trains in ``precision`` (bf16/fp16 mixed precision, fp32) as asked."""
    ops = for_device(device)
    if precision == "fp32":
        return True
    if precision == "bf16":
        return ops.bf16_supported(device)
    if precision == "fp16":
        return ops.fp16_supported(device)
    raise PrecisionError(_refusal("precision", precision))


def resolve_precision(requested: str, device) -> tuple[str, str]:
    """(the precision a run on ``device`` really trains in, a one-line note to say aloud or '').

    The note is empty when the request is used as is; otherwise it says what is used instead and why,
    and names the ``precision`` setting. See the module docstring for the table of decisions.
    """
    if precision_supported(requested, device):  # raises PrecisionError for an unknown name
        return requested, ""
    ops, kind = for_device(device), device_type(device)
    where = ops.backend() if kind != "cpu" else "the CPU"
    if requested == "fp16" and kind == "cpu":
        return "fp32", ("precision = 'fp16' is not used on the CPU (no fast fp16 arithmetic, and fp16 needs loss "
                        "scaling): training in fp32 instead; set precision = 'fp32' (or 'bf16') to silence this")
    if requested == "bf16" and ops.fp16_supported(device):
        return "fp16", (f"precision = 'bf16' is not supported on this {where} device ({describe(device)}): training "
                        "in fp16 with loss scaling instead; set precision = 'fp16' (or 'fp32') to silence this")
    return "fp32", (f"precision = {requested!r} is not supported on this {where} device ({describe(device)}) by "
                    f"torch {torch.__version__}: training in fp32 instead; set precision = 'fp32' to silence this")


def precision_dtype(precision: str) -> torch.dtype:
    """The weight dtype of the base model for a (resolved) precision."""
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise PrecisionError(_refusal("precision", precision)) from None


def accelerator_kwargs(device, precision: str) -> dict:
    """Accelerator(**...) for a single-process run on ``device`` in the (resolved) ``precision``: accelerate
    picks its own GPU (CUDA, XPU or MPS) unless told cpu=True, and must not be given a precision the
    device lacks (resolve_precision first)."""
    return {"mixed_precision": ACCELERATE_PRECISION[precision], "cpu": device_type(device) == "cpu"}


@dataclass(frozen=True)
class RunDevice:
    """Where and in what precision a run trains: what ``plan`` decided, for the loop to use and say."""

    device: torch.device
    requested: str  # the precision setting
    precision: str  # what the device trains in (== requested unless ``note`` says otherwise)
    note: str = ""  # one line to log and to write into the file's metadata; '' when nothing changed

    @property
    def dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for it, which is also kohya's ss_mixed_precision value."""
        return ACCELERATE_PRECISION[self.precision]

    def accelerator_kwargs(self) -> dict:
        return accelerator_kwargs(self.device, self.precision)


def plan(device_setting: str, precision: str) -> RunDevice:
    """The device for a ``device`` setting (resolve_device) and the precision it really trains in
    (resolve_precision), in one value the loop keeps."""
    device = resolve_device(device_setting)
    used, note = resolve_precision(precision, device)
    return RunDevice(device, precision, used, note)
