"""A tiny DiT-shaped block stack for the block swap / checkpointing tests, written as ComfyUI writes its
blocks: keyword arguments (``vec``, ``transformer_options``), activations added into in place after an op
saved them, and the caller writing ``block_index`` into the shared options dict between blocks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mod = nn.Linear(dim, 2 * dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, dim))

    def forward(self, x, *, vec, transformer_options):
        scale, shift = self.mod(vec).chunk(2, dim=-1)
        h = self.norm1(x) * (1 + scale[:, None]) + shift[:, None]
        attn = torch.softmax(self.to_q(h) @ h.transpose(1, 2) / h.shape[-1] ** 0.5, dim=-1) @ self.to_v(h)
        x += attn * self.gain  # in place, after norm1 saved x (ComfyUI's Flux blocks: ``img += ...``)
        x += self.ff(torch.nn.functional.gelu(self.norm2(x))) * (1 + transformer_options["block_index"])
        return x


class Stack(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, vec):
        options = {"block_index": 0}
        x = self.embed(x)
        for i, block in enumerate(self.layers):
            options["block_index"] = i
            x = block(x, vec=vec, transformer_options=options)
        return self.out(x)


def copy_saved_activations():
    """What nodes/comfy_model.py does around ComfyUI's forward: saved activations are copied, so in-place
    additions after a save are legal (weights and their views are kept as they are)."""
    from comfyui_lora_trainer.training.dit_blocks import is_activation

    if not torch.is_grad_enabled():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if is_activation(t) else t, lambda t: t)


def build(seed: int = 0, dim: int = 16, depth: int = 4, rank: int = 4):
    """The stack with peft LoRA on to_q, to_v and ff (the base frozen), deterministic from ``seed``."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = Stack(dim, depth)
    for p in model.parameters():
        p.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_v", "ff"],
                                               init_lora_weights="gaussian"), model)
    return model


def train(model, steps: int = 5, wrap=contextlib.nullcontext, clone_saved: bool = True, dim: int = 16, seed: int = 1,
          between=None):
    """``steps`` AdamW steps on fixed random batches; returns the losses. ``wrap``: a context manager factory
    around each forward+backward (the swap/checkpoint under test); ``between``: called after each backward."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 8, dim, generator=g)
        vec = torch.randn(2, dim, generator=g)
        target = torch.randn(2, 8, dim, generator=g)
        with wrap(), (copy_saved_activations() if clone_saved else contextlib.nullcontext()):
            loss = torch.nn.functional.mse_loss(model(x, vec), target)
            loss.backward()
        if between is not None:
            between()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def assert_same(model_a, model_b, losses_a, losses_b):
    for a, b in zip(losses_a, losses_b):
        assert torch.equal(a, b), (a, b)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
