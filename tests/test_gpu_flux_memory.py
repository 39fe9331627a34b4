"""CUDA-only: the real peak of a Flux-shaped model (full hidden size 3072, 24 heads, 2 double + 4 single
blocks, LoRA rank 16 on every block Linear, 1024 px, batch 1) against nodes/estimate.py's figure for the same
model and settings: the estimate must not be below the measured peak, nor absurdly above it.

Skipped without CUDA. Its CPU-side logic (the model, the estimate call, block swap and checkpointing on it)
runs at tiny size in tests/test_estimate_dit.py::test_the_gpu_check_runs_tiny_on_the_cpu."""


import pytest
import torch

from comfyui_lora_trainer.nodes import estimate as est
from comfyui_lora_trainer.training.block_swap import BlockSwap, swap_selection
from comfyui_lora_trainer.training.dit_blocks import checkpoint_blocks, flat_blocks

import flux_shaped

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (measures real GPU memory)")

FP8 = getattr(torch, "float8_e4m3fn", None)


def measure(weight_dtype, blocks_to_swap=0, checkpointing=True, steps=3, **size):
    """(measured peak bytes, the estimate for this model) after ``steps`` training steps."""
    torch.cuda.empty_cache()
    model = flux_shaped.build(weight_dtype=weight_dtype, device="cuda", **size)
    shape = est.dit_shape_from_model(model, "flux-dev")
    blocks = flat_blocks(model, "flux-dev")
    swap = BlockSwap(blocks, swap_selection(shape.block_lists(), blocks_to_swap), "cuda").attach()
    ckpt = checkpoint_blocks(blocks) if checkpointing else None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        losses = flux_shaped.train_steps(model, steps, "cuda", context=size.get("context", 4096))
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    finally:
        if ckpt is not None:
            ckpt.remove()
        swap.detach()
    assert all(torch.isfinite(torch.tensor(losses)))
    settings = est.Settings(resolution=1024, batch_size=1, rank=16, precision="bf16",
                            gradient_checkpointing=checkpointing, blocks_to_swap=blocks_to_swap)
    estimate = est.estimate(shape, settings, None, "cuda")
    # max_memory_allocated does not see the CUDA context the estimate adds
    predicted = estimate.peak_bytes - estimate.parts["context"]
    print(f"measured {measured / est.GiB:.2f} GiB, estimated {predicted / est.GiB:.2f} GiB (without context): "
          f"{ {k: round(v / est.GiB, 2) for k, v in estimate.parts.items()} }")
    del model
    return measured, predicted


def check(measured, predicted):
    assert measured <= predicted, f"measured {measured / est.GiB:.2f} GiB > estimated {predicted / est.GiB:.2f} GiB"
    assert measured >= 0.5 * predicted, f"estimate {predicted / est.GiB:.2f} GiB is over twice the measured " \
                                        f"{measured / est.GiB:.2f} GiB"


def test_bf16_weights_with_per_block_checkpointing():
    check(*measure(torch.bfloat16))


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_fp8_weights_with_per_block_checkpointing():
    check(*measure(FP8))


def test_block_swap_with_checkpointing_lowers_the_peak_as_estimated():
    plain, plain_estimate = measure(torch.bfloat16)
    swapped, swapped_estimate = measure(torch.bfloat16, blocks_to_swap=2)  # kohya's count: 1 double + 2 single
    check(swapped, swapped_estimate)
    assert swapped < plain
    saved, predicted_saving = plain - swapped, plain_estimate - swapped_estimate
    assert 0.5 * predicted_saving <= saved <= 1.5 * predicted_saving
