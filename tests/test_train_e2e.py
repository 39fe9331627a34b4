"""End to end on the tiny SD1.x model: train, check the file, and load it with diffusers."""

import copy
import json
import os
import struct
import hashlib

import pytest
import torch
from safetensors import safe_open

from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import load_base_model, tiny_tokenizer_dir, write_tiny_checkpoint

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny_sd1.safetensors"), family="sd1", seed=0)


def config_for(checkpoint, out_dir, **over):
    values = dict(
        checkpoint=checkpoint, tokenizer=tiny_tokenizer_dir(), dataset=SAMPLE, output_dir=str(out_dir),
        output_name="e2e", steps=60, rank=4, alpha=8.0, learning_rate=2e-3, resolution=64, batch_size=4,
        seed=3, device="cpu",
    )
    values.update(over)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = train(config_for(checkpoint, out))
    return result


def test_file_has_kohya_keys_alphas_and_metadata(trained):
    assert trained.path and os.path.isfile(trained.path)
    with safe_open(trained.path, "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert modules, "no modules exported"
    for m in modules:
        assert m.startswith("lora_unet_") and ("_attn1_" in m or "_attn2_" in m)
        down, up, alpha = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"], tensors[f"{m}.alpha"]
        assert down.shape[0] == 4 and up.shape[1] == 4
        assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == 8.0
    assert len(keys) == 3 * len(modules)
    # every attention projection of every transformer block: to_q, to_k, to_v, to_out_0 in attn1 and attn2
    suffixes = {m.split("_attn")[1][2:] for m in modules}
    assert suffixes == {"to_q", "to_k", "to_v", "to_out_0"}, suffixes
    assert sum(m.endswith("attn1_to_q") for m in modules) == sum(m.endswith("attn2_to_out_0") for m in modules)
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 8.0
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_output_name"] == "e2e" and metadata["ss_steps"] == "60"
    assert json.loads(metadata["ss_dataset_dirs"])
    # the header's hash is the sha256 of the tensor data actually written
    with open(trained.path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()


def test_loss_fell(trained):
    losses = trained.losses
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)


def kohya_name(path):
    return "lora_unet_" + path.replace(".", "_")


def test_diffusers_load_lora_weights_matches_manual_merge(trained, checkpoint):
    from diffusers import StableDiffusionPipeline

    base = load_base_model(checkpoint, tiny_tokenizer_dir())
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
        scheduler=base.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    manual = copy.deepcopy(base.unet)
    with safe_open(trained.path, "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    patched = 0
    for path, module in manual.named_modules():
        name = kohya_name(path)
        if f"{name}.lora_down.weight" in lora:
            down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
            scale = lora[f"{name}.alpha"].item() / down.shape[0]
            with torch.no_grad():
                module.weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            patched += 1
    assert patched * 3 == len(lora)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, base.unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        before = base.unet(sample, t, context).sample
        pipe.load_lora_weights(trained.path)
        after = pipe.unet(sample, t, context).sample
        expected = manual(sample, t, context).sample
    assert (after - before).abs().max() > 1e-4, "the LoRA changed nothing"
    relative = (after - expected).norm() / expected.norm()
    assert relative < 1e-5, relative


def test_same_seed_same_lora_bitwise(checkpoint, tmp_path):
    a = train(config_for(checkpoint, tmp_path / "a", steps=5))
    b = train(config_for(checkpoint, tmp_path / "b", steps=5))
    c = train(config_for(checkpoint, tmp_path / "c", steps=5, seed=4))
    assert a.lora.tensors.keys() == b.lora.tensors.keys()
    assert all(torch.equal(a.lora.tensors[k], b.lora.tensors[k]) for k in a.lora.tensors)
    assert a.losses == b.losses
    assert any(not torch.equal(a.lora.tensors[k], c.lora.tensors[k]) for k in a.lora.tensors)


def test_gradient_accumulation_and_refusal_to_overwrite(checkpoint, tmp_path):
    # batch 4 in one step == batch 2 accumulated over 2 micro-steps (same samples, same noise)
    a = train(config_for(checkpoint, tmp_path / "a", steps=3, batch_size=4, max_grad_norm=0))
    b = train(config_for(checkpoint, tmp_path / "b", steps=3, batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0))
    for k in a.lora.tensors:
        torch.testing.assert_close(a.lora.tensors[k], b.lora.tensors[k], rtol=1e-3, atol=2e-5)
    with pytest.raises(FileExistsError, match="already exists"):
        train(config_for(checkpoint, tmp_path / "a", steps=3))
    assert os.listdir(tmp_path / "a") == ["e2e.safetensors"]  # nothing else written, no temp file left


def test_bf16_runs(checkpoint, tmp_path):
    result = train(config_for(checkpoint, tmp_path, steps=3, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(v.dtype == torch.float32 for v in result.lora.tensors.values())
