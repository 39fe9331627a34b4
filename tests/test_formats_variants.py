"""Every export variant (LoRA, LoCon, LoHa incl. Tucker, LoKr decomposed and full, DoRA) for SD1.x and SDXL:
round trip through our own file writer and loader reproduces peft's merged weights; baking reports the
true SVD error; files in diffusers/peft and ComfyUI key styles import to the same modules."""

import copy
import json

import pytest
import torch

from comfyui_lora_trainer.training.adapters import add_adapter
from comfyui_lora_trainer.training.formats import (
    LoraWeights,
    export_kohya,
    load_lora_file,
    lora_delta,
    module_names,
    save_lora_file,
    weights_from_state_dict,
)
from comfyui_lora_trainer.training.formats.families import BASE_MODEL_VERSION
from comfyui_lora_trainer.training.formats.names import te_module_path, te_name, unet_name

from peft_variants import TE, UNET_CONV, UNET_LINEAR, peft_configs  # noqa: E402


def _configs():
    return peft_configs(lora_rslora=True)


@pytest.fixture(scope="module")
def bases():
    from comfyui_lora_trainer.training.models import build_tiny_components

    return {f: build_tiny_components(f, seed=0) for f in ("sd1", "sdxl")}


def _adapted(base, variant, seed=0):
    """Copies of the base's UNet and text encoders with the variant's adapter (random, non-zero)."""
    torch.manual_seed(seed)
    unet = copy.deepcopy(base.unet).requires_grad_(False)
    add_adapter(unet, _configs()[variant](UNET_LINEAR))
    tes = []
    for te in base.text_encoders:
        te = copy.deepcopy(te).requires_grad_(False)
        add_adapter(te, _configs()[variant](TE))
        tes.append(te)
    if variant == "dora":  # a trained magnitude differs from ||W0 + dW||; otherwise DoRA == LoRA
        for m in list(unet.modules()) + [x for te in tes for x in te.modules()]:
            mag = getattr(m, "lora_magnitude_vector", None)
            if mag is not None and "default" in mag:
                w = mag["default"].weight
                w.data *= 1 + 0.3 * torch.rand_like(w)
    return unet, tes


def _peft_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _peft_changes(family, unet, tes):
    """kohya name -> (base weight, peft's weight change; DoRA: merged weight - base weight)."""
    out = {}
    prefixes = ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
    models = [(unet, lambda p: unet_name(family, p, unet))] + [
        (te, lambda p, pre=pre: te_name(pre, p)) for te, pre in zip(tes, prefixes)]
    for model, namer in models:
        for path, layer in _peft_layers(model).items():
            base = layer.get_base_layer().weight.detach().clone()
            if getattr(layer, "use_dora", {}).get("default", False):
                layer.merge(adapter_names=["default"])
                change = layer.get_base_layer().weight.detach() - base
                layer.unmerge()
            else:  # peft's own delta: merged - base would lose digits to cancellation for tiny deltas
                change = layer.get_delta_weight("default").detach().reshape(base.shape)
            out[namer(path)] = (base, change)
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("variant", list(_configs()))
def test_export_round_trip_is_exact(bases, tmp_path, family, variant):
    unet, tes = _adapted(bases[family], variant)
    result = export_kohya(family, unet=unet, text_encoders=tes)
    md = {"ss_base_model_version": BASE_MODEL_VERSION[family]}
    path = save_lora_file(tmp_path / f"{variant}.safetensors", LoraWeights(result.tensors, md, family))
    back = load_lora_file(path)
    assert back.family == family and back.source_format == "kohya"
    assert set(back.tensors) == set(result.tensors)

    expected = _peft_changes(family, unet, tes)
    assert set(module_names(back)) == set(expected)
    convs = 0
    for name, (w0, change) in expected.items():
        got = lora_delta(back, name, shape=w0.shape, base_weight=w0 if variant == "dora" else None)
        assert _rel(got, change) < 1e-5, (name, _rel(got, change))
        convs += w0.dim() == 4 and w0.shape[-1] == 3

    keys = {k.split(".", 1)[1] for k in back.tensors}
    for k in [k for k in back.tensors if k.endswith(".alpha")]:
        assert back.tensors[k].dim() == 0 and back.tensors[k].dtype == torch.float32
    if variant == "lokr_full":  # loaders ignore alpha when both factors are full: scale folded into w1
        assert keys == {"lokr_w1", "lokr_w2"}
    if variant in ("loha", "loha_tucker"):
        assert {"hada_w1_a", "hada_w2_b"} <= keys
        assert ("hada_t1" in keys) == (variant == "loha_tucker")
    if variant == "dora":
        scales = [t for k, t in back.tensors.items() if k.endswith(".dora_scale")]
        assert scales and all(t.shape[0] > 1 and all(s == 1 for s in t.shape[1:]) for t in scales)  # output axis
        assert result.warnings and "A1111" in result.warnings[0]
    if variant != "lora" and variant != "lokr_full":
        assert convs > 0
    net = result.network_metadata()  # ss_network_module / ss_network_args for the header
    assert net["network_module"] == ("networks.lora" if variant in ("lora", "locon") else "lycoris.kohya")
    if variant.startswith(("loha", "lokr")):
        assert net["network_args"]["algo"] == variant.split("_")[0]
    assert ("conv_dim" in net["network_args"]) == (convs > 0)


@pytest.mark.parametrize("variant", ["dora", "loha", "lokr"])
def test_bake_reports_the_true_svd_error(bases, variant):
    family = "sd1"
    unet, tes = _adapted(bases[family], variant)
    baked = export_kohya(family, unet=unet, text_encoders=tes, bake="all", bake_rank=2)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in baked.tensors)
    w = LoraWeights(baked.tensors, {}, family)
    changes = _peft_changes(family, unet, tes)
    assert set(baked.bake_errors) == set(changes)
    for name, (w0, change) in changes.items():
        got = lora_delta(w, name, shape=w0.shape)
        assert w.tensors[name + ".lora_down.weight"].shape[0] <= 2
        assert abs(_rel(got, change) - baked.bake_errors[name]) < 1e-4, name
    assert max(baked.bake_errors.values()) > 1e-3  # rank 2 really is lossy here

    full = export_kohya(family, unet=unet, text_encoders=tes, bake="dora" if variant == "dora" else "all",
                        bake_rank=10_000)
    w = LoraWeights(full.tensors, {}, family)
    for name, (w0, change) in changes.items():
        assert _rel(lora_delta(w, name, shape=w0.shape), change) < 1e-5, name


def test_bake_choice_is_checked(bases):
    unet, tes = _adapted(bases["sd1"], "lora")
    with pytest.raises(ValueError, match="bake"):
        export_kohya("sd1", unet=unet, bake="everything")


def test_diffusers_peft_file_imports_with_its_alphas(bases):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    base = bases["sd1"]
    unet = copy.deepcopy(base.unet).requires_grad_(False)
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_LINEAR + UNET_CONV, init_lora_weights=False,
                      alpha_pattern={"to_q": 2.0}, use_dora=False)
    add_adapter(unet, ucfg)
    te = copy.deepcopy(base.text_encoders[0]).requires_grad_(False)
    tcfg = LoraConfig(r=2, lora_alpha=4, target_modules=TE, init_lora_weights=False, use_rslora=True)
    add_adapter(te, tcfg)
    sd = {"unet." + k: v for k, v in get_peft_model_state_dict(unet).items()}
    sd.update({"text_encoder." + k: v for k, v in get_peft_model_state_dict(te).items()})
    meta = {"lora_adapter_metadata": json.dumps(
        {**{f"unet.{k}": v for k, v in ucfg.to_dict().items() if k in ("r", "lora_alpha", "alpha_pattern", "use_rslora")},
         **{f"text_encoder.{k}": v for k, v in tcfg.to_dict().items() if k in ("r", "lora_alpha", "alpha_pattern", "use_rslora")}})}
    w = weights_from_state_dict(sd, meta)
    assert w.source_format == "diffusers"  # family: unknown for a tiny model (no real cross-attention width)
    expected = _peft_changes("sd1", unet, [te])
    assert set(module_names(w)) == set(expected)
    for name, (w0, change) in expected.items():
        assert _rel(lora_delta(w, name, shape=w0.shape), change) < 1e-5, name


def test_comfyui_native_keys_import_to_kohya_names(bases):
    from comfyui_lora_trainer.training.models import unet_module_path_to_ldm

    unet, tes = _adapted(bases["sdxl"], "locon")
    kohya = export_kohya("sdxl", unet=unet, text_encoders=tes).tensors
    native = {}
    for path in _peft_layers(unet):
        ldm = unet_module_path_to_ldm(path, unet)
        src = unet_name("sdxl", path, unet)
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            native[f"diffusion_model.{ldm}{suffix}"] = kohya[src + suffix]
    for te, clip, pre in zip(tes, ("clip_l", "clip_g"), ("lora_te1", "lora_te2")):
        for path in _peft_layers(te):
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                native[f"text_encoders.{clip}.transformer.{te_module_path(path)}{suffix}"] = \
                    kohya[te_name(pre, path) + suffix]
    w = weights_from_state_dict(native, {})
    assert w.source_format == "comfyui" and w.family == "sdxl"
    assert set(w.tensors) == set(kohya)


@pytest.mark.parametrize("ldm, diffusers", [
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("input_blocks.3.0.op", "down_blocks_0_downsamplers_0_conv"),
    ("input_blocks.5.0.in_layers.2", "down_blocks_1_resnets_1_conv1"),
    ("middle_block.1.proj_out", "mid_block_attentions_0_proj_out"),
    ("output_blocks.2.1.conv", "up_blocks_0_upsamplers_0_conv"),
    ("output_blocks.5.2.conv", "up_blocks_1_upsamplers_0_conv"),
    ("output_blocks.11.0.skip_connection", "up_blocks_3_resnets_2_conv_shortcut"),
])
def test_comfyui_native_sd15_names(ldm, diffusers):
    t = {f"diffusion_model.{ldm}.lora_down.weight": torch.zeros(2, 4),
         f"diffusion_model.{ldm}.lora_up.weight": torch.zeros(4, 2)}
    w = weights_from_state_dict(t, {"ss_base_model_version": "sd_v1"})
    assert module_names(w) == ["lora_unet_" + diffusers]


def test_kohya_names_from_other_tools_are_fixed():
    # diffusers' convert_state_dict_to_kohya: lora_te1 for SD1 and no text_model_
    t = {"lora_te1_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
         "lora_te1_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2),
         "lora_te1_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2, dtype=torch.int64)}
    w = weights_from_state_dict(t, {"ss_base_model_version": "sd_v1"})
    assert module_names(w) == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
def test_dora_scale_for_base_norm_makes_comfyuis_formula_exact(shape):
    from comfyui_lora_trainer.training.formats.modules import dora_scale_for_base_norm, dora_weight, module_delta

    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(*shape, generator=g)
    out, rank = shape[0], 2
    down = torch.randn(rank, *shape[1:], generator=g) if len(shape) == 4 else torch.randn(rank, shape[1], generator=g)
    t = {"m.lora_down.weight": down,
         "m.lora_up.weight": torch.randn(out, rank, *([1, 1] if len(shape) == 4 else []), generator=g),
         "m.alpha": torch.tensor(4.0),
         "m.dora_scale": (1 + torch.rand(out, *[1] * (len(shape) - 1), generator=g))}
    want = w0 + module_delta(t, "m", base_weight=w0)
    plain = module_delta({k: v for k, v in t.items() if k != "m.dora_scale"}, "m", shape=w0.shape)
    rows = (out,) + (1,) * (len(shape) - 1)

    def comfy_0_3_64(scale):  # weight_decompose on the output axis: (W0 + dW) * s / ||W0||
        return (w0 + plain) * scale.reshape(rows) / w0.reshape(out, -1).norm(dim=1).reshape(rows)

    assert (comfy_0_3_64(t["m.dora_scale"]) - want).abs().max() > 1e-2  # the bug is visible here
    fixed = dora_scale_for_base_norm(t, "m", w0)
    assert fixed.shape == t["m.dora_scale"].shape
    torch.testing.assert_close(comfy_0_3_64(fixed), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dora_weight(w0, plain, t["m.dora_scale"]), want)
    # a 1-D [out] scale (peft's magnitude layout) comes back as [out, 1, ...], which ComfyUI broadcasts right
    flat = dict(t, **{"m.dora_scale": t["m.dora_scale"].reshape(out)})
    assert dora_scale_for_base_norm(flat, "m", w0).shape == t["m.dora_scale"].shape
