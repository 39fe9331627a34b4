"""Fixtures for the real-ComfyUI integration suite; see comfy_server.py for setup (COMFYUI_DIR).

Fixtures (session scope: one server for the whole run):
    comfyui_dir     Path of the ComfyUI checkout (COMFYUI_DIR)
    comfy_base_dir  the isolated base directory (models/, input/, output/, custom_nodes/, comfyui.log)
    comfy_server    the running ComfyServer (url, port, log_path, startup_seconds, alive())
    comfy           a ComfyClient (queue, wait, run, object_info, interrupt, log_text, ...)
    comfy_lib       ComfyUI's ``comfy`` package imported in this process (COMFYUI_DIR on sys.path; CPU
                    unless CUDA is there), for in-process tests of comfy.sd / comfy.lora
    sd15_checkpoint name (for CheckpointLoaderSimple) of a random, full-shape SD1.5 checkpoint
                    written into <base>/models/checkpoints/ by training.models.write_checkpoint
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import comfy_server as cs  # noqa: E402

SKIP_REASON = ("COMFYUI_DIR is not set: the integration suite needs a ComfyUI checkout "
               "(see tests/integration/comfy_server.py for setup)")


def pytest_collection_modifyitems(config, items):
    missing = cs.comfyui_dir_from_env() is None
    for item in items:
        try:
            inside = Path(str(item.fspath)).resolve().is_relative_to(_HERE)
        except (OSError, ValueError):
            inside = False
        if not inside:
            continue
        item.add_marker(pytest.mark.integration)
        if missing:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    path = cs.comfyui_dir_from_env()
    if path is None:
        pytest.skip(SKIP_REASON)
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={path} has no main.py (see tests/integration/comfy_server.py)")
    return path


@pytest.fixture(scope="session")
def comfy_lib(comfyui_dir):
    if str(comfyui_dir) not in sys.path:
        sys.path.insert(0, str(comfyui_dir))
    import torch

    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.sd
    import comfy.utils

    return comfy


@pytest.fixture(scope="session")
def comfy_base_dir(request, comfyui_dir):
    # own temp dir (not pytest's basetemp, which concurrent pytest runs rotate away); removed at the end
    # unless a test failed or COMFYUI_KEEP_DIR is set, so the ~1 GiB checkpoint does not pile up
    base = Path(tempfile.mkdtemp(prefix="comfyui-it-"))
    cs.prepare_base_dir(base)
    yield base
    if os.environ.get("COMFYUI_KEEP_DIR") or request.session.testsfailed:
        sys.stderr.write(f"\n[comfy] base dir kept: {base} (server log {base / 'comfyui.log'})\n")
    else:
        cs.remove_tree(base)


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, comfy_base_dir):
    server = cs.ComfyServer(comfyui_dir, comfy_base_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy(comfy_server) -> cs.ComfyClient:
    return cs.ComfyClient(comfy_server)


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_base_dir, comfy_server) -> str:
    """A random SD1.5-shaped checkpoint in the original LDM key layout that ComfyUI detects as SD15.

    Written once per session (a few GB, tens of seconds); returns the name to pass as ckpt_name.
    """
    try:
        from comfyui_lora_trainer.training.models import build_components, write_checkpoint
    except ImportError as e:  # MODELS helper's API not there yet
        pytest.skip(f"training.models.build_components/write_checkpoint unavailable: {e}")
    name = "random-sd15.safetensors"
    path = comfy_base_dir / "models" / "checkpoints" / name
    if not path.exists():
        t0 = time.monotonic()
        base = build_components("sd1", seed=0)
        write_checkpoint(base, path)
        del base
        sys.stderr.write(f"\n[comfy] wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB) "
                         f"in {time.monotonic() - t0:.1f} s\n")
    return name
