"""SVD merges and exact merges of mixed adapter types (fast, CPU)."""

import json

import pytest
import torch

from comfyui_lora_trainer.training.formats import LoraWeights, lora_delta, module_names
from comfyui_lora_trainer.training.merge import REPORT_KEY, merge_loras


def _lora(seed, r=4, alpha=2.0, conv=False):
    g = torch.Generator().manual_seed(seed)
    t = {}
    if conv:
        t["lora_unet_x_conv1.lora_down.weight"] = torch.randn(r, 8, 3, 3, generator=g)
        t["lora_unet_x_conv1.lora_up.weight"] = torch.randn(12, r, 1, 1, generator=g)
        t["lora_unet_x_conv1.alpha"] = torch.tensor(alpha)
    t["lora_unet_x_to_q.lora_down.weight"] = torch.randn(r, 16, generator=g)
    t["lora_unet_x_to_q.lora_up.weight"] = torch.randn(24, r, generator=g)
    t["lora_unet_x_to_q.alpha"] = torch.tensor(alpha)
    return LoraWeights(t, {}, "sd1")


def _loha(seed, r=3):
    g = torch.Generator().manual_seed(seed)
    n = "lora_unet_x_to_q"
    return LoraWeights({n + ".hada_w1_a": torch.randn(24, r, generator=g), n + ".hada_w1_b": torch.randn(r, 16, generator=g),
                        n + ".hada_w2_a": torch.randn(24, r, generator=g), n + ".hada_w2_b": torch.randn(r, 16, generator=g),
                        n + ".alpha": torch.tensor(1.5)}, {}, "sd1")


def _lokr_full(seed):
    g = torch.Generator().manual_seed(seed)
    n = "lora_unet_x_to_q"
    return LoraWeights({n + ".lokr_w1": torch.randn(4, 2, generator=g), n + ".lokr_w2": torch.randn(6, 8, generator=g),
                        n + ".alpha": torch.tensor(99.0)}, {}, "sd1")  # ignored by loaders: both factors full


def _expected(items, name):
    return sum(s * lora_delta(w, name) for w, s in items if any(k.startswith(name + ".") for k in w.tensors))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_svd_error_equals_discarded_singular_values():
    items = [(_lora(1, conv=True), 0.8), (_lora(2, r=6, alpha=6.0, conv=True), -0.5)]
    merged, report = merge_loras(items, "svd", rank=3)
    total, dropped = 0.0, 0.0
    for name in module_names(merged):
        full = _expected(items, name)
        s = torch.linalg.svdvals(full.reshape(full.shape[0], -1).double())
        want = (s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()
        got = lora_delta(merged, name)
        assert merged.tensors[name + ".lora_down.weight"].shape[0] == 3
        assert report.rel_errors[name] == pytest.approx(want.item(), rel=1e-6)
        assert _rel(got, full) == pytest.approx(want.item(), rel=1e-4)  # the file really has that error
        total += float((s ** 2).sum())
        dropped += float((s[3:] ** 2).sum())
    assert report.overall == pytest.approx((dropped / total) ** 0.5, rel=1e-6)
    stored = json.loads(merged.metadata[REPORT_KEY])
    assert stored["overall_rel_error"] == pytest.approx(report.overall)
    assert set(stored["per_module_rel_error"]) == set(module_names(merged))


def test_svd_energy_picks_the_smallest_rank():
    items = [(_lora(3, r=8), 1.0)]
    _, full_report = merge_loras(items, "svd", rank=8)
    assert max(full_report.rel_errors.values()) < 1e-6
    merged, report = merge_loras(items, "svd", energy=0.9)
    name = "lora_unet_x_to_q"
    s = torch.linalg.svdvals(lora_delta(items[0][0], name).double())
    cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    k = int((cum < 0.9).sum()) + 1
    assert merged.tensors[name + ".lora_down.weight"].shape[0] == k
    assert 1 - report.rel_errors[name] ** 2 >= 0.9 - 1e-9


def test_exact_merge_of_mixed_types_is_exact():
    items = [(_lora(4), 0.6), (_loha(5), -1.2), (_lokr_full(6), 0.3)]
    merged, report = merge_loras(items, "exact")
    name = "lora_unet_x_to_q"
    assert set(merged.tensors) == {name + ".lora_down.weight", name + ".lora_up.weight", name + ".alpha"}
    assert _rel(lora_delta(merged, name), _expected(items, name)) < 1e-5
    # LoKr with two full factors ignores alpha, as ComfyUI and A1111 do
    assert torch.allclose(lora_delta(items[2][0], name),
                          torch.kron(items[2][0].tensors[name + ".lokr_w1"], items[2][0].tensors[name + ".lokr_w2"]))


def test_svd_merge_needs_a_target_and_refuses_dora():
    with pytest.raises(ValueError, match="rank or an energy"):
        merge_loras([(_lora(1), 1.0)], "svd")
    with pytest.raises(ValueError, match="mode"):
        merge_loras([(_lora(1), 1.0)], "average")
    dora = _lora(2)
    dora.tensors["lora_unet_x_to_q.dora_scale"] = torch.ones(24, 1)
    with pytest.raises(ValueError, match="DoRA"):
        merge_loras([(dora, 1.0)], "svd", rank=2)
