"""Latent caches (memory, disk) keyed by content/model/size/crop: a second run skips the VAE. Text cache."""

import os

import pytest
import torch
from PIL import Image

from comfyui_lora_trainer.training import cache as cache_mod
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import build_tiny_components


def make_dataset(folder, n=3):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (80, 72), (60 * i, 30, 200 - 50 * i)).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(f"picture {i}, red, round, small")
    return str(folder)


def cfg(dataset, **over):
    values = dict(checkpoint="tiny", dataset=dataset, output_dir="", steps=2, rank=2, alpha=2.0,
                  learning_rate=1e-3, resolution=64, batch_size=2, seed=1, device="cpu")
    values.update(over)
    return TrainConfig(**values)


def base_without_vae_encode():
    base = build_tiny_components("sd1", seed=0)

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE was called although every latent was cached")

    base.vae.encode = refuse
    return base


def test_disk_cache_hit_on_second_run(tmp_path):
    cache_mod.clear_memory_cache()
    data = make_dataset(tmp_path / "data")
    cache_dir = str(tmp_path / "cache")
    first = train(cfg(data, cache_latents="disk", cache_dir=cache_dir), base=build_tiny_components("sd1", seed=0))
    assert first.stats["vae_calls"] == 3
    assert len([f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]) == 3
    cache_mod.clear_memory_cache()  # a new process: only the disk cache is left
    second = train(cfg(data, cache_latents="disk", cache_dir=cache_dir), base=base_without_vae_encode())
    assert second.stats["vae_calls"] == 0 and second.stats["latent_cache_hits"] == 3
    assert second.losses == first.losses  # the cached distribution gives the same latents
    # the key follows image content and training size: a changed image is encoded again, alone
    Image.new("RGB", (80, 72), (1, 2, 3)).save(os.path.join(data, "1.png"))
    cache_mod.clear_memory_cache()
    third = train(cfg(data, cache_latents="disk", cache_dir=cache_dir), base=build_tiny_components("sd1", seed=0))
    assert third.stats["vae_calls"] == 1 and third.stats["latent_cache_hits"] == 2
    cache_mod.clear_memory_cache()
    bigger = train(cfg(data, cache_latents="disk", cache_dir=cache_dir, resolution=80),
                   base=build_tiny_components("sd1", seed=0))
    assert bigger.stats["vae_calls"] == 3


def test_memory_cache_hit_and_model_key(tmp_path):
    cache_mod.clear_memory_cache()
    data = make_dataset(tmp_path / "data")
    train(cfg(data), base=build_tiny_components("sd1", seed=0))
    second = train(cfg(data), base=base_without_vae_encode())
    assert second.stats["vae_calls"] == 0 and second.stats["latent_cache_hits"] == 3
    assert not os.path.exists(os.path.join(data, ".lora_trainer_cache"))  # memory mode writes nothing
    other_vae = train(cfg(data), base=build_tiny_components("sd1", seed=1))  # other weights, other key
    assert other_vae.stats["vae_calls"] == 3


def test_no_cache_encodes_every_sample(tmp_path):
    data = make_dataset(tmp_path / "data")
    result = train(cfg(data, cache_latents="none", steps=3), base=build_tiny_components("sd1", seed=0))
    assert result.stats["vae_calls"] == 6


def test_text_embeddings_cached_when_encoders_frozen(tmp_path):
    data = make_dataset(tmp_path / "data")
    calls = {}
    for steps in (1, 4):
        base = build_tiny_components("sd1", seed=0)
        counter = {"n": 0}
        te = base.text_encoders[0]
        original = te.forward

        def counted(*args, _orig=original, _c=counter, **kwargs):
            _c["n"] += 1
            return _orig(*args, **kwargs)

        te.forward = counted
        train(cfg(data, steps=steps), base=base)
        calls[steps] = counter["n"]
    assert calls[1] == calls[4] == 3  # once per caption, before training
    shuffled = train(cfg(data, steps=4, shuffle_caption=True, caption_dropout_rate=0.5),
                     base=build_tiny_components("sd1", seed=0))
    assert shuffled.stats["text_encoder_calls"] >= 2  # captions vary: encoded during training, not up front
    trained_te = train(cfg(data, steps=3, train_text_encoder=True), base=build_tiny_components("sd1", seed=0))
    assert trained_te.stats["text_encoder_calls"] == 3  # one per micro-batch, with gradients
