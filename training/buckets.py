"""Aspect-ratio bucketing (kohya's BucketManager) and the deterministic batch plan.

Bucket list (kohya ``make_bucket_resolutions``): the square ``floor(resolution/step)*step`` plus every
width from min to max in ``step`` pixels with ``height = min(max, floor(area/width/step)*step)``, both
orientations, keeping height >= min. An image goes to the bucket with the nearest aspect ratio, is scaled
to cover it and cropped. ``no_upscale``: images larger than the area are scaled down to it keeping their
aspect ratio, smaller ones keep their size; the bucket is the size floored to ``step`` (crop, never pad).

The plan says which samples make up micro-batch ``m``; it depends only on (seed, epoch), so a resumed run
and every process of a multi-process run compute the same plan.
"""

from __future__ import annotations

import math

import torch

from .seeds import epoch_generator


def make_bucket_resolutions(resolution: int, min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """(width, height) buckets for a training area of resolution x resolution, sorted."""
    area = resolution * resolution
    square = max(step, (int(math.sqrt(area)) // step) * step)
    resos = {(square, square)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (area // width // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]] | None, resolution: int, step: int,
                  no_upscale: bool = False) -> tuple[int, int]:
    """The (width, height) an image of that size is trained at."""
    if no_upscale:
        area = resolution * resolution
        w, h = float(width), float(height)
        if w * h > area:
            scale = math.sqrt(area / (w * h))
            w, h = w * scale, h * scale
        return max(step, int(w) // step * step), max(step, int(h) // step * step)
    if not buckets:
        return resolution, resolution
    aspect = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - aspect), b))


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    return torch.randperm(size, generator=epoch_generator(seed, epoch)).tolist()


class BatchPlan:
    """Global micro-batches: lists of (sample_number, item_index).

    Without buckets samples stream across epoch boundaries in the (seed, epoch) order, every batch full.
    With buckets, each epoch's samples are shuffled, grouped per bucket, split into batches of
    ``global_batch`` (the last of a bucket may be short, as in kohya) and the batches are shuffled.
    """

    def __init__(self, item_of_sample: list[int], item_bucket: list[tuple[int, int]] | None, global_batch: int,
                 seed: int):
        self.item_of_sample = item_of_sample
        self.epoch_size = len(item_of_sample)
        self.item_bucket = item_bucket
        self.global_batch = global_batch
        self.seed = seed
        self._epoch_cache: dict[int, list[list[int]]] = {}
        if item_bucket is not None:
            self.batches_per_epoch = len(self._bucket_batches(0))

    def _bucket_batches(self, epoch: int) -> list[list[int]]:
        """Batches of positions (0..epoch_size-1) for one epoch."""
        if epoch not in self._epoch_cache:
            order = epoch_order(self.seed, epoch, self.epoch_size)
            groups: dict[tuple[int, int], list[int]] = {}
            for position in order:
                groups.setdefault(self.item_bucket[self.item_of_sample[position]], []).append(position)
            batches = []
            for key in sorted(groups):
                members = groups[key]
                batches += [members[i : i + self.global_batch] for i in range(0, len(members), self.global_batch)]
            shuffle = epoch_order(self.seed + 7_777, epoch, len(batches))
            self._epoch_cache = {epoch: [batches[i] for i in shuffle]}
        return self._epoch_cache[epoch]

    def micro_batch(self, m: int) -> list[tuple[int, int]]:
        if self.item_bucket is None:
            out = []
            for sample_number in range(m * self.global_batch, (m + 1) * self.global_batch):
                epoch, position = divmod(sample_number, self.epoch_size)
                if epoch not in self._epoch_cache:
                    self._epoch_cache = {epoch: epoch_order(self.seed, epoch, self.epoch_size)}
                out.append((sample_number, self.item_of_sample[self._epoch_cache[epoch][position]]))
            return out
        epoch, j = divmod(m, self.batches_per_epoch)
        batches = self._bucket_batches(epoch)
        start = epoch * self.epoch_size + sum(len(b) for b in batches[:j])
        return [(start + k, self.item_of_sample[pos]) for k, pos in enumerate(batches[j])]

    def epoch_of(self, sample_number: int) -> int:
        return sample_number // self.epoch_size
