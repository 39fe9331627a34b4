"""A test double of nodes/host.py's ComfyHost: folders in a temp dir, recorded calls, no ComfyUI."""

from __future__ import annotations

import os

import torch


class FakeProgress:
    def __init__(self, host, total):
        self.host, self.total = host, total

    def update(self, value, total=None, preview=None):
        self.host.progress_values.append((value, total or self.total))
        if preview is not None:
            self.host.previews.append((value, preview))


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
        self.texts: list = []
        self.previews: list = []
        self.temp_images: list = []
        self.free_bytes = 64 * 2**30  # what device_memory() reports as free
        self.prompt_id, self.node_id = "prompt-1", "7"

    def input_directory(self):
        return os.path.join(self.root, "input")

    def checkpoint_names(self):
        return sorted(os.listdir(os.path.join(self.root, "models/checkpoints")))

    def checkpoint_path(self, name):
        return os.path.join(self.root, "models/checkpoints", name)

    def lora_names(self):
        return sorted(os.listdir(self.loras_directory()))

    def lora_path(self, name):
        path = os.path.join(self.loras_directory(), name)
        if not os.path.isfile(path):  # as ComfyHost (folder_paths.get_full_path gives None)
            from comfyui_lora_trainer.nodes.spec import NodeError

            raise NodeError(f"LoRA '{name}' not found in models/loras; pick one from the list")
        return path

    def loras_directory(self):
        return os.path.join(self.root, "models/loras")

    def state_directory(self):
        # as ComfyHost: beside the outputs, never inside models/loras (created by the first save)
        return os.path.join(self.root, "output", "loratrainer_state")

    def tokenizer_dir(self):
        return self._tokenizer_dir

    def torch_device(self):
        return torch.device("cpu")

    def free_memory(self):
        self.freed += 1

    def device_memory(self):
        return {"free": self.free_bytes, "total": 2 * self.free_bytes, "type": "cpu", "name": "cpu", "cpu_count": 2}

    def executing(self):
        return self.prompt_id, self.node_id

    def progress(self, total, node_id=None):
        return FakeProgress(self, total)

    def progress_text(self, text, node_id):
        self.texts.append((node_id, text))

    def save_temp_image(self, image, prefix):
        folder = os.path.join(self.root, "temp")
        os.makedirs(folder, exist_ok=True)
        filename = f"{os.path.basename(prefix)}_{len(self.temp_images):05}_.png"
        image.save(os.path.join(folder, filename))
        self.temp_images.append(filename)
        return {"filename": filename, "subfolder": "", "type": "temp"}

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
