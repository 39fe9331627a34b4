"""How the frozen base model is stored and run: ``fp8_base`` and ``torch_compile``.

``fp8_base`` (kohya's): frozen base weights stored in float8 (e4m3fn), upcast layer by layer in forward.
The weights of the frozen ``nn.Linear`` and ``nn.Conv2d`` layers (the bulk of a UNet or text encoder) are
kept as ``torch.float8_e4m3fn``: one byte per weight instead of two (bf16) or four (fp32). Each such layer
gets a forward that casts its weight (and bias) to the compute dtype for that call only: the autocast
dtype under mixed precision, else the input's dtype. Norms, embeddings and biases stay as they are, and
adapter (LoRA) weights are never touched, so they train in their own dtype. kohya converts the whole
model with ``unet.to(torch.float8_e4m3fn)`` and relies on autocast; converting per layer also works
without mixed precision (on the CPU, fp32) and keeps the precision of the small layers.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from . import devices

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


class Fp8Unavailable(RuntimeError):
    pass


def check_fp8_available() -> None:
    if FP8_DTYPE is None:
        raise Fp8Unavailable(f"fp8_base needs torch.float8_e4m3fn (PyTorch 2.1 or newer; this is {torch.__version__}); "
                             "upgrade PyTorch or set fp8_base = false")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dtype = devices.autocast_dtype(x.device)
    if dtype is not None:
        return dtype
    return x.dtype if x.is_floating_point() else torch.float32


def _linear_forward(self, x):
    dtype = _compute_dtype(x)
    bias = self.bias.to(dtype) if self.bias is not None else None
    return F.linear(x.to(dtype), self.weight.to(dtype), bias)


def _conv_forward(self, x):
    dtype = _compute_dtype(x)
    bias = self.bias.to(dtype) if self.bias is not None else None
    return self._conv_forward(x.to(dtype), self.weight.to(dtype), bias)


def _is_adapter_part(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith(("lora_", "hada_", "lokr_")) for p in parts)


def store_frozen_in_fp8(model: torch.nn.Module) -> int:
    """Store the weights of ``model``'s frozen Linear / Conv2d layers in float8 and give those layers an
    upcasting forward. Layers with a trainable weight and the adapters' own layers are left alone. Returns
    the number of layers converted."""
    check_fp8_available()
    count = 0
    for name, module in model.named_modules():
        if type(module) not in (torch.nn.Linear, torch.nn.Conv2d) or _is_adapter_part(name):
            continue
        weight = module.weight
        if weight is None or weight.requires_grad or weight.dtype == FP8_DTYPE:
            continue
        module.weight = torch.nn.Parameter(weight.detach().to(FP8_DTYPE), requires_grad=False)
        forward = _linear_forward if isinstance(module, torch.nn.Linear) else _conv_forward
        module.forward = types.MethodType(forward, module)
        count += 1
    return count


def fp8_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes held in float8, bytes of all parameters) of ``model``."""
    fp8 = total = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        total += size
        if p.dtype == FP8_DTYPE:
            fp8 += size
    return fp8, total


class CompileUnavailable(RuntimeError):
    """torch_compile cannot work here; the message says why and what to do."""


def _is_compiler_error(error: BaseException) -> bool:
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover
        TorchDynamoException = ()
    module = type(error).__module__ or ""
    return isinstance(error, TorchDynamoException) or module.startswith(("torch._dynamo", "torch._inductor"))


def compile_unet(unet: torch.nn.Module, device: torch.device) -> None:
    """``torch_compile``: compile ``unet`` in place, as ``nn.Module.compile`` does (its names, its state
    dict and the adapters' export are unchanged). Raises CompileUnavailable, saying what to do, when it
    cannot work here, up front or when the first call fails to compile."""
    import shutil
    import sys

    if not hasattr(torch, "compile"):
        raise CompileUnavailable(f"torch_compile needs PyTorch 2.0 or newer (this is {torch.__version__}); "
                                 "set torch_compile = false")
    try:
        import torch._dynamo as dynamo
        supported, why = dynamo.is_dynamo_supported(), ""
    except Exception as e:  # pragma: no cover - broken installs
        supported, why = False, f": {e}"
    if not supported:
        raise CompileUnavailable(
            f"torch_compile: torch.compile is not supported with Python {sys.version_info.major}."
            f"{sys.version_info.minor} on {sys.platform} (PyTorch {torch.__version__}){why}; set torch_compile = false")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        raise CompileUnavailable("torch_compile on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on "
                                 "PATH; install one or set torch_compile = false")
    compiled = torch.compile(unet._call_impl)

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as e:
            if _is_compiler_error(e):
                raise CompileUnavailable(f"torch_compile: compiling the UNet failed ({type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}); set torch_compile = false") from e
            raise

    unet._compiled_call_impl = call
