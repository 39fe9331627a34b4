"""Cancel over /interrupt keeps the work and a state (in output/loratrainer_state, never listed as a
LoRA); resume ends equal to an uninterrupted run and its record holds the whole loss curve. The
pre-flight estimate refuses a setting that cannot fit a memory budget. In a real ComfyUI."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import comfy_server as cs

SAMPLE = Path(__file__).resolve().parents[2] / "training" / "sample_dataset"
STEPS = 30  # tiny model; steps take ~0.1-1 s on a busy CPU, enough to cancel mid-run


@pytest.fixture(scope="module")
def tiny_sd1(comfy_base_dir):
    from comfyui_lora_trainer.training.models import write_tiny_checkpoint

    name = "tiny-sd1.safetensors"
    write_tiny_checkpoint(str(comfy_base_dir / "models" / "checkpoints" / name), family="sd1", seed=0)
    shutil.copytree(SAMPLE, comfy_base_dir / "input" / "shapes", dirs_exist_ok=True)
    return name


def graph(checkpoint, output_name, resume=False, **over):
    train = {"checkpoint": checkpoint, "dataset": ["1", 0], "steps": STEPS, "learning_rate": 1e-3, "rank": 4,
             "alpha": 4.0, "resolution": 64, "batch_size": 1, "seed": 3, "output_name": output_name,
             "precision": "fp32", "resume": resume}
    train.update(over)
    return {"1": {"class_type": "LoraTrainer_LoadDataset", "inputs": {"folder": "shapes", "resolution": 64}},
            "2": {"class_type": "LoraTrainer_TrainLoRA", "inputs": train}}


def run_record(comfy, name):
    runs = [r for r in comfy.get_json("/loratrainer/runs")["runs"] if r["name"] == name]
    return runs[-1] if runs else None


def test_cancel_then_resume_equals_uninterrupted(comfy, comfy_base_dir, tiny_sd1):
    loras = comfy_base_dir / "models" / "loras"
    prompt_id = comfy.queue(graph(tiny_sd1, "it_cancel"))
    deadline = time.monotonic() + 300
    seen = None
    while time.monotonic() < deadline:
        record = run_record(comfy, "it_cancel")
        if record and record["step"] >= 3:
            seen = record["step"]
            comfy.interrupt()
            break
        entry = comfy.history(prompt_id)
        assert not (entry and entry.get("status", {}).get("completed") is not None), entry and entry["status"]
        time.sleep(0.05)
    assert seen is not None, "training never reached step 3"
    entry = comfy.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    record = comfy.get_json(f"/loratrainer/runs/{run_record(comfy, 'it_cancel')['run_id']}")
    stopped = record["step"]
    assert record["status"] == "interrupted" and seen <= stopped <= seen + 3  # within a step or so
    assert (loras / f"it_cancel_interrupted_step{stopped}.safetensors").is_file()
    # the state lies beside the outputs, not in models/loras, so LoraLoader never lists it
    assert (comfy_base_dir / "output" / "loratrainer_state" / f"it_cancel_state_step{stopped}.pt").is_file()
    assert not list(loras.rglob("it_cancel*.pt"))  # (other tests leave a pickle here on purpose)
    listed = comfy.node_info("LoraLoader")["input"]["required"]["lora_name"][0]
    assert f"it_cancel_interrupted_step{stopped}.safetensors" in listed
    states = [n for n in listed if "_state_step" in n or n.startswith("it_cancel") and n.endswith(".pt")]
    assert not states, listed
    cancelled_losses = record["losses"]
    assert len(cancelled_losses) == stopped

    comfy.run(graph(tiny_sd1, "it_cancel", resume=True), timeout=600)
    comfy.run(graph(tiny_sd1, "it_straight"), timeout=600)
    resumed, straight = load_file(loras / "it_cancel.safetensors"), load_file(loras / "it_straight.safetensors")
    assert set(resumed) == set(straight)
    for key in straight:
        assert (resumed[key] == straight[key]).all(), key
    resumed_record = comfy.get_json(f"/loratrainer/runs/{run_record(comfy, 'it_cancel')['run_id']}")
    assert resumed_record["resumed_at"] == stopped and resumed_record["step"] == STEPS
    # the whole curve from step 1: the cancelled run's losses, then the resumed steps
    assert resumed_record["first_step"] == 0 and len(resumed_record["losses"]) == STEPS
    assert resumed_record["losses"][:stopped] == cancelled_losses
    straight_record = comfy.get_json(f"/loratrainer/runs/{run_record(comfy, 'it_straight')['run_id']}")
    assert resumed_record["losses"] == straight_record["losses"]


def test_estimate_refuses_what_cannot_fit(comfy, tiny_sd1):
    with pytest.raises(cs.ExecutionFailed) as info:
        comfy.run(graph(tiny_sd1, "it_too_big", resolution=2048, batch_size=8, memory_limit_gb=0.5), timeout=120)
    message = str(info.value)
    assert "run out of memory" in message and "batch_size 8 -> 4" in message and "gradient_checkpointing" in message
    assert run_record(comfy, "it_too_big") is None  # refused before a run started


def test_run_routes_validate_their_input(comfy):
    import urllib.error

    for bad, status in (("not-a-run", 400), ("0" * 32, 404), ("..%2F..%2Fetc", 400)):
        with pytest.raises(urllib.error.HTTPError) as info:
            comfy.get_bytes(f"/loratrainer/runs/{bad}")
        assert info.value.code == status, bad
