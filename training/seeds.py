"""Every seed a run derives from its one ``seed``: the one place that mixes seeds.

Randomness is drawn per sample from generators seeded by (seed, sample number, salt), not from one stream,
and the data order is a function of (seed, epoch): the same seed gives the same run whatever the batch layout
or the number of processes, and a run resumed at step N draws exactly what an uninterrupted run would have.
A salt separates the independent draws of one sample.
"""

from __future__ import annotations

import torch

MASK63 = (1 << 63) - 1

# salts of one sample's draws; salt 0 draws its flip, timestep and noise, in that order
SALT_CAPTION, SALT_LATENT, SALT_CROP = 101, 202, 303
SALT_NOISE, SALT_DROPOUT = 404, 505  # kohya's noise options (noise.py); LoRA dropout masks (adapters.py)


def mix(seed: int, number: int, salt: int = 0) -> int:
    """A 63-bit seed for draw ``salt`` of item ``number`` (a sample, or a LoRA layer's name hash) of a run."""
    return (seed * 1_000_003 + number * 7_919 + 1 + salt * 65_537) & MASK63


def sample_generator(seed: int, sample_number: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for one training sample: its flip, timestep and noise (salt 0), caption, latent, crop."""
    return torch.Generator().manual_seed(mix(seed, sample_number, salt))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s data order."""
    return torch.Generator().manual_seed((seed * 104_729 + epoch + 17) & MASK63)


def draw_seed(seed: int, sample_number: int, salt: int, high: int) -> int:
    """One integer in [0, high) from the sample's ``salt`` generator: a seed handed to another generator."""
    return int(torch.randint(0, high, (1,), generator=sample_generator(seed, sample_number, salt)))
