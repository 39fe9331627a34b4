"""Per-block gradient checkpointing of DiT blocks (bitwise equal to the plain run on the CPU, undone cleanly)
and finding ComfyUI's block lists by family."""

import pytest
import torch
from torch import nn

from comfyui_lora_trainer.training.dit_blocks import (
    FAMILY_ARCHITECTURE, block_lists, checkpoint_blocks, flat_blocks, restore_forward, wrap_forward,
)
from comfyui_lora_trainer.training.formats.families import MODEL_FAMILIES

from dit_stack import Block, assert_same, build, train

torch.set_num_threads(1)


@pytest.mark.parametrize("host_copies_activations", [True, False])
def test_checkpointed_blocks_train_bitwise_like_plain_ones(host_copies_activations):
    """The blocks add into activations in place; the plain reference needs the host's saved-activation copy
    (nodes/comfy_model.py), the checkpointed run is right with or without it."""
    reference = build()
    ref_losses = train(reference)
    model = build()
    handle = checkpoint_blocks(model.layers)
    losses = train(model, clone_saved=host_copies_activations)
    handle.remove()
    assert_same(reference, model, ref_losses, losses)


def test_without_checkpointing_the_in_place_blocks_need_the_copy():
    """Why nodes/comfy_model.py copies saved activations: without it autograd refuses the in-place block."""
    with pytest.raises(RuntimeError, match="inplace operation"):
        train(build(), steps=1, clone_saved=False)


def test_checkpointing_saves_nothing_inside_the_blocks():
    model = build(depth=3)
    x, vec = torch.randn(2, 8, 16), torch.randn(2, 16)

    def saved_bytes():
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, vec).sum()
        return sum(total)

    plain = saved_bytes()
    with checkpoint_blocks(model.layers):
        checkpointed = saved_bytes()
    assert checkpointed < plain / 3


def test_the_recomputation_sees_the_options_of_its_own_call():
    """ComfyUI writes block_index into the one transformer_options dict between blocks; the blocks here scale
    by it, so a recomputation that read the dict's last value would change the gradients (caught above by the
    bitwise test); here directly: the dict a block got is a copy frozen at the call."""
    seen = []
    block = Block(16)
    block.forward = lambda x, *, vec, transformer_options: seen.append(dict(transformer_options)) or x * x
    handle = checkpoint_blocks([block])
    options = {"block_index": 3}
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = block(x, vec=torch.randn(2, 16), transformer_options=options)
    options["block_index"] = 7
    y.sum().backward()
    assert [s["block_index"] for s in seen] == [3, 3]  # forward and recomputation
    handle.remove()


def test_no_grad_passes_are_not_checkpointed():
    model = build(depth=2)
    with checkpoint_blocks(model.layers), torch.no_grad():
        out = model(torch.randn(1, 8, 16), torch.randn(1, 16))
    assert out.grad_fn is None


def test_remove_restores_the_original_forward():
    model = build(depth=2)
    blocks = list(model.layers)
    handle = checkpoint_blocks(blocks)
    assert all("forward" in b.__dict__ for b in blocks)
    handle.remove()
    assert all("forward" not in b.__dict__ for b in blocks)
    assert all(b.forward.__func__ is Block.forward for b in blocks)


def test_forward_layers_come_off_in_any_order_and_keep_an_earlier_instance_forward():
    block = nn.Linear(2, 2)
    own = lambda x: x + 1  # noqa: E731  (a forward another tool set on the instance)
    block.forward = own
    calls = []
    wrap_forward(block, lambda call, a, k: calls.append("a") or call(*a, **k), "a")
    wrap_forward(block, lambda call, a, k: calls.append("b") or call(*a, **k), "b")
    assert block(torch.zeros(1)).item() == 1 and calls == ["b", "a"]
    restore_forward(block, "a")
    calls.clear()
    block(torch.zeros(1))
    assert calls == ["b"]
    restore_forward(block, "b")
    assert block.forward is own


def fake_model(**lists):
    net = nn.Module()
    for name, n in lists.items():
        setattr(net, name, nn.ModuleList(nn.Linear(1, 1) for _ in range(n)))
    outer = nn.Module()
    outer.diffusion_model = net  # as ComfyUI's BaseModel holds it
    return outer


@pytest.mark.parametrize("family,lists,expected", [
    ("flux-dev", dict(double_blocks=2, single_blocks=3), ["double_blocks", "single_blocks"]),
    ("chroma", dict(double_blocks=1, single_blocks=2), ["double_blocks", "single_blocks"]),
    ("sd3.5-large", dict(joint_blocks=3), ["joint_blocks"]),
    ("z-image", dict(noise_refiner=2, context_refiner=2, layers=4), ["context_refiner", "noise_refiner", "layers"]),
    ("lumina2", dict(noise_refiner=2, context_refiner=2, layers=4), ["context_refiner", "noise_refiner", "layers"]),
    ("qwen-image", dict(transformer_blocks=4), ["transformer_blocks"]),
])
def test_block_lists_by_family(family, lists, expected):
    model = fake_model(**lists)
    found = block_lists(model, family)
    assert [name for name, _ in found] == expected
    assert len(flat_blocks(model, family)) == sum(lists.values())
    assert [name for name, _ in block_lists(model.diffusion_model)] == expected  # detected without a family


def test_every_dit_family_has_block_lists_and_unknown_models_are_named():
    assert set(FAMILY_ARCHITECTURE) == set(MODEL_FAMILIES)
    with pytest.raises(ValueError, match="Linear"):
        block_lists(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="sdxl"):
        block_lists(fake_model(layers=2), "sdxl")
