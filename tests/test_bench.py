"""The benchmark code runs and reports sane figures (speed goals are reported, never asserted)."""

import json
import math

import pytest
import torch

from comfyui_lora_trainer.bench.cpu import bench_cpu, seconds_per_step
from comfyui_lora_trainer.bench.gpu import bench_step
from comfyui_lora_trainer.bench.measure import measured
from comfyui_lora_trainer.bench.run import table, write_results


def test_seconds_per_step_is_the_median_gap():
    assert seconds_per_step([0.0, 1.0, 1.5, 2.0, 2.5, 9.0]) == 0.5
    assert math.isnan(seconds_per_step([1.0]))


def test_measured_sees_a_large_allocation():
    with measured() as m:
        block = torch.ones(64, 2**20)  # 256 MiB
        block += 1
    assert m.seconds > 0
    if m.peak_rss_bytes is not None:
        assert m.peak_rss_bytes - m.rss_before_bytes > 200 * 2**20


def test_cpu_comparison_runs_both_loops(tmp_path):
    result = bench_cpu(steps=4, repeats=1)
    for side in ("ours", "reference"):
        row = result[side]
        assert row["seconds"] > 0 and row["seconds_per_step"] > 0 and math.isfinite(row["final_loss"])
    assert result["speedup_end_to_end"] > 0
    text = table([result])
    assert "speed-up" in text
    path = write_results([result], str(tmp_path))
    record = json.load(open(path))
    assert record["results"][0]["settings"]["steps"] == 4 and record["environment"]["torch"] == torch.__version__


def test_gpu_step_bench_runs_on_cpu_with_a_small_unet():
    row = bench_step(
        "sd1", resolution=64, batch_size=2, rank=4, steps=2, device="cpu",
        unet_overrides={"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
                        "cross_attention_dim": 32, "attention_head_dim": 8},
    )
    assert row["samples_per_second"] > 0 and row["tflop_per_step"] > 0
    assert row["mfu"] is None and row["peak_vram_bytes"] is None  # no GPU peak known for a CPU
    sdxl = bench_step(
        "sdxl", resolution=64, batch_size=1, rank=4, steps=1, device="cpu", gradient_checkpointing=True,
        unet_overrides={"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
                        "transformer_layers_per_block": 1, "cross_attention_dim": 64, "attention_head_dim": 8,
                        "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 48},
    )
    assert sdxl["samples_per_second"] > 0


def test_photo_sized_copy_upscales_images_and_keeps_captions(tmp_path):
    from PIL import Image

    from comfyui_lora_trainer.bench.cpu import SAMPLE, photo_sized_copy

    folder = photo_sized_copy(str(tmp_path / "photos"), 256)
    import os

    pngs = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    assert pngs == sorted(n for n in os.listdir(SAMPLE) if n.endswith(".png")) and pngs
    with Image.open(os.path.join(folder, pngs[0])) as image:
        assert image.size == (256, 256)
    assert open(os.path.join(folder, pngs[0][:-4] + ".txt")).read() == open(os.path.join(SAMPLE, pngs[0][:-4] + ".txt")).read()


def test_core_step_stamps_times_each_core_step_and_restores_the_sampler():
    """The core comparison times core's steps from its per-step loss callback; the patch must pass losses on."""
    import types

    from comfyui_lora_trainer.bench.comfy_core import core_step_stamps

    class TrainSampler:
        def __init__(self, loss_fn, optimizer, loss_callback=None, batch_size=1):
            self.loss_callback, self.batch_size = loss_callback, batch_size

    fake = types.SimpleNamespace(TrainSampler=TrainSampler)
    original, stamps, seen = TrainSampler.__init__, [], []
    with core_step_stamps(fake, stamps):
        sampler = fake.TrainSampler(None, None, seen.append, batch_size=3)
        for loss in (0.5, 0.4, 0.3):
            sampler.loss_callback(loss)
    assert seen == [0.5, 0.4, 0.3] and len(stamps) == 3 and stamps == sorted(stamps)
    assert sampler.batch_size == 3 and TrainSampler.__init__ is original


def test_bench_has_its_own_entry_and_the_cli_does_not_offer_it():
    from comfyui_lora_trainer.bench.__main__ import build_parser
    from comfyui_lora_trainer.training.cli import build_parser as cli_parser

    args = build_parser().parse_args(["--only", "cpu", "--steps", "3"])
    assert args.only == ["cpu"] and args.steps == 3 and args.repeats == 2 and args.results_dir is None
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["bench"])
