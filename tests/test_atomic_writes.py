"""One atomic writer (training/formats/safetensors_io.py ``write_atomically`` / ``publish_atomically``) serves
every file the package writes in place of a user's file: LoRA files, merge-into checkpoints, checkpoints
(``write_checkpoint``) and bench results. Each writer is checked to go through it (a publish failure
injected into the helper's ``os`` leaves the old file and no temp file), and the no-clobber publish keeps
working on a file system without hard links."""

import errno
import json
import os
import sys

import pytest
import torch

from comfyui_lora_trainer.training.adapters import add_adapter
from comfyui_lora_trainer.training.formats import LoraWeights, load_lora_file, save_lora_file
from comfyui_lora_trainer.training.formats import safetensors_io
from comfyui_lora_trainer.training.formats.safetensors_io import publish_atomically, write_atomically


def _lora(seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return LoraWeights({"lora_unet_a.lora_down.weight": torch.randn(2, size, generator=g),
                        "lora_unet_a.lora_up.weight": torch.randn(size, 2, generator=g),
                        "lora_unet_a.alpha": torch.tensor(2.0)}, {}, "sd1")


def _patched_os(monkeypatch, **funcs):
    """safetensors_io sees an ``os`` whose named functions are replaced; the rest of the process is untouched."""
    patched = type(sys)("os_patched")
    patched.__dict__.update(os.__dict__)
    patched.__dict__.update(funcs)
    monkeypatch.setattr(safetensors_io, "os", patched)


def _no_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted (no hard links here)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from comfyui_lora_trainer.training.models import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"), family="sd1", seed=0)


def _merge_into(checkpoint, out, overwrite=False):
    from comfyui_lora_trainer.training.lora_tools import merge_into_checkpoint
    from comfyui_lora_trainer.training.models import load_base_model, tiny_tokenizer_dir
    from comfyui_lora_trainer.training.formats import export_kohya
    from peft import LoraConfig

    base = load_base_model(checkpoint, tiny_tokenizer_dir())
    torch.manual_seed(0)
    add_adapter(base.unet.requires_grad_(False), LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"],
                                                           init_lora_weights=False))
    lora = LoraWeights(export_kohya("sd1", unet=base.unet).tensors, {}, "sd1")
    return merge_into_checkpoint(checkpoint, [(lora, 1.0)], out, overwrite=overwrite)


def _write_checkpoint(path, overwrite=True):
    from comfyui_lora_trainer.training.models import build_tiny_components, write_checkpoint

    write_checkpoint(build_tiny_components("sd1", seed=0), path, overwrite=overwrite)


def _bench(directory):
    from comfyui_lora_trainer.bench.run import write_results

    return write_results([{"name": "x", "skipped": "test"}], str(directory))


def test_publish_without_hard_links_still_refuses_to_clobber(tmp_path, monkeypatch):
    _patched_os(monkeypatch, link=_no_links)
    target = tmp_path / "a.safetensors"
    save_lora_file(target, _lora(1))  # falls back to a checked rename
    assert load_lora_file(target).tensors["lora_unet_a.alpha"].item() == 2.0
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="a.safetensors.*already exists"):
        save_lora_file(target, _lora(2))
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]
    save_lora_file(target, _lora(2), overwrite=True)
    assert target.read_bytes() != before and os.listdir(tmp_path) == ["a.safetensors"]


def test_publish_with_hard_links_is_no_clobber_even_if_the_name_appears_late(tmp_path):
    tmp = tmp_path / ".late.tmp"
    tmp.write_bytes(b"new")
    target = tmp_path / "late.bin"
    target.write_bytes(b"someone else's")  # appeared after any exists() check a caller made
    with pytest.raises(FileExistsError):
        publish_atomically(str(tmp), str(target))
    assert target.read_bytes() == b"someone else's"
    publish_atomically(str(tmp), str(target), overwrite=True)
    assert target.read_bytes() == b"new" and not tmp.exists()


def test_a_failing_writer_leaves_nothing(tmp_path):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "x.bin", write)
    assert os.listdir(tmp_path) == []


def test_merge_into_goes_through_the_helper(tmp_path, monkeypatch, checkpoint):
    out = tmp_path / "merged.safetensors"
    _patched_os(monkeypatch, link=_no_links)
    _merge_into(checkpoint, out)  # no hard links: the fallback publishes
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="merged.safetensors already exists"):
        _merge_into(checkpoint, out)
    monkeypatch.undo()
    with pytest.raises(FileExistsError):  # with hard links: refused too (link() fails on the name)
        _merge_into(checkpoint, out)

    def broken(src, dst):
        raise OSError(errno.EIO, "rename failed (simulated)")

    _patched_os(monkeypatch, replace=broken)
    with pytest.raises(OSError, match="rename failed"):
        _merge_into(checkpoint, out, overwrite=True)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["merged.safetensors"]


def test_write_checkpoint_goes_through_the_helper(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    _write_checkpoint(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        _write_checkpoint(path, overwrite=False)

    def broken(src, dst):
        raise OSError(errno.EIO, "rename failed (simulated)")

    _patched_os(monkeypatch, replace=broken)
    with pytest.raises(OSError, match="rename failed"):
        _write_checkpoint(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_bench_results_go_through_the_helper(tmp_path, monkeypatch):
    path = _bench(tmp_path)
    assert json.loads(open(path).read())["results"][0]["name"] == "x"

    def broken(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    _patched_os(monkeypatch, fsync=broken)
    with pytest.raises(OSError, match="No space left"):
        _bench(tmp_path / "other")
    assert os.listdir(tmp_path / "other") == []  # no half-written result, no temp file
