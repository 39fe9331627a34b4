"""kohya export from peft-adapted tiny models, load, delta (fast, CPU)."""

import os

import pytest
import torch

from comfyui_lora_trainer.training.adapters import add_adapter
from comfyui_lora_trainer.training.formats import (
    LoraWeights,
    kohya_state_dict_from_models,
    load_lora_file,
    lora_delta,
    module_names,
    save_lora_file,
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _tiny_sd1():
    """(unet, text_encoder): from training.models when it has landed, else built here."""
    try:
        from comfyui_lora_trainer.training.models import build_tiny_components

        base = build_tiny_components("sd1", seed=0)
        return base.unet, base.text_encoders[0]
    except ImportError:
        pass
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu"))
    return unet, te


def _add_lora(model, targets, **kw):
    from peft import LoraConfig

    model.requires_grad_(False)
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    cfg.update(kw)
    add_adapter(model, LoraConfig(**cfg))
    return model


@pytest.fixture(scope="module")
def sd1_lora():
    torch.manual_seed(1)
    unet, te = _tiny_sd1()
    _add_lora(unet, UNET_TARGETS, rank_pattern={r".*conv1": 2}, alpha_pattern={r".*conv1": 1})
    _add_lora(te, TE_TARGETS, use_rslora=True)
    sd = kohya_state_dict_from_models("sd1", unet=unet, text_encoders=[te])
    return unet, te, sd


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_export_keys_shapes_alpha(sd1_lora):
    unet, te, sd = sd1_lora
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[q + ".lora_down.weight"].shape == (4, 32)
    assert sd[q + ".lora_up.weight"].shape == (32, 4)
    a = sd[q + ".alpha"]
    assert a.dim() == 0 and a.dtype == torch.float32 and a.item() == pytest.approx(8.0)

    teq = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert teq + ".lora_down.weight" in sd
    # rsLoRA: scaling = alpha / sqrt(r) -> stored alpha = scaling * r = 8 * sqrt(4) = 16
    assert sd[teq + ".alpha"].item() == pytest.approx(16.0)

    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[conv + ".lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd[conv + ".lora_up.weight"].shape == (32, 2, 1, 1)
    assert sd[conv + ".alpha"].item() == pytest.approx(1.0)   # alpha_pattern
    assert sd["lora_unet_down_blocks_0_resnets_0_conv2.alpha"].item() == pytest.approx(8.0)

    # one entry per peft layer, 3 keys each, all names well formed
    n_layers = len(_lora_layers(unet)) + len(_lora_layers(te))
    assert len(sd) == 3 * n_layers
    for k, t in sd.items():
        name, suffix = k.split(".", 1)
        assert suffix in ("lora_down.weight", "lora_up.weight", "alpha")
        assert name.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
        assert t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
    # copies, not views of the live parameters
    layer = _lora_layers(unet)["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert sd[q + ".lora_down.weight"].data_ptr() != layer.lora_A["default"].weight.data_ptr()


def test_text_encoder_with_projection_keeps_text_model():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    te = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, projection_dim=32))
    _add_lora(te, TE_TARGETS)
    names = {k.split(".")[0] for k in kohya_state_dict_from_models("sd2", text_encoders=[te])}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any("text_model_text_model" in n for n in names)


@pytest.mark.parametrize("which", ["unet", "te"])
def test_lora_delta_equals_peft_merge(sd1_lora, which):
    unet, te, sd = sd1_lora
    model, prefix = (unet, "lora_unet") if which == "unet" else (te, "lora_te")
    w = LoraWeights(tensors=sd, metadata={}, family="sd1")
    checked = {"linear": 0, "conv3x3": 0}
    for path, layer in _lora_layers(model).items():
        name = prefix + "_" + (path if which == "unet" else "text_model." + path).replace(".", "_")
        base = layer.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=["default"])
        try:
            expected = layer.get_base_layer().weight.detach() - base
        finally:
            layer.unmerge()
        got = lora_delta(w, name)
        assert got.shape == base.shape, name
        rel = (got - expected).norm() / expected.norm()
        assert rel < 1e-5, (name, rel.item())
        checked["conv3x3" if base.dim() == 4 and base.shape[-1] == 3 else "linear"] += 1
    if which == "unet":
        assert checked["conv3x3"] > 0
    assert checked["linear"] > 0


def test_roundtrip_through_file(sd1_lora, tmp_path):
    _, _, sd = sd1_lora
    p = save_lora_file(tmp_path / "a.safetensors", LoraWeights(sd, {"ss_base_model_version": "sd_v1"}, "sd1"))
    back = load_lora_file(p)
    assert back.family == "sd1"
    assert set(back.tensors) == set(sd)
    for k in sd:
        assert torch.equal(back.tensors[k], sd[k]), k
    assert module_names(back) == sorted({k.split(".")[0] for k in sd})
    assert back.tensors[module_names(back)[0] + ".alpha"].dtype == torch.float32


def test_missing_alpha_means_scale_one():
    down, up = torch.randn(3, 5), torch.randn(7, 3)
    w = LoraWeights({"m.lora_down.weight": down, "m.lora_up.weight": up}, {}, None)
    torch.testing.assert_close(lora_delta(w, "m"), up @ down)


def test_other_peft_tuners_are_refused():
    from peft import IA3Config
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4))
    add_adapter(te, IA3Config(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"]))
    with pytest.raises(NotImplementedError, match="IA3"):
        kohya_state_dict_from_models("sd1", text_encoders=[te])


def test_no_adapter_is_a_clear_error():
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4))
    with pytest.raises(ValueError, match="No LoRA layers"):
        kohya_state_dict_from_models("sd1", text_encoders=[te])


def _tiny_sdxl():
    """(unet, te1, te2) from training.models when available, else built here (§2.4 configs)."""
    models = pytest.importorskip("comfyui_lora_trainer.training.models")
    if not hasattr(models, "unet_module_path_to_ldm"):
        pytest.skip("training.models does not export unet_module_path_to_ldm yet")
    if hasattr(models, "build_tiny_components"):
        base = models.build_tiny_components("sdxl", seed=0)
        return base.unet, base.text_encoders[0], base.text_encoders[1]
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
    )
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, projection_dim=32))
    return unet, te1, te2


def test_sdxl_names_use_ldm_paths():
    unet, te1, te2 = _tiny_sdxl()
    _add_lora(unet, ["to_q", "conv1", "conv"])
    _add_lora(te1, ["q_proj"])
    _add_lora(te2, ["q_proj"])
    sd = kohya_state_dict_from_models("sdxl", unet=unet, text_encoders=[te1, te2])
    names = {k.split(".")[0] for k in sd}
    assert any(n.startswith("lora_unet_input_blocks_") and n.endswith("_attn1_to_q") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    assert any(n.startswith("lora_unet_middle_block_") for n in names)
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # resnet conv1
    L = unet.config.layers_per_block
    assert f"lora_unet_input_blocks_{L + 1}_0_op" in names  # first downsampler
    slot = 2 if "CrossAttn" in unet.config.up_block_types[0] else 1
    assert f"lora_unet_output_blocks_{L}_{slot}_conv" in names  # first upsampler
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names


@pytest.mark.parametrize("content", [b"", b"garbage, not a safetensors file" * 10, b"\xff" * 7])
def test_load_garbage_names_file(tmp_path, content):
    p = tmp_path / "broken.safetensors"
    p.write_bytes(content)
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_lora_file(p)


def test_load_truncated_and_non_lora(tmp_path, sd1_lora):
    from safetensors.torch import save_file

    _, _, sd = sd1_lora
    good = save_lora_file(tmp_path / "good.safetensors", LoraWeights(sd, {}, "sd1"))
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        load_lora_file(trunc)

    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(ckpt))
    with pytest.raises(ValueError, match="model.safetensors.*checkpoint"):
        load_lora_file(ckpt)

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora_file(tmp_path / "nope.safetensors")
    assert os.path.exists(good)
