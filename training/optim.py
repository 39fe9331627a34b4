"""Optimizers, learning-rate schedules, noise, timesteps and losses (kohya's options, library code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def _fused_adamw_supported(device) -> bool:
    """torch's fused AdamW runs on the CPU and CUDA (torch >= 2.4); elsewhere (MPS, XPU) keep the default."""
    kind = torch.device(device).type if device is not None else "cpu"
    return kind in ("cpu", "cuda") and tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 4)


def make_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float, args: dict | None = None,
                   device=None):
    """torch.optim.Optimizer for ``name``; ``args`` are passed through (kohya's ``optimizer_args``)."""
    args = dict(args or {})
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    if name == "adamw":
        if "fused" not in args and "foreach" not in args and _fused_adamw_supported(device):
            # One fused kernel for all LoRA tensors instead of ~10 small ops per tensor: torch uses the
            # per-tensor loop on the CPU by default, which was ~10 % of a tiny-model step (bench/README.md).
            args["fused"] = True
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "adamw8bit":
        if device is not None and torch.device(device).type != "cuda":
            raise OptionalDependencyError(
                "optimizer = 'adamw8bit' needs a CUDA GPU (bitsandbytes 8-bit states); use 'adamw' on the CPU")
        bnb = _need("bitsandbytes", "bitsandbytes", "optimizer = 'adamw8bit'")
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


# ---------------------------------------------------------------------------------------------
# noise schedule helpers
# ---------------------------------------------------------------------------------------------

def training_scheduler(noise_scheduler, zero_terminal_snr: bool):
    """The family's DDPM scheduler, with betas rescaled to zero terminal SNR if asked."""
    if not zero_terminal_snr:
        return noise_scheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(noise_scheduler.config, rescale_betas_zero_snr=True)


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar / (1 - alpha_bar) per timestep (float32)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    a = alphas_cumprod[timesteps.cpu()].to(timesteps.device)
    return a / (1 - a).clamp_min(1e-12)


def min_snr_weights(scheduler, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    """kohya's min-SNR-gamma weight: min(snr, γ)/snr (epsilon) or min(snr, γ)/(snr + 1) (v)."""
    s = snr(scheduler, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped / s.clamp_min(1e-8)  # zero-terminal-SNR: the last step has snr 0


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """Loss per sample (mean over C, H, W): [B]."""
    p, t = prediction.float(), target.float()
    if loss_type == "mse":
        element = F.mse_loss(p, t, reduction="none")
    elif loss_type == "l1":
        element = F.l1_loss(p, t, reduction="none")
    elif loss_type == "huber":  # kohya: 2c(sqrt((p-t)^2 + c^2) - c)
        element = 2 * huber_c * (torch.sqrt((p - t) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        element = 2 * F.smooth_l1_loss(p, t, reduction="none", beta=huber_c)
    else:
        raise ValueError(f"loss_type = {loss_type!r} is not known")
    return element.flatten(1).mean(1)
