"""Optimizers, learning-rate schedules, noise, timesteps and losses (kohya's options, library code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def debiased_weights(scheduler, timesteps, prediction_type: str) -> torch.Tensor:
    """kohya's ``debiased_estimation_loss`` weight (``apply_debiased_estimation``): with snr clipped at 1000,
    ``1/sqrt(snr)`` (epsilon) or ``1/(snr + 1)`` (v). A zero-terminal-SNR last step (snr 0) is held at
    snr 1e-8 for epsilon models (weight 1e4) where kohya's weight would be infinite."""
    s = torch.minimum(snr(scheduler, timesteps), torch.tensor(1000.0, device=timesteps.device))
    if prediction_type == "v_prediction":
        return 1 / (s + 1)
    return 1 / torch.sqrt(s.clamp_min(1e-8))


from .config import HUBER_SCHEDULES  # noqa: E402


def huber_threshold(schedule: str, huber_c: float, huber_scale: float, scheduler, timesteps: torch.Tensor):
    """The Huber / smooth-L1 parameter per sample, kohya's ``get_huber_threshold_if_needed``.

    ``constant``: ``huber_c * huber_scale`` (a float); ``exponential``: ``exp(-a t) * huber_scale`` with
    ``a = -ln(huber_c) / T`` (``huber_scale`` at t = 0 down to ``huber_c * huber_scale`` at t = T);
    ``snr``: ``(1 - huber_c) / (1 + sigma_t)^2 + huber_c`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``
    (about 1 at t = 0, ``huber_c`` at high noise; kohya applies no ``huber_scale`` here). Tensors are [B].
    """
    if schedule == "constant":
        return huber_c * huber_scale
    if schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if schedule == "snr":
        abar = scheduler.alphas_cumprod.to(torch.float32)[timesteps.cpu()]
        sigmas = ((1.0 - abar) / abar) ** 0.5
        return ((1 - huber_c) / (1 + sigmas) ** 2 + huber_c).to(timesteps.device)
    raise ValueError(f"huber_schedule = {schedule!r} is not known; use one of {', '.join(HUBER_SCHEDULES)}")


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c) -> torch.Tensor:
    """Loss per sample (mean over C, H, W): [B]. ``huber_c`` is a float or a [B] tensor (a schedule)."""
    p, t = prediction.float(), target.float()
    if isinstance(huber_c, torch.Tensor):
        huber_c = huber_c.to(p.device, torch.float32).view(-1, *([1] * (p.dim() - 1)))
    if loss_type == "mse":
        element = F.mse_loss(p, t, reduction="none")
    elif loss_type == "l1":
        element = F.l1_loss(p, t, reduction="none")
    elif loss_type == "huber":  # kohya: 2c(sqrt((p-t)^2 + c^2) - c)
        element = 2 * huber_c * (torch.sqrt((p - t) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1" and isinstance(huber_c, torch.Tensor):  # 2 * smooth_l1 with a per-sample beta
        d = (p - t).abs()
        element = 2 * torch.where(d < huber_c, 0.5 * d**2 / huber_c, d - 0.5 * huber_c)
    elif loss_type == "smooth_l1":
        element = 2 * F.smooth_l1_loss(p, t, reduction="none", beta=huber_c)
    else:
        raise ValueError(f"loss_type = {loss_type!r} is not known")
    return element.flatten(1).mean(1)


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
