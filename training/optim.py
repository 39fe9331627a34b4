"""Optimizers and learning-rate schedules (kohya's options, library code); the objective is in loss.py."""

from __future__ import annotations

import torch

from .devices import fused_adamw_available


class OptionalDependencyError(ImportError):
    """An option that needs a package which is not installed; the message names the package."""


def _need(module: str, package: str, option: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptionalDependencyError(
            f"{option} needs the '{package}' package, which is not installed: pip install {package}"
        ) from None


_8BIT_STATES_OK: set[str] = set()  # devices whose 8-bit step worked (the loop builds its optimizer twice)


def _check_8bit_states(bnb, device) -> None:
    """One 8-bit AdamW step on a 64x64 tensor on ``device``: CUDA has the kernels, and bitsandbytes >= 0.48 a CPU
    backend; a build without kernels for the device fails here, before a model is loaded."""
    if str(device) in _8BIT_STATES_OK:
        return
    try:
        p = torch.nn.Parameter(torch.randn(64, 64, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3, min_8bit_size=1).step()
    except Exception as e:
        raise OptionalDependencyError(
            f"optimizer = 'adamw8bit': bitsandbytes {getattr(bnb, '__version__', '?')} cannot keep 8-bit states on "
            f"{device} ({type(e).__name__}: {e}); use a CUDA GPU (or bitsandbytes >= 0.48 on the CPU), or "
            "optimizer = 'adamw'") from None
    _8BIT_STATES_OK.add(str(device))


def make_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float, args: dict | None = None,
                   device=None):
    """torch.optim.Optimizer for ``name``; ``args`` are passed through (kohya's ``optimizer_args``)."""
    args = dict(args or {})
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    if name == "adamw":
        if "fused" not in args and "foreach" not in args and fused_adamw_available(device):
            # One fused kernel for all LoRA tensors instead of ~10 small ops per tensor: torch uses the
            # per-tensor loop on the CPU by default, which was ~10 % of a tiny-model step (bench/README.md).
            args["fused"] = True
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "adamw8bit":
        bnb = _need("bitsandbytes", "bitsandbytes", "optimizer = 'adamw8bit'")
        if device is not None:
            _check_8bit_states(bnb, device)
        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "prodigy":
        prodigyopt = _need("prodigyopt", "prodigyopt", "optimizer = 'prodigy'")
        return prodigyopt.Prodigy(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "lion":
        lion = _need("lion_pytorch", "lion-pytorch", "optimizer = 'lion'")
        return lion.Lion(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "adafactor":
        if hasattr(torch.optim, "Adafactor"):
            return torch.optim.Adafactor(param_groups, lr=lr, weight_decay=weight_decay, **args)
        from transformers.optimization import Adafactor

        args.setdefault("relative_step", False)
        args.setdefault("scale_parameter", False)
        return Adafactor(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, **args)
    raise ValueError(f"optimizer = {name!r} is not known")


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                      power: float = 1.0):
    """A ``diffusers.optimization`` schedule; stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
