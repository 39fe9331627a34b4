"""Flow matching as the objective's third parameterisation (training/loss.py on training/flow.py's math): the
input, the velocity target, the per-sample weighting, the draw from a sample's own generator and the settings
a flow run refuses, all pinned by hand."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_lora_trainer.training.config import ConfigError, TrainConfig
from comfyui_lora_trainer.training.flow import FlowTimesteps, sample_sigmas
from comfyui_lora_trainer.training.loss import PARAMETERISATIONS, Objective


def _config(**kw):
    return TrainConfig(checkpoint="model.safetensors", dataset="data", **kw)


def _objective(**kw):
    return Objective.for_run(_config(**kw), None, "flow")


def test_flow_is_registered_and_needs_no_ddpm_schedule():
    assert set(PARAMETERISATIONS) == {"epsilon", "v_prediction", "flow"}
    objective = _objective()
    assert objective.scheduler is None and objective.flow_options == FlowTimesteps()


def test_noisy_input_and_velocity_target_by_hand():
    objective = _objective()
    x0 = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 4.0]]]])
    noise = torch.tensor([[[[3.0, 1.0]]], [[[-1.0, 2.0]]]])
    sigma = torch.tensor([0.25, 0.8])
    noisy = objective.noisy(x0, noise, sigma)
    torch.testing.assert_close(noisy[0], 0.25 * noise[0] + 0.75 * x0[0])
    torch.testing.assert_close(noisy[1], 0.8 * noise[1] + 0.2 * x0[1])
    torch.testing.assert_close(objective.target(x0, noise, sigma), torch.tensor([[[[2.0, 3.0]]], [[[-1.5, -2.0]]]]))


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap", "logit_normal", "mode"])
def test_weighting_is_applied_per_sample(scheme):
    objective = _objective(weighting_scheme=scheme)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    prediction = torch.zeros(3, 2, 2, 2)
    target = torch.stack([torch.full((2, 2, 2), v) for v in (1.0, 2.0, 3.0)])  # mse 1, 4, 9
    per = objective.per_sample(prediction, target, sigma)
    mse = torch.tensor([1.0, 4.0, 9.0])
    by_hand = {"sigma_sqrt": sigma ** -2, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}
    torch.testing.assert_close(per, mse * by_hand.get(scheme, torch.ones(3)))


def test_huber_exponential_reads_sigma_as_kohya_timesteps():
    objective = _objective(loss_type="huber", huber_schedule="exponential", huber_c=0.1)
    sigma = torch.tensor([0.0, 1.0])
    per = objective.per_sample(torch.zeros(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0), sigma)
    c = torch.tensor([1.0, 0.1])  # huber_scale at t = 0, huber_c * huber_scale at t = 1000
    torch.testing.assert_close(per, 2 * c * (torch.sqrt(4 + c ** 2) - c))


def test_draw_is_the_samples_own_stream_and_reads_the_latent_size():
    objective = _objective(timestep_sampling="flux_shift", sigmoid_scale=1.5)
    a = objective.draw_timestep(torch.Generator().manual_seed(7), (16, 32, 32))
    b = sample_sigmas(1, FlowTimesteps(timestep_sampling="flux_shift", sigmoid_scale=1.5),
                      torch.Generator().manual_seed(7), (32, 32))
    assert a.shape == (1,) and a.dtype == torch.float32 and 0 < float(a) < 1
    torch.testing.assert_close(a, b)
    bigger = objective.draw_timestep(torch.Generator().manual_seed(7), (16, 128, 128))
    assert float(bigger) > float(a)  # flux_shift: a larger image shifts towards noise


def test_ddpm_parameterisations_draw_as_before():
    from diffusers import DDPMScheduler

    objective = Objective.for_run(_config(min_timestep=100, max_timestep=200), DDPMScheduler(), "epsilon")
    t = objective.draw_timestep(torch.Generator().manual_seed(3), (4, 8, 8))
    torch.testing.assert_close(t, torch.randint(100, 200, (1,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("key, value", [("min_snr_gamma", 5.0), ("debiased_estimation_loss", True),
                                        ("zero_terminal_snr", True), ("min_timestep", 100), ("max_timestep", 900)])
def test_a_flow_run_refuses_ddpm_only_settings_by_name(key, value):
    with pytest.raises(ValueError, match=f"{key} = .*flow matching"):
        _objective(**{key: value})
    with pytest.raises(ValueError, match="huber_schedule = 'snr'"):
        _objective(loss_type="huber", huber_schedule="snr")


@pytest.mark.parametrize("key, value, message", [
    ("timestep_sampling", "logit", "use one of sigma, uniform, sigmoid, shift, flux_shift, nextdit_shift"),
    ("weighting_scheme", "sqrt", "use one of none, sigma_sqrt, logit_normal, mode, cosmap"),
    ("discrete_flow_shift", 0.0, "use a number from 0.001 to 100"),
    ("logit_std", 20.0, "use a number from 0.001 to 10"),
])
def test_flow_settings_are_validated_by_their_fields(key, value, message):
    with pytest.raises(ConfigError, match=f"{key} = .*{message}"):
        _config(**{key: value}).validate()
