"""The training objective: what a step draws (timestep, noise), what the model is asked to predict, and how
each sample's error becomes its loss (kohya's loss types, min-SNR-gamma and debiased weighting).

A parameterisation says what a sample draws, how a noisy input is made, what the target is and how each
sample is weighted: ``epsilon`` (predict the noise), ``v_prediction`` (predict ``alpha_t * noise - sigma_t *
x0``), both at DDPM timesteps, and ``flow`` (flow matching as SD3, Flux, Chroma, Lumina2 and Qwen-Image train:
a noise level sigma in [0, 1] drawn by kohya's ``timestep_sampling``, input ``sigma * noise + (1 - sigma) *
x0``, target the velocity ``noise - x0``, loss weighted by ``weighting_scheme``; the math is in flow.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import flow
from .config import HUBER_SCHEDULES
from .dataset import mask_to_latent
from .noise import sample_noise


# ---------------------------------------------------------------------------------------------
# what one sample draws (from its own generators; see seeds.py)
# ---------------------------------------------------------------------------------------------

def draw_timestep(generator: torch.Generator, min_timestep: int, max_timestep: int) -> torch.Tensor:
    """One training timestep in [min_timestep, max_timestep), shape [1]."""
    return torch.randint(min_timestep, max_timestep, (1,), generator=generator)


def draw_noise(shape, generator: torch.Generator, extra: torch.Generator, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, input noise) for one sample with the config's noise options (noise.py): the target is built
    from the first, the noisy input from the second (they differ under ``ip_noise_gamma``)."""
    return sample_noise(
        shape, generator, extra,
        noise_offset=config.noise_offset, noise_offset_random_strength=config.noise_offset_random_strength,
        multires_noise_iterations=config.multires_noise_iterations,
        multires_noise_discount=config.multires_noise_discount, ip_noise_gamma=config.ip_noise_gamma,
        ip_noise_gamma_random_strength=config.ip_noise_gamma_random_strength)


# ---------------------------------------------------------------------------------------------
# the noise schedule
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


# ---------------------------------------------------------------------------------------------
# per-sample weights
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# loss functions
# ---------------------------------------------------------------------------------------------

def huber_threshold(schedule: str, huber_c: float, huber_scale: float, scheduler, timesteps: torch.Tensor,
                    num_train_timesteps: int | None = None):
    """The Huber / smooth-L1 parameter per sample, kohya's ``get_huber_threshold_if_needed``.

    ``constant``: ``huber_c * huber_scale`` (a float); ``exponential``: ``exp(-a t) * huber_scale`` with
    ``a = -ln(huber_c) / T`` (``huber_scale`` at t = 0 down to ``huber_c * huber_scale`` at t = T);
    ``snr``: ``(1 - huber_c) / (1 + sigma_t)^2 + huber_c`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``
    (about 1 at t = 0, ``huber_c`` at high noise; kohya applies no ``huber_scale`` here). Tensors are [B].
    ``num_train_timesteps``: T where there is no DDPM ``scheduler`` (flow models: t = 1000 sigma, as kohya).
    """
    if schedule == "constant":
        return huber_c * huber_scale
    if schedule == "exponential":
        alpha = -math.log(huber_c) / (num_train_timesteps or scheduler.config.num_train_timesteps)
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if schedule == "snr":
        abar = scheduler.alphas_cumprod.to(torch.float32)[timesteps.cpu()]
        sigmas = ((1.0 - abar) / abar) ** 0.5
        return ((1 - huber_c) / (1 + sigmas) ** 2 + huber_c).to(timesteps.device)
    raise ValueError(f"huber_schedule = {schedule!r} is not known; use one of {', '.join(HUBER_SCHEDULES)}")


def element_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c) -> torch.Tensor:
    """Loss per element: [B, C, H, W]. ``huber_c`` is a float or a [B] tensor (a schedule)."""
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
    return element


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per sample: [B], the element loss weighted by ``mask`` (see ``apply_loss_mask``)."""
    return apply_loss_mask(element_loss(prediction, target, loss_type, huber_c), mask)


def apply_loss_mask(element: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """kohya's masked loss: per-sample loss [B] from the element loss [B, C, h, w] and masks [B, 1, H, W] in
    [0, 1] (pixel or latent size; reduced to h x w by area averaging). ``mask = None``: the plain mean.

    As kohya (``apply_masked_loss``, then ``loss.mean([1, 2, 3])``), the weighted loss is averaged over all
    latent elements, not over the mask's area: a full white mask gives exactly the unmasked loss, a black
    region adds neither loss nor gradient, a mostly black mask also lowers the loss's scale. Per-sample
    weights (min-SNR, debiased, prior loss weight) multiply the result."""
    if mask is None:
        return element.flatten(1).mean(1)
    if mask.dim() != 4 or mask.shape[0] != element.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not fit a loss of shape "
                         f"{tuple(element.shape)}: expected [B, 1, H, W]")
    weights = mask_to_latent(mask.to(element.device), tuple(element.shape[-2:])).to(element.dtype)
    return (element * weights).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# parameterisations and the objective of a run
# ---------------------------------------------------------------------------------------------

class Epsilon:
    """DDPM noise prediction: a timestep in [min_timestep, max_timestep), input ``sqrt(abar) x0 + sqrt(1 - abar)
    noise``, target ``noise``."""

    name = "epsilon"

    def draw(self, objective, generator, latent_shape):
        return draw_timestep(generator, objective.min_timestep, objective.max_timestep)

    def noisy(self, objective, latents, input_noise, timesteps):
        return objective.scheduler.add_noise(latents, input_noise, timesteps)

    def target(self, objective, latents, noise, timesteps):
        return noise

    def weights(self, objective, timesteps) -> list:
        """The per-sample weights the loss is multiplied by, in order (min-SNR-gamma, debiased estimation)."""
        out = []
        if objective.min_snr_gamma > 0:
            out.append(min_snr_weights(objective.scheduler, timesteps, objective.min_snr_gamma, self.name))
        if objective.debiased:
            out.append(debiased_weights(objective.scheduler, timesteps, self.name))
        return out

    def huber_timesteps(self, timesteps):
        return timesteps, None


class VPrediction(Epsilon):
    """v-prediction (SD2-v): the same input, target ``sqrt(abar) noise - sqrt(1 - abar) x0``."""

    name = "v_prediction"

    def target(self, objective, latents, noise, timesteps):
        return objective.scheduler.get_velocity(latents, noise, timesteps)


class FlowMatching:
    """Flow matching (rectified flow): "timesteps" are noise levels sigma in [0, 1] drawn by the config's
    ``timestep_sampling`` (from the sample's own generator; ``flux_shift`` / ``nextdit_shift`` read the latent's
    size), input ``sigma * noise + (1 - sigma) * x0``, target ``noise - x0``, weight ``weighting_scheme``'s."""

    name = "flow"

    def draw(self, objective, generator, latent_shape):
        return flow.sample_sigmas(1, objective.flow_options, generator, tuple(latent_shape[-2:]))

    def noisy(self, objective, latents, input_noise, sigmas):
        return flow.noisy_input(latents, input_noise, sigmas)

    def target(self, objective, latents, noise, sigmas):
        return flow.velocity_target(latents, noise)

    def weights(self, objective, sigmas) -> list:
        return [flow.loss_weighting(sigmas, objective.flow_options.weighting_scheme).to(sigmas.device)]

    def huber_timesteps(self, sigmas):
        return flow.timesteps_of(sigmas), flow.NUM_TRAIN_TIMESTEPS


PARAMETERISATIONS = {p.name: p for p in (Epsilon(), VPrediction(), FlowMatching())}

# what a flow run cannot use: the settings read a DDPM schedule (alphas_cumprod) or its timestep range
_DDPM_ONLY = (("min_snr_gamma", lambda c: c.min_snr_gamma > 0), ("debiased_estimation_loss",
              lambda c: c.debiased_estimation_loss), ("zero_terminal_snr", lambda c: c.zero_terminal_snr),
              ("huber_schedule", lambda c: c.loss_type in ("huber", "smooth_l1") and c.huber_schedule == "snr"),
              ("min_timestep", lambda c: c.min_timestep != 0), ("max_timestep", lambda c: c.max_timestep != 1000))


@dataclass(frozen=True)
class Objective:
    """One run's objective: the (possibly rescaled) noise schedule (None for flow models), the model's
    parameterisation and the loss settings of the config."""

    scheduler: object
    prediction_type: str
    loss_type: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "constant"
    huber_scale: float = 1.0
    min_snr_gamma: float = 0.0
    debiased: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    flow_options: flow.FlowTimesteps | None = None

    @classmethod
    def for_run(cls, config, noise_scheduler, prediction_type: str) -> "Objective":
        if prediction_type not in PARAMETERISATIONS:
            raise ValueError(f"prediction type {prediction_type!r} is not trainable yet; "
                             f"known: {', '.join(PARAMETERISATIONS)}")
        options = None
        if prediction_type == "flow":
            for key, used in _DDPM_ONLY:
                if used(config):
                    raise ValueError(f"{key} = {getattr(config, key)!r} needs a DDPM noise schedule; this model "
                                     "trains by flow matching: leave it at its default and use timestep_sampling / "
                                     "weighting_scheme instead")
            options = flow.FlowTimesteps.from_config(config)
        else:
            noise_scheduler = training_scheduler(noise_scheduler, config.zero_terminal_snr)
        return cls(noise_scheduler, prediction_type, config.loss_type, config.huber_c, config.huber_schedule,
                   config.huber_scale, config.min_snr_gamma, config.debiased_estimation_loss,
                   config.min_timestep, config.max_timestep, options)

    @property
    def parameterisation(self):
        return PARAMETERISATIONS[self.prediction_type]

    def draw_timestep(self, generator: torch.Generator, latent_shape) -> torch.Tensor:
        """One sample's timestep (DDPM, long) or noise level (flow, float), shape [1], from its generator."""
        return self.parameterisation.draw(self, generator, latent_shape)

    def noisy(self, latents, input_noise, timesteps):
        """The model's input for clean ``latents`` at ``timesteps``."""
        return self.parameterisation.noisy(self, latents, input_noise, timesteps)

    def target(self, latents, noise, timesteps):
        """What the model should output for that input."""
        return self.parameterisation.target(self, latents, noise, timesteps)

    def per_sample(self, prediction, target, timesteps, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss of each sample: [B]; ``mask`` [B, 1, H, W] (masked loss) is applied before the
        per-sample weights."""
        huber_c = self.huber_c
        if self.loss_type in ("huber", "smooth_l1"):
            t, total = self.parameterisation.huber_timesteps(timesteps)
            huber_c = huber_threshold(self.huber_schedule, self.huber_c, self.huber_scale, self.scheduler, t, total)
        per = per_sample_loss(prediction, target, self.loss_type, huber_c, mask)
        for weight in self.parameterisation.weights(self, timesteps):
            per = per * weight
        return per
