"""kohya's loss / noise / network extras (issue #4): LoRA+, network/rank/module dropout, multi-resolution
noise, input-perturbation noise, random noise strengths, debiased estimation, Huber schedules, max-norm.

The math is checked against kohya's formulas (sd-scripts @ 48d368fa: custom_train_functions.py
pyramid_noise_like / apply_debiased_estimation, train_util.py get_huber_threshold_if_needed, networks/lora.py
LoRAModule.forward / prepare_optimizer_params / apply_max_norm_regularization); the wiring by short runs
of the tiny models that differ when an option is on and match where the design says they must."""

import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from comfyui_lora_trainer.training import loss
from comfyui_lora_trainer.training.adapters import LoraDropout, apply_max_norm, attach_adapters, \
    optimizer_param_groups
from comfyui_lora_trainer.training.config import ConfigError, TrainConfig
from comfyui_lora_trainer.training.continuation import load_lora_weights_into
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import build_tiny_components
from comfyui_lora_trainer.training.noise import pyramid_noise, sample_noise
from comfyui_lora_trainer.training.state import ResumeError

from tiny_runs import SAMPLE, cfg, run


def weights_differ(a, b):
    return any(not torch.equal(a.lora.tensors[k], b.lora.tensors[k]) for k in a.lora.tensors)


def assert_same_weights(a, b, **tol):
    assert a.lora.tensors.keys() == b.lora.tensors.keys()
    for k in a.lora.tensors:
        torch.testing.assert_close(a.lora.tensors[k], b.lora.tensors[k], **tol)


@pytest.fixture(scope="module")
def plain():
    return run(steps=3)[0]


@pytest.fixture(scope="module")
def scheduler():
    return build_tiny_components("sd1", seed=0).noise_scheduler


# ------------------------------------------------------------------ noise math

def kohya_pyramid_noise_like(noise, rand, randn, iterations, discount):
    """kohya's pyramid_noise_like verbatim (custom_train_functions.py L458-468), its random.random() and
    torch.randn(b, c, wn, hn) passed in so the draws can be replayed."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = rand() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("shape,iterations,discount", [((4, 8, 12), 6, 0.3), ((4, 16, 16), 10, 0.8), ((3, 5, 7), 2, 0.1)])
def test_pyramid_noise_matches_kohya(shape, iterations, discount):
    base = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ours = pyramid_noise(base, torch.Generator().manual_seed(42), iterations, discount)
    g = torch.Generator().manual_seed(42)  # replay the same draws in kohya's order
    ref = kohya_pyramid_noise_like(base.clone()[None], lambda: float(torch.rand(1, generator=g)),
                                   lambda *s: torch.randn(*s, generator=g), iterations, discount)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours.std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(ours, base / base.std())  # the levels were added
    assert torch.equal(base, torch.randn(shape, generator=torch.Generator().manual_seed(3)))  # input untouched


def test_pyramid_noise_is_low_frequency_heavy():
    """The point of multi-resolution noise: neighbouring pixels are correlated, plain noise's are not."""
    g = torch.Generator().manual_seed(0)

    def neighbour_corr(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()

    plain = torch.randn((4, 32, 32), generator=g)
    pyramid = pyramid_noise(plain, g, 8, 0.8)
    assert abs(neighbour_corr(plain)) < 0.1
    assert neighbour_corr(pyramid) > 0.2


def test_sample_noise_options():
    shape = (4, 8, 8)

    def gens(seed=5):
        return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)

    target, inp = sample_noise(shape, *gens())
    assert torch.equal(target, torch.randn(shape, generator=gens()[0])) and inp is target
    # noise offset: the formula the loop always used, drawn from the main stream only
    g = gens()[0]
    expected = torch.randn(shape, generator=g)
    expected = expected + 0.1 * torch.randn((4, 1, 1), generator=g)
    assert torch.equal(sample_noise(shape, *gens(), noise_offset=0.1)[0], expected)
    # random strength: the same offset direction scaled by a strength in [0, noise_offset)
    randomised = sample_noise(shape, *gens(), noise_offset=0.1, noise_offset_random_strength=True)[0]
    g, extra = gens()
    plain_noise = torch.randn(shape, generator=g)
    direction = torch.randn((4, 1, 1), generator=g)
    strength = torch.rand(1, generator=extra) * 0.1
    torch.testing.assert_close(randomised, plain_noise + strength * direction)
    assert 0 < strength.item() < 0.1
    # input perturbation: the target is unchanged, the input gets gamma * N(0, 1) more
    t_ip, in_ip = sample_noise(shape, *gens(), ip_noise_gamma=0.1)
    assert torch.equal(t_ip, target)
    perturbation = (in_ip - t_ip) / 0.1
    assert torch.allclose(perturbation, torch.randn(shape, generator=gens()[1]), atol=1e-5)
    t_r, in_r = sample_noise(shape, *gens(), ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    g, extra = gens()
    s = torch.rand(1, generator=extra) * 0.1
    torch.testing.assert_close(in_r - t_r, s * torch.randn(shape, generator=extra))
    # multires: applied to the target noise (kohya changes `noise` itself), drawn from the extra stream
    t_m, in_m = sample_noise(shape, *gens(), multires_noise_iterations=4, multires_noise_discount=0.5)
    torch.testing.assert_close(t_m, pyramid_noise(target, gens()[1], 4, 0.5))
    assert in_m is t_m


# ------------------------------------------------------------------ loss math

def test_debiased_weights_are_kohyas(scheduler):
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    a = scheduler.alphas_cumprod.double()[t]
    snr = torch.clamp(a / (1 - a), max=1000)
    eps = loss.debiased_weights(scheduler, t, "epsilon")
    v = loss.debiased_weights(scheduler, t, "v_prediction")
    torch.testing.assert_close(eps.double(), 1 / snr.sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(v.double(), 1 / (snr + 1), rtol=1e-5, atol=0)
    assert eps[0].item() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)  # t=0: snr > 1000 is clipped
    assert eps[-1].item() > 10  # high noise is weighted up
    # zero terminal SNR: the last step stays finite
    ztsnr = loss.training_scheduler(scheduler, True)
    assert torch.isfinite(loss.debiased_weights(ztsnr, torch.tensor([999]), "epsilon")).all()


def test_huber_threshold_schedules(scheduler):
    t = torch.tensor([0, 500, 999])
    c, scale = 0.1, 2.0
    assert loss.huber_threshold("constant", c, scale, scheduler, t) == pytest.approx(0.2)
    exp = loss.huber_threshold("exponential", c, scale, scheduler, t)
    alpha = -math.log(c) / 1000
    assert exp[0].item() == pytest.approx(scale)  # t=0: huber_scale
    assert exp[1].item() == pytest.approx(scale * math.exp(-alpha * 500))
    assert exp[2].item() == pytest.approx(scale * c ** (999 / 1000))  # t=999: about huber_c * huber_scale
    snr = loss.huber_threshold("snr", c, scale, scheduler, t)
    a = scheduler.alphas_cumprod.double()[t]
    sigma = ((1 - a) / a).sqrt()
    torch.testing.assert_close(snr.double(), (1 - c) / (1 + sigma) ** 2 + c, rtol=1e-5, atol=0)
    assert snr[0].item() == pytest.approx(0.9489, abs=1e-3)  # t=0: close to 1 (L2-like)
    assert snr[2].item() == pytest.approx(c, abs=5e-3)  # t=999: close to huber_c
    with pytest.raises(ValueError, match="huber_schedule"):
        loss.huber_threshold("cosine", c, scale, scheduler, t)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_per_sample_loss_takes_a_threshold_per_sample(loss_type):
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn((3, 4, 5, 5), generator=g), torch.randn((3, 4, 5, 5), generator=g)
    cs = torch.tensor([0.05, 0.5, 3.0])
    per = loss.per_sample_loss(p, t, loss_type, cs)
    for i in range(3):  # each sample with its own c equals the scalar path
        one = loss.per_sample_loss(p[i:i + 1], t[i:i + 1], loss_type, float(cs[i]))
        assert per[i].item() == pytest.approx(one.item(), rel=1e-5)


# ------------------------------------------------------------------ loss and noise wiring

def test_multires_ip_and_random_strength_noise_change_training(plain):
    multires, _ = run(steps=3, multires_noise_iterations=6, multires_noise_discount=0.3)
    ip, _ = run(steps=3, ip_noise_gamma=0.1)
    ip_random, _ = run(steps=3, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    offset, _ = run(steps=3, noise_offset=0.1)
    offset_random, _ = run(steps=3, noise_offset=0.1, noise_offset_random_strength=True)
    for a, b in [(multires, plain), (ip, plain), (ip_random, ip), (offset_random, offset)]:
        assert a.losses[0] != b.losses[0] and weights_differ(a, b)
    md = multires.lora.metadata
    assert md["ss_multires_noise_iterations"] == "6" and md["ss_multires_noise_discount"] == "0.3"
    assert ip_random.lora.metadata["ss_ip_noise_gamma"] == "0.1"
    assert ip_random.lora.metadata["ss_ip_noise_gamma_random_strength"] == "True"
    assert offset_random.lora.metadata["ss_noise_offset_random_strength"] == "True"
    assert "ss_multires_noise_iterations" not in plain.lora.metadata


def test_debiased_estimation_scales_the_loss_by_its_weight(scheduler):
    """One sample, one fixed timestep, step 1 (the LoRA is still a no-op): the loss is the plain loss times
    kohya's weight 1/sqrt(snr(t))."""
    fixed = dict(steps=1, batch_size=1, min_timestep=500, max_timestep=501)
    plain, _ = run(**fixed)
    debiased, _ = run(debiased_estimation_loss=True, **fixed)
    w = loss.debiased_weights(scheduler, torch.tensor([500]), "epsilon").item()
    assert debiased.losses[0] == pytest.approx(plain.losses[0] * w, rel=1e-5)
    assert debiased.lora.metadata["ss_debiased_estimation"] == "True"
    both, _ = run(debiased_estimation_loss=True, min_snr_gamma=5.0, **fixed)
    w_snr = loss.min_snr_weights(scheduler, torch.tensor([500]), 5.0, "epsilon").item()
    assert both.losses[0] == pytest.approx(plain.losses[0] * w * w_snr, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["exponential", "snr"])
def test_huber_schedule_uses_the_timesteps_threshold(scheduler, loss_type, schedule):
    """At a fixed timestep a scheduled run equals a constant run with huber_c = the schedule's c(t)."""
    fixed = dict(steps=1, batch_size=1, min_timestep=700, max_timestep=701, loss_type=loss_type)
    c_t = float(loss.huber_threshold(schedule, 0.1, 1.0, scheduler, torch.tensor([700]))[0])
    scheduled, _ = run(huber_schedule=schedule, huber_c=0.1, **fixed)
    constant, _ = run(huber_c=c_t, **fixed)
    naive, _ = run(huber_c=0.1, **fixed)
    assert scheduled.losses[0] == pytest.approx(constant.losses[0], rel=1e-5)
    assert scheduled.losses[0] != pytest.approx(naive.losses[0], rel=1e-3)
    assert scheduled.lora.metadata["ss_huber_schedule"] == schedule
    scaled, _ = run(huber_c=0.1, huber_scale=3.0, **fixed)  # constant: c * huber_scale
    tripled, _ = run(huber_c=0.3, **fixed)
    assert scaled.losses[0] == pytest.approx(tripled.losses[0], rel=1e-6)


# ------------------------------------------------------------------ LoRA+

def test_loraplus_param_groups():
    base = build_tiny_components("sd1", seed=0)
    config = cfg(train_text_encoder=True, loraplus_lr_ratio=16.0, loraplus_text_encoder_lr_ratio=4.0)
    torch.manual_seed(0)
    groups = attach_adapters(base, config)
    te_params = [p for ps in groups["text_encoders"] for p in ps]
    param_groups = optimizer_param_groups(base, config, groups["unet"], te_params)
    assert [g["lr"] for g in param_groups] == pytest.approx([1e-3, 16e-3, 5e-4, 4 * 5e-4])
    ups = {id(p) for n, p in base.unet.named_parameters() if ".lora_B." in n}
    downs = {id(p) for n, p in base.unet.named_parameters() if ".lora_A." in n}
    assert {id(p) for p in param_groups[1]["params"]} == ups
    assert {id(p) for p in param_groups[0]["params"]} == downs
    te_ups = {id(p) for te in base.text_encoders for n, p in te.named_parameters() if ".lora_B." in n}
    assert te_ups and {id(p) for p in param_groups[3]["params"]} == te_ups
    # unet-specific ratio wins over the general one (kohya: `unet_ratio or ratio`); off: one group per model
    unet_only = cfg(loraplus_lr_ratio=16.0, loraplus_unet_lr_ratio=2.0)
    assert [g["lr"] for g in optimizer_param_groups(base, unet_only, groups["unet"], [])] == pytest.approx([1e-3, 2e-3])
    assert len(optimizer_param_groups(base, cfg(train_text_encoder=True), groups["unet"], te_params)) == 2


def test_loraplus_moves_the_up_matrices_faster(plain):
    plus, _ = run(steps=3, loraplus_lr_ratio=16.0)
    assert plus.lora.metadata["ss_network_args"].count("loraplus_lr_ratio")

    def norm(result, suffix):
        return sum(float(v.float().norm()) for k, v in result.lora.tensors.items() if k.endswith(suffix))

    # Adam steps are about lr per element: B (starting at 0) moves ~16x further, A about as far
    assert norm(plus, "lora_up.weight") > 8 * norm(plain, "lora_up.weight")
    dora, _ = run(steps=1, adapter="dora", loraplus_lr_ratio=4.0)
    assert dora.losses


# ------------------------------------------------------------------ dropouts

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def lora_net(rank=4):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["lin", "conv"]), _Net())
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return net


def capture_down(net):
    seen = {}
    for name in ("lin", "conv"):
        getattr(net, name).lora_A["default"].register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o.detach().clone()))
    return seen


def test_dropout_masks_follow_kohya():
    x = torch.randn(3, 10, 8)
    img = torch.randn(3, 3, 6, 6)
    net = lora_net(rank=8)
    seen_plain = capture_down(net)
    net(x, img)
    plain = dict(seen_plain)

    def masked(**p):
        net = lora_net(rank=8)
        d = LoraDropout(**p)
        d.attach(net, "net")
        d.set_seeds([11, 12, 13])
        seen = capture_down(net)  # registered after the dropout hook: sees its output
        net(x, img)
        return seen, d

    # rank dropout: whole rank channels are zero for every token / pixel of a sample, the rest scaled 1/(1-p)
    seen, _ = masked(rank_dropout=0.5)
    lin = seen["lin"] / plain["lin"]
    per_channel = lin[:, 0, :]
    assert torch.allclose(lin, per_channel[:, None, :].expand_as(lin), atol=1e-5)
    torch.testing.assert_close(per_channel[per_channel != 0], torch.full_like(per_channel[per_channel != 0], 2.0))
    assert (per_channel == 0).any() and (per_channel > 0).any()
    conv = seen["conv"] / plain["conv"]
    assert torch.allclose(conv, conv[:, :, :1, :1].expand_as(conv), atol=1e-5)  # conv: channel dim 1
    # network dropout: element-wise, kept elements scaled 1/(1-p)
    seen, _ = masked(network_dropout=0.25)
    ratio = seen["lin"] / plain["lin"]
    kept = ratio != 0
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / 0.75))
    assert 0.1 < (ratio == 0).float().mean().item() < 0.4
    # module dropout: a sample's whole LoRA path is zero or untouched
    seen, _ = masked(module_dropout=0.5)
    for name in ("lin", "conv"):
        for b in range(3):
            assert torch.equal(seen[name][b], torch.zeros_like(seen[name][b])) or \
                torch.equal(seen[name][b], plain[name][b])


def test_dropout_is_per_sample_and_gated():
    net = lora_net()
    d = LoraDropout(network_dropout=0.5, rank_dropout=0.3)
    d.attach(net, "net")
    x, img = torch.randn(3, 10, 8), torch.randn(3, 3, 6, 6)
    reference = [o.detach() for o in net(x, img)]  # no seeds: no dropout
    d.set_seeds([7, 8, 9])
    dropped = [o.detach() for o in net(x, img)]
    assert not torch.allclose(dropped[0], reference[0])
    # a sample's mask depends on its seed only, not on its position or batch companions
    d.set_seeds([9, 7])
    pair = [o.detach() for o in net(x[[2, 0]], img[[2, 0]])]
    torch.testing.assert_close(pair[0], dropped[0][[2, 0]])
    torch.testing.assert_close(pair[1], dropped[1][[2, 0]])
    d.set_seeds([7, 8, 9])
    with torch.no_grad():  # sampling / inference: never dropped
        assert all(torch.equal(a, b) for a, b in zip(net(x, img), reference))
    net.eval()
    assert all(torch.equal(a.detach(), b) for a, b in zip(net(x, img), reference))
    net.train()
    with pytest.raises(RuntimeError, match="sample seeds"):
        net(x[:2], img[:2])
    d.remove()
    assert all(torch.equal(a.detach(), b) for a, b in zip(net(x, img), reference))


@pytest.mark.parametrize("option", ["network_dropout", "rank_dropout", "module_dropout"])
def test_dropout_changes_training(plain, option):
    dropped, base = run(steps=3, **{option: 0.5})
    # step 1 is identical (B starts at zero, so the masked path adds nothing); later steps are not
    assert dropped.losses[0] == plain.losses[0]
    assert dropped.losses[1:] != plain.losses[1:] and weights_differ(dropped, plain)
    # the hooks are gone once the run returns the model to the host
    assert not any(m._forward_hooks for n, m in base.unet.named_modules() if n.endswith("lora_A.default"))


def test_dropout_with_dora_and_sdxl_text_encoders():
    plain_dora, _ = run(steps=2, adapter="dora", learning_rate=1e-2)
    dropped_dora, _ = run(steps=2, adapter="dora", learning_rate=1e-2, network_dropout=0.5, rank_dropout=0.5)
    assert weights_differ(plain_dora, dropped_dora)
    plain_xl, _ = run("sdxl", steps=2, train_text_encoder=True, learning_rate=1e-2)
    dropped_xl, _ = run("sdxl", steps=2, train_text_encoder=True, learning_rate=1e-2, rank_dropout=0.5)
    te2 = [k for k in plain_xl.lora.tensors if k.startswith("lora_te2_")]
    assert te2 and any(not torch.equal(plain_xl.lora.tensors[k], dropped_xl.lora.tensors[k]) for k in te2)


def test_dropout_metadata(tmp_path):
    result, _ = run(steps=1, network_dropout=0.1, rank_dropout=0.2, module_dropout=0.3)
    md = result.lora.metadata
    assert md["ss_network_dropout"] == "0.1"
    assert '"rank_dropout": "0.2"' in md["ss_network_args"] and '"module_dropout": "0.3"' in md["ss_network_args"]


def test_dropout_never_reaches_samples_or_the_exported_lora(tmp_path):
    """Samples taken mid-run (dropout hooks live) equal samples of the final model without hooks, and the
    exported file reproduces the trained model's inference output exactly."""
    from comfyui_lora_trainer.training.sampling import sample_images

    events = []
    over = dict(steps=2, learning_rate=5e-2, network_dropout=0.5, rank_dropout=0.5, module_dropout=0.3,
                train_text_encoder=True, output_dir=str(tmp_path), output_name="drop", sample_every_n_steps=2,
                sample_prompts=["shapetoy, a red circle"], sample_steps=2, sample_seed=3)
    result, base = run(events=events.append, **over)
    live = [e for e in events if e["type"] == "sample" and e["step"] == 2][0]["images"][0]
    after = sample_images(base, base.unet, list(base.text_encoders), ["shapetoy, a red circle"], seed=3, steps=2,
                          cfg=7.0, sampler="euler", size=64, device="cpu")[0]
    assert np.array_equal(np.asarray(live), np.asarray(after))

    fresh = build_tiny_components("sd1", seed=0)
    attach_adapters(fresh, cfg(**over))
    assert load_lora_weights_into(fresh, result.path, True, True) > 0
    g = torch.Generator().manual_seed(0)
    ctx_dim = base.unet.config.cross_attention_dim
    x, ctx = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, ctx_dim), generator=g)
    t = torch.tensor([10, 500])
    base.unet.train()  # training mode, hooks removed by the run: no dropout either way
    with torch.no_grad():
        torch.testing.assert_close(base.unet(x, t, ctx).sample, fresh.unet(x, t, ctx).sample, rtol=1e-5, atol=1e-6)


def test_dropout_survives_gradient_checkpointing():
    """Checkpointing recomputes the forward in the backward pass: the masks must be the same both times."""
    over = dict(steps=2, network_dropout=0.5, rank_dropout=0.3, module_dropout=0.2, learning_rate=1e-2)
    a, _ = run(**over)
    b, _ = run(gradient_checkpointing=True, **over)
    assert a.losses == b.losses
    assert_same_weights(a, b, rtol=0, atol=1e-6)


def test_extras_are_independent_of_the_batch_layout():
    """Masks and noise are drawn per sample: 4 samples in one micro-batch = 2 micro-batches of 2."""
    over = dict(steps=2, network_dropout=0.3, rank_dropout=0.3, module_dropout=0.3, multires_noise_iterations=4,
                ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, noise_offset=0.05,
                noise_offset_random_strength=True, train_text_encoder=True, learning_rate=1e-2)
    one, _ = run(batch_size=4, **over)
    two, _ = run(batch_size=2, gradient_accumulation_steps=2, **over)
    assert one.losses == pytest.approx(two.losses, rel=1e-5)
    assert_same_weights(one, two, rtol=1e-3, atol=5e-5)  # float rounding only (Adam amplifies it on tiny grads)
    none, _ = run(batch_size=4, steps=2, train_text_encoder=True, learning_rate=1e-2)
    gap = max(float((one.lora.tensors[k] - none.lora.tensors[k]).abs().max()) for k in one.lora.tensors)
    assert gap > 1e-3  # the options moved the weights far more than the tolerance above


def test_resume_with_extras_is_exact(tmp_path):
    over = dict(steps=4, network_dropout=0.3, rank_dropout=0.3, module_dropout=0.3, multires_noise_iterations=4,
                ip_noise_gamma=0.1, loraplus_lr_ratio=4.0, scale_weight_norms=0.05, loss_type="huber",
                huber_schedule="snr", debiased_estimation_loss=True, learning_rate=1e-2, output_name="r")
    full, _ = run(**over)
    part, _ = run(output_dir=str(tmp_path / "part"), **{**over, "steps": 2, "save_state": True})
    resumed, _ = run(output_dir=str(tmp_path / "part"), resume_from=part.state_path, overwrite=True, **over)
    assert resumed.losses == full.losses
    for k in full.lora.tensors:
        assert torch.equal(resumed.lora.tensors[k], full.lora.tensors[k]), k
    with pytest.raises(ResumeError, match="loraplus_lr_ratio"):
        run(output_dir=str(tmp_path / "other"), resume_from=part.state_path, **{**over, "loraplus_lr_ratio": 8.0})


# ------------------------------------------------------------------ max-norm

def test_apply_max_norm_is_kohyas():
    net = lora_net(rank=4)
    with torch.no_grad():
        net.lin.lora_B["default"].weight.mul_(100)  # a big delta
        net.conv.lora_B["default"].weight.mul_(1e-4)  # a small one
    def delta(layer):
        up, down = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        return (up.flatten(1) @ down.flatten(1)) * layer.scaling["default"]

    before_small = delta(net.conv).norm().item()
    assert delta(net.lin).norm().item() > 1.0 > before_small
    down_before = net.lin.lora_A["default"].weight.clone()
    scaled, mean, biggest = apply_max_norm([net], 1.0)
    assert scaled == 1
    assert delta(net.lin).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert delta(net.conv).norm().item() == pytest.approx(before_small, rel=1e-6)
    assert biggest == pytest.approx(1.0, rel=1e-5) and mean == pytest.approx((1.0 + before_small) / 2, rel=1e-5)
    # A and B each take sqrt of the ratio (kohya), so both shrink by the same factor
    factor = net.lin.lora_A["default"].weight.norm() / down_before.norm()
    assert 0 < factor.item() < 1


def test_scale_weight_norms_caps_every_delta():
    def max_delta(result):
        t, worst = result.lora.tensors, 0.0
        for k in t:
            if k.endswith(".lora_down.weight"):
                name = k[: -len(".lora_down.weight")]
                down, up = t[k].float(), t[name + ".lora_up.weight"].float()
                alpha = float(t[name + ".alpha"]) if name + ".alpha" in t else down.shape[0]
                worst = max(worst, float((up.flatten(1) @ down.flatten(1)).norm()) * alpha / down.shape[0])
        return worst

    free, _ = run(steps=3, learning_rate=5e-2)
    capped, _ = run(steps=3, learning_rate=5e-2, scale_weight_norms=0.01)
    assert max_delta(free) > 0.02
    assert max_delta(capped) <= 0.01 * (1 + 1e-4)
    assert capped.stats["max_norm_scaled"] > 0
    assert capped.lora.metadata["ss_scale_weight_norms"] == "0.01"


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("over,key", [
    (dict(huber_schedule="cosine"), "huber_schedule"),
    (dict(huber_scale=0.0), "huber_scale"),
    (dict(multires_noise_iterations=-1), "multires_noise_iterations"),
    (dict(multires_noise_discount=1.5), "multires_noise_discount"),
    (dict(ip_noise_gamma=-0.1), "ip_noise_gamma"),
    (dict(loraplus_lr_ratio=-1.0), "loraplus_lr_ratio"),
    (dict(loraplus_unet_lr_ratio=16.0, adapter="loha"), "loraplus_unet_lr_ratio"),
    (dict(network_dropout=1.0), "network_dropout"),
    (dict(rank_dropout=-0.1), "rank_dropout"),
    (dict(rank_dropout=0.1, adapter="lokr"), "rank_dropout"),
    (dict(module_dropout=0.1, adapter="dora"), "module_dropout"),
    (dict(scale_weight_norms=-1.0), "scale_weight_norms"),
    (dict(scale_weight_norms=1.0, adapter="dora"), "scale_weight_norms"),
])
def test_bad_values_are_refused_by_name(over, key):
    with pytest.raises(ConfigError, match=key):
        cfg(**over).validate()


def test_toml_keys_load(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('checkpoint = "x"\ndataset = "d"\nloraplus_lr_ratio = 16\nnetwork_dropout = 0.1\n'
                    'multires_noise_iterations = 6\nmultires_noise_discount = 0.3\nip_noise_gamma = 0.1\n'
                    'huber_schedule = "snr"\ndebiased_estimation_loss = true\nscale_weight_norms = 1\n')
    config = TrainConfig.from_toml(str(path)).validate()
    assert config.loraplus_lr_ratio == 16.0 and isinstance(config.loraplus_lr_ratio, float)
    assert config.huber_schedule == "snr" and config.debiased_estimation_loss



@pytest.mark.slow
def test_two_processes_with_extras_match_one_process(tmp_path):
    """Under ``accelerate launch`` (2 CPU processes, gloo) the dropout masks and the extra noise are still the
    samples' own: the ranks agree, and equal one process over the same global batch."""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from comfyui_lora_trainer.training.models import tiny_tokenizer_dir, write_tiny_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt = write_tiny_checkpoint(str(tmp_path / "tiny.safetensors"), family="sd1", seed=0)
    common = dict(steps=3, rank=2, alpha=2.0, learning_rate=1e-2, resolution=64, seed=4, device="cpu",
                  train_text_encoder=True, network_dropout=0.3, rank_dropout=0.3, module_dropout=0.3,
                  multires_noise_iterations=4, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                  noise_offset=0.05, noise_offset_random_strength=True, loraplus_lr_ratio=4.0,
                  scale_weight_norms=0.05, loss_type="huber", huber_schedule="snr", debiased_estimation_loss=True)
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'checkpoint = "{ckpt}"\ntokenizer = "{tiny_tokenizer_dir()}"\ndataset = "{os.path.abspath(SAMPLE)}"\n'
        f'output_dir = "{tmp_path / "multi"}"\noutput_name = "ddp"\nbatch_size = 2\n'
        + "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}\n"
                  for k, v in common.items()))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(__file__), "accelerate_worker.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), worker, str(toml), str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes 2" in proc.stdout
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in rank0:
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=1e-7)
    single = train(TrainConfig(checkpoint=ckpt, tokenizer=tiny_tokenizer_dir(), dataset=SAMPLE, output_dir="",
                               batch_size=4, **common))
    # Rounding differs between an all-reduced mean of two half batches and one batch mean, and Adam at lr 1e-2
    # amplifies it by an amount that depends on the CPU's kernels (up to 1.1e-3 of a tensor's largest value on
    # an AMD EPYC, less on Sapphire Rapids). Draws made per process instead of per sample would change half
    # the batch's noise and masks: a run over 2 of the 4 samples ends a median 0.37 of a tensor's largest value
    # away from this one.
    for k in rank0:
        scale = single.lora.tensors[k].abs().max().item()
        torch.testing.assert_close(rank0[k], single.lora.tensors[k], rtol=0, atol=2e-3 * scale)
