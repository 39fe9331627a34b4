"""Block swap: the copy schedule on its own, then swapped training runs equal to unswapped ones bit for bit on
the CPU (the same code path as on CUDA, without streams and pinning), with and without checkpointing."""

import contextlib

import pytest
import torch

from comfyui_lora_trainer.training.block_swap import BlockSwap, plan_swap
from comfyui_lora_trainer.training.dit_blocks import checkpoint_blocks

from dit_stack import assert_same, build, train

torch.set_num_threads(1)


def simulate(plan):
    """Walk the schedule as the runtime does; return the max number of swapped blocks on the device and the
    copies made. Fails if a block runs (forward or backward) without its weights."""
    resident, copies, peak = set(), 0, 0

    def fetch(i):
        nonlocal copies
        if i is not None and i not in resident:
            resident.add(i)
            copies += 1

    for step in plan.forward:
        fetch(step.fetch)
        fetch(step.prefetch)
        peak = max(peak, len(resident))
        assert not plan.is_swapped(step.block) or step.block in resident, f"forward {step.block}"
        resident -= set(step.release)
    assert resident == ({plan.kept_for_backward} if plan.swapped else set())
    for step in plan.backward:
        resident -= set(step.release)
        fetch(step.fetch)
        fetch(step.prefetch)
        peak = max(peak, len(resident))
        assert not plan.is_swapped(step.block) or step.block in resident, f"backward {step.block}"
    return peak, copies, resident


@pytest.mark.parametrize("count,n", [(6, 0), (6, 1), (6, 3), (6, 6), (57, 16), (2, 2)])
def test_the_schedule_keeps_at_most_two_swapped_blocks_and_every_block_is_there_when_it_runs(count, n):
    plan = plan_swap(count, n)
    assert plan.swapped == tuple(range(count - n, count))  # the last N, as kohya
    peak, copies, left = simulate(plan)
    assert peak == min(n, 2)
    assert copies == max(0, 2 * n - 1)  # each swapped block visits twice, the last one once
    assert left <= {plan.swapped[0]} if n else left == set()  # the first swapped block: released at the end


def test_the_schedule_orders_forward_and_backward():
    plan = plan_swap(5, 2)
    assert [(s.block, s.fetch, s.prefetch, s.release) for s in plan.forward] == [
        (0, None, None, ()), (1, None, None, ()), (2, None, 3, ()), (3, 3, 4, (3,)), (4, 4, None, ())]
    assert [(s.block, s.release, s.fetch, s.prefetch) for s in plan.backward] == [
        (4, (), 4, 3), (3, (4,), 3, None), (2, (3,), None, None), (1, (), None, None), (0, (), None, None)]


@pytest.mark.parametrize("n", [-1, 7, 1.5])
def test_the_schedule_refuses_impossible_counts(n):
    with pytest.raises(ValueError, match="blocks_to_swap"):
        plan_swap(6, n)


def swapping(model, n, **kw):
    return lambda: BlockSwap(model.layers, n, "cpu", debug=True, **kw)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_swapped_run_equals_an_unswapped_one_bitwise(n):
    reference = build()
    ref_losses = train(reference)
    model = build()
    swap = BlockSwap(model.layers, n, "cpu", debug=True).attach()  # released weights are empty: misuse fails
    losses = train(model, between=lambda: _no_swapped_weights_left(swap))
    swap.detach()
    assert_same(reference, model, ref_losses, losses)
    assert swap.copied_bytes > 0
    kinds = [e for e, _ in swap.events]
    assert kinds.count("backward") > 0 and kinds.count("release") > 0


def _no_swapped_weights_left(swap):
    assert swap.resident_blocks() == []  # after backward every device copy is released
    assert swap.live_copies() == 0  # and nothing (the graph) holds one


def test_swap_with_per_block_checkpointing_equals_the_plain_run_bitwise():
    reference = build()
    ref_losses = train(reference)
    for order in ("checkpoint inside", "swap inside"):
        model = build()

        @contextlib.contextmanager
        def both():
            if order == "checkpoint inside":
                ckpt, swap = checkpoint_blocks(model.layers), BlockSwap(model.layers, 3, "cpu", debug=True).attach()
            else:
                swap = BlockSwap(model.layers, 3, "cpu", debug=True).attach()
                ckpt = checkpoint_blocks(model.layers)
            yield
            ckpt.remove()
            swap.detach()

        losses = train(model, wrap=both)
        assert_same(reference, model, ref_losses, losses)


def test_after_the_forward_only_the_last_swapped_block_is_on_the_device():
    """The graph must not keep the swapped blocks' device weights (F.linear saves a view of its weight)."""
    model = build()
    swap = BlockSwap(model.layers, 4, "cpu", debug=True).attach()
    x, vec = torch.randn(2, 8, 16), torch.randn(2, 16)
    out = model(x, vec)
    assert swap.resident_blocks() == [3]
    per_block = len(swap.weights[3])
    assert swap.live_copies() == per_block  # only block 3's, kept for its backward
    out.sum().backward()
    assert swap.resident_blocks() == [] and swap.live_copies() == 0
    order = [e for e in swap.events if e[0] in ("fetch", "backward")]
    assert order[-7:] == [("backward", 3), ("backward", 2), ("fetch", 2), ("backward", 1), ("fetch", 1),
                          ("backward", 0), ("fetch", 0)]
    swap.detach()


def test_no_grad_passes_release_every_block():
    model = build()
    swap = BlockSwap(model.layers, 2, "cpu", debug=True).attach()
    with torch.no_grad():
        model(torch.randn(1, 8, 16), torch.randn(1, 16))
    assert swap.resident_blocks() == []
    swap.detach()


def test_detach_puts_the_model_back_as_it_was():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.named_parameters()}
    swap = BlockSwap(model.layers, 3, "cpu", debug=True).attach()
    assert all("forward" in b.__dict__ for b in model.layers)
    frozen = [p for p in model.layers[3].parameters() if not p.requires_grad]
    assert all(p.numel() == 0 for p in frozen)  # released (debug: empty)
    assert all(p.numel() > 0 for p in model.layers[3].parameters() if p.requires_grad)  # LoRA stays resident
    train(model, steps=1)
    swap.detach()
    assert all("forward" not in b.__dict__ for b in model.layers)
    assert {k: v for k, v in model.named_parameters()}.keys() == tensors.keys()
    assert all(tensors[k] is v for k, v in model.named_parameters())  # the same Parameter objects
    after = model.state_dict()
    for k, v in before.items():
        if "lora_" not in k:
            assert torch.equal(after[k], v), k


def test_swap_of_zero_blocks_changes_nothing():
    model = build()
    swap = BlockSwap(model.layers, 0, "cpu").attach()
    assert all("forward" not in b.__dict__ for b in model.layers)
    swap.detach()


def test_flux_counts_blocks_as_kohya_does():
    from comfyui_lora_trainer.training.block_swap import max_blocks_to_swap, swap_selection

    flux = [("double_blocks", 19), ("single_blocks", 38)]
    picked = swap_selection(flux, 16)  # kohya: 8 double + 16 single blocks
    assert picked == list(range(11, 19)) + list(range(57 - 16, 57))
    assert max_blocks_to_swap(flux) == 38 and len(swap_selection(flux, 38)) == 57
    with pytest.raises(ValueError, match="at most 38"):
        swap_selection(flux, 39)
    assert swap_selection([("joint_blocks", 24)], 3) == [21, 22, 23]
    lumina = [("context_refiner", 2), ("noise_refiner", 2), ("layers", 26)]
    assert swap_selection(lumina, 4) == [26, 27, 28, 29] and max_blocks_to_swap(lumina) == 30


def test_a_run_with_a_non_contiguous_selection_equals_the_plain_one():
    """Flux's selection is two runs of blocks (the last double blocks, the last single blocks)."""
    reference = build(depth=5)
    ref_losses = train(reference, steps=3)
    model = build(depth=5)
    plan = plan_swap(5, [1, 3, 4])
    peak, copies, _ = simulate(plan)
    assert peak <= 2 and copies == 5
    with BlockSwap(model.layers, [1, 3, 4], "cpu", debug=True) as swap:
        losses = train(model, steps=3, between=lambda: _no_swapped_weights_left(swap))
    assert_same(reference, model, ref_losses, losses)


def test_swap_refuses_a_model_whose_base_is_not_frozen():
    from dit_stack import Stack

    with pytest.raises(ValueError, match="freeze the base model"):
        BlockSwap(Stack().layers, 1, "cpu").attach()
