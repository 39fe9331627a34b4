"""Atomic save, overwrite refusal, sshs_* hashes, metadata (fast, CPU; no diffusers needed)."""

import hashlib
import json
import os
import struct
import time

import pytest
import torch
from safetensors import safe_open

from comfyui_lora_trainer.training.formats import (
    LoraWeights,
    RunInfo,
    cleanup_stale_temp_files,
    load_lora_file,
    make_metadata,
    save_lora_file,
)
from comfyui_lora_trainer.training.formats import safetensors_io


def _weights(big=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_in = 768 if big else 16
    t = {}
    for i in range(8 if big else 2):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_q"
        t[name + ".lora_down.weight"] = torch.randn(32, n_in, generator=g)
        t[name + ".lora_up.weight"] = torch.randn(n_in, 32, generator=g)
        t[name + ".alpha"] = torch.tensor(16.0)
    md = make_metadata(RunInfo(family="sd1", network_dim=32, network_alpha=16, output_name="x",
                               trigger_words=["sks dog"], tag_frequency={"img": {"dog": 3}}))
    return LoraWeights(t, md, "sd1")


def _rehash(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    model = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model, legacy


@pytest.mark.parametrize("big", [False, True])
def test_hashes_match_rehash_of_written_file(tmp_path, big):
    p = save_lora_file(tmp_path / "l.safetensors", _weights(big))
    if big:
        assert os.path.getsize(p) > 0x100000 + 0x10000
    with safe_open(p, "pt") as f:
        md = f.metadata()
    model, legacy = _rehash(p)
    assert md["sshs_model_hash"] == model
    assert md["sshs_legacy_hash"] == legacy
    assert model != hashlib.sha256(b"").hexdigest()
    assert safetensors_io.model_hash_of_file(p) == model
    assert safetensors_io.legacy_hash_of_file(p) == legacy


def test_hashes_with_dtype_cast_and_huge_header(tmp_path):
    w = _weights(big=True)
    # a header bigger than 1 MiB (e.g. an enormous tag list) puts the legacy window inside the header
    w.metadata["ss_tag_frequency"] = json.dumps({"d": {f"tag{i}": i for i in range(120000)}})
    p = save_lora_file(tmp_path / "h.safetensors", w, dtype="fp16")
    n = struct.unpack("<Q", open(p, "rb").read(8))[0]
    assert n > 0x100000
    with safe_open(p, "pt") as f:
        md = f.metadata()
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("lora_up.weight"))).dtype == torch.float16
        assert f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha"))).dtype == torch.float32
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == _rehash(p)


def test_stale_hash_values_are_replaced(tmp_path):
    w = _weights()
    w.metadata["sshs_model_hash"] = "f" * 64
    w.metadata["sshs_legacy_hash"] = "ffffffff"
    p = save_lora_file(tmp_path / "l.safetensors", w)
    md = load_lora_file(p).metadata
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == _rehash(p)


def test_refuses_overwrite_unless_asked(tmp_path):
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError) as ei:
        save_lora_file(target, _weights())
    msg = str(ei.value)
    assert "mine.safetensors" in msg and "another name" in msg and "overwrite" in msg
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["mine.safetensors"]
    save_lora_file(target, _weights(), overwrite=True)
    assert load_lora_file(target).family == "sd1"
    assert os.listdir(tmp_path) == ["mine.safetensors"]


def test_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "a.safetensors"

    def boom(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors_io.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_lora_file(target, _weights())
    assert os.listdir(tmp_path) == []  # neither the target nor a temp file


def test_atomic_overwrite_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.safetensors"
    save_lora_file(target, _weights(seed=1))
    before = target.read_bytes()

    def boom(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(safetensors_io.os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        save_lora_file(target, _weights(seed=2), overwrite=True)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_cleanup_stale_temp_files(tmp_path):
    stale = tmp_path / ".a.safetensors.tmp-0123456789abcdef"
    fresh = tmp_path / ".b.safetensors.tmp-fedcba9876543210"
    other = tmp_path / ".c.safetensors.tmp-notours"
    for p in (stale, fresh, other):
        p.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    removed = cleanup_stale_temp_files(tmp_path)
    assert removed == [str(stale)]
    assert fresh.exists() and other.exists()
    assert cleanup_stale_temp_files(tmp_path, min_age_s=0) == [str(fresh)]
    assert cleanup_stale_temp_files(tmp_path / "missing") == []


def test_make_metadata_strings_and_keys():
    info = RunInfo(
        family="sdxl", network_dim=8, network_alpha=4, network_args={"conv_dim": 4, "conv_alpha": 1},
        base_model_name="sd_xl_base_1.0.safetensors", base_model_hash="ab" * 32, resolution=(1024, 768),
        steps=100, epoch=2, max_train_steps=100, num_train_images=40,
        dataset_dirs={"imgs": {"n_repeats": 10, "img_count": 4}}, tag_frequency={"imgs": {"sks": 4}},
        output_name="mylora", learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5,
        optimizer="torch.optim.AdamW", optimizer_args={"weight_decay": 0.01}, lr_scheduler="constant",
        seed=42, training_started_at=1700000000.0, training_finished_at=1700000600.0,
        mixed_precision="bf16", max_grad_norm=1.0, gradient_accumulation_steps=1, total_batch_size=2,
        session_id=7, trigger_words=["sks", "photo of sks"], extra={"ss_custom": {"a": 1}},
    )
    md = make_metadata(info)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    expect = {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
        "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors", "ss_new_sd_model_hash": "ab" * 32,
        "ss_resolution": "(1024, 768)", "ss_steps": "100", "ss_epoch": "2", "ss_max_train_steps": "100",
        "ss_num_train_images": "40", "ss_output_name": "mylora", "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "5e-05",
        "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)", "ss_lr_scheduler": "constant",
        "ss_seed": "42", "ss_training_started_at": "1700000000.0", "ss_training_finished_at": "1700000600.0",
        "ss_mixed_precision": "bf16", "ss_max_grad_norm": "1.0", "ss_gradient_accumulation_steps": "1",
        "ss_total_batch_size": "2", "ss_session_id": "7",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "mylora", "modelspec.resolution": "1024x768",
        "modelspec.date": "2023-11-14T22:23:20+00:00", "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": "sks, photo of sks",
    }
    for k, v in expect.items():
        assert md[k] == v, k
    assert json.loads(md["ss_network_args"]) == {"conv_dim": 4, "conv_alpha": 1}
    assert json.loads(md["ss_tag_frequency"]) == {"imgs": {"sks": 4}}
    assert json.loads(md["ss_dataset_dirs"]) == {"imgs": {"n_repeats": 10, "img_count": 4}}
    assert json.loads(md["ss_custom"]) == {"a": 1}
    assert "sshs_model_hash" not in md


@pytest.mark.parametrize("family,bmv,v2,arch,res,pred", [
    ("sd1", "sd_v1", "False", "stable-diffusion-v1/lora", "512x512", "epsilon"),
    ("sd2", "sd_v2", "True", "stable-diffusion-v2-512/lora", "512x512", "epsilon"),
    ("sd2-v", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "768x768", "v"),
])
def test_make_metadata_families(family, bmv, v2, arch, res, pred):
    md = make_metadata(RunInfo(family=family))
    assert md["ss_base_model_version"] == bmv and md["ss_v2"] == v2
    assert md["modelspec.architecture"] == arch and md["modelspec.resolution"] == res
    assert md["modelspec.prediction_type"] == pred and md["modelspec.implementation"] == "diffusers"
    assert "ss_steps" not in md  # unknown fields are left out
    with pytest.raises(ValueError, match="family"):
        make_metadata(RunInfo(family="flux"))


def test_metadata_roundtrip_and_family_detection(tmp_path):
    w = _weights()
    w.metadata = make_metadata(RunInfo(family="sd2-v"))
    back = load_lora_file(save_lora_file(tmp_path / "v.safetensors", w))
    assert back.family == "sd2-v"
    for k, v in w.metadata.items():
        assert back.metadata[k] == v
