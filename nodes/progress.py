"""A Train LoRA run as the user sees it: the loop's events turned into progress, chart, samples and files.

``RunReporter`` is the ``events`` callback of ``training.loop.train``. It keeps the run record
(nodes/runs.py) that a reloaded page re-draws from, sends the websocket messages web/lora_trainer.js
draws (``loratrainer.*``), and drives what the stock frontend shows: ComfyUI's progress bar with a
preview (the latest sample image, or the loss chart when sampling is off) and a status line.
"""

from __future__ import annotations

import os
import time

from .runs import REGISTRY, progress_line, smoothed

# websocket message types (web/lora_trainer.js listens for the same names)
RUN_EVENT = "loratrainer.run"  # a run's status changed (starting, running, done, interrupted, error)
PROGRESS_EVENT = "loratrainer.progress"  # one optimizer step
SAMPLE_EVENT = "loratrainer.sample"  # sample images for a step
SAVED_EVENT = "loratrainer.saved"  # a LoRA file was written (pages refresh their LoRA lists)
VALIDATION_EVENT = "loratrainer.validation"  # one validation measurement {step, loss}

PREVIEW_CHART_SECONDS = 5.0  # without samples, the loss chart preview is re-drawn at most this often
TEXT_SECONDS = 0.5  # the status line under the node at most this often


class SpeedMeter:
    """Steps per second over the last ``window`` steps, and the time left at that speed."""

    def __init__(self, window: int = 20, clock=time.monotonic):
        self.window, self.clock, self.times = window, clock, []

    def tick(self, step: int) -> None:
        self.times.append((step, self.clock()))
        del self.times[: -self.window - 1]

    def rate(self) -> float | None:
        if len(self.times) < 2:
            return None
        (s0, t0), (s1, t1) = self.times[0], self.times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def eta(self, step: int, total: int) -> float | None:
        rate = self.rate()
        return (total - step) / rate if rate else None


def to_pil(value):
    """A sample image from the loop: a PIL image, a file path, or an [H,W,3]/[3,H,W] tensor in [0,1]/[-1,1]."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        with Image.open(value) as img:
            return img.convert("RGB")
    import numpy as np

    array = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value, dtype=np.float32)
    if array.ndim == 4:
        array = array[0]
    if array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.min() < 0:
        array = (array + 1) / 2
    return Image.fromarray((array.clip(0, 1) * 255).round().astype("uint8")).convert("RGB")


class RunReporter:
    """One run's reporting: ``started`` -> the loop calls the reporter with each event -> ``finished`` or
    ``failed``."""

    def __init__(self, host, config, node, prompt_id, settings: dict):
        self.host, self.config, self.name, self.total = host, config, config.output_name, config.steps
        self.record = REGISTRY.start(node, prompt_id, config.steps, config.output_name, settings)
        self.run = self.record.run_id
        self.node = node
        self.ids = {"run_id": self.run, "node": self.record.node, "prompt_id": prompt_id}
        self.progress = None  # ComfyUI's progress bar, from ``started``
        self.meter = SpeedMeter()
        self.losses: list[float] = []
        self.validation: list[tuple[int, float]] = []  # (step, validation loss), sorted by step
        self.preview = None  # the newest sample image, shown with the next step
        self.has_samples = False
        self.chart_at = self.text_at = 0.0
        self.precision_note = ""  # what the device trains in instead of the precision asked (the start event)

    def send(self, message: str, /, **data) -> None:
        self.host.send(message, {**self.ids, **data})

    def started(self, estimate) -> None:
        """The run is about to train; ``estimate`` is the pre-flight estimate (or None)."""
        if estimate is not None:
            REGISTRY.update(self.run, estimate=estimate.to_dict())
            self.host.progress_text(estimate.summary(), self.node)
        self.send(RUN_EVENT, status="starting", total=self.total, name=self.name,
                  estimate=estimate.to_dict() if estimate else None)
        self.progress = self.host.progress(self.total, self.node)

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "start":
            self.precision_note = event.get("precision_note") or ""
        if kind == "start" and event.get("losses"):
            self.on_resumed(event)
        elif kind == "step":
            self.on_step(event)
        elif kind == "validation":
            self.on_validation(int(event["step"]), float(event["loss"]))
        elif kind == "sample":
            self.on_sample(event)
        elif kind in ("saved", "checkpoint", "state"):
            entry = {"kind": event.get("kind") or kind, "path": os.path.basename(event.get("path", "")),
                     "step": event.get("step")}
            REGISTRY.add_file(self.run, entry)
            self.send(SAVED_EVENT, **entry)
        elif kind == "log" and event.get("message"):
            self.host.progress_text(str(event["message"])[:300], self.node)

    def on_resumed(self, event: dict) -> None:
        # the earlier losses (kept in the state) come first, so the record, the live chart and the
        # preview show the whole curve from step 1
        history = [float(v) for v in event["losses"]]
        start = int(event.get("start_step") or len(history))
        first = max(0, start - len(history))
        self.losses = list(history)
        REGISTRY.update(self.run, losses=list(history), first_step=first, step=start, resumed_at=start,
                        status="running")
        for step, loss in event.get("validation") or []:  # the validation curve so far, from the state
            self.remember_validation(int(step), float(loss))
        self.send(RUN_EVENT, status="running", total=self.total, step=start, first_step=first, resumed_at=start,
                  losses=history, validation=[{"step": s, "loss": v} for s, v in self.validation])

    def remember_validation(self, step: int, loss: float) -> None:
        REGISTRY.add_validation(self.run, step, loss)
        self.validation = sorted([p for p in self.validation if p[0] != step] + [(step, loss)])

    def on_validation(self, step: int, loss: float) -> None:
        """One validation measurement: the run record, the live chart's second series, the status line."""
        self.remember_validation(step, loss)
        self.send(VALIDATION_EVENT, step=step, loss=loss)
        best_step, best = min(self.validation, key=lambda p: p[1])
        self.host.progress_text(f"step {step}: validation loss {loss:.4f} (best {best:.4f} at step {best_step})",
                                self.node)

    def on_step(self, event: dict) -> None:
        from ..training.plot import loss_chart

        step, total, loss = event["step"], event.get("total", self.total), float(event["loss"])
        elapsed = event.get("elapsed", 0.0)
        self.meter.tick(step)
        REGISTRY.add_step(self.run, step, total, loss, elapsed)
        self.losses.append(loss)
        rate, eta = self.meter.rate(), self.meter.eta(step, total)
        self.send(PROGRESS_EVENT, step=step, total=total, loss=loss, elapsed=elapsed, rate=rate, eta=eta)
        now = time.monotonic()
        preview, self.preview = self.preview, None
        if preview is None and not self.has_samples and (now - self.chart_at >= PREVIEW_CHART_SECONDS
                                                         or step == total):
            self.chart_at = now
            preview = loss_chart(self.losses, 512, 288, f"{self.name} loss", validation=self.validation)
        self.progress.update(step, total, preview=preview)
        if now - self.text_at >= TEXT_SECONDS or step == total:
            self.text_at = now
            smooth = smoothed(self.losses[-200:])[-1]
            last_validation = self.validation[-1][1] if self.validation else None
            self.host.progress_text(progress_line(step, total, loss, smooth, rate, eta, last_validation), self.node)

    def on_sample(self, event: dict) -> None:
        images = []
        for index, value in enumerate(event.get("images") or event.get("paths") or []):
            try:
                image = to_pil(value)
            except Exception as e:  # a sample must never end the run
                self.host.progress_text(f"sample image {index} unreadable: {e}", self.node)
                continue
            images.append(self.host.save_temp_image(image, f"loratrainer/{self.name}_sample"))
            if index == 0:
                self.preview, self.has_samples = image, True
        step = int(event.get("step", 0))
        REGISTRY.add_sample(self.run, step, images, event.get("prompts"))
        self.send(SAMPLE_EVENT, step=step, images=images, prompts=event.get("prompts") or [])

    def failed(self, message: str) -> None:
        REGISTRY.update(self.run, status="error", message=message)
        self.send(RUN_EVENT, status="error", message=message)

    def finished(self, result) -> str:
        """Records the end of the run; returns the file name (relative to the output folder)."""
        status = "interrupted" if result.stopped_early else "done"
        file_name = os.path.relpath(result.path, self.config.output_dir) if result.path else ""
        REGISTRY.update(self.run, status=status, message=file_name)
        self.send(RUN_EVENT, status=status, file=file_name, step=result.steps_done, total=self.total)
        return file_name
