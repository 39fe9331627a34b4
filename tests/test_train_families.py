"""The three families train end to end from checkpoints on disk; detection; unsupported families; learning."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import (
    UnsupportedModelError, build_tiny_components, load_base_model, tiny_tokenizer_dir, write_tiny_checkpoint,
)

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def cfg(checkpoint, out, **over):
    values = dict(checkpoint=checkpoint, tokenizer=tiny_tokenizer_dir(), dataset=SAMPLE, output_dir=str(out),
                  output_name="fam", steps=3, rank=2, alpha=2.0, learning_rate=1e-3, resolution=64, batch_size=2,
                  seed=2, device="cpu", target="attention_ff", train_text_encoder=True)
    values.update(over)
    return TrainConfig(**values)


@pytest.mark.parametrize("family,version,prediction", [
    ("sd1", "sd_v1", "epsilon"), ("sd2", "sd_v2", "epsilon"), ("sd2-v", "sd_v2", "v_prediction"),
    ("sdxl", "sdxl_base_v1-0", "epsilon"),
])
def test_family_detected_and_trained_end_to_end(tmp_path, family, version, prediction):
    ckpt = write_tiny_checkpoint(str(tmp_path / f"{family}.safetensors"), family=family, seed=0)
    base = load_base_model(ckpt, tiny_tokenizer_dir())
    assert base.family == family and base.prediction_type == prediction
    events = []
    result = train(cfg(ckpt, tmp_path / "out"), events=events.append)
    assert any(f"model family {family}," in e.get("message", "") for e in events)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    with safe_open(result.path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert meta["ss_base_model_version"].startswith(version)
    if family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
        assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    else:
        assert any(k.startswith("lora_unet_down_blocks_") for k in keys)
        assert any(k.startswith("lora_te_text_model_") for k in keys)


def test_unsupported_family_is_named(tmp_path):
    path = str(tmp_path / "sd3.safetensors")
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UnsupportedModelError, match="SD3"):
        train(cfg(path, tmp_path / "out"))


def test_diffusers_folder_is_accepted(tmp_path):
    base = build_tiny_components("sd1", seed=0)
    folder = tmp_path / "diffusers"
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoders[0].save_pretrained(folder / "text_encoder")
    base.tokenizers[0].save_pretrained(folder / "tokenizer")
    base.noise_scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    result = train(cfg(str(folder), tmp_path / "out", steps=2))
    assert os.path.isfile(result.path)


def denoising_loss(base, latents, hidden, noise, timesteps):
    with torch.no_grad():
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = base.unet(noisy, timesteps, hidden).sample
        return torch.nn.functional.mse_loss(pred, noise).item()


@pytest.mark.slow
def test_training_lowers_the_denoising_loss_by_30_percent():
    """200 steps on the sample dataset: training-set loss at fixed noise/timesteps falls >= 30%."""
    from comfyui_lora_trainer.training.cache import encode_distribution
    from comfyui_lora_trainer.training.dataset import image_to_tensor, load_dataset, load_image, resize_and_crop
    from comfyui_lora_trainer.training.models import encode_prompts

    base = build_tiny_components("sd1", seed=0)
    config = TrainConfig(checkpoint="tiny", dataset=SAMPLE, output_dir="", steps=200, rank=8, alpha=8.0,
                         learning_rate=3e-3, resolution=64, batch_size=2, seed=0, device="cpu", flip=False,
                         target="attention_ff", trigger_word="shapetoy")
    dataset = load_dataset(SAMPLE)
    pixels = torch.stack([image_to_tensor(resize_and_crop(load_image(i.image_path), 64, 64)[0]) for i in dataset.items])
    latents, _ = encode_distribution(base, pixels)
    with torch.no_grad():
        hidden = encode_prompts(base, [i.caption for i in dataset.items]).encoder_hidden_states
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=g)
    before = denoising_loss(base, latents, hidden, noise, timesteps)
    train(config, base=base)
    base.unet.eval()
    after = denoising_loss(base, latents, hidden, noise, timesteps)
    assert after <= 0.7 * before, (before, after)
