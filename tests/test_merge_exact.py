"""Exact rank-concatenation merge (fast, CPU)."""

import json

import pytest
import torch

from comfyui_lora_trainer.training.formats import (
    LoraWeights,
    load_lora_file,
    lora_delta,
    module_names,
    save_lora_file,
)
from comfyui_lora_trainer.training.merge import merge_exact


def _lora(modules, seed, family="sd1", title=None, alpha=True):
    """modules: {name: (kind, rank, alpha)}; kind 'linear' (out 24, in 16) or 'conv' (3x3, 8 -> 12)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (kind, r, a) in modules.items():
        if kind == "linear":
            t[name + ".lora_down.weight"] = torch.randn(r, 16, generator=g)
            t[name + ".lora_up.weight"] = torch.randn(24, r, generator=g)
        else:
            t[name + ".lora_down.weight"] = torch.randn(r, 8, 3, 3, generator=g)
            t[name + ".lora_up.weight"] = torch.randn(12, r, 1, 1, generator=g)
        if alpha and a is not None:
            t[name + ".alpha"] = torch.tensor(float(a))
    md = {"modelspec.title": title} if title else {}
    return LoraWeights(t, md, family)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_merge_delta_is_weighted_sum():
    a = _lora({"lora_unet_x_to_q": ("linear", 4, 8), "lora_unet_x_conv1": ("conv", 2, 1),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("linear", 4, 16 * 2)}, 1, title="A")
    b = _lora({"lora_unet_x_to_q": ("linear", 8, 1), "lora_unet_x_conv1": ("conv", 3, 3),
               "lora_unet_only_in_b": ("linear", 5, 2.5)}, 2, title="B")
    c = _lora({"lora_unet_x_to_q": ("linear", 2, None)}, 3, alpha=False)  # no alpha -> scale 1
    wa, wb, wc = 0.7, -0.45, 1.3
    m = merge_exact([(a, wa), (b, wb), (c, wc)])

    assert set(module_names(m)) == set(module_names(a)) | set(module_names(b))
    for name in module_names(m):
        expected = 0
        for w, s in ((a, wa), (b, wb), (c, wc)):
            if name + ".lora_down.weight" in w.tensors:
                expected = expected + s * lora_delta(w, name)
        got = lora_delta(m, name)
        assert got.shape == expected.shape
        assert _rel(got, expected) < 1e-5, name
        # one alpha for all modules (the largest rank), so diffusers' single-alpha attention mapping is right
        assert m.tensors[name + ".alpha"].item() == 14 and m.tensors[name + ".alpha"].dtype == torch.float32
    assert m.tensors["lora_unet_x_to_q.lora_down.weight"].shape[0] == 4 + 8 + 2
    assert m.tensors["lora_unet_x_conv1.lora_down.weight"].shape == (5, 8, 3, 3)
    assert m.tensors["lora_unet_x_conv1.lora_up.weight"].shape == (12, 5, 1, 1)

    assert m.family == "sd1"
    md = m.metadata
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_dim"] == "14"
    assert md["modelspec.merged_from"] == "A, B, lora3"
    assert md["ss_base_model_version"] == "sd_v1"
    recipe = json.loads(md["ss_merge_recipe"])
    assert [x["weight"] for x in recipe] == [wa, wb, wc]


def test_merge_survives_save_and_load(tmp_path):
    a = _lora({"m": ("linear", 4, 2)}, 1)
    b = _lora({"m": ("linear", 6, 6)}, 2)
    m = merge_exact([(a, 1.0), (b, -1.0)])
    back = load_lora_file(save_lora_file(tmp_path / "m.safetensors", m))
    expected = lora_delta(a, "m") - lora_delta(b, "m")
    assert _rel(lora_delta(back, "m"), expected) < 1e-5
    assert back.family == "sd1"


def test_merge_linear_and_1x1_conv_forms():
    # SD2 proj_in: single-file training gives [r,in,1,1], diffusers-folder training [r,in]
    a = LoraWeights({"p.lora_down.weight": torch.randn(2, 16, 1, 1), "p.lora_up.weight": torch.randn(24, 2, 1, 1),
                     "p.alpha": torch.tensor(2.0)}, {}, "sd2")
    b = LoraWeights({"p.lora_down.weight": torch.randn(3, 16), "p.lora_up.weight": torch.randn(24, 3),
                     "p.alpha": torch.tensor(1.0)}, {}, "sd2")
    m = merge_exact([(a, 1.0), (b, 0.5)])
    expected = lora_delta(a, "p") + 0.5 * lora_delta(b, "p").reshape(24, 16, 1, 1)
    assert _rel(lora_delta(m, "p"), expected) < 1e-5


def test_merge_rejects_mixed_families_and_bad_input():
    a = _lora({"m": ("linear", 4, 4)}, 1, family="sd1")
    b = _lora({"m": ("linear", 4, 4)}, 2, family="sdxl")
    with pytest.raises(ValueError, match="different model families"):
        merge_exact([(a, 1.0), (b, 1.0)])
    unknown = _lora({"m": ("linear", 4, 4)}, 3, family=None)
    assert merge_exact([(a, 1.0), (unknown, 1.0)]).family == "sd1"
    with pytest.raises(ValueError, match="at least one"):
        merge_exact([])
    shape_clash = _lora({"m": ("conv", 4, 4)}, 4)
    with pytest.raises(ValueError, match="'m'"):
        merge_exact([(a, 1.0), (shape_clash, 1.0)])
    dora = _lora({"m": ("linear", 4, 4)}, 5)
    dora.tensors["m.dora_scale"] = torch.ones(24, 1)
    with pytest.raises(ValueError, match="not a plain LoRA"):
        merge_exact([(a, 1.0), (dora, 1.0)])


def test_merge_keeps_full_weight_and_bias_changes_of_core_node_files():
    # ComfyUI's core Train LoRA node writes diff (weight) and diff_b (bias) modules beside LoRA ones
    g = torch.Generator().manual_seed(5)
    core = LoraWeights({"lora_unet_x_norm.diff": torch.randn(24, 16, generator=g),
                        "lora_unet_x_norm.diff_b": torch.randn(24, generator=g),
                        "lora_unet_x_bias_only.diff_b": torch.randn(12, generator=g)}, {}, "sd1")
    ours = _lora({"lora_unet_x_norm": ("linear", 4, 4)}, 6)
    m = merge_exact([(core, 0.5), (ours, -2.0)])
    expected = 0.5 * lora_delta(core, "lora_unet_x_norm") - 2.0 * lora_delta(ours, "lora_unet_x_norm")
    assert _rel(lora_delta(m, "lora_unet_x_norm"), expected) < 1e-5
    torch.testing.assert_close(m.tensors["lora_unet_x_norm.diff_b"], 0.5 * core.tensors["lora_unet_x_norm.diff_b"])
    torch.testing.assert_close(m.tensors["lora_unet_x_bias_only.diff_b"],
                               0.5 * core.tensors["lora_unet_x_bias_only.diff_b"])
    assert not any(k.startswith("lora_unet_x_bias_only.") and not k.endswith(".diff_b") for k in m.tensors)
