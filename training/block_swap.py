"""Block swap: the frozen weights of the last N transformer blocks live in host memory and visit the device
only while their block runs (forward, and again for its backward), as kohya's ``--blocks_to_swap``
(sd-scripts ``library/custom_offloading_utils.py``; docs/flux_train_network.md: Flux.1 LoRA in 12 GB with 16
blocks swapped).

Two pieces:

- :func:`plan_swap`, a pure schedule: given the block count and N, which block's weights are fetched,
  prefetched and released at each block's forward and backward. Unit-tested on its own; the runtime follows it.
- :class:`BlockSwap`, the runtime. ``attach(blocks, n, device)`` moves the frozen parameters and buffers of
  the swapped blocks into pinned host memory (on CUDA; a separate holding copy elsewhere) and wraps each
  block's ``forward``: before it, the block's weights are copied to the device (the next swapped block's copy
  starts on a second CUDA stream, overlapped with this block's compute); after it they are released. In the
  backward pass a gradient hook on the block's outputs fetches them again before the block's backward (or the
  checkpoint's recomputation) runs, prefetches the block before it, and releases the block after it.
  ``detach()`` puts every weight back on the device and the model back as it was.

Trainable tensors (peft's ``lora_A``/``lora_B``, anything with ``requires_grad``) stay resident: the optimizer
updates them in place.

Without gradient checkpointing the autograd graph would keep each block's device weights alive (``F.linear``
saves a view of its weight for the input gradient), so a saved-tensor hook replaces those views by a
reference to the parameter and rebuilds them from the re-fetched weights in backward. Other saved tensors
pass through to whatever saved-tensor hook was active (the checkpoint's, or the host's).

The CPU runs the same path with the device copy made by ``Tensor.to(copy=True)`` and no streams or pinning,
which lets a CPU test prove a swapped run equals an unswapped one bitwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten

from .dit_blocks import in_backward, inside_checkpoint, outer_saved_tensor_hooks, restore_forward, wrap_forward


# -- the schedule --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwapStep:
    """What happens at one block in one pass (forward: before/after the block; backward: when the
    gradient of the block's outputs arrives, before its backward runs)."""

    block: int
    release: tuple[int, ...] = ()  # blocks whose device copies are freed (forward: after the block; backward: first)
    fetch: int | None = None  # the block whose weights must be on the device now (waits for its prefetch)
    prefetch: int | None = None  # the next block in this pass whose copy starts now, overlapped


@dataclass(frozen=True)
class SwapPlan:
    count: int
    swapped: tuple[int, ...]  # the last N blocks, as kohya swaps them
    forward: tuple[SwapStep, ...]  # in forward order
    backward: tuple[SwapStep, ...]  # in backward order
    kept_for_backward: int | None  # the last block stays on the device from its forward into its backward

    def is_swapped(self, block: int) -> bool:
        return block in self.swapped


def plan_swap(count: int, blocks_to_swap) -> SwapPlan:
    """The copy schedule for ``count`` blocks run in order. ``blocks_to_swap``: N (the last N blocks, as kohya
    swaps them), or the block indices to swap (:func:`swap_selection`: Flux's double and single blocks).

    Forward: block i fetches itself (if swapped) and prefetches block i+1 (if swapped), and releases itself
    after its forward, except the last block, whose backward comes next. Backward (blocks in reverse order):
    block i releases block i+1 (its backward is complete once block i's output gradient exists), fetches
    itself and prefetches block i-1. At most two swapped blocks are on the device at any time."""
    if isinstance(blocks_to_swap, bool) or (isinstance(blocks_to_swap, int) and blocks_to_swap < 0) or \
            not isinstance(blocks_to_swap, (int, list, tuple, set, frozenset, range)):
        raise ValueError(f"blocks_to_swap = {blocks_to_swap!r}: use a whole number of at least 0")
    if isinstance(blocks_to_swap, int):
        if blocks_to_swap > count:
            raise ValueError(f"blocks_to_swap = {blocks_to_swap}: this model has {count} transformer blocks; "
                             f"use at most {count}")
        blocks_to_swap = range(count - blocks_to_swap, count)
    swapped = tuple(sorted(set(blocks_to_swap)))
    if swapped and not (0 <= swapped[0] and swapped[-1] < count):
        raise ValueError(f"blocks_to_swap: block indices {swapped} outside 0..{count - 1}")
    on = set(swapped)
    last = count - 1 if count - 1 in on else None
    forward = tuple(
        SwapStep(block=i, fetch=i if i in on else None, prefetch=i + 1 if i + 1 in on else None,
                 release=(i,) if i in on and i != last else ())
        for i in range(count)
    )
    backward = tuple(
        SwapStep(block=i, release=(i + 1,) if i + 1 in on else (), fetch=i if i in on else None,
                 prefetch=i - 1 if i - 1 in on else None)
        for i in reversed(range(count))
    )
    return SwapPlan(count, swapped, forward, backward, last)


def swap_selection(lists: list[tuple[str, int]], blocks_to_swap: int) -> list[int]:
    """Which blocks of a model's flat block list (``[(attribute, count)]`` in execution order, as
    ``dit_blocks.block_lists`` gives them) ``blocks_to_swap`` = N swaps, as kohya counts N: with Flux's
    ``double_blocks`` + ``single_blocks`` (a double block holds about twice a single's weights) the last
    N // 2 double blocks and the last (N - N // 2) * 2 single blocks (sd-scripts ``flux_models.py``
    ``enable_block_swap``; up to 35 on Flux.1); otherwise the last N blocks."""
    names = [name for name, _ in lists]
    total = sum(n for _, n in lists)
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or blocks_to_swap < 0:
        raise ValueError(f"blocks_to_swap = {blocks_to_swap!r}: use a whole number of at least 0")
    if names == ["double_blocks", "single_blocks"]:
        doubles, singles = lists[0][1], lists[1][1]
        d, s = blocks_to_swap // 2, (blocks_to_swap - blocks_to_swap // 2) * 2
        if d > doubles or s > singles:
            raise ValueError(f"blocks_to_swap = {blocks_to_swap}: this model has {doubles} double and {singles} "
                             f"single blocks; use at most {max_blocks_to_swap(lists)}")
        return list(range(doubles - d, doubles)) + list(range(total - s, total))
    if blocks_to_swap > total:
        raise ValueError(f"blocks_to_swap = {blocks_to_swap}: this model has {total} transformer blocks; "
                         f"use at most {total}")
    return list(range(total - blocks_to_swap, total))


def max_blocks_to_swap(lists: list[tuple[str, int]]) -> int:
    """The largest N :func:`swap_selection` accepts for these block lists."""
    if [name for name, _ in lists] == ["double_blocks", "single_blocks"]:
        return min(2 * lists[0][1] + 1, 2 * (lists[1][1] // 2))  # N // 2 <= doubles, ceil(N / 2) * 2 <= singles
    return sum(n for _, n in lists)


# -- the runtime ---------------------------------------------------------------------------------------
@dataclass
class _Weight:
    tensor: torch.Tensor  # the Parameter or buffer object the module holds (its .data is swapped)
    holding: torch.Tensor  # host copy (pinned on CUDA): the value between visits


class _SavedWeight:
    """A saved view of a swapped weight, rebuilt from the weight's device copy when backward needs it."""

    __slots__ = ("weight", "size", "stride", "offset")

    def __init__(self, weight: torch.Tensor, view: torch.Tensor):
        self.weight, self.size, self.stride, self.offset = weight, view.size(), view.stride(), view.storage_offset()

    def rebuild(self) -> torch.Tensor:
        return self.weight.data.as_strided(self.size, self.stride, self.offset)


class BlockSwap:
    """Runs ``plan_swap`` on a list of blocks. Use :meth:`attach` and :meth:`detach` (or ``with``)."""

    def __init__(self, blocks, blocks_to_swap, device, *, debug: bool = False):
        """``blocks``: every transformer block in execution order; ``blocks_to_swap``: N (the last N) or the
        indices to swap (:func:`swap_selection`)."""
        self.blocks = list(blocks)
        self.plan = plan_swap(len(self.blocks), blocks_to_swap)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        # tests: a released weight is an empty tensor, so any use of it outside a visit fails loudly, and every
        # device copy is tracked, so a test can see which are still alive (held by the autograd graph)
        self.debug = debug
        self._copy_refs: list = []
        self.weights: dict[int, list[_Weight]] = {}
        self.resident: dict[int, list[torch.Tensor]] = {}  # block -> its device copies (same order as weights)
        self.pending: dict[int, tuple[list[torch.Tensor], object]] = {}  # block -> (copies, CUDA event)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.events: list[tuple[str, int]] = []  # (action, block) in order, for tests and debugging
        self._backward_running = False
        self._attached = False
        self.copied_bytes = 0

    # attach / detach
    def attach(self) -> "BlockSwap":
        if self._attached or not self.plan.swapped:
            return self
        for i in self.plan.swapped:
            if not any(not p.requires_grad for p in self.blocks[i].parameters()) and \
                    any(True for _ in self.blocks[i].parameters()):
                raise ValueError(f"block swap: every weight of block {i} ({type(self.blocks[i]).__name__}) requires "
                                 "grad; freeze the base model (requires_grad_(False)) before attaching")
        for i in self.plan.swapped:
            self.weights[i] = self._hold(self.blocks[i])
            self._release(i)
        for i, block in enumerate(self.blocks):
            wrap_forward(block, self._forward_wrapper(i), tag="block_swap")
        self._attached = True
        return self

    def detach(self) -> None:
        """Every swapped weight back on the device (as its tensor object), every forward unwrapped."""
        if not self._attached:
            return
        for i, block in enumerate(self.blocks):
            restore_forward(block, tag="block_swap")
        self.pending.clear()
        for i, weights in self.weights.items():
            for w in weights:
                w.tensor.data = w.holding.to(self.device, copy=True)
            self.resident.pop(i, None)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self.weights.clear()
        self._attached = False

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    def _hold(self, block: torch.nn.Module) -> list[_Weight]:
        seen, held = set(), []
        tensors = [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())
        for t in tensors:
            if id(t) in seen or t.device.type == "meta":
                continue
            seen.add(id(t))
            if self.cuda:  # pinned, so the copies to the device can run asynchronously on the copy stream
                holding = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                holding.copy_(t.data)
            else:  # a holding copy of its own: the device copy is made from it at every visit
                holding = t.data.to("cpu", copy=True)
            held.append(_Weight(t, holding))
        return held

    # moving weights
    def _copies(self, i: int, non_blocking: bool) -> list[torch.Tensor]:
        copies = [w.holding.to(self.device, copy=True, non_blocking=non_blocking) for w in self.weights[i]]
        self.copied_bytes += sum(c.numel() * c.element_size() for c in copies)
        if self.debug:
            from torch.multiprocessing.reductions import StorageWeakRef

            self._copy_refs += [StorageWeakRef(c.untyped_storage()) for c in copies]
        return copies

    def _prefetch(self, i: int | None) -> None:
        if i is None or i in self.resident or i in self.pending:
            return
        self.events.append(("prefetch", i))
        if self.copy_stream is None:
            self.pending[i] = (self._copies(i, non_blocking=False), None)
            return
        with torch.cuda.stream(self.copy_stream):
            copies = self._copies(i, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.pending[i] = (copies, event)

    def _fetch(self, i: int | None) -> None:
        if i is None or i in self.resident:
            return
        self.events.append(("fetch", i))
        if i in self.pending:
            copies, event = self.pending.pop(i)
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for c in copies:  # allocated on the copy stream, used on this one: the allocator must know
                    c.record_stream(current)
        else:
            copies = self._copies(i, non_blocking=self.cuda)
        for w, c in zip(self.weights[i], copies):
            w.tensor.data = c
        self.resident[i] = copies

    def _release(self, i: int) -> None:
        if i in self.resident:
            self.events.append(("release", i))
        self.resident.pop(i, None)
        self.pending.pop(i, None)
        for w in self.weights.get(i, ()):
            w.tensor.data = torch.empty(0, dtype=w.holding.dtype, device=self.device) if self.debug \
                else w.holding

    def _release_all(self) -> None:
        for i in list(self.resident) + list(self.pending):
            self._release(i)

    # hooks
    def _forward_wrapper(self, i: int):
        step = self.plan.forward[i]

        def around(call, args, kwargs):
            if in_backward():  # a gradient checkpoint recomputing the block: its weights are already here
                self._fetch(step.fetch)
                return call(*args, **kwargs)
            if i == 0:
                self._release_all()  # a new pass (an earlier one may have ended without backward)
            self.events.append(("forward", i))
            self._fetch(step.fetch)
            self._prefetch(step.prefetch)
            grad = torch.is_grad_enabled()
            keeps = grad and self.plan.is_swapped(i) and not inside_checkpoint()  # a checkpoint saves nothing
            saving = self._saved_weights(i) if keeps else contextlib.nullcontext()
            with saving:
                out = call(*args, **kwargs)
            if grad:
                self._hook_outputs(i, out)
            for r in step.release:
                self._release(r)
            if not grad and i == self.plan.kept_for_backward:
                self._release(i)  # no backward follows (sampling, validation)
            return out

        return around

    def _saved_weights(self, i: int):
        """Saved views of this block's device weights become references, so the copies can be freed after
        the forward; everything else goes to the saved-tensor hook that was active (if any)."""
        storages = {c.untyped_storage().data_ptr(): w.tensor for w, c in zip(self.weights[i], self.resident[i])}
        outer_pack, outer_unpack = outer_saved_tensor_hooks()

        def pack(t):
            weight = storages.get(t.untyped_storage().data_ptr()) if t.device == self.device else None
            if weight is not None and t.dtype == weight.dtype and not t.requires_grad:
                return _SavedWeight(weight, t)
            return outer_pack(t)

        def unpack(x):
            return x.rebuild() if isinstance(x, _SavedWeight) else outer_unpack(x)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _hook_outputs(self, i: int, out) -> None:
        step = self.plan.backward[len(self.blocks) - 1 - i]
        if not (step.release or step.fetch is not None or step.prefetch is not None):
            return
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        fired = []

        def on_grad(grad):
            if not fired:  # the first of the block's outputs whose gradient arrives
                fired.append(True)
                self._backward_step(step)
            return grad

        for t in tensors:
            t.register_hook(on_grad)

    def _backward_step(self, step: SwapStep) -> None:
        if not self._backward_running:
            self._backward_running = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self.events.append(("backward", step.block))
        for r in step.release:
            self._release(r)
        self._fetch(step.fetch)
        self._prefetch(step.prefetch)

    def _backward_done(self) -> None:
        self._backward_running = False
        self._release_all()

    # reports
    def resident_blocks(self) -> list[int]:
        return sorted(set(self.resident) | set(self.pending))

    def live_copies(self) -> int:
        """(debug) How many device copies made so far still exist (held by this object or the graph)."""
        self._copy_refs = [r for r in self._copy_refs if not r.expired()]
        return len(self._copy_refs)

    def swapped_bytes(self) -> int:
        return sum(w.holding.numel() * w.holding.element_size() for ws in self.weights.values() for w in ws)
