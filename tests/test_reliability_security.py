"""Issue 7, security: output names cannot leave models/loras, the dataset folder must lie inside the
input directory, the HTTP routes serve nothing but run records, and the same seed gives a bitwise
identical LoRA on the CPU."""

import os
import shutil
import struct

import pytest
import torch

from comfyui_lora_trainer.nodes.dataset import LoadDataset, resolve_folder
from comfyui_lora_trainer.nodes.merge import MergeLoRAs
from comfyui_lora_trainer.nodes.spec import NodeError
from comfyui_lora_trainer.nodes.train import TrainLoRA
from comfyui_lora_trainer.training.config import ConfigError, TrainConfig, output_name_problem
from comfyui_lora_trainer.training.formats import LoraWeights
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import tiny_tokenizer_dir


SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")

BAD_NAMES = [
    "..", ".", "../escape", "../../etc/cron.d/x", "/tmp/abs", "/abs/path", "sub/dir", "a\\b", "..\\..\\win",
    "C:evil", "c:\\x", "nul\x00byte", "tab\tname", "CON", "con", "prn.txt", "AUX", "NUL", "COM1", "lpt9",
    "trailing.", " lead", "trail ", "", "   ", "x" * 300,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_output_name_problem_refuses(name):
    assert output_name_problem(name) is not None


@pytest.mark.parametrize("name", ["my_lora", "sks dog v2", "étoile", "a.b-c_d", "x" * 150])
def test_plain_names_are_accepted(name):
    assert output_name_problem(name) is None


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs_lora", "a/../../b", "nul\x00", "CON", "..", "COM3.safetensors"])
def test_train_node_refuses_names_that_leave_models_loras(host, tmp_path, name):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    before = tree(tmp_path)
    with pytest.raises(NodeError, match="output_name"):
        TrainLoRA.execute(host, checkpoint="tiny.safetensors", dataset=dataset, steps=1, learning_rate=1e-3, rank=2,
                          alpha=2.0, resolution=64, batch_size=1, seed=0, output_name=name, precision="fp32")
    assert tree(tmp_path) == before and not os.path.exists("/tmp/abs_lora.safetensors")


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs_merge", "x/y", "lpt1", "a\x00b"])
def test_merge_node_refuses_save_names_that_leave_models_loras(host, tmp_path, name):
    lora = LoraWeights({"lora_unet_a.lora_down.weight": torch.ones(2, 8), "lora_unet_a.lora_up.weight": torch.ones(8, 2),
                        "lora_unet_a.alpha": torch.tensor(2.0)}, {}, "sd1")
    before = tree(tmp_path)
    with pytest.raises(NodeError, match="save_name"):
        MergeLoRAs.execute(host, lora_1=lora, weight_1=1.0, lora_2=lora, weight_2=1.0, save_name=name)
    assert tree(tmp_path) == before and not os.path.exists("/tmp/abs_merge.safetensors")


def test_config_refuses_escaping_names_before_anything_runs(tmp_path):
    config = TrainConfig(checkpoint="x", dataset="y", output_dir=str(tmp_path), output_name="../up")
    with pytest.raises(ConfigError, match="output_name"):
        train(config)


def test_dataset_folder_must_lie_inside_the_input_directory(host, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(SAMPLE, outside)
    os.symlink(outside, os.path.join(host.input_directory(), "sneaky"))  # a link out of input/
    for folder in ("../models", "..", "/etc", str(outside), "sneaky", "shapes/../../models", "shapes/../sneaky"):
        with pytest.raises(NodeError, match="inside ComfyUI's input directory"):
            resolve_folder(host, folder)
        assert isinstance(LoadDataset.fingerprint(host, folder=folder), str)  # never raises, never reads it
    assert resolve_folder(host, "shapes") == os.path.realpath(os.path.join(host.input_directory(), "shapes"))


def test_run_record_ids_are_validated():
    from comfyui_lora_trainer.nodes.runs import RunRegistry, valid_run_id

    registry = RunRegistry()
    record = registry.start("1", "p", 10, "name")
    assert registry.get(record.run_id)["run_id"] == record.run_id
    for bad in ("../../etc/passwd", "..%2f..%2fetc", record.run_id.upper(), record.run_id + "0", "", None, 123,
                record.run_id[:-1] + "/", "0" * 31):
        assert not valid_run_id(bad)
        assert registry.get(bad) is None
    # a record holds only what the node put there: no paths beyond file names, no file contents
    registry.add_file(record.run_id, {"kind": "saved", "path": "name.safetensors", "step": 10})
    assert registry.get(record.run_id)["files"] == [{"kind": "saved", "path": "name.safetensors", "step": 10}]


def tensor_bytes(path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


def test_same_seed_and_data_give_a_bitwise_identical_lora_file_on_the_cpu(tmp_path, host):
    checkpoint = host.checkpoint_path("tiny.safetensors")
    results = []
    for run in ("a", "b"):
        config = TrainConfig(checkpoint=checkpoint, tokenizer=tiny_tokenizer_dir(), dataset=SAMPLE,
                             output_dir=str(tmp_path / run), output_name="same", steps=3, rank=2, alpha=2.0,
                             learning_rate=1e-3, resolution=64, batch_size=2, seed=11, device="cpu")
        results.append(train(config))
    a, b = (tensor_bytes(r.path) for r in results)
    assert a == b and len(a) > 0  # every tensor byte of the two files
    from safetensors import safe_open

    hashes = []
    for r in results:
        with safe_open(r.path, "pt") as f:
            hashes.append(f.metadata()["sshs_model_hash"])
    assert hashes[0] == hashes[1]
    assert results[0].losses == results[1].losses
