"""Sample images every N steps from the in-memory model, with a fixed seed."""

import os

import torch
import numpy as np

from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import build_tiny_components

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def run(out, **over):
    values = dict(checkpoint="tiny", dataset=SAMPLE, output_dir=str(out), output_name="s", steps=4, rank=4, alpha=4.0,
                  learning_rate=1e-2, resolution=64, batch_size=2, seed=0, device="cpu", sample_every_n_steps=2,
                  sample_prompts=["shapetoy, a red circle", "a blue square"], sample_steps=3, sample_seed=11)
    values.update(over)
    events = []
    train(TrainConfig(**values), base=build_tiny_components("sd1", seed=0), events=events.append)
    return [e for e in events if e["type"] == "sample"]


def test_samples_every_n_steps_with_fixed_seed(tmp_path):
    samples = run(tmp_path / "a")
    assert [e["step"] for e in samples] == [0, 2, 4]
    for e in samples:
        assert len(e["images"]) == 2 and e["prompts"] == ["shapetoy, a red circle", "a blue square"]
        assert e["images"][0].size == (64, 64)
        assert all(os.path.isfile(p) for p in e["paths"])
    arrays = [[np.asarray(im, dtype=np.int16) for im in e["images"]] for e in samples]
    assert np.abs(arrays[0][0] - arrays[-1][0]).max() > 0, "samples do not reflect the trained model"
    again = run(tmp_path / "b")
    for first, second in zip(samples, again):  # same seed, same images
        for a, b in zip(first["images"], second["images"]):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    other = run(tmp_path / "c", steps=2, sample_seed=12)
    assert not np.array_equal(np.asarray(other[0]["images"][0]), np.asarray(samples[0]["images"][0]))
