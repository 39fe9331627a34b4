"""Issue 5 through the host's test double: run records, live events, preview, estimate, dataset report."""

import os
import shutil

import pytest
import torch
from PIL import Image

from comfyui_lora_trainer.nodes import estimate as est
from comfyui_lora_trainer.nodes import runs
from comfyui_lora_trainer.nodes.dataset import LoadDataset
from comfyui_lora_trainer.nodes.report import analyse_dataset, bucket_resolutions, nearest_bucket
from comfyui_lora_trainer.nodes.spec import NodeError
from comfyui_lora_trainer.nodes.train import (PROGRESS_EVENT, RUN_EVENT, SAMPLE_EVENT, SAVED_EVENT, VALIDATION_EVENT,
                                              SpeedMeter, TrainLoRA)
from comfyui_lora_trainer.training.dataset import load_dataset
from comfyui_lora_trainer.training.models import tiny_tokenizer_dir, write_tiny_checkpoint

from fake_host import FakeHost

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


@pytest.fixture()
def host(tmp_path):
    h = FakeHost(tmp_path, tiny_tokenizer_dir())
    write_tiny_checkpoint(h.checkpoint_path("tiny.safetensors"), family="sd1", seed=0)
    shutil.copytree(SAMPLE, os.path.join(h.input_directory(), "shapes"))
    runs.REGISTRY.clear()
    return h


def inputs(dataset, **over):
    values = dict(
        checkpoint="tiny.safetensors", dataset=dataset, steps=4, learning_rate=1e-3, rank=4, alpha=4.0,
        resolution=64, batch_size=1, seed=1, output_name="ui_lora", precision="fp32",
    )
    values.update(over)
    return values


# -- run registry ---------------------------------------------------------------------------------------
def test_registry_records_steps_samples_and_validates_ids():
    registry = runs.RunRegistry(max_runs=2)
    record = registry.start("5", "p1", 10, "a")
    assert runs.valid_run_id(record.run_id)
    registry.add_step(record.run_id, 1, 10, 0.5, 0.1)
    registry.add_step(record.run_id, 2, 10, 0.25, 0.2)
    registry.add_sample(record.run_id, 2, [{"filename": "x.png", "subfolder": "", "type": "temp"}], ["p"])
    got = registry.get(record.run_id)
    assert got["losses"] == [0.5, 0.25] and got["step"] == 2 and got["status"] == "running"
    assert got["samples"][0]["images"][0]["filename"] == "x.png"
    assert got["node"] == "5" and got["prompt_id"] == "p1"
    for bad in ("../etc/passwd", "ABC", "", None, record.run_id.upper(), record.run_id + "0"):
        assert registry.get(bad) is None
    # finished runs are dropped oldest first beyond max_runs; running ones are kept
    registry.update(record.run_id, status="done")
    second, third = registry.start("6", "p2", 1), registry.start("7", "p3", 1)
    ids = [r["run_id"] for r in registry.summaries()]
    assert record.run_id not in ids and second.run_id in ids and third.run_id in ids


def test_resumed_run_chart_starts_at_resume_step():
    registry = runs.RunRegistry()
    record = registry.start("1", None, 10)
    registry.add_step(record.run_id, 6, 10, 0.3, 1.0)
    assert registry.get(record.run_id)["first_step"] == 5


def test_smoothing_speed_and_status_line():
    assert runs.smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    values = runs.smoothed([1.0, 0.0], weight=0.5)
    assert values[0] == 1.0 and 0 < values[1] < 1.0
    t = [0.0]
    meter = SpeedMeter(clock=lambda: t[0])
    for step in range(1, 6):
        t[0] = step * 0.5
        meter.tick(step)
    assert meter.rate() == pytest.approx(2.0) and meter.eta(5, 25) == pytest.approx(10.0)
    line = runs.progress_line(5, 25, 0.1234, 0.2, 2.0, 10.0)
    assert "step 5/25" in line and "2.00 it/s" in line and "ETA 0:10" in line
    assert runs.format_duration(3725) == "1:02:05" and runs.format_duration(None) == "--:--"


# -- estimate -------------------------------------------------------------------------------------------
SD15 = est.ModelShape("sd1", unet_params=859_520_964, text_encoder_params=123_060_480, vae_params=83_653_863,
                      model_channels=320, attention_modules=[(320, 320)] * 64 + [(768, 320)] * 32)
SDXL = est.ModelShape("sdxl", unet_params=2_567_463_684, text_encoder_params=817_000_000, vae_params=83_653_863,
                      model_channels=320, attention_modules=[(1280, 1280)] * 560 + [(2048, 1280)] * 140)


def test_estimate_matches_published_floors():
    sd15 = est.estimate(SD15, est.Settings(512, 1, 16, "bf16"), None)
    assert 2.5 * est.GiB < sd15.peak_bytes < 5 * est.GiB  # ~4 GB reported for SD1.5 LoRA
    sdxl = est.estimate(SDXL, est.Settings(1024, 1, 16, "bf16"), None)
    assert 12 * est.GiB < sdxl.peak_bytes < 18 * est.GiB  # 12-17 GB with diffusers defaults
    sdxl_gc = est.estimate(SDXL, est.Settings(1024, 1, 16, "bf16", gradient_checkpointing=True), None)
    assert 6 * est.GiB < sdxl_gc.peak_bytes < 9 * est.GiB  # ~6-7 GB floor with checkpointing
    bigger = est.estimate(SDXL, est.Settings(1024, 4, 16, "bf16"), None)
    assert bigger.peak_bytes > sdxl.peak_bytes + 20 * est.GiB
    h100 = est.estimate(SDXL, est.Settings(1024, 1, 16, "bf16", steps=1000), None, "cuda", "NVIDIA H100 80GB HBM3")
    t4 = est.estimate(SDXL, est.Settings(1024, 1, 16, "bf16", steps=1000), None, "cuda", "Tesla T4")
    assert 0 < h100.total_seconds < t4.total_seconds


def test_estimate_refuses_with_the_settings_to_change():
    settings = est.Settings(1024, 4, 16, "fp32")
    result = est.estimate(SDXL, settings, 12 * est.GiB, "cuda", "NVIDIA GeForce RTX 4070")
    assert not result.fits
    text = "\n".join(result.suggestions)
    for setting in ("batch_size", "gradient_checkpointing", "precision", "resolution"):
        assert setting in text
    assert "(fits)" in result.suggestions[0]  # the ones that fit are listed first
    message = est.refusal_message(result)
    assert "12.0 GiB free" in message and "batch_size 4 -> 2" in message
    assert est.estimate(SDXL, settings, 200 * est.GiB, "cuda").fits


def test_model_shape_from_a_checkpoint_header(tmp_path):
    path = write_tiny_checkpoint(str(tmp_path / "t.safetensors"), family="sd1", seed=0)
    shape = est.read_model_shape(path)
    assert shape.family == "sd1" and shape.unet_params > 0 and shape.vae_params > 0
    assert shape.text_encoder_params > 0 and shape.attention_modules
    assert shape.lora_params(8) == 2 * shape.lora_params(4)


# -- Train LoRA through the fake host -------------------------------------------------------------------
def test_train_reports_live_and_records_the_run(host):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    lora, loss, name, _ = TrainLoRA.execute(host, **inputs(dataset), node_id="12").values
    sent = [event for event, _ in host.sent]
    assert sent[0] == RUN_EVENT and sent[-1] == RUN_EVENT
    steps = [data for event, data in host.sent if event == PROGRESS_EVENT]
    assert [d["step"] for d in steps] == [1, 2, 3, 4] and all(d["node"] == "12" for d in steps)
    assert [d["loss"] for d in steps] == loss["loss"]
    run_id = steps[0]["run_id"]
    record = runs.REGISTRY.get(run_id)
    assert record["status"] == "done" and record["losses"] == loss["loss"] and record["node"] == "12"
    assert record["prompt_id"] == "prompt-1" and record["estimate"]["fits"]
    assert any(f["path"] == name for f in record["files"])
    saved = [d for event, d in host.sent if event == SAVED_EVENT]
    assert saved and saved[-1]["path"] == "ui_lora.safetensors"
    # the stock frontend's preview: the loss chart image when sampling is off; a status line
    assert host.previews and isinstance(host.previews[-1][1], Image.Image) and host.previews[-1][0] == 4
    assert any("step 4/4" in text for _, text in host.texts)
    assert any("estimated peak memory" in text for _, text in host.texts)


def test_validation_reaches_the_chart_the_record_the_status_line_and_the_last_output(host):
    from comfyui_lora_trainer.nodes.options import TrainingOptions

    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    (options,) = TrainingOptions.execute(host, validation_split=2.0, validate_every_n_steps=2).values
    _, loss, _, validation = TrainLoRA.execute(host, **inputs(dataset), options=options, node_id="7").values
    sent = [d for e, d in host.sent if e == VALIDATION_EVENT]
    assert [d["step"] for d in sent] == [0, 2, 4] and all(d["node"] == "7" for d in sent)
    # core's Plot Loss Graph: one value per training step, the latest measurement at or before it
    assert len(validation["loss"]) == len(loss["loss"]) == 4
    assert validation["loss"] == [sent[0]["loss"], sent[1]["loss"], sent[1]["loss"], sent[2]["loss"]]
    record = runs.REGISTRY.get(sent[0]["run_id"])
    assert record["validation"] == [{"step": d["step"], "loss": d["loss"]} for d in sent]
    assert any("validation loss" in text for _, text in host.texts)


def test_resumed_run_carries_the_whole_loss_curve(host):
    """Cancel at step k, resume: the record, the live messages and LOSS_MAP show steps 1..N."""
    from fake_host import InterruptProcessing

    k, steps = 2, 5
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    host.stop_after_steps = k
    with pytest.raises(InterruptProcessing):
        TrainLoRA.execute(host, **inputs(dataset, steps=steps), node_id="4")
    first = runs.REGISTRY.get(runs.REGISTRY.summaries()[-1]["run_id"])
    assert first["status"] == "interrupted" and len(first["losses"]) == k
    host.stop_after_steps, host.sent = None, []
    _, loss, _, _ = TrainLoRA.execute(host, **inputs(dataset, steps=steps), resume=True, node_id="4").values
    assert len(loss["loss"]) == steps and loss["loss"][:k] == first["losses"]
    run_id = [d for e, d in host.sent if e == PROGRESS_EVENT][0]["run_id"]
    record = runs.REGISTRY.get(run_id)
    assert record["losses"] == loss["loss"] and record["first_step"] == 0 and record["resumed_at"] == k
    assert record["step"] == steps and record["status"] == "done"
    # the live chart gets the history before the first new step, then steps k+1..N
    resumed = [d for e, d in host.sent if e == RUN_EVENT and "losses" in d]
    assert len(resumed) == 1 and resumed[0]["losses"] == first["losses"] and resumed[0]["step"] == k
    assert [d["step"] for e, d in host.sent if e == PROGRESS_EVENT] == list(range(k + 1, steps + 1))
    order = [e for e, d in host.sent]
    assert order.index(RUN_EVENT, 1) < order.index(PROGRESS_EVENT)


def test_train_refuses_a_setting_that_cannot_fit_before_loading(host):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    with pytest.raises(NodeError) as info:
        TrainLoRA.execute(host, **inputs(dataset, resolution=1024, batch_size=8), memory_limit_gb=0.5)
    message = str(info.value)
    assert "batch_size" in message and "resolution" in message and "0.5 GiB free" in message
    assert not host.sent and not host.progress_values  # refused before any training
    host.free_bytes = 1024  # the device's own free memory is used when no limit is given
    with pytest.raises(NodeError, match="run out of memory"):
        TrainLoRA.execute(host, **inputs(dataset))


def test_sample_events_become_images_and_previews(host, monkeypatch):
    """The node's handling of the loop's sample/saved events (the loop is replaced by one that emits them)."""
    from comfyui_lora_trainer.training import loop

    def fake_train(config, events=None, should_stop=None, base=None):
        assert config.sample_every_n_steps == 2 and config.sample_prompts == ["a red circle"]
        for step in (1, 2):
            events({"type": "step", "step": step, "total": 2, "loss": 0.5 / step, "elapsed": step})
        events({"type": "sample", "step": 2, "images": [Image.new("RGB", (32, 32), (255, 0, 0)),
                                                          torch.zeros(3, 16, 16)], "prompts": ["a red circle"]})
        events({"type": "saved", "path": os.path.join(config.output_dir, "x.safetensors")})
        return loop.TrainResult(None, os.path.join(config.output_dir, "x.safetensors"), [0.5, 0.25], 2, False, 1.0, config)

    monkeypatch.setattr(loop, "train", fake_train)
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    TrainLoRA.execute(host, **inputs(dataset, steps=2), sample_every=2, sample_prompt="a red circle\n", node_id="3")
    samples = [d for event, d in host.sent if event == SAMPLE_EVENT]
    assert len(samples) == 1 and len(samples[0]["images"]) == 2
    assert all(os.path.isfile(os.path.join(host.root, "temp", i["filename"])) for i in samples[0]["images"])
    record = runs.REGISTRY.get(samples[0]["run_id"])
    assert record["samples"][0]["step"] == 2 and record["samples"][0]["prompts"] == ["a red circle"]


def test_train_refuses_unreadable_images_before_training(host):
    with open(os.path.join(host.input_directory(), "shapes", "broken.png"), "wb") as f:
        f.write(b"not a png at all")
    dataset, report, _ = LoadDataset.execute(host, folder="shapes").values
    assert "UNREADABLE" in report and "broken.png" in report
    with pytest.raises(NodeError, match="cannot be read"):
        TrainLoRA.execute(host, **inputs(dataset))
    assert not host.progress_values


# -- dataset report -------------------------------------------------------------------------------------
def test_dataset_report_finds_each_problem(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root)
    shutil.copy(root / "00_red_circle.png", root / "10_copy.png")  # same pixels...
    Image.open(root / "01_blue_square.png").save(root / "11_same_pixels.bmp")  # ...whatever the format
    (root / "10_copy.txt").write_text("a copy")
    (root / "11_same_pixels.txt").write_text("")  # empty caption
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "12_tiny.png")  # small, no caption
    (root / "12_tiny.txt").unlink(missing_ok=True)
    (root / "02_green_triangle.txt").write_text(", ".join(f"word{i}" for i in range(90)))
    (root / "13_broken.jpg").write_bytes(b"\xff\xd8 broken")
    (root / "13_broken.txt").write_text("broken")
    dataset = load_dataset(str(root))
    report = analyse_dataset(dataset, resolution=128, tokenizer=None)
    problems = {c.rel: c.problems for c in report.images}
    assert problems["13_broken.jpg"] == ["unreadable"]
    assert "no caption" in problems["12_tiny.png"] and "small" in problems["12_tiny.png"]
    assert "empty caption" in problems["11_same_pixels.bmp"] and "duplicate" in problems["11_same_pixels.bmp"]
    assert "duplicate" in problems["10_copy.png"] and "duplicate" not in problems["00_red_circle.png"]
    assert "long caption" in problems["02_green_triangle.png"]
    assert sorted(map(sorted, report.duplicates)) == [["00_red_circle.png", "10_copy.png"],
                                                      ["01_blue_square.png", "11_same_pixels.bmp"]]
    text = report.text()
    for phrase in ("12 images", "UNREADABLE", "missing captions", "empty captions", "over 77 tokens",
                   "very small", "duplicate images", "aspect buckets"):
        assert phrase in text, phrase
    grid = report.grid(cell=64)
    assert grid.size == (4 * 64, 3 * 64)
    # the broken image (the 12th) gets a red cross in its cell; a clean one keeps its own pixels unframed
    assert grid.getpixel((3 * 64 + 32, 2 * 64 + 32)) == (220, 30, 30)
    assert grid.getpixel((2, 2)) != (220, 30, 30)


def test_caption_tokens_counted_with_the_clip_tokenizer(tmp_path):
    from comfyui_lora_trainer.nodes.report import load_tokenizer, token_count

    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    assert tokenizer is not None
    assert token_count(tokenizer, "a red circle") < 20 < token_count(tokenizer, "a red circle " * 4)
    assert token_count(tokenizer, " ".join(["circle"] * 80)) > 77


def test_buckets():
    buckets = bucket_resolutions(512)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    w, h = nearest_bucket(1600, 900, buckets)
    assert w > h and abs(w / h - 16 / 9) < 0.2
