"""The memory estimate for the DiT families: shapes read from the model, the published architectures, the
effect of each setting, kohya's Flux.1 tiers, the suggestions, and the README table."""

import pytest
import torch

from comfyui_lora_trainer.nodes import estimate as est
from comfyui_lora_trainer.training.block_swap import BlockSwap, swap_selection
from comfyui_lora_trainer.training.dit_blocks import checkpoint_blocks, flat_blocks
from comfyui_lora_trainer.training.formats.families import MODEL_FAMILIES

import flux_shaped

torch.set_num_threads(1)
GB = 10**9
S = est.Settings
FP8_CKPT = dict(precision="bf16", fp8_base=True, gradient_checkpointing=True)

# published parameter counts of the diffusion models (model cards / papers), billions
PUBLISHED = {"flux-dev": 11.9, "flux-schnell": 11.9, "chroma": 8.9, "sd3": 2.0, "sd3.5-medium": 2.5,
             "sd3.5-large": 8.1, "lumina2": 2.6, "z-image": 6.0, "qwen-image": 20.0}


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_every_dit_family_has_its_published_size(family):
    shape = est.reference_shape(family)
    assert shape.params / 1e9 == pytest.approx(PUBLISHED[family], rel=0.05)
    assert shape.lora_params(16) == 2 * shape.lora_params(8) > 0
    peak = est.estimate(shape, S(1024, 1, 16, "bf16", gradient_checkpointing=True), None).peak_bytes
    assert peak > shape.params * 2  # at least its bf16 weights


def test_shapes_read_from_the_model_match_the_model():
    model = flux_shaped.build(h=64, heads=2, doubles=2, singles=3, context=32, rank=4)
    shape = est.dit_shape_from_model(model, "flux-dev")
    assert shape.hidden == 64 and shape.block_lists() == [("double_blocks", 2), ("single_blocks", 3)]
    assert shape.params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    double = sum(p.numel() for n, p in model.double_blocks[0].named_parameters() if "lora_" not in n)
    assert shape.blocks[0] == ("double_blocks", double)
    assert shape.weight_bytes == pytest.approx(2.0, rel=0.02)  # bf16 (the fp32 LoRA is trained, not counted)
    assert shape.lora_params(4) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    if hasattr(torch, "float8_e4m3fn"):
        fp8 = est.dit_shape_from_model(flux_shaped.build(h=64, heads=2, doubles=1, singles=1, context=32,
                                                         weight_dtype=torch.float8_e4m3fn), "flux-dev")
        assert fp8.weight_bytes < 1.1  # Linears in 1 byte (norms and biases in bf16)


def test_shapes_read_from_a_state_dict_with_comfyuis_prefix():
    shapes = {"model.diffusion_model." + k: v for k, v in est.REFERENCE_DIT_SHAPES["flux-dev"]().items()}
    assert est.dit_shape_from_shapes(shapes, "flux-dev").params == est.reference_shape("flux-dev").params
    with pytest.raises(ValueError, match="no transformer blocks"):
        est.dit_shape_from_shapes({"img_in.weight": (3072, 64)}, "flux-dev")


def test_each_memory_setting_lowers_the_flux_peak():
    flux = est.reference_shape("flux-dev")
    peak = lambda **kw: est.estimate(flux, S(1024, 1, 16, **kw), None).peak_bytes  # noqa: E731
    assert peak(precision="bf16", gradient_checkpointing=True) < peak(precision="bf16")
    assert peak(**FP8_CKPT) < peak(precision="bf16", gradient_checkpointing=True) - 10 * est.GiB
    assert peak(**FP8_CKPT, optimizer="adamw8bit") < peak(**FP8_CKPT)
    swaps = [peak(**FP8_CKPT, blocks_to_swap=n) for n in (0, 8, 16, 28, 38)]
    assert swaps == sorted(swaps, reverse=True) and swaps[0] - swaps[-1] > 9 * est.GiB
    # the weights read from an fp8 model count 1 byte each, like fp8_base
    fp8_loaded = est.reference_shape("flux-dev", weight_bytes=1)
    assert est.estimate(fp8_loaded, S(1024, 1, 16, "bf16", gradient_checkpointing=True), None).peak_bytes == \
        peak(**FP8_CKPT)
    # batch and resolution scale the activations
    at = lambda resolution, batch: est.estimate(flux, S(resolution, batch, 16, **FP8_CKPT), None).peak_bytes  # noqa: E731
    assert at(512, 1) < at(1024, 1) < at(1024, 2)


@pytest.mark.parametrize("gb,changes,smaller", [
    (24, dict(batch_size=2), 16),
    (12, dict(blocks_to_swap=16, optimizer="adamw8bit"), 10),
])
def test_kohyas_flux_tiers_fit_their_cards(gb, changes, smaller):
    """kohya sd-scripts docs/flux_train_network.md: fp8 base, checkpointing, 1024 px."""
    flux = est.reference_shape("flux-dev")
    settings = S(1024, changes.pop("batch_size", 1), 16, **FP8_CKPT, **changes)
    result = est.estimate(flux, settings, gb * GB, "cuda")
    assert result.fits, est.refusal_message(result)
    assert result.peak_bytes > smaller * GB  # and not by far: kohya would have named the next smaller card


def test_flux_on_16gb_picks_a_swap_count_and_suggestions_name_the_smallest_change():
    flux = est.reference_shape("flux-dev")
    settings = S(1024, 1, 16, **FP8_CKPT)
    n = est.pick_blocks_to_swap(flux, settings, 16 * GB)
    assert n is not None and n > 0
    assert est.estimate(flux, est.replace(settings, blocks_to_swap=n), 16 * GB).fits
    assert not est.estimate(flux, est.replace(settings, blocks_to_swap=n - 1), 16 * GB).fits
    assert est.pick_blocks_to_swap(flux, settings, 80 * GB) == 0
    assert est.pick_blocks_to_swap(flux, settings, 2 * GB) is None

    refused = est.estimate(flux, S(1024, 1, 16, "bf16"), 12 * GB, "cuda", "NVIDIA GeForce RTX 3060")
    assert not refused.fits
    first = refused.suggestions[0]
    assert first.endswith("(fits)") and "blocks_to_swap" in first and "gradient_checkpointing on" in first
    message = est.refusal_message(refused)
    assert "blocks_to_swap" in message and "11.2 GiB free" in message
    # already checkpointed in fp8 on 12 GB: 8-bit AdamW plus a swap count
    almost = est.estimate(flux, S(1024, 1, 16, **FP8_CKPT), 12 * GB, "cuda")
    assert "blocks_to_swap" in almost.suggestions[0] and almost.suggestions[0].endswith("(fits)")


def test_sd_families_keep_their_estimate_and_learn_fp8_and_8bit():
    sdxl = est.reference_shape("sdxl")
    plain = est.estimate(sdxl, S(1024, 1, 16, "bf16", gradient_checkpointing=True), None).peak_bytes
    fp8 = est.estimate(sdxl, S(1024, 1, 16, "bf16", gradient_checkpointing=True, fp8_base=True), None).peak_bytes
    assert 4 * est.GiB < fp8 < 5.5 * est.GiB < plain  # SDXL fp8 + caching + GC: 4.4-4.9 GB published


def test_the_readme_table_is_the_estimators():
    with open(est.README, encoding="utf-8") as f:
        text = f.read()
    assert est.current_block(text) == est.generated_block(), (
        "README.md's memory table is out of date with nodes/estimate.py; refresh it with "
        "`python -m comfyui_lora_trainer.nodes.estimate`"
    )
    for label in ("SDXL", "SD3.5 Medium", "Flux.1 dev", "Qwen-Image", "blocks_to_swap 16", "8-bit AdamW"):
        assert label in est.generated_block()


def test_the_table_command_reports_and_fixes_drift(tmp_path):
    with open(est.README, encoding="utf-8") as f:
        text = f.read()
    stale = tmp_path / "README.md"
    stale.write_text(text.replace("| Flux.1 dev | 11.9 B |", "| Flux.1 dev | 12.9 B |"), encoding="utf-8")
    assert est.main(["--check", "--path", str(stale)]) == 1
    assert est.main(["--path", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == text


def test_the_gpu_check_runs_tiny_on_the_cpu():
    """tests/test_gpu_flux_memory.py's path at tiny size: the Flux-shaped model with LoRA, its shape read for
    the estimate, checkpointing and kohya-counted block swap on its blocks, training steps."""
    size = dict(h=64, heads=2, doubles=2, singles=4, context=32)
    reference = flux_shaped.build(**size, weight_dtype=torch.float32)
    ref_losses = flux_shaped.train_steps(reference, 2, "cpu", resolution=128, text_tokens=8, context=32,
                                         copy_saved=True)
    model = flux_shaped.build(**size, weight_dtype=torch.float32)
    shape = est.dit_shape_from_model(model, "flux-dev")
    blocks = flat_blocks(model, "flux-dev")
    selection = swap_selection(shape.block_lists(), 2)
    assert selection == [1, 4, 5]  # the last double block, the last two single blocks
    with BlockSwap(blocks, selection, "cpu", debug=True), checkpoint_blocks(blocks):
        losses = flux_shaped.train_steps(model, 2, "cpu", resolution=128, text_tokens=8, context=32)
    assert losses == ref_losses
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    swapped = est.estimate(shape, S(128, 1, 4, "bf16", gradient_checkpointing=True, blocks_to_swap=2), None, "cuda")
    plain = est.estimate(shape, S(128, 1, 4, "bf16", gradient_checkpointing=True), None, "cuda")
    assert plain.parts["weights"] == shape.params * 4  # as held: fp32 here
    # three swapped blocks, two of them (the largest: a double and a single) counted in flight
    assert plain.parts["weights"] - swapped.parts["weights"] == 4 * shape.blocks[4][1]


def test_shapes_of_a_model_not_yet_frozen_count_every_weight():
    model = flux_shaped.FluxShaped(h=64, heads=2, doubles=1, singles=2, context=32)
    shape = est.dit_shape_from_model(model, "flux-dev")
    assert shape.params == sum(p.numel() for p in model.parameters()) and shape.weight_bytes == 4
