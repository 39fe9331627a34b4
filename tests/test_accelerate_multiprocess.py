"""Two CPU processes under ``accelerate launch`` (gloo): identical adapters on both ranks, equal to a
one-process run over the same global batch (noise and timesteps are drawn per sample, not per process)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import tiny_tokenizer_dir, write_tiny_checkpoint

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")
WORKER = os.path.join(os.path.dirname(__file__), "accelerate_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path):
    ckpt = write_tiny_checkpoint(str(tmp_path / "tiny.safetensors"), family="sd1", seed=0)
    common = dict(steps=3, rank=2, alpha=2.0, learning_rate=2e-3, resolution=64, seed=4, device="cpu",
                  train_text_encoder=True, shuffle_caption=True, max_grad_norm=1.0)
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'checkpoint = "{ckpt}"\ntokenizer = "{tiny_tokenizer_dir()}"\ndataset = "{os.path.abspath(SAMPLE)}"\n'
        f'output_dir = "{tmp_path / "multi"}"\noutput_name = "ddp"\nbatch_size = 2\n'
        + "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}\n"
                  for k, v in common.items())
    )
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), WORKER, str(toml), str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes 2" in proc.stdout  # the run's log states the number of processes
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=1e-7)
    assert os.path.isfile(tmp_path / "multi" / "ddp.safetensors")  # written once, by rank 0

    single = train(TrainConfig(checkpoint=ckpt, tokenizer=tiny_tokenizer_dir(), dataset=SAMPLE, output_dir="",
                               batch_size=4, **common))
    moved = [k for k in rank0 if k.endswith("lora_up.weight") and rank0[k].abs().sum() > 0]
    assert moved, "training changed nothing"
    for k in rank0:
        torch.testing.assert_close(rank0[k], single.lora.tensors[k], rtol=1e-3, atol=1e-5)
