"""Browser test: headless Chromium (Debian's chromium + playwright-core) against a real ComfyUI serving
comfyui-frontend-package and this package. Loads the train_sdxl example workflow, queues it, and checks
that the Train LoRA node's chart draws points and a sample image arrives; keeps a screenshot.

Setup (not needed for CI, where this test skips):
    apt-get install -y chromium                      # Debian 12: /usr/bin/chromium
    mkdir -p ~/pw && cd ~/pw && npm init -y && npm install playwright-core
    export LORATRAINER_PLAYWRIGHT=~/pw/node_modules   # or put playwright-core on NODE_PATH
    COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/integration/test_ui_browser.py -s
The screenshot path is printed (default: <tmp>/loratrainer-browser.png, or $LORATRAINER_SCREENSHOT).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import comfy_server as cs

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parents[1] / "training" / "sample_dataset"


def _playwright_dir() -> str | None:
    candidates = [os.environ.get("LORATRAINER_PLAYWRIGHT"), *os.environ.get("NODE_PATH", "").split(os.pathsep)]
    for c in candidates:
        if c and (Path(c) / "playwright-core" / "package.json").is_file():
            return c
    return None


def _requirements() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium binary (apt-get install chromium, or set CHROMIUM)"
    if _playwright_dir() is None:
        return "playwright-core not found (npm install playwright-core; set LORATRAINER_PLAYWRIGHT to its node_modules)"
    return None


def test_chart_and_sample_in_the_browser(comfy, comfy_base_dir):
    missing = _requirements()
    if missing:
        pytest.skip(f"browser test needs chromium + playwright-core: {missing}")
    from comfyui_lora_trainer.training.models import write_tiny_checkpoint

    checkpoint = "tiny-sdxl-browser.safetensors"
    write_tiny_checkpoint(str(comfy_base_dir / "models" / "checkpoints" / checkpoint), family="sdxl", seed=0)
    shutil.copytree(SAMPLE, comfy_base_dir / "input" / "my_dataset", dirs_exist_ok=True)
    templates = comfy.get_json("/api/workflow_templates")
    folder = next(k for k, names in templates.items() if "train_sdxl" in names)
    screenshot = os.environ.get("LORATRAINER_SCREENSHOT") or os.path.join(tempfile.gettempdir(), "loratrainer-browser.png")
    env = dict(os.environ, NODE_PATH=_playwright_dir(),
               CHROMIUM=os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser"))
    result = subprocess.run(["node", str(HERE / "browser" / "train_in_browser.mjs"), comfy.url, folder, checkpoint,
                             screenshot], capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads(lines[-1])
    print(f"\n[browser] screenshot: {screenshot}\n[browser] {seen}")
    assert seen["ok"], seen
    assert seen["points"] >= 2 and len(seen["losses"]) >= 2 and seen["samples"] >= 1 and seen["sampleWidth"] > 0
    assert "step" in seen["status"]
    assert os.path.getsize(screenshot) > 10_000
