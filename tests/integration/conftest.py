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


def missing_requirements(comfyui_dir: Path, python: str) -> list[str]:
    """Distributions named in COMFYUI_DIR/requirements.txt that ``python``'s environment lacks (torch aside).
    Asked of a subprocess, since the server may run under COMFYUI_PYTHON."""
    import re
    import subprocess

    names = []
    try:
        lines = (comfyui_dir / "requirements.txt").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        name = re.split(r"[<>=!~;\[\s#]", line.strip(), maxsplit=1)[0]
        if name and not name.startswith("-") and name != "torch":
            names.append(name)
    probe = ("import importlib.metadata as m, sys\n"
             "for n in sys.argv[1:]:\n"
             "    try: m.version(n)\n"
             "    except m.PackageNotFoundError: print(n)\n")
    out = subprocess.run([python, "-c", probe, *names], capture_output=True, text=True, timeout=120)
    return out.stdout.split()


def pytest_collection_modifyitems(config, items):
    missing = cs.comfyui_dir_from_env() is None
    comfyui_dir = cs.comfyui_dir_from_env()
    if comfyui_dir is not None and any(_inside(item) for item in items):
        python = os.environ.get("COMFYUI_PYTHON") or sys.executable
        absent = missing_requirements(comfyui_dir, python)
        if absent:
            # one message instead of an error per test when the server cannot start
            raise pytest.UsageError(
                f"COMFYUI_DIR={comfyui_dir}: ComfyUI's requirements are not installed in {python} "
                f"(missing: {', '.join(absent)}). Install them without touching torch:\n"
                f"    tests/integration/setup_comfyui.sh {comfyui_dir} {python}")
    for item in items:
        if not _inside(item):
            continue
        item.add_marker(pytest.mark.integration)
        if missing:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def _inside(item) -> bool:
    return _inside_path(item.fspath)


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


# -- CI: a skipped integration or browser test is a failure ------------------------------------------------------
# .ci/run sets CI=true and LORATRAINER_REQUIRE_INTEGRATION=1 for its integration parts: there a skip means the
# product was not checked in ComfyUI (no ComfyUI, no browser...). Only tests that need a GPU may skip.
GPU_WORDS = ("gpu", "cuda")


def _require_integration() -> bool:
    return os.environ.get("CI", "").lower() == "true" and os.environ.get("LORATRAINER_REQUIRE_INTEGRATION") == "1"


_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and _require_integration():
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if _inside_path(report.fspath) and not any(w in reason.lower() for w in GPU_WORDS):
            _skipped.append(f"{report.nodeid}: {reason}")


def _inside_path(fspath) -> bool:
    try:
        return Path(str(fspath)).resolve().is_relative_to(_HERE)
    except (OSError, ValueError):
        return False


def pytest_sessionfinish(session, exitstatus):
    if _skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.section("skipped integration tests fail in CI")
        for line in _skipped:
            terminalreporter.write_line(line)
