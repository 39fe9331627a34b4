"""The Training Options node in a real ComfyUI: listed with its widgets, chained into Train LoRA it
changes the trained file, and a bad value fails at the Options node naming the setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import comfy_server as cs

SAMPLE = Path(__file__).resolve().parents[2] / "training" / "sample_dataset"
OPTIONS_NODE = "LoraTrainer_TrainingOptions"


@pytest.fixture(scope="module")
def tiny_sd1(comfy_base_dir):
    from comfyui_lora_trainer.training.models import write_tiny_checkpoint

    name = "tiny-sd1-options.safetensors"
    write_tiny_checkpoint(str(comfy_base_dir / "models" / "checkpoints" / name), family="sd1", seed=0)
    shutil.copytree(SAMPLE, comfy_base_dir / "input" / "shapes", dirs_exist_ok=True)
    return name


def graph(checkpoint, output_name, first: dict, second: dict | None = None):
    nodes = {
        "1": {"class_type": "LoraTrainer_LoadDataset", "inputs": {"folder": "shapes", "resolution": 64}},
        "3": {"class_type": OPTIONS_NODE, "inputs": dict(first)},
        "2": {"class_type": "LoraTrainer_TrainLoRA", "inputs": {
            "checkpoint": checkpoint, "dataset": ["1", 0], "steps": 2, "learning_rate": 1e-3, "rank": 4,
            "alpha": 4.0, "resolution": 64, "batch_size": 1, "seed": 3, "output_name": output_name,
            "precision": "fp32", "options": ["4" if second is not None else "3", 0]}},
    }
    if second is not None:
        nodes["4"] = {"class_type": OPTIONS_NODE, "inputs": {**second, "options": ["3", 0]}}
    return nodes


def test_options_node_is_listed_with_its_widgets(comfy):
    info = comfy.node_info(OPTIONS_NODE)
    assert info["display_name"] == "Training Options (LoRA Trainer)"
    assert info["output"] == ["LORATRAINER_OPTIONS"]
    optional = info["input"]["optional"]
    assert optional["options"][0] == "LORATRAINER_OPTIONS"
    assert optional["adapter"][1]["options"] == ["lora", "loha", "lokr", "dora"]
    assert optional["network_weights"][1]["options"][0] == "none"
    assert optional["keep_tokens"][0] == "INT" and optional["zero_terminal_snr"][0] == "BOOLEAN"
    train = comfy.node_info("LoraTrainer_TrainLoRA")["input"]["optional"]
    assert train["options"][0] == "LORATRAINER_OPTIONS"


def test_chained_options_change_the_trained_lora(comfy, comfy_base_dir, tiny_sd1):
    loras = comfy_base_dir / "models" / "loras"
    comfy.run(graph(tiny_sd1, "it_opt_loha", {"adapter": "loha", "loss_type": "l1"}, {"loss_type": "huber"}),
              timeout=600)
    header = (loras / "it_opt_loha.safetensors").read_bytes()[:200_000]
    assert b"hada_w1_a" in header and b"lora_down" not in header
    # the file just written is offered to continue from
    listed = comfy.node_info(OPTIONS_NODE)["input"]["optional"]["network_weights"][1]["options"]
    assert "it_opt_loha.safetensors" in listed


def test_bad_option_fails_naming_the_setting(comfy, tiny_sd1):
    with pytest.raises(cs.ExecutionFailed) as info:
        comfy.run(graph(tiny_sd1, "it_opt_bad", {"min_bucket_reso": 2048, "max_bucket_reso": 1024}), timeout=120)
    message = str(info.value)
    assert "LoraTrainer_TrainingOptions (node 3)" in message and "min_bucket_reso = 2048" in message
