"""Fixtures shared across test files.

* ``tiny_checkpoint``: a tiny random SD1.x single-file checkpoint (seed 0), written once per session; tests
  read or copy it, never change it.
* ``host``: a FakeHost (tests/fake_host.py) rooted at ``<tmp_path>/comfy`` with that checkpoint as
  ``models/checkpoints/tiny.safetensors`` and the sample dataset as ``input/shapes``. Test files may define
  their own ``host`` (tests/test_nodes.py, tests/test_nodes_ui.py do), which wins in that file.
"""

import os
import shutil

import pytest

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from comfyui_lora_trainer.training.models import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"), family="sd1", seed=0)


@pytest.fixture()
def host(tmp_path, tiny_checkpoint):
    from comfyui_lora_trainer.training.models import tiny_tokenizer_dir
    from fake_host import FakeHost

    h = FakeHost(tmp_path / "comfy", tiny_tokenizer_dir())
    shutil.copy(tiny_checkpoint, h.checkpoint_path("tiny.safetensors"))
    shutil.copytree(SAMPLE, os.path.join(h.input_directory(), "shapes"))
    return h
