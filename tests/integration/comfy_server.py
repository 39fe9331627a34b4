"""Harness that runs a real, isolated ComfyUI server for the integration tests.

Setting up COMFYUI_DIR
======================
The integration suite (``tests/integration``) is skipped unless the environment variable
``COMFYUI_DIR`` points at a ComfyUI checkout that can run ``python main.py``. ComfyUI's code is never
part of this repository; set it up once, outside the repo, e.g.::

    # 1. get ComfyUI (tested: 0.3.64, the oldest supported, and 0.33.0), outside this repository:
    git clone --depth 1 --branch v0.33.0 https://github.com/Comfy-Org/ComfyUI ../ComfyUI-0.33.0

    # 2. a venv per ComfyUI version (their frontends differ) with this package installed, then ComfyUI's
    #    requirements without touching torch, and a start-up check:
    tests/integration/setup_comfyui.sh ../ComfyUI-0.33.0 .venv-comfy033/bin/python

    # 3. run the suite (from the repository root):
    COMFYUI_DIR=../ComfyUI-0.33.0 .venv-comfy033/bin/python -m pytest tests/integration -ra

Optional environment: ``COMFYUI_PYTHON`` (interpreter for the server; default: the one running
pytest), ``COMFYUI_START_TIMEOUT`` (seconds to wait for the server; default 180),
``COMFYUI_KEEP_DIR=1`` (keep the temporary base directory ``/tmp/comfyui-it-*`` with its
``comfyui.log``; it is also kept, and its path printed, when a test failed). ``.ci/run`` does all
of this for both tested versions.

What the server looks like
==========================
:class:`ComfyServer` starts ``main.py --cpu --base-directory <tmp> --database-url sqlite:///:memory:
--disable-api-nodes --listen 127.0.0.1 --port <free port>``, with this repository symlinked as
``<tmp>/custom_nodes/comfyui-lora-trainer`` (beside it the test-only nodes of probe_nodes.py and
tiny_loaders/) and ``<tmp>/models/{checkpoints,loras}``, ``<tmp>/input``,
``<tmp>/output`` prepared. The server log (stdout+stderr) goes to ``<tmp>/comfyui.log``. Only the
loopback address is used. :class:`ComfyClient` talks to it over HTTP (standard library only):

    client.queue(prompt) -> prompt_id            # POST /prompt; HTTP 400 raises PromptRejected(.body)
    client.wait(prompt_id, timeout) -> entry     # polls GET /history/{id}; entry["status"]["status_str"]
    client.run(prompt, timeout) -> entry         # queue + wait; raises ExecutionFailed on "error"
    client.object_info(cls=None) -> dict         # GET /object_info[/{cls}] as returned: {cls: info}
    client.node_info(cls) -> dict                # just that node's info ({} if not registered)
    client.wait_running(prompt_id, timeout)      # poll GET /queue until it runs (then interrupt())
    client.interrupt(prompt_id=None)             # POST /interrupt
    client.log_text(since=0) / client.log_mark() # server log (all of it, or from a mark on)
    client.get_json(path) / client.post_json(path, body) / client.get_bytes(path)
    client.package_nodes() -> {node_id: info}    # nodes registered by this package
    client.probe_model(model_link, clip_link=None, vae_link=None) -> (node_id, node)  # see probe_nodes.py
    client.probe_result(entry, node_id) -> dict  # what ITProbeModelInfo reported (config_class, patches...)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_FOLDER = "comfyui-lora-trainer"
PACKAGE_PYTHON_MODULE = "custom_nodes." + PACKAGE_FOLDER
PROBE_MODULE_FILE = "lora_trainer_it_probe.py"
TINY_LOADERS_FOLDER = "lora_trainer_it_tiny_loaders"


class PromptRejected(Exception):
    """POST /prompt answered with an error status (validation failed). ``body`` is the parsed JSON."""

    def __init__(self, status: int, body):
        self.status = status
        self.body = body
        super().__init__(f"prompt rejected (HTTP {status}): {json.dumps(body)[:4000]}")


class ExecutionFailed(Exception):
    """A queued prompt finished with status "error". ``entry`` is its history entry."""

    def __init__(self, entry: dict, log_tail: str = ""):
        self.entry = entry
        msgs = entry.get("status", {}).get("messages", [])
        err = [m[1] for m in msgs if m and m[0] in ("execution_error", "execution_interrupted")]
        detail = ""
        if err:
            e = err[-1]
            detail = (f"{e.get('node_type')} (node {e.get('node_id')}): {e.get('exception_type')}: "
                      f"{e.get('exception_message')}\n{''.join(e.get('traceback') or [])}")
        super().__init__(f"prompt failed: {detail}\n--- server log tail ---\n{log_tail}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def comfyui_dir_from_env() -> Path | None:
    value = os.environ.get("COMFYUI_DIR")
    return Path(value).expanduser().resolve() if value else None


def prepare_base_dir(base: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Create the folder layout of an isolated ComfyUI instance and link this package into it."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/vae", "input", "output",
                "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACKAGE_FOLDER
    if not link.exists():
        link.symlink_to(repo_root, target_is_directory=True)
    # test-only probe nodes (ITProbe*), see probe_nodes.py
    shutil.copyfile(Path(__file__).with_name("probe_nodes.py"), base / "custom_nodes" / PROBE_MODULE_FILE)
    # test-only tiny Flux MODEL/CLIP/VAE loaders (ITTinyFlux*), see tiny_loaders/__init__.py; linked, since they
    # import comfy_tiny from beside them
    tiny = base / "custom_nodes" / TINY_LOADERS_FOLDER
    if not tiny.exists():
        tiny.symlink_to(Path(__file__).with_name("tiny_loaders"), target_is_directory=True)
    return base


class ComfyServer:
    """One ComfyUI process on 127.0.0.1:<port> with its own base directory."""

    def __init__(self, comfyui_dir: Path, base_dir: Path, port: int | None = None,
                 python: str | None = None, extra_args: list[str] | None = None):
        self.comfyui_dir = Path(comfyui_dir)
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.extra_args = list(extra_args or [])
        self.log_path = self.base_dir / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--base-directory", str(self.base_dir),
                "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
                "--listen", HOST, "--port", str(self.port), *self.extra_args]

    def start(self, timeout: float | None = None) -> "ComfyServer":
        if not (self.comfyui_dir / "main.py").is_file():
            raise RuntimeError(f"COMFYUI_DIR={self.comfyui_dir} has no main.py; see {__file__} for setup")
        prepare_base_dir(self.base_dir)
        timeout = float(timeout or os.environ.get("COMFYUI_START_TIMEOUT", 180))
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)  # the server must import this package the way ComfyUI does
        self._log_file = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=self.comfyui_dir, env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during startup; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/KSampler", timeout=5) as r:
                    if r.status == 200 and json.loads(r.read()):
                        break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI not ready after {timeout:.0f} s; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # the server runs in its own session/process group: signal only that group
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ComfyClient:
    """Small HTTP client for a :class:`ComfyServer` (standard library only)."""

    def __init__(self, server: ComfyServer, client_id: str | None = None):
        self.server = server
        self.url = server.url
        self.client_id = client_id or uuid.uuid4().hex
        self.last_response: dict | None = None

    # -- raw HTTP --------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 60.0):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def get_bytes(self, path: str, timeout: float = 60.0) -> bytes:
        return self._request("GET", path, timeout=timeout)[1]

    def get_json(self, path: str, timeout: float = 60.0):
        return json.loads(self.get_bytes(path, timeout=timeout) or b"null")

    def post_json(self, path: str, body=None, timeout: float = 60.0):
        raw = self._request("POST", path, body if body is not None else {}, timeout=timeout)[1]
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", "replace")

    # -- ComfyUI API -----------------------------------------------------------------------
    def queue(self, prompt: dict, extra_data: dict | None = None, prompt_id: str | None = None) -> str:
        """POST /prompt (API format). Returns the prompt_id; raises PromptRejected on HTTP 4xx.

        Note: when SOME output nodes validate, ComfyUI accepts the prompt (HTTP 200), runs only those,
        and lists the failed nodes in ``self.last_response["node_errors"]``.
        """
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        if prompt_id:
            body["prompt_id"] = prompt_id
        try:
            status, raw = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
            raise PromptRejected(e.code, parsed) from None
        self.last_response = json.loads(raw)
        return self.last_response["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Poll GET /history/{id} until the prompt is done; return its history entry.

        The entry has "outputs" ({node_id: ui dict}) and "status" ({"status_str": "success"|"error",
        "completed", "messages"}). Raises TimeoutError (with the log tail) or RuntimeError if the
        server died.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            if not self.server.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.server.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s; queue="
                                   f"{self.get_json('/queue')}\n{self.server.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 120.0, extra_data: dict | None = None) -> dict:
        """queue + wait; raises ExecutionFailed when the prompt ends with status "error"."""
        entry = self.wait(self.queue(prompt, extra_data=extra_data), timeout=timeout)
        if entry["status"].get("status_str") != "success":
            raise ExecutionFailed(entry, self.server.log_tail())
        return entry

    def object_info(self, cls: str | None = None) -> dict:
        """GET /object_info[/{cls}] as ComfyUI returns it: ``{class_name: info, ...}``
        (with cls: ``{cls: info}``, or ``{}`` if that class is not registered)."""
        if cls is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{urllib.parse.quote(cls)}")

    def node_info(self, cls: str) -> dict:
        """The info of one node class (``object_info(cls)[cls]``), ``{}`` if it is not registered."""
        return self.object_info(cls).get(cls, {})

    def wait_running(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.1) -> None:
        """Wait until prompt_id is the running prompt (GET /queue), e.g. before interrupt()."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.get_json("/queue").get("queue_running", [])
            if any(len(item) > 1 and item[1] == prompt_id for item in running):
                return
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                raise RuntimeError(f"prompt {prompt_id} already finished: {entry['status']}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not start within {timeout} s")

    def package_nodes(self) -> dict:
        """{node_id: info} for the nodes this package registered (python_module custom_nodes.<folder>)."""
        return {k: v for k, v in self.object_info().items()
                if str(v.get("python_module", "")).startswith(PACKAGE_PYTHON_MODULE)}

    @staticmethod
    def probe_model(model_link, clip_link=None, vae_link=None, node_id: str = "probe"):
        """An ITProbeModelInfo node (test-only, probe_nodes.py) to add to an API prompt."""
        inputs = {"model": list(model_link)}
        if clip_link is not None:
            inputs["clip"] = list(clip_link)
        if vae_link is not None:
            inputs["vae"] = list(vae_link)
        return node_id, {"class_type": "ITProbeModelInfo", "inputs": inputs}

    @staticmethod
    def probe_result(entry: dict, node_id: str = "probe") -> dict:
        return entry["outputs"][node_id]["probe"][0]

    def interrupt(self, prompt_id: str | None = None):
        return self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def queue_state(self) -> dict:
        return self.get_json("/queue")

    def free(self, unload_models: bool = True, free_memory: bool = True):
        return self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self.get_bytes("/view?" + q)

    def log_text(self, since: int = 0) -> str:
        return self.server.log_text(since)

    def log_mark(self) -> int:
        return self.server.log_mark()


def start_isolated_server(comfyui_dir: Path | None = None, base_dir: Path | None = None,
                          extra_args: list[str] | None = None) -> tuple[ComfyServer, ComfyClient]:
    """Convenience for scripts: start a server in a fresh temp dir (caller calls server.stop())."""
    comfyui_dir = comfyui_dir or comfyui_dir_from_env()
    if comfyui_dir is None:
        raise RuntimeError("set COMFYUI_DIR (see the docstring of tests/integration/comfy_server.py)")
    base_dir = Path(base_dir or tempfile.mkdtemp(prefix="comfy-it-"))
    server = ComfyServer(comfyui_dir, base_dir, extra_args=extra_args).start()
    return server, ComfyClient(server)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
