"""SD1.x through Train LoRA's model input (in-process, real ComfyUI): a random full-shape SD1.5 checkpoint loaded
by ComfyUI's own ``load_checkpoint_guess_config`` gives the MODEL, the real CLIP (ComfyUI's SD1 tokenizer and
text encoder) and the real VAE; the training loop trains ComfyUI's UNet in place (epsilon objective on the DDPM
schedule of ComfyUI's own model_sampling) and the file loads back through ComfyUI's LoRA loader with every key
and the trained model's outputs. Random weights, 64 px, 4 steps: a minute on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    from comfyui_lora_trainer.training.models import build_components, write_checkpoint

    path = tmp_path_factory.mktemp("sd15") / "random-sd15.safetensors"
    write_checkpoint(build_components("sd1", seed=0), path)
    yield str(path)
    path.unlink()


def _load(comfy_lib, path):
    with torch.inference_mode():  # as the Load Checkpoint node runs
        return comfy_lib.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]


def test_sd15_model_input_trains_in_place_and_round_trips(comfy_lib, sd15_file, tmp_path):
    import comfy_tiny

    from comfyui_lora_trainer.nodes.host import ComfyHost
    from comfyui_lora_trainer.training.config import TrainConfig
    from comfyui_lora_trainer.training.loop import train

    model, clip, vae = _load(comfy_lib, sd15_file)
    provider = ComfyHost().base_model(model, clip, vae)
    targets = provider.adapter_targets("attention")  # the q, k, v, out projections of every transformer block
    assert provider.family == "sd1" and provider.prediction_type == "epsilon"
    unet_modules = {id(m) for m in provider.diffusion_model.modules()}
    unet_numel = sum(p.numel() for p in provider.diffusion_model.parameters())
    dataset = str(Path(__file__).resolve().parents[2] / "training" / "sample_dataset")
    config = TrainConfig(dataset=dataset, output_dir=str(tmp_path), output_name="sd15_model_input",
                         steps=4, rank=4, alpha=4.0, learning_rate=1e-3, resolution=64, batch_size=1, seed=0,
                         device="cpu", precision="fp32", target="attention", validation_dataset=dataset,
                         validate_every_n_steps=4)
    with torch.inference_mode():
        result = train(config, base=provider)
    assert result.steps_done == 4 and all(l == l for l in result.losses)
    (_, before), (_, after) = result.validation[0], result.validation[-1]
    assert after < before, result.validation  # 4 steps on random weights: a small but certain fall
    # trained in place: ComfyUI's own UNet modules, their weights once (frozen), the adapters beside them
    assert unet_modules <= {id(m) for m in provider.diffusion_model.modules()}
    frozen = [p for p in provider.diffusion_model.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == unet_numel

    lora, metadata = comfy_lib.utils.load_torch_file(result.path, safe_load=True, return_metadata=True)
    modules = {k.split(".")[0] for k in lora}
    assert modules == {provider.lora_name(t) for t in targets} and len(targets) % 8 == 0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules  # kohya's SD1 names
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"

    # the same inputs through the trained model and through a fresh load patched by ComfyUI's LoRA loader
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([2.0])
    cond = provider.encode_text(["red circle"])
    with torch.no_grad():
        trained = provider.forward(x, sigma, cond)
    provider.release()

    fresh_model, fresh_clip, _ = _load(comfy_lib, sd15_file)
    comfy_provider = comfy_tiny.apply_lora_file(comfy_lib, fresh_model, lora, fresh_clip)
    patched = comfy_provider.patcher
    assert len(patched.patches) == len(modules)
    with torch.no_grad():
        loaded = comfy_provider.forward(x, sigma, cond)
        plain = ComfyHost().base_model(model, clip, vae).forward(x, sigma, cond)  # the released model: as loaded
    diff = float((trained - loaded).abs().max())
    assert diff < 1e-5, diff
    assert float((trained - plain).abs().max()) > 100 * max(diff, 1e-7)
    sys.stderr.write(f"\n[comfy_model] sd1: {after / before:.3f}, {diff:.2e}, {len(patched.patches)}/{len(modules)}\n")


UNET_FAMILIES = {  # family -> (the tiny model in ComfyUI's own classes, a kohya name its file has, ss_base_model_version)
    "sdxl": (lambda tiny: tiny.sdxl_patcher(), "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
             "sdxl_base_v1-0"),  # kohya's SDXL names are the LDM paths
    "sd2": (lambda tiny: tiny.sd2_patcher(v_prediction=False),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "sd_v2"),
    "sd2-v": (lambda tiny: tiny.sd2_patcher(v_prediction=True),
              "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v", "sd_v2_v"),
}


@pytest.mark.parametrize("family", list(UNET_FAMILIES))
def test_unet_model_input_trains_in_its_parameterisation_and_round_trips(comfy_lib, tmp_path, family):
    """SDXL and SD2.x (eps and v) through the model input: ComfyUI's own model classes around a tiny UNet
    (comfy_tiny: comfy.supported_models.SDXL / SD20 and their BaseModels) train in their parameterisation (v
    for 768-v), SDXL with each sample's original size and crop in its ADM vector as kohya trains it; the file
    (kohya's names) loads back through ComfyUI's LoRA loader with every key and the trained model's output."""
    import comfy_tiny

    from comfyui_lora_trainer.nodes.host import ComfyHost
    from comfyui_lora_trainer.training.config import TrainConfig
    from comfyui_lora_trainer.training.loop import train

    make, name, version = UNET_FAMILIES[family]
    tiny = comfy_tiny.TinyModel(family, {}, {}, None, pooled=family == "sdxl")
    with torch.inference_mode():
        patcher = make(comfy_tiny)
    provider = ComfyHost().base_model(patcher, comfy_tiny.StandInClip(tiny), comfy_tiny.StandInVae(4))
    assert provider.family == family
    assert provider.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    targets = provider.adapter_targets("attention_ff")
    dataset = str(Path(__file__).resolve().parents[2] / "training" / "sample_dataset")
    config = TrainConfig(dataset=dataset, output_dir=str(tmp_path), output_name=f"{family}_model_input", steps=20,
                         rank=4, alpha=4.0, learning_rate=1e-2, resolution=64, batch_size=2, seed=0, device="cpu",
                         precision="fp32", target="attention_ff", validation_dataset=dataset,
                         validate_every_n_steps=20)
    with torch.inference_mode():
        result = train(config, base=provider)
    (_, before), (_, after) = result.validation[0], result.validation[-1]
    assert after < before, result.validation

    lora, metadata = comfy_lib.utils.load_torch_file(result.path, safe_load=True, return_metadata=True)
    modules = {k.split(".")[0] for k in lora}
    assert modules == {provider.lora_name(t) for t in targets} and name in modules
    assert metadata["ss_base_model_version"] == version

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([2.0])
    cond = provider.encode_text(["red circle"])
    sizes = torch.tensor([[64, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        trained = provider.forward(x, sigma, cond, sizes)
        other_size = provider.forward(x, sigma, cond, torch.tensor([[1024, 768, 32, 16, 64, 64]]))
    size_effect = float((trained - other_size).abs().max())
    assert (size_effect > 1e-4) == (family == "sdxl")  # the size conditioning reaches SDXL, and only SDXL
    provider.release()

    with torch.inference_mode():
        fresh = make(comfy_tiny)
    comfy_provider = comfy_tiny.apply_lora_file(comfy_lib, fresh, lora)
    patched = comfy_provider.patcher
    assert len(patched.patches) == len(modules)
    with torch.no_grad():
        loaded = comfy_provider.forward(x, sigma, cond, sizes)
    diff = float((trained - loaded).abs().max())
    assert diff < 1e-5, diff
    sys.stderr.write(f"\n[comfy_model] {family}: {after / before:.3f}, {diff:.2e}, "
                     f"{len(patched.patches)}/{len(modules)}\n")
