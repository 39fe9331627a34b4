"""A test double of nodes/host.py's ComfyHost: folders in a temp dir, recorded calls, no ComfyUI."""

from __future__ import annotations

import os

import torch


class FakeProgress:
    def __init__(self, host, total):
        self.host, self.total = host, total

    def update(self, value, total=None, preview=None):
        self.host.progress_values.append((value, total or self.total))


class InterruptProcessing(Exception):
    pass


class FakeHost:
    def __init__(self, root, tokenizer_dir, stop_after_steps=None):
        self.root = str(root)
        for sub in ("input", "models/checkpoints", "models/loras"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._tokenizer_dir = tokenizer_dir
        self.stop_after_steps = stop_after_steps
        self.progress_values: list = []
        self.sent: list = []
        self.applied: list = []
        self.freed = 0

    def input_directory(self):
        return os.path.join(self.root, "input")

    def checkpoint_names(self):
        return sorted(os.listdir(os.path.join(self.root, "models/checkpoints")))

    def checkpoint_path(self, name):
        return os.path.join(self.root, "models/checkpoints", name)

    def lora_names(self):
        return sorted(os.listdir(self.loras_directory()))

    def lora_path(self, name):
        return os.path.join(self.loras_directory(), name)

    def loras_directory(self):
        return os.path.join(self.root, "models/loras")

    def tokenizer_dir(self):
        return self._tokenizer_dir

    def torch_device(self):
        return torch.device("cpu")

    def free_memory(self):
        self.freed += 1

    def progress(self, total):
        return FakeProgress(self, total)

    def interrupted(self):
        return self.stop_after_steps is not None and len(self.progress_values) >= self.stop_after_steps

    def raise_interrupt(self):
        raise InterruptProcessing()

    def send(self, event, data):
        self.sent.append((event, data))

    def apply_lora(self, model, clip, tensors, strength_model, strength_clip):
        self.applied.append((tensors, strength_model, strength_clip))
        return ("patched", model), ("patched", clip)

    def read_lora_file(self, path):
        from safetensors.torch import load_file

        return load_file(path)
