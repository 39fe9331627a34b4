"""training/flow.py against kohya's formulas (sd-scripts @ 48d368fa, library/flux_train_utils.py and
library/lumina_train_util.py), computed by hand here, and the seeded reproducibility the loop relies on."""

import math

import pytest
import torch

from comfyui_lora_trainer.training.flow import (
    NUM_TRAIN_TIMESTEPS,
    TIMESTEP_SAMPLING,
    FlowTimesteps,
    density_sample,
    flux_mu,
    loss_weighting,
    noisy_input,
    sample_sigmas,
    shift_sigmas,
    time_shift,
    timesteps_of,
    velocity_target,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shift_and_mu_by_hand():
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / (1 + 2 * 0.5)
    assert shift_sigmas(torch.tensor(0.25), 1.0).item() == pytest.approx(0.25)
    # 512x512 px -> 64x64 latent -> 32*32 = 1024 tokens: 0.5 + 0.65 * (1024 - 256) / 3840
    assert flux_mu(64, 64) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    assert flux_mu(128, 128) == pytest.approx(1.15)  # 1024 px: kohya's y2
    assert flux_mu(32, 32) == pytest.approx(0.5)  # 256 tokens: y1
    # e^mu / (e^mu + (1/s - 1)): mu = ln 3, s = 0.5 -> 3 / 4
    assert time_shift(math.log(3.0), torch.tensor(0.5)).item() == pytest.approx(0.75)


def test_each_sampling_equals_kohya_formula_on_the_same_draws():
    n, hw = 16, (64, 96)
    mu = 0.5 + 0.65 / 3840 * (32 * 48 - 256)
    z = torch.randn(n, generator=gen(3))
    u = torch.rand(n, generator=gen(3))

    def sig(mode, **kw):
        return sample_sigmas(n, FlowTimesteps(timestep_sampling=mode, **kw), gen(3), hw)

    torch.testing.assert_close(sig("uniform"), u)
    torch.testing.assert_close(sig("sigmoid", sigmoid_scale=2.0), torch.sigmoid(2.0 * z))
    s = torch.sigmoid(1.5 * z)
    torch.testing.assert_close(sig("shift", sigmoid_scale=1.5, discrete_flow_shift=3.1582),
                               s * 3.1582 / (1 + 2.1582 * s))
    torch.testing.assert_close(sig("flux_shift"), math.exp(mu) / (math.exp(mu) + (1 / torch.sigmoid(z) - 1)))
    torch.testing.assert_close(sig("nextdit_shift"), math.exp(mu) / (math.exp(mu) + (1 / u - 1)))
    # "sigma": index floor(u * 1000) into the descending grid (1000 - i) / 1000, then the discrete shift
    grid = (1000 - (u * 1000).long()).float() / 1000
    torch.testing.assert_close(sig("sigma", discrete_flow_shift=3.0), grid * 3 / (1 + 2 * grid))


def test_density_by_hand():
    n = 8
    z = torch.randn(n, generator=gen(5))
    u = torch.rand(n, generator=gen(5))
    logit = FlowTimesteps(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.7)
    torch.testing.assert_close(density_sample(n, logit, gen(5)), torch.sigmoid(z * 0.7 + 0.3))
    mode = FlowTimesteps(weighting_scheme="mode", mode_scale=1.29)
    torch.testing.assert_close(density_sample(n, mode, gen(5)),
                               1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    torch.testing.assert_close(density_sample(n, FlowTimesteps(weighting_scheme="cosmap"), gen(5)), u)


def test_loss_weighting_by_hand():
    s = torch.tensor([0.25, 0.5, 0.8])
    torch.testing.assert_close(loss_weighting(s, "sigma_sqrt"), torch.tensor([16.0, 4.0, 1 / 0.64]))
    torch.testing.assert_close(loss_weighting(s, "cosmap"),
                               torch.tensor([2 / (math.pi * (1 - 0.5 + 0.125)), 4 / math.pi,
                                             2 / (math.pi * (1 - 1.6 + 1.28))]))
    for scheme in ("none", "logit_normal", "mode"):
        torch.testing.assert_close(loss_weighting(s, scheme), torch.ones(3))
    with pytest.raises(ValueError, match="weighting_scheme"):
        loss_weighting(s, "snr")


def test_noisy_input_and_velocity():
    x0 = torch.randn(3, 4, 8, 8, generator=gen(1))
    noise = torch.randn(3, 4, 8, 8, generator=gen(2))
    s = torch.tensor([0.0, 0.3, 1.0])
    x = noisy_input(x0, noise, s)
    torch.testing.assert_close(x[0], x0[0])
    torch.testing.assert_close(x[2], noise[2])
    torch.testing.assert_close(x[1], 0.3 * noise[1] + 0.7 * x0[1])
    # the target is d x_sigma / d sigma: a finite difference along sigma equals it
    h = 1e-2
    dx = (noisy_input(x0, noise, s + h) - x) / h
    torch.testing.assert_close(dx, velocity_target(x0, noise), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(timesteps_of(s), s * NUM_TRAIN_TIMESTEPS)


@pytest.mark.parametrize("mode", TIMESTEP_SAMPLING)
def test_seeded_reproducible_in_range_and_per_sample(mode):
    opts = FlowTimesteps(timestep_sampling=mode, weighting_scheme="logit_normal")
    a = sample_sigmas(64, opts, gen(7), (64, 64))
    b = sample_sigmas(64, opts, gen(7), (64, 64))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (64,)
    assert bool(((a >= 0) & (a <= 1)).all())
    assert not torch.equal(a, sample_sigmas(64, opts, gen(8), (64, 64)))
    # one stream per sample: sample i drawn alone from its own generator is the same however it is batched
    one = torch.cat([sample_sigmas(1, opts, gen(100 + i), (64, 64)) for i in range(4)])
    again = torch.cat([sample_sigmas(1, opts, gen(100 + i), (64, 64)) for i in range(4)])
    assert torch.equal(one, again)


def test_shifts_move_the_distribution_the_documented_way():
    n = 4000
    plain = sample_sigmas(n, FlowTimesteps(timestep_sampling="sigmoid"), gen(0)).mean()
    shifted = sample_sigmas(n, FlowTimesteps(timestep_sampling="shift", discrete_flow_shift=3.0), gen(0)).mean()
    small = sample_sigmas(n, FlowTimesteps(timestep_sampling="flux_shift"), gen(0), (32, 32)).mean()
    large = sample_sigmas(n, FlowTimesteps(timestep_sampling="flux_shift"), gen(0), (128, 128)).mean()
    assert abs(plain - 0.5) < 0.02 and shifted > plain + 0.1 and large > small + 0.05


def test_unknown_sampling_and_missing_size_are_refused():
    # the ranges and choices of the options are TrainConfig's flow settings (tests/test_loss_flow.py)
    with pytest.raises(ValueError, match="timestep_sampling = 'logit'"):
        sample_sigmas(2, FlowTimesteps(timestep_sampling="logit"), gen(0))
    with pytest.raises(ValueError, match="latent size"):
        sample_sigmas(2, FlowTimesteps(timestep_sampling="flux_shift"), gen(0))
