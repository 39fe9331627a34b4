"""Short training runs on the tiny random models, with the settings most backend option tests start from."""

import os

import torch

from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import build_tiny_components

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def cfg(**over) -> TrainConfig:
    """2 steps, rank 2, batch 2, 64 px on the sample dataset, no gradient clipping; ``over`` replaces any key."""
    values = dict(checkpoint="tiny", dataset=SAMPLE, output_dir="", steps=2, rank=2, alpha=2.0, learning_rate=1e-3,
                  resolution=64, batch_size=2, seed=1, device="cpu", max_grad_norm=0.0)
    values.update(over)
    return TrainConfig(**values)


def run(family="sd1", events=None, base=None, should_stop=None, **over):
    """(TrainResult, base model) of ``cfg(**over)`` on ``base`` or a fresh tiny ``family`` model (seed 0)."""
    base = base or build_tiny_components(family, seed=0)
    return train(cfg(**over), base=base, events=events, should_stop=should_stop), base


def tensors_differ(a, b) -> bool:
    """Whether two runs' LoRA tensors differ anywhere."""
    return any(not torch.equal(a.lora.tensors[k], b.lora.tensors[k]) for k in a.lora.tensors)
