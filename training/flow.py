"""Flow-matching (rectified flow) training math, as kohya sd-scripts trains Flux.1, Chroma, SD3 and Lumina2.

Convention (ComfyUI's ``CONST`` model sampling, kohya, diffusers): the noise level ``sigma`` lies in [0, 1],
the noisy input is ``x_sigma = sigma * noise + (1 - sigma) * x0`` and the model predicts the velocity
``d x_sigma / d sigma = noise - x0``. ComfyUI's Lumina2 / Qwen-Image / Flux / SD3 modules all output in this
convention (ComfyUI's Lumina2 negates the original model's output), so one target serves every flow family.

Pieces, matched to sd-scripts @ 48d368fa (``library/flux_train_utils.py``: ``get_noisy_model_input_and_timesteps``,
``time_shift``, ``get_lin_function``, ``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``; ``library/lumina_train_util.py`` for ``nextdit_shift``):

* :func:`sample_sigmas`: the noise level of each sample by ``timestep_sampling``;
* :func:`loss_weighting`: the per-sample loss weight of a ``weighting_scheme`` (diffusers' and kohya's
  ``compute_loss_weighting_for_sd3``), applied to the velocity loss as diffusers' Flux/SD3 scripts do;
* :func:`noisy_input` and :func:`velocity_target`.

Random draws come from the ``generator`` passed in (the loop gives each sample its own stream), never from
the global RNG, so a sample's sigma does not depend on the batch layout or a resume.

Not copied on purpose: kohya's ``model_prediction_type = "sigma_scaled"`` for Flux compares an x0 estimate
with the velocity target (kohya itself recommends ``raw``); here the prediction is always the raw velocity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

NUM_TRAIN_TIMESTEPS = 1000  # the scheduler grid of kohya's "sigma" sampling (FlowMatchEulerDiscreteScheduler)

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")

# kohya's linear map from the image sequence length to Flux's time-shift mu: 256 tokens -> 0.5, 4096 -> 1.15
_MU_POINTS = (256.0, 0.5, 4096.0, 1.15)


@dataclass(frozen=True)
class FlowTimesteps:
    """How a flow-matching run picks its noise levels and weights its loss: kohya's option names and defaults.
    What each one means, and the values it accepts, are TrainConfig's ``flow`` settings (training/config.py),
    which take their defaults from here and are validated there."""

    timestep_sampling: str = "sigma"  # one of TIMESTEP_SAMPLING
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "none"  # one of WEIGHTING_SCHEMES
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def from_config(cls, config) -> "FlowTimesteps":
        """The options of a config (any object with these attributes, e.g. TrainConfig)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


# ---------------------------------------------------------------------------------------------- shifts
def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``: SD3's / kohya's ``discrete_flow_shift`` (and ComfyUI's
    ``time_snr_shift``); shift > 1 moves noise levels towards 1."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def flux_mu(latent_height: int, latent_width: int, patch_size: int = 2) -> float:
    """kohya's mu for ``flux_shift``: linear in the image sequence length (latent H/2 * W/2 tokens for the
    2x2 patches of Flux, Lumina2, Qwen-Image), 0.5 at 256 tokens and 1.15 at 4096 (1024x1024 px)."""
    x1, y1, x2, y2 = _MU_POINTS
    seq_len = (latent_height // patch_size) * (latent_width // patch_size)
    m = (y2 - y1) / (x2 - x1)
    return m * seq_len + (y1 - m * x1)


def time_shift(mu: float, sigmas: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Flux's resolution shift ``e^mu / (e^mu + (1/s - 1)^power)`` (kohya ``time_shift``, ComfyUI
    ``flux_time_shift``)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** power)


# ---------------------------------------------------------------------------------------------- sampling
def density_sample(n: int, options: FlowTimesteps, generator: torch.Generator | None = None) -> torch.Tensor:
    """kohya's ``compute_density_for_timestep_sampling``: u in [0, 1] for ``n`` samples (logit_normal:
    sigmoid(N(logit_mean, logit_std)); mode: ``1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u)``; otherwise
    uniform)."""
    scheme = options.weighting_scheme
    if scheme == "logit_normal":
        u = torch.randn(n, generator=generator) * options.logit_std + options.logit_mean
        return torch.sigmoid(u)
    u = torch.rand(n, generator=generator)
    if scheme == "mode":
        return 1 - u - options.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(n: int, options: FlowTimesteps, generator: torch.Generator | None = None,
                  latent_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Noise levels in [0, 1] for ``n`` samples (float32, shape [n]), drawn from ``generator``.

    ``latent_size`` (H, W of the latent) is needed by ``flux_shift`` and ``nextdit_shift``. The "sigma"
    sampling puts the density's u on diffusers' FlowMatchEulerDiscreteScheduler grid as kohya does: index
    ``floor(u * 1000)`` of the descending levels ``(1000 - i) / 1000``, shifted by ``discrete_flow_shift``.
    """
    mode = options.timestep_sampling
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    if mode == "nextdit_shift":
        sigmas = torch.rand(n, generator=generator).clamp(min=1e-7)
        return time_shift(_mu(latent_size, mode), sigmas)
    if mode in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(options.sigmoid_scale * torch.randn(n, generator=generator))
        if mode == "shift":
            return shift_sigmas(sigmas, options.discrete_flow_shift)
        if mode == "flux_shift":
            return time_shift(_mu(latent_size, mode), sigmas.clamp(min=1e-7))
        return sigmas
    if mode != "sigma":
        raise ValueError(f"timestep_sampling = {mode!r}: use one of {', '.join(TIMESTEP_SAMPLING)}")
    u = density_sample(n, options, generator)
    index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    grid = (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS
    return shift_sigmas(grid, options.discrete_flow_shift)


def _mu(latent_size, mode: str) -> float:
    if latent_size is None:
        raise ValueError(f"timestep_sampling = {mode} needs the latent size (H, W) for its shift")
    return flux_mu(int(latent_size[0]), int(latent_size[1]))


def timesteps_of(sigmas: torch.Tensor) -> torch.Tensor:
    """kohya's ``timesteps`` for logs and metadata: ``sigma * 1000``."""
    return sigmas * NUM_TRAIN_TIMESTEPS


# ---------------------------------------------------------------------------------------------- objective
def loss_weighting(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """diffusers' / kohya's ``compute_loss_weighting_for_sd3``: sigma_sqrt -> ``sigma^-2``; cosmap ->
    ``2 / (pi * (1 - 2 sigma + 2 sigma^2))``; none, logit_normal and mode -> 1 (those two act through the
    sampling density instead). Float32, the shape of ``sigmas``."""
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme = {scheme!r}: use one of {', '.join(WEIGHTING_SCHEMES)}")
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.reshape(sigmas.shape[:1] + (1,) * (like.ndim - 1)).to(like.dtype)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``sigma * noise + (1 - sigma) * x0`` per sample (ComfyUI's ``CONST.noise_scaling``)."""
    s = _per_sample(sigmas, x0)
    return s * noise + (1.0 - s) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``noise - x0``."""
    return noise - x0
