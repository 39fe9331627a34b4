"""Names and metadata for LoRAs trained on the model ComfyUI holds (issue 16), without ComfyUI: the kohya names
of ComfyUI module paths, the per-family ss_/modelspec values (kohya sd-scripts @ 48d368fa: sai_model_spec.py,
flux_utils.MODEL_VERSION_*, sd3_utils model types, lumina_util) read back to the family, and the export of peft
adapters on a module tree under those names. The files themselves load in ComfyUI in
tests/integration/test_comfy_model_families.py."""

import pytest
import torch

from comfyui_lora_trainer.training.adapters import add_adapter, make_peft_config, remove_adapters
from comfyui_lora_trainer.training.formats.convert import to_kohya
from comfyui_lora_trainer.training.formats.export import export_diffusion_model
from comfyui_lora_trainer.training.formats.families import MODEL_FAMILIES, family_from_metadata
from comfyui_lora_trainer.training.formats.metadata import RunInfo, make_metadata
from comfyui_lora_trainer.training.formats.names import comfy_unet_name


def test_comfy_module_paths_become_kohya_names():
    assert comfy_unet_name("flux-dev", "double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"
    assert comfy_unet_name("sd3", "joint_blocks.3.x_block.mlp.fc2") == "lora_unet_joint_blocks_3_x_block_mlp_fc2"
    assert comfy_unet_name("qwen-image", "transformer_blocks.0.attn.to_out.0") == \
        "lora_unet_transformer_blocks_0_attn_to_out_0"
    # SDXL keeps the LDM path (what kohya writes); SD1 gets the diffusers path kohya writes for it
    assert comfy_unet_name("sdxl", "input_blocks.4.1.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert comfy_unet_name("sd1", "input_blocks.1.1.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(ValueError, match="hidream"):
        comfy_unet_name("hidream", "double_stream_blocks.0.block.attn1.to_q")


@pytest.mark.parametrize("family,version,arch", [
    ("flux-dev", "flux1", "flux-1-dev/lora"),
    ("flux-schnell", "flux1", "flux-1-schnell/lora"),
    ("chroma", "chroma", "chroma/lora"),
    ("sd3", "medium", "stable-diffusion-v3-medium/lora"),
    ("sd3.5-large", "5-large", "stable-diffusion-v3-5-large/lora"),
    ("lumina2", "lumina2", "lumina-2/lora"),
    ("qwen-image", "qwen_image", "qwen-image/lora"),
])
def test_metadata_names_the_family_and_reads_back(family, version, arch):
    md = make_metadata(RunInfo(family=family, network_dim=4, network_alpha=4))
    assert md["ss_base_model_version"] == version and md["modelspec.architecture"] == arch
    assert "modelspec.prediction_type" not in md  # the SAI spec has no flow value; kohya writes none for Flux
    assert md["ss_v2"] == "False"
    assert family_from_metadata(md) == family


def test_kohya_and_partial_headers_read_back():
    assert family_from_metadata({"modelspec.architecture": "stable-diffusion-3-5-large/lora"}) == "sd3.5-large"
    assert family_from_metadata({"modelspec.architecture": "stable-diffusion-3-medium/lora"}) == "sd3"
    assert family_from_metadata({"ss_base_model_version": "flux1"}) == "flux-dev"
    assert family_from_metadata({"ss_base_model_version": "chroma"}) == "chroma"
    assert family_from_metadata({"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd1"
    assert set(MODEL_FAMILIES).isdisjoint({"sd1", "sd2", "sd2-v", "sdxl"})


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.proj = torch.nn.Linear(8, 8)


class _Tiny(torch.nn.Module):
    """A module tree with Flux's paths (double_blocks.N.img_attn.qkv / proj)."""

    def __init__(self):
        super().__init__()
        self.double_blocks = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
        for b in self.double_blocks:
            b.img_attn = _Block()


def test_export_diffusion_model_uses_the_module_paths_and_reads_back_unchanged():
    model = _Tiny()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    targets = [f"double_blocks.{i}.img_attn.{m}" for i in range(2) for m in ("qkv", "proj")]
    torch.manual_seed(0)
    add_adapter(model, make_peft_config("lora", 2, 4.0, targets))
    result = export_diffusion_model("flux-dev", model)
    # trained in place, handed back: the owner's modules and weights as they were
    layers = {t: model.get_submodule(t).get_base_layer() for t in targets}
    assert remove_adapters(model) == 4 and not hasattr(model, "peft_config")
    assert all(model.get_submodule(t) is layers[t] for t in targets)
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert {k.split(".")[0] for k in result.tensors} == {comfy_unet_name("flux-dev", t) for t in targets}
    assert float(result.tensors["lora_unet_double_blocks_1_img_attn_proj.alpha"]) == 4.0
    md = make_metadata(RunInfo(family="flux-dev"))
    converted, family, style, _ = to_kohya(result.tensors, md)
    assert family == "flux-dev" and style == "kohya" and converted.keys() == result.tensors.keys()
    # ComfyUI-native keys of a Flux file (diffusion_model.<path>.lora_down.weight) map to the same names
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    native = {"diffusion_model.double_blocks.0.img_attn.qkv" + k[len(stem):]: v
              for k, v in result.tensors.items() if k.startswith(stem + ".")}
    out, _, style, _ = to_kohya(native, md)
    assert style == "comfyui" and out.keys() == {k for k in result.tensors if k.startswith(stem + ".")}
