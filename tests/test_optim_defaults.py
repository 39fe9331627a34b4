"""Optimizer defaults chosen for speed must not change what the user asked for."""

import torch

from comfyui_lora_trainer.training.optim import make_optimizer


def _params():
    return [{"params": [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]}]


def test_adamw_is_fused_on_the_cpu_by_default():
    optimizer = make_optimizer("adamw", _params(), 1e-3, 0.01, {}, "cpu")
    assert optimizer.defaults["fused"] is True


def test_an_explicit_foreach_or_fused_setting_wins():
    assert not make_optimizer("adamw", _params(), 1e-3, 0.01, {"foreach": True}, "cpu").defaults.get("fused")
    assert make_optimizer("adamw", _params(), 1e-3, 0.01, {"fused": False}, "cpu").defaults["fused"] is False


def test_fused_adamw_matches_the_per_tensor_loop():
    torch.manual_seed(0)
    groups = [_params(), _params()]
    groups[1][0]["params"] = [torch.nn.Parameter(p.detach().clone()) for p in groups[0][0]["params"]]
    fused = make_optimizer("adamw", groups[0], 1e-2, 0.01, {}, "cpu")
    plain = make_optimizer("adamw", groups[1], 1e-2, 0.01, {"foreach": False}, "cpu")
    for _ in range(5):
        for optimizer, group in ((fused, groups[0]), (plain, groups[1])):
            for p in group[0]["params"]:
                p.grad = torch.ones_like(p) * 0.3 + p.detach() * 0.1
            optimizer.step()
    for a, b in zip(groups[0][0]["params"], groups[1][0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
