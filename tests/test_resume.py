"""Runs: save every N steps keeping the last K, resumable state (bitwise-equal resume), NaN stop, early stop."""

import os

import pytest
import torch
from safetensors import safe_open

from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import TrainingError, train
from comfyui_lora_trainer.training.models import build_tiny_components
from comfyui_lora_trainer.training.state import ResumeError, latest_state

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def cfg(out, **over):
    values = dict(checkpoint="tiny", dataset=SAMPLE, output_dir=str(out), output_name="run", steps=6, rank=2,
                  alpha=2.0, learning_rate=2e-3, resolution=64, batch_size=2, gradient_accumulation_steps=2,
                  seed=7, device="cpu", lr_scheduler="cosine", lr_warmup_steps=2, shuffle_caption=True,
                  caption_dropout_rate=0.2)
    values.update(over)
    return TrainConfig(**values)


def run(out, events=None, should_stop=None, **over):
    return train(cfg(out, **over), base=build_tiny_components("sd1", seed=0), events=events, should_stop=should_stop)


def test_resume_ends_with_the_same_weights_bitwise(tmp_path):
    full = run(tmp_path / "full", train_text_encoder=True)
    # stop after step 3 (as Cancel does); the state is saved, then a new run resumes from it
    events = []
    stopped = run(tmp_path / "part", train_text_encoder=True, events=events.append,
                  should_stop=lambda: sum(e["type"] == "step" for e in events) >= 3)
    assert stopped.stopped_early and stopped.steps_done == 3
    assert stopped.state_path and os.path.isfile(stopped.state_path)
    assert any(e["type"] == "state" and e["path"] == stopped.state_path for e in events)
    assert os.path.isfile(tmp_path / "part" / "run_interrupted_step3.safetensors")
    resumed = run(tmp_path / "part", train_text_encoder=True, resume_from=stopped.state_path)
    assert resumed.steps_done == 6
    assert resumed.losses == full.losses
    assert resumed.lora.tensors.keys() == full.lora.tensors.keys()
    for k in full.lora.tensors:
        assert torch.equal(resumed.lora.tensors[k], full.lora.tensors[k]), k
    # a folder resolves to its newest state; changed settings are refused with the key named
    assert latest_state(str(tmp_path / "part"), "run") == stopped.state_path
    with pytest.raises(ResumeError, match="seed"):
        run(tmp_path / "other", resume_from=str(tmp_path / "part"), seed=8, train_text_encoder=True)


def test_resume_keeps_the_validation_curve_and_its_best_step(tmp_path):
    over = dict(validation_split=2, validate_every_n_steps=2, keep_best=True)
    full = run(tmp_path / "full", **over)
    events = []
    stopped = run(tmp_path / "part", events=events.append, should_stop=lambda: sum(e["type"] == "step"
                                                                                 for e in events) >= 3, **over)
    assert [s for s, _ in stopped.validation] == [0, 2, 3]  # a cancel is measured too (the file's metadata)
    resumed_events = []
    resumed = run(tmp_path / "part", resume_from=stopped.state_path, events=resumed_events.append, **over)
    start = next(e for e in resumed_events if e["type"] == "start")
    assert start["validation"] == [list(p) for p in stopped.validation]  # the history, for the chart
    assert [s for s, _ in resumed.validation] == [0, 2, 3, 4, 6]  # the start (3) is not measured twice
    assert [p for p in resumed.validation if p[0] != 3] == full.validation  # the same values as uninterrupted
    assert (resumed.best_validation_step, resumed.best_validation_loss) == \
        min(resumed.validation, key=lambda p: p[1])  # the tracker came back with the state
    for k in full.lora.tensors:  # measuring never changes what is trained
        assert torch.equal(resumed.lora.tensors[k], full.lora.tensors[k]), k


def test_save_every_n_steps_keeps_last_k(tmp_path):
    events = []
    result = run(tmp_path, steps=7, save_every_n_steps=2, keep_last_n=2, save_state=True, events=events.append)
    names = sorted(os.listdir(tmp_path))
    assert "run_step2.safetensors" not in names
    assert {"run_step4.safetensors", "run_step6.safetensors", "run.safetensors"} <= set(names)
    assert "run_state_step2.pt" not in names and "run_state_step6.pt" in names and "run_state_step7.pt" in names
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4, 6]
    with safe_open(str(tmp_path / "run_step4.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "4"
    assert result.state_path.endswith("run_state_step7.pt")


def test_nan_loss_stops_with_step_and_keeps_last_good_save(tmp_path):
    def poison(event):
        if event["type"] == "step" and event["step"] == 3:
            with torch.no_grad():
                for name, p in holder["base"].unet.named_parameters():
                    if "lora_A" in name:
                        p.fill_(float("nan"))

    holder = {"base": build_tiny_components("sd1", seed=0)}
    with pytest.raises(TrainingError, match=r"nan at step 4.*run_state_step2\.pt"):
        train(cfg(tmp_path, save_every_n_steps=2, save_state=True), base=holder["base"], events=poison)
    names = set(os.listdir(tmp_path))
    assert "run_step2.safetensors" in names and "run_state_step2.pt" in names
    assert "run.safetensors" not in names
    with safe_open(str(tmp_path / "run_step2.safetensors"), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_early_stopping(tmp_path):
    events = []
    result = run(tmp_path, steps=40, early_stopping_patience=3, early_stopping_min_delta=10.0,
                 events=events.append)
    assert result.early_stopped and not result.stopped_early
    assert result.steps_done == 4  # best at step 1, then 3 steps without improvement
    assert os.path.isfile(tmp_path / "run.safetensors")
    assert any("early stopping" in e.get("message", "") for e in events)
    off = run(tmp_path / "off", steps=5, early_stopping_patience=0)
    assert off.steps_done == 5 and not off.early_stopped
