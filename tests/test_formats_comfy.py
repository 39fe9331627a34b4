"""Our kohya files through ComfyUI's own LoRA code (comfy.lora), when COMFYUI_DIR points at a checkout.

Skipped without COMFYUI_DIR. Checks that the names we write are the ones ComfyUI maps and that its
patch (alpha/rank scale, conv reshape) reproduces peft's merged weights and exact merges.
"""

import os
import sys

import pytest
import torch

from comfyui_lora_trainer.training.formats import LoraWeights, kohya_state_dict_from_models, lora_delta
from comfyui_lora_trainer.training.merge import merge_exact

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not os.path.isdir(os.path.join(COMFYUI_DIR, "comfy")),
    reason="set COMFYUI_DIR to a ComfyUI checkout",
)


@pytest.fixture(scope="module")
def comfy():
    if COMFYUI_DIR not in sys.path:
        sys.path.insert(0, COMFYUI_DIR)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.lora
    import comfy.utils

    return comfy


def _helpers(*names):
    try:
        import test_formats_kohya as h
    except ImportError:  # tests/ made a package
        from . import test_formats_kohya as h
    return [getattr(h, n) for n in names]


def _comfy_delta(comfy, lora_sd, name, shape):
    patches = comfy.lora.load_lora(lora_sd, {name: "w"}, log_missing=False)
    assert "w" in patches, name
    base = torch.zeros(shape)
    out = comfy.lora.calculate_weight([(1.0, patches["w"], 1.0, None, None)], base.clone(), "w")
    return out - base


def test_sd1_export_through_comfy_matches_peft(comfy):
    TE_TARGETS, UNET_TARGETS, _add_lora, _lora_layers, _tiny_sd1 = _helpers(
        "TE_TARGETS", "UNET_TARGETS", "_add_lora", "_lora_layers", "_tiny_sd1")

    torch.manual_seed(3)
    unet, te = _tiny_sd1()
    _add_lora(unet, UNET_TARGETS, rank_pattern={r".*conv2": 3}, alpha_pattern={r".*conv2": 1.5})
    _add_lora(te, TE_TARGETS, use_rslora=True)
    sd = kohya_state_dict_from_models("sd1", unet=unet, text_encoders=[te])
    n = 0
    for model, prefix, tm in ((unet, "lora_unet_", ""), (te, "lora_te_", "text_model.")):
        for path, layer in _lora_layers(model).items():
            name = prefix + (tm + path).replace(".", "_")
            expected = layer.get_delta_weight("default").detach()
            got = _comfy_delta(comfy, sd, name, expected.shape)
            assert ((got - expected).norm() / expected.norm()) < 1e-5, name
            n += 1
    assert n > 20


def test_sdxl_unet_names_match_comfy_map(comfy):
    _add_lora, _lora_layers, _tiny_sdxl = _helpers("_add_lora", "_lora_layers", "_tiny_sdxl")

    unet, te1, te2 = _tiny_sdxl()
    _add_lora(unet, ["to_q", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"])
    cfg = unet.config
    L = cfg.layers_per_block
    nb = len(cfg.block_out_channels)
    tl = cfg.transformer_layers_per_block
    tl = [tl] * nb if isinstance(tl, int) else list(tl)
    depth = [tl[i] if "CrossAttn" in cfg.down_block_types[i] else 0 for i in range(nb)]
    comfy_cfg = dict(
        num_res_blocks=[L] * nb, channel_mult=[1] * nb,
        transformer_depth=[d for d in depth for _ in range(L)],
        transformer_depth_output=[d for d in depth for _ in range(L + 1)],  # popped from the end
        transformer_depth_middle=tl[-1],
    )
    dmap = comfy.utils.unet_to_diffusers(comfy_cfg)
    sd = kohya_state_dict_from_models("sdxl", unet=unet)
    names = {k.split(".")[0] for k in sd}
    expected = set()
    for path in _lora_layers(unet):
        ldm = dmap[path + ".weight"][: -len(".weight")]
        expected.add("lora_unet_" + ldm.replace(".", "_"))
    assert names == expected


def test_exact_merge_through_comfy(comfy):
    g = torch.Generator().manual_seed(0)

    def lw(r, a, conv=False):
        if conv:
            t = {"m.lora_down.weight": torch.randn(r, 8, 3, 3, generator=g), "m.lora_up.weight": torch.randn(12, r, 1, 1, generator=g)}
        else:
            t = {"m.lora_down.weight": torch.randn(r, 16, generator=g), "m.lora_up.weight": torch.randn(24, r, generator=g)}
        t["m.alpha"] = torch.tensor(float(a))
        return LoraWeights(t, {}, "sd1")

    for conv, shape in ((False, (24, 16)), (True, (12, 8, 3, 3))):
        a, b = lw(4, 1, conv), lw(8, 12, conv)
        m = merge_exact([(a, 0.8), (b, -0.3)])
        expected = 0.8 * lora_delta(a, "m") - 0.3 * lora_delta(b, "m")
        got = _comfy_delta(comfy, m.tensors, "m", shape)
        assert ((got - expected).norm() / expected.norm()) < 1e-5
