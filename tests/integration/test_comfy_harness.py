"""Sanity checks for the ComfyUI harness using core nodes only (no checkpoint needed)."""

from __future__ import annotations

import pytest

import comfy_server as cs


def test_server_up_and_core_nodes_listed(comfy, comfy_server):
    info = comfy.node_info("KSampler")
    assert info["name"] == "KSampler"
    assert "model" in info["input"]["required"]
    assert comfy.node_info("NoSuchNode_xyz") == {}
    assert comfy.node_info("ITProbeModelInfo")["python_module"].startswith("custom_nodes.")
    assert comfy_server.url.startswith("http://127.0.0.1:")
    assert comfy_server.alive()
    log = comfy.log_text()
    assert "Starting server" in log or "To see the GUI go to" in log


def test_package_loaded_without_import_failure(comfy, comfy_base_dir):
    log = comfy.log_text()
    link = comfy_base_dir / "custom_nodes" / cs.PACKAGE_FOLDER
    assert link.is_symlink() and (link / "__init__.py").is_file()
    failed = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln and cs.PACKAGE_FOLDER in ln]
    assert not failed, log[-6000:]
    assert str(link) in log  # "Import times for custom nodes" lists it


def test_package_nodes_listed(comfy):
    nodes = comfy.package_nodes()
    if not nodes:
        pytest.skip("comfyui_lora_trainer has not registered any nodes yet")
    for node_id, info in nodes.items():
        assert info["python_module"] == cs.PACKAGE_PYTHON_MODULE
        assert info["display_name"], node_id
        assert "input" in info and "output" in info


def test_validation_error_round_trip(comfy):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "does-not-exist.safetensors"}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["3", 2]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "y"}},
    }
    with pytest.raises(cs.PromptRejected) as exc:
        comfy.queue({"1": prompt["1"]})  # no output node
    assert exc.value.status == 400
    assert exc.value.body["error"]["type"] == "prompt_no_outputs"

    bad_only = {k: prompt[k] for k in ("3", "4", "5", "6")}
    with pytest.raises(cs.PromptRejected) as exc:
        comfy.queue(bad_only)
    body = exc.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert "3" in body["node_errors"], body
    errs = [e for ne in body["node_errors"].values() for e in ne["errors"]]
    assert any(e["type"] == "value_not_in_list" for e in errs), errs

    # one valid output: accepted, the invalid branch is reported in node_errors and skipped
    pid = comfy.queue(prompt)
    assert "3" in comfy.last_response["node_errors"]
    entry = comfy.wait(pid, timeout=60)
    assert entry["status"]["status_str"] == "success"
    assert set(entry["outputs"]) == {"2"}


def test_core_prompt_executes_and_image_is_served(comfy, comfy_base_dir):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 16, "batch_size": 1,
                                                     "color": 0xFF0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness"}},
    }
    entry = comfy.run(prompt, timeout=60)
    assert entry["status"]["status_str"] == "success"
    img = entry["outputs"]["2"]["images"][0]
    assert (comfy_base_dir / "output" / img["subfolder"] / img["filename"]).is_file()
    png = comfy.view(img["filename"], img["subfolder"], img["type"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_execution_error_is_reported(comfy):
    # ImageScale to 0x0 is allowed by validation; a negative crop is not. Use a runtime failure:
    # ImageCrop beyond the image is clamped, so instead feed LoadImage a file that is not an image.
    (comfy.server.base_dir / "input" / "not-an-image.png").write_bytes(b"not a png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "not-an-image.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bad"}},
    }
    pid = comfy.queue(prompt)
    entry = comfy.wait(pid, timeout=60)
    assert entry["status"]["status_str"] == "error"
    with pytest.raises(cs.ExecutionFailed):
        comfy.run(prompt, timeout=60)


def test_interrupt_when_idle_is_harmless(comfy):
    comfy.interrupt()
    assert comfy.queue_state() == {"queue_running": [], "queue_pending": []}
