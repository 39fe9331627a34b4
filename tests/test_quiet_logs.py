"""Logs a user sees on every run: no bitsandbytes import where neither QLoRA nor 8-bit AdamW is used (it looks
up hub kernels and warns offline), no diffusers "modules ... kept in float32: []" warning on each load."""

import importlib.util
import logging
import subprocess
import sys

import pytest

import tiny_runs
from comfyui_lora_trainer.training.bnb_gate import needs_bitsandbytes

DEMO = """
import sys
from comfyui_lora_trainer.training.cli import main
assert main(["demo", "--steps", "1", "--out", sys.argv[1]]) == 0
print("bitsandbytes imported:", "bitsandbytes" in sys.modules)
"""


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_a_plain_run_never_imports_bitsandbytes(tmp_path):
    # a fresh process: peft and diffusers import bitsandbytes eagerly the first time they load
    out = subprocess.run([sys.executable, "-c", DEMO, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bitsandbytes imported: False" in out.stdout, out.stdout[-2000:]
    assert "bitsandbytes" not in out.stderr.lower(), out.stderr[-2000:]


def test_which_settings_need_bitsandbytes():
    assert not needs_bitsandbytes(tiny_runs.cfg())
    assert needs_bitsandbytes(tiny_runs.cfg(optimizer="adamw8bit"))
    assert needs_bitsandbytes(tiny_runs.cfg(quantize_base="4bit"))


def test_no_float32_modules_warning_when_training_in_bf16(caplog):
    library = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root's handlers
    library.addHandler(caplog.handler)
    try:
        tiny_runs.run(precision="bf16", steps=1)
    finally:
        library.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]
