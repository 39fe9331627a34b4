import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from comfyui_lora_trainer.training.cli import main
from comfyui_lora_trainer.training.lora_cli import parse_weighted
from comfyui_lora_trainer.training.models import tiny_tokenizer_dir, write_tiny_checkpoint

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "comfyui_lora_trainer", "--help"], capture_output=True, text=True, cwd="/", check=True
    ).stdout
    for command in ("demo", "train", "merge"):
        assert command in out


def test_parse_weighted():
    assert parse_weighted("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_weighted("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert parse_weighted("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_weighted("C:model.safetensors") == ("C:model.safetensors", 1.0)


def test_train_from_toml_then_merge(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(str(tmp_path / "tiny.safetensors"), family="sd1", seed=0)
    config = tmp_path / "run.toml"
    config.write_text(
        f'checkpoint = "tiny.safetensors"\ntokenizer = "{tiny_tokenizer_dir()}"\ndataset = "{SAMPLE}"\n'
        'output_dir = "out"\noutput_name = "cli"\nsteps = 4\nrank = 2\nalpha = 2\nlearning_rate = 1e-3\n'
        "resolution = 64\nbatch_size = 2\nseed = 5\ndevice = \"cpu\"\n"
    )
    assert main(["train", str(config)]) == 0
    path = tmp_path / "out" / "cli.safetensors"
    assert path.is_file()
    assert main(["train", str(config)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "output_name='cli2'", "--set", "rank=3"]) == 0
    with safe_open(str(tmp_path / "out" / "cli2.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "3"
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--out", str(merged), f"{path}:0.5", str(tmp_path / "out" / "cli2.safetensors")]) == 0
    with safe_open(str(merged), "pt") as f:
        down = next(k for k in f.keys() if k.endswith("lora_down.weight"))
        assert f.get_tensor(down).shape[0] == 5


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('checkpoint = "x"\ndataset = "y"\nlearning_rat = 1\n')
    assert main(["train", str(config)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert os.path.isfile(tmp_path / "demo_lora.safetensors")
    assert os.path.isfile(tmp_path / "demo_lora_loss.png")
    assert "wrote" in out
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0  # never overwrites: picks a free name
    assert os.path.isfile(tmp_path / "demo_lora_1.safetensors")
