"""The server's record of training runs: what the Train LoRA node's chart draws, kept in the process.

A page that is reloaded mid-run asks ``GET /loratrainer/runs`` (summaries) and
``GET /loratrainer/runs/{run_id}`` (one record: loss history, step, total, samples, estimate) and
re-draws the chart; live updates arrive as websocket messages with the same field names. No ComfyUI
import here: host.py serves these records over HTTP, and the tests read them directly.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_RUNS = 16  # finished runs kept for reloading pages; the oldest finished ones go first
MAX_SAMPLES = 64  # sample sets kept per run (the newest)


def valid_run_id(value) -> bool:
    return isinstance(value, str) and bool(RUN_ID.match(value))


class RunRecord:
    """One Train LoRA execution. Mutated only through the registry (which holds the lock)."""

    def __init__(self, node: str | None, prompt_id: str | None, total: int, name: str, settings: dict):
        self.run_id = uuid.uuid4().hex
        self.node = None if node is None else str(node)
        self.prompt_id = prompt_id
        self.name = name
        self.settings = dict(settings)
        self.status = "starting"  # starting -> running -> done | interrupted | error
        self.message = ""
        self.step = 0
        self.first_step = 0  # the step before losses[0] (0: the curve starts at step 1)
        self.resumed_at = 0  # a resumed run: the step it continued from (its elapsed time counts from there)
        self.total = int(total)
        self.losses: list[float] = []
        self.validation: list[dict] = []  # [{"step", "loss"}], sorted by step: the validation loss (issue 15)
        self.elapsed = 0.0
        self.started = time.time()
        self.updated = self.started
        self.samples: list[dict] = []
        self.estimate: dict | None = None
        self.files: list[dict] = []

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "node": self.node,
            "prompt_id": self.prompt_id,
            "name": self.name,
            "status": self.status,
            "step": self.step,
            "total": self.total,
            "started": self.started,
            "updated": self.updated,
        }

    def to_dict(self) -> dict:
        out = self.summary()
        out.update(
            message=self.message,
            first_step=self.first_step,
            resumed_at=self.resumed_at,
            losses=list(self.losses),
            validation=[dict(v) for v in self.validation],
            elapsed=self.elapsed,
            samples=[dict(s) for s in self.samples],
            estimate=dict(self.estimate) if self.estimate else None,
            files=[dict(f) for f in self.files],
            settings=dict(self.settings),
        )
        return out


class RunRegistry:
    """Thread-safe: training runs on ComfyUI's worker thread, HTTP reads on the server's loop."""

    def __init__(self, max_runs: int = MAX_RUNS):
        self._lock = threading.Lock()
        self._runs: dict[str, RunRecord] = {}
        self.max_runs = max_runs

    def start(self, node, prompt_id, total: int, name: str = "", settings: dict | None = None) -> RunRecord:
        record = RunRecord(node, prompt_id, total, name, settings or {})
        with self._lock:
            self._runs[record.run_id] = record
            self._trim()
        return record

    def _trim(self) -> None:
        if len(self._runs) <= self.max_runs:
            return
        finished = sorted(
            (r for r in self._runs.values() if r.status not in ("starting", "running")), key=lambda r: r.updated
        )
        for record in finished[: len(self._runs) - self.max_runs]:
            del self._runs[record.run_id]

    def update(self, run_id: str, **fields) -> None:
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                return
            for key, value in fields.items():
                setattr(record, key, value)
            record.updated = time.time()

    def add_step(self, run_id: str, step: int, total: int, loss: float, elapsed: float) -> None:
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                return
            if not record.losses and step > 1:
                record.first_step = step - 1  # resumed: the chart starts at the resumed step
            record.status = "running"
            record.step, record.total, record.elapsed = int(step), int(total), float(elapsed)
            record.losses.append(float(loss))
            record.updated = time.time()

    def add_validation(self, run_id: str, step: int, loss: float) -> None:
        """One validation measurement; a repeated step (a resumed run measures its start again) replaces."""
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                return
            points = [v for v in record.validation if v["step"] != int(step)] + [{"step": int(step), "loss": float(loss)}]
            record.validation = sorted(points, key=lambda v: v["step"])
            record.updated = time.time()

    def add_sample(self, run_id: str, step: int, images: list[dict], prompts: list[str] | None = None) -> None:
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                return
            record.samples.append({"step": int(step), "images": list(images), "prompts": list(prompts or [])})
            del record.samples[:-MAX_SAMPLES]
            record.updated = time.time()

    def add_file(self, run_id: str, entry: dict) -> None:
        with self._lock:
            record = self._runs.get(run_id)
            if record is not None:
                record.files.append(dict(entry))
                record.updated = time.time()

    def get(self, run_id: str) -> dict | None:
        if not valid_run_id(run_id):
            return None
        with self._lock:
            record = self._runs.get(run_id)
            return record.to_dict() if record is not None else None

    def summaries(self) -> list[dict]:
        with self._lock:
            return [r.summary() for r in sorted(self._runs.values(), key=lambda r: r.started)]

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


REGISTRY = RunRegistry()


# -- helpers shared by the node and the tests ---------------------------------------------------------
def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); the JS chart uses the same."""
    out, last, norm = [], 0.0, 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(last / norm if norm else value)
    return out


def loss_maps(losses: list[float], validation: list[dict], total_steps: int | None = None) -> tuple[dict, dict]:
    """(training, validation) LOSS_MAP values for Train LoRA's outputs.

    Core's Plot Loss Graph (comfy_extras/nodes_train.py) draws ``value["loss"]``, one point per list entry,
    and ignores other keys. The training map is ``{"loss": per step}`` plus ``validation_steps`` and
    ``validation_loss`` (the measurements, for anything that reads them); the validation map's ``loss``
    holds, for every step 1..N, the latest validation loss measured at or before it, so Plot Loss Graph
    draws it on the same step axis as the training loss (a step function). Before the first measurement
    (which the loop makes at step 0) the first value is used. Without validation its ``loss`` is empty."""
    training = {"loss": [float(v) for v in losses]}
    if not validation:
        return training, {"loss": []}
    points = sorted((int(v["step"]), float(v["loss"])) for v in validation)
    training["validation_steps"] = [s for s, _ in points]
    training["validation_loss"] = [v for _, v in points]
    steps = total_steps if total_steps is not None else max(len(losses), points[-1][0])
    held, current, j = [], points[0][1], 0
    for step in range(1, steps + 1):
        while j < len(points) and points[j][0] <= step:
            current = points[j][1]
            j += 1
        held.append(current)
    return training, {"loss": held, "validation_steps": training["validation_steps"],
                      "validation_loss": training["validation_loss"]}


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(step: int, total: int, loss: float, smooth: float | None, rate: float | None, eta: float | None,
                  validation: float | None = None) -> str:
    """The one-line status the stock frontend shows under the node (progress_text)."""
    parts = [f"step {step}/{total}", f"loss {loss:.4f}"]
    if smooth is not None:
        parts[-1] += f" (avg {smooth:.4f})"
    if validation is not None:
        parts.append(f"val {validation:.4f}")
    if rate:
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")
    parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)
