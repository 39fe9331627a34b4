"""Training noise for one sample: Gaussian noise plus kohya's noise options, drawn from per-sample generators.

kohya (``train_util.get_noise_noisy_latents_and_timesteps``, ``custom_train_functions``) draws these for the
whole batch from the global RNG; here every sample draws its own from its generators (see the module
docstring of ``loop.py``), so a sample's noise is the same whatever the batch layout, the number of
processes or a resume. Consequences, by design: the random strengths are drawn per sample, not per batch,
and the multi-resolution noise is renormalised by the sample's own standard deviation.

- ``generator`` (the sample's main stream) draws the base noise and the noise offset, exactly as before
  these options existed, so runs without them are unchanged;
- ``extra`` (a second per-sample stream) draws everything the options add, in this order: the
  noise-offset strength, the pyramid levels, the input-perturbation strength and its noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's ``pyramid_noise_like`` for one sample [C, H, W]: add ``iterations`` levels of noise, level i
    drawn at size / r**i (r uniform in [2, 4), one per level) and upsampled bilinearly, weighted discount**i;
    stop after a 1-pixel level; divide by the standard deviation. Level 0 is full-size fresh noise."""
    c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = torch.randn((1, c, hn, wn), generator=generator)
        out += F.interpolate(level, size=(h, w), mode="bilinear")[0] * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_noise(shape, generator: torch.Generator, extra: torch.Generator, *, noise_offset: float = 0.0,
                 noise_offset_random_strength: bool = False, multires_noise_iterations: int = 0,
                 multires_noise_discount: float = 0.3, ip_noise_gamma: float = 0.0,
                 ip_noise_gamma_random_strength: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(target noise, input noise) for one sample of latent ``shape`` [C, H, W].

    The target noise is what the model learns to predict (and what v-targets are built from); the input
    noise is what is added to the latent: the same tensor, or with ``ip_noise_gamma`` the target noise plus
    ``gamma * N(0, 1)`` (input perturbation, arXiv 2301.11706; the target stays unperturbed, as in kohya).
    """
    noise = torch.randn(shape, generator=generator)
    if noise_offset > 0:
        offset = torch.randn((shape[0], 1, 1), generator=generator)
        if noise_offset_random_strength:  # kohya: strength uniform in [0, noise_offset)
            noise = noise + (torch.rand(1, generator=extra) * noise_offset) * offset
        else:
            noise = noise + noise_offset * offset
    if multires_noise_iterations > 0:
        noise = pyramid_noise(noise, extra, multires_noise_iterations, multires_noise_discount)
    if ip_noise_gamma > 0:
        strength = torch.rand(1, generator=extra) * ip_noise_gamma if ip_noise_gamma_random_strength \
            else ip_noise_gamma
        return noise, noise + strength * torch.randn(shape, generator=extra)
    return noise, noise
