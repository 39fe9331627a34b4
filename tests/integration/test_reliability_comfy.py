"""Issue 7 in a real ComfyUI server: two trainings back to back, image generation after training,
hostile inputs over HTTP, a LoRA for another base model, a pickle LoRA, the package's HTTP routes,
and start-up cleanup of leftovers from a killed save."""

from __future__ import annotations

import os
import shutil
import sys
import time
import urllib.error
from pathlib import Path

import pytest

import comfy_server as cs

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "training" / "sample_dataset"
sys.path.insert(0, str(REPO / "tests"))

from reliability import corpus  # noqa: E402


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def train_prompt(checkpoint, name, seed=0, steps=3, folder="rel_shapes"):
    return {
        "1": {"class_type": "LoraTrainer_LoadDataset", "inputs": {"folder": folder}},
        "2": {"class_type": "LoraTrainer_TrainLoRA", "inputs": {
            "checkpoint": checkpoint, "dataset": ["1", 0], "steps": steps, "learning_rate": 1e-4, "rank": 4,
            "alpha": 4.0, "resolution": 64, "batch_size": 1, "seed": seed, "output_name": name,
            "precision": "fp32"}},
    }


def generate_prompt(checkpoint, lora_name=None, prefix="rel_gen"):
    model, clip = ["1", 0], ["1", 1]
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    if lora_name:
        prompt["2"] = {"class_type": "LoraTrainer_ApplyLoRA", "inputs": {
            "model": model, "clip": clip, "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["2", 0], ["2", 1]
    prompt.update({
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "shapetoy, a red circle", "clip": clip}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}},
    })
    return prompt


def error_message(entry) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


@pytest.fixture(scope="module")
def dataset(comfy_base_dir):
    shutil.copytree(SAMPLE, comfy_base_dir / "input" / "rel_shapes", dirs_exist_ok=True)
    return "rel_shapes"


def test_two_trainings_back_to_back_then_generation(comfy, comfy_server, comfy_base_dir, sd15_checkpoint, dataset):
    from safetensors import safe_open

    loras = comfy_base_dir / "models" / "loras"
    first = comfy.queue(train_prompt(sd15_checkpoint, "rel_first", seed=1))
    second = comfy.queue(train_prompt(sd15_checkpoint, "rel_second", seed=2))  # queued while the first runs
    entries = [comfy.wait(first, timeout=900), comfy.wait(second, timeout=900)]
    for entry in entries:
        assert entry["status"]["status_str"] == "success", error_message(entry) + comfy_server.log_tail()
    meta = {}
    for name in ("rel_first", "rel_second"):
        with safe_open(str(loras / f"{name}.safetensors"), "pt") as f:
            meta[name] = f.metadata()
            assert f.keys()
        assert meta[name]["ss_output_name"] == name
    # one after the other: the second started training after the first had finished
    assert float(meta["rel_second"]["ss_training_started_at"]) >= float(meta["rel_first"]["ss_training_finished_at"])
    assert meta["rel_first"]["ss_seed"] == "1" and meta["rel_second"]["ss_seed"] == "2"
    rss_after_two = rss_bytes(comfy_server.proc.pid)

    # a third training does not keep the previous one's model around (CPU: resident memory does not climb
    # by anything like a UNet copy, 3.4 GB for SD1.5 in fp32)
    comfy.run(train_prompt(sd15_checkpoint, "rel_third", seed=3), timeout=900)
    grew = rss_bytes(comfy_server.proc.pid) - rss_after_two
    assert grew < 1.5 * 2**30, f"server memory grew by {grew / 2**30:.2f} GiB after another training"

    # image generation works after training, with and without the trained LoRA
    for lora in (None, "rel_first.safetensors"):
        mark = comfy.log_mark()
        entry = comfy.run(generate_prompt(sd15_checkpoint, lora, prefix=f"rel_gen_{bool(lora)}"), timeout=600)
        assert entry["outputs"]["10"]["images"]
        assert "lora key not loaded" not in comfy.log_text(since=mark)


def test_hostile_names_over_http(comfy, comfy_base_dir, sd15_checkpoint, dataset):
    loras = comfy_base_dir / "models" / "loras"
    before = sorted(os.listdir(loras))
    # output names are free text: the node refuses them when it runs, before any training
    for name in ("../../escape", "/tmp/rel_abs_escape", "CON", "a\x00b"):
        entry = comfy.wait(comfy.queue(train_prompt(sd15_checkpoint, name)), timeout=300)
        assert entry["status"]["status_str"] == "error"
        assert "output_name" in error_message(entry)
    assert sorted(os.listdir(loras)) == before
    assert not (comfy_base_dir / "escape.safetensors").exists() and not os.path.exists("/tmp/rel_abs_escape.safetensors")
    # folders and LoRA files are lists, but ComfyUI (0.3.64) does not check a V3 node's COMBO value against
    # its list: the nodes themselves must refuse anything else, whether validation catches it or not
    def refused(prompt, words):
        try:
            entry = comfy.wait(comfy.queue(prompt), timeout=300)
        except cs.PromptRejected as e:
            return e.status == 400
        return entry["status"]["status_str"] == "error" and words in error_message(entry)

    for folder in ("../models", "/etc", "rel_shapes/../../models"):
        assert refused(train_prompt(sd15_checkpoint, "rel_x", folder=folder), "inside ComfyUI's input directory")
    for name in ("../../../etc/passwd", "/etc/passwd"):
        assert refused(generate_prompt(sd15_checkpoint, name), "not found in models/loras")
    assert sorted(os.listdir(loras)) == before


def test_lora_for_another_base_model_is_refused(comfy, comfy_server, comfy_base_dir, sd15_checkpoint):
    from safetensors.torch import save_file

    save_file(corpus.sdxl_lora_tensors(), str(comfy_base_dir / "models" / "loras" / "rel_sdxl_lora.safetensors"))
    entry = comfy.wait(comfy.queue(generate_prompt(sd15_checkpoint, "rel_sdxl_lora.safetensors")), timeout=600)
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "made for SDXL but the model is SD1.x" in message, message
    assert "10" not in entry.get("outputs", {})  # nothing was generated with a half-applied LoRA


def test_pickle_lora_never_runs_code(comfy, comfy_base_dir, sd15_checkpoint, tmp_path):
    marker = tmp_path / "code_ran"
    corpus.write_malicious_pickle(comfy_base_dir / "models" / "loras" / "rel_evil.pt", marker)
    entry = comfy.wait(comfy.queue(generate_prompt(sd15_checkpoint, "rel_evil.pt")), timeout=600)
    assert entry["status"]["status_str"] == "error" and error_message(entry)  # loaded weights_only: refused
    assert not marker.exists()


def test_package_routes_serve_only_run_records(comfy):
    runs = comfy.get_json("/loratrainer/runs")
    assert isinstance(runs, dict) and isinstance(runs.get("runs"), list)
    for run in runs["runs"]:
        assert set(run) <= {"run_id", "node", "prompt_id", "name", "status", "step", "total", "started", "updated"}
    if runs["runs"]:
        record = comfy.get_json(f"/api/loratrainer/runs/{runs['runs'][0]['run_id']}")
        assert record["run_id"] == runs["runs"][0]["run_id"] and isinstance(record["losses"], list)
    for path, statuses in (("/loratrainer/runs/" + "0" * 32, {404}), ("/loratrainer/runs/not-an-id", {400}),
                           ("/loratrainer/runs/..%2f..%2f..%2fetc%2fpasswd", {400, 404}),
                           ("/loratrainer/runs/%2e%2e/%2e%2e/etc/passwd", {400, 404}),
                           ("/loratrainer/../../../../etc/passwd", {400, 403, 404})):
        with pytest.raises(urllib.error.HTTPError) as info:
            comfy.get_bytes(path)
        assert info.value.code in statuses, (path, info.value.code)
        assert b"root:" not in info.value.read()


def test_startup_removes_temp_files_a_killed_save_left(comfyui_dir, tmp_path):
    """A save SIGKILLed mid-write leaves '.<name>.tmp-<hex>' in models/loras; ComfyUI's next start cleans it."""
    base = tmp_path / "base"
    cs.prepare_base_dir(base)
    loras = base / "models" / "loras"
    stale = loras / ".killed.safetensors.tmp-0123456789abcdef"
    stale.write_bytes(b"half a LoRA")
    os.utime(stale, (time.time() - 3600,) * 2)
    recent = loras / ".busy.safetensors.tmp-fedcba9876543210"  # another process's save in progress
    recent.write_bytes(b"in progress")
    keep = loras / "keep.safetensors"
    keep.write_bytes(b"not really a LoRA, but not ours to delete")
    server = cs.ComfyServer(comfyui_dir, base)
    server.start()
    try:
        deadline = time.monotonic() + 30
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not stale.exists(), server.log_tail()
        assert recent.exists() and keep.exists()
    finally:
        server.stop()
