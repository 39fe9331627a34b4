"""Train LoRA: checkpoint + dataset -> a LoRA file in models/loras, the LoRA itself and its loss.

While it trains the node reports through the host: ComfyUI's progress bar and preview (the latest
sample image, or the loss chart when sampling is off) and a status line, which the stock frontend
shows; websocket messages (``loratrainer.*``) that web/lora_trainer.js draws as a live chart; and a
run record in nodes/runs.py that a reloaded page re-draws from. Before training it estimates peak
memory and time (nodes/estimate.py) and refuses settings that cannot fit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from .spec import DATASET, LORA, In, NodeError, NodeResult, NodeSpec, Out, node_id

OPTIONS = "LORATRAINER_OPTIONS"

# websocket message types (web/lora_trainer.js listens for the same names)
RUN_EVENT = "loratrainer.run"  # a run's status changed (starting, running, done, interrupted, error)
PROGRESS_EVENT = "loratrainer.progress"  # one optimizer step
SAMPLE_EVENT = "loratrainer.sample"  # sample images for a step
SAVED_EVENT = "loratrainer.saved"  # a LoRA file was written (pages refresh their LoRA lists)

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


def clean_stale_saves(folder: str) -> list[str]:
    """Remove temp files that a save killed mid-write (crash, SIGKILL) left in ``folder``; never raises."""
    from ..training.formats.safetensors_io import cleanup_stale_temp_files

    try:
        return cleanup_stale_temp_files(folder)
    except OSError:
        return []


def config_fields() -> set[str]:
    from ..training.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def state_path_for(folders, output_name: str) -> str | None:
    """The newest (highest step) resumable state a cancelled or periodically saved run of ``output_name``
    left in any of ``folders`` (the state folder, and models/loras where older versions wrote them)."""
    import re

    try:
        from ..training.state import latest_state
    except ImportError:
        return None
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    found = [p for p in (latest_state(f, output_name) for f in dict.fromkeys(folders) if f) if p]
    if not found:
        return None
    return max(found, key=lambda p: int(re.search(r"_state_step(\d+)\.pt$", p).group(1)))


def state_directory(host) -> str | None:
    """The host's folder for resumable states (outside models/loras, so LoRA lists never show them)."""
    get = getattr(host, "state_directory", None)
    return get() if get is not None else None


def tokenizer_for_checkpoint(host, path: str) -> str | None:
    """ComfyUI's CLIP tokenizer, unless the checkpoint's text encoder has another vocabulary (the tiny
    test models): then None, and the loader takes the tokenizer that belongs to it."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith("embeddings.token_embedding.weight"):
                    if f.get_slice(key).get_shape()[0] != 49408:
                        return None
                    break
    except Exception:  # a diffusers folder or an unreadable file: the loader reports it
        pass
    return host.tokenizer_dir()


def _pil(value):
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


class TrainLoRA(NodeSpec):
    """Trains a LoRA on an SD1.x/SD2.x/SDXL checkpoint inside ComfyUI's process."""

    node_id = node_id("TrainLoRA")
    display_name = "Train LoRA (LoRA Trainer)"
    description = (
        "Trains a LoRA for an SD1.x/SD2.x/SDXL checkpoint on a dataset from Load Dataset and writes it to "
        "models/loras, with a live loss chart and sample images. Checks memory before it starts. Cancel "
        "stops within one step and saves <name>_interrupted_stepN plus a resumable state; queue again "
        "with resume on to continue."
    )
    # Order matters: saved workflows store widget values by position. Append new inputs at the end.
    inputs = [
        In("checkpoint", "COMBO", options=lambda host: host.checkpoint_names(), tooltip="base model to train on"),
        In("dataset", DATASET),
        In("steps", "INT", default=500, min=1, max=1_000_000, tooltip="optimizer steps"),
        In("learning_rate", "FLOAT", default=1e-4, min=1e-7, max=0.1, step=1e-5),
        In("rank", "INT", default=16, min=1, max=256, tooltip="LoRA rank (dim)"),
        In("alpha", "FLOAT", default=16.0, min=0.01, max=1024.0, step=0.5, tooltip="scale = alpha / rank"),
        In("resolution", "INT", default=512, min=64, max=4096, step=64),
        In("batch_size", "INT", default=1, min=1, max=64),
        In(
            "seed", "INT", default=0, min=0, max=2**63 - 1, control_after_generate=False,
            tooltip="same seed, same run; fixed so that queueing again with resume on continues the same run",
        ),
        In("output_name", "STRING", default="my_lora", tooltip="file name in models/loras (no extension)"),
        In("precision", "COMBO", options=["bf16", "fp32", "fp16"], default="bf16", optional=True),
        In("trigger_word", "STRING", default="", optional=True, tooltip="prepended to every caption"),
        In("overwrite", "BOOLEAN", default=False, optional=True, tooltip="replace an existing file of that name"),
        In(
            "gradient_checkpointing", "BOOLEAN", default=False, optional=True,
            tooltip="recompute activations in the backward pass: far less memory, about 30-45 % slower",
        ),
        In(
            "sample_every", "INT", default=0, min=0, max=1_000_000, optional=True,
            tooltip="draw sample images every N steps (0: off); they show on the node",
        ),
        In(
            "sample_prompt", "STRING", default="", multiline=True, optional=True,
            tooltip="one prompt per line for the sample images (empty: the first caption of the dataset)",
        ),
        In(
            "save_every", "INT", default=0, min=0, max=1_000_000, optional=True,
            tooltip="also write <name>_stepN and a resumable state every N steps (0: only at the end)",
        ),
        In(
            "resume", "BOOLEAN", default=False, optional=True,
            tooltip="continue from the state a cancelled (or periodically saved) run of this output_name left",
        ),
        In(
            "memory_limit_gb", "FLOAT", default=0.0, min=0.0, max=4096.0, step=0.5, optional=True,
            tooltip="memory budget for the pre-flight check (0: the device's free memory)",
        ),
        In("options", OPTIONS, optional=True, tooltip="more settings from the Training Options node"),
    ]
    outputs = [
        Out("lora", LORA, "the trained LoRA, usable by Apply LoRA without loading the file"),
        Out("loss", "LOSS_MAP", "loss per step (core Plot Loss Graph accepts it)"),
        Out("file_name", "STRING", "the file written in models/loras"),
    ]
    output_node = True
    wants_node_id = True

    @classmethod
    def build_config(cls, host, checkpoint, dataset, steps, learning_rate, rank, alpha, resolution, batch_size,
                     seed, output_name, precision="bf16", trigger_word="", overwrite=False,
                     gradient_checkpointing=False, sample_every=0, sample_prompt="", save_every=0, resume=False,
                     options=None):
        from ..training.config import ConfigError, TrainConfig
        from ..training.devices import resolve_precision

        device = host.torch_device()
        precision = resolve_precision(precision, device)[0]  # what the device really trains in; execute says so
        checkpoint_path = host.checkpoint_path(checkpoint)
        values = dict(
            checkpoint=checkpoint_path,
            tokenizer=tokenizer_for_checkpoint(host, checkpoint_path),
            dataset=dataset.root,
            output_dir=host.loras_directory(),
            output_name=output_name.strip(),
            steps=steps,
            rank=rank,
            alpha=float(alpha),
            learning_rate=float(learning_rate),
            resolution=resolution,
            batch_size=batch_size,
            seed=seed,
            precision=precision,
            trigger_word=(trigger_word or "").strip(),
            overwrite=bool(overwrite),
            device=str(device),
        )
        known = config_fields()
        wanted = {
            "gradient_checkpointing": bool(gradient_checkpointing),
            "sample_every_n_steps": int(sample_every or 0),
            "save_every_n_steps": int(save_every or 0),
        }
        if sample_every:
            prompts = [line.strip() for line in (sample_prompt or "").splitlines() if line.strip()]
            if not prompts:
                prompts = [next((item.caption for item in dataset.items if item.caption), "")]
            wanted["sample_prompts"] = prompts
        for key, value in wanted.items():
            if key in known:
                values[key] = value
            elif value:
                raise NodeError(f"{key.split('_n_')[0]}: this version of the trainer does not support it; leave it off")
        for key, value in (options or {}).items():
            if key in values and key not in ("gradient_accumulation_steps",):
                continue  # the node's own inputs win over the options node
            values[key] = value
        if "save_state_on_stop" in known:
            values.setdefault("save_state_on_stop", True)
        states = state_directory(host)
        if states and "state_dir" in known:
            values["state_dir"] = states
        config = TrainConfig(**{k: v for k, v in values.items() if k in known})
        if resume:
            if "resume_from" not in known:
                raise NodeError("resume: this version of the trainer cannot resume; switch resume off")
            # the state folder first; models/loras holds the states of runs from before it existed
            state = state_path_for([getattr(config, "state_dir", "") or config.output_dir, config.output_dir],
                                   config.output_name)
            if state is None:
                where = f"{states} (nor in models/loras)" if states else "models/loras"
                raise NodeError(
                    f"resume: no saved state for '{config.output_name}' in {where}; a run saves one when it "
                    "is cancelled, and every save_every steps with save_state on (Training Options). Switch resume "
                    "off to start afresh."
                )
            config.resume_from = state
        try:
            config.validate()
        except ConfigError as e:
            raise NodeError(str(e)) from None
        samples = getattr(dataset, "num_samples", None)
        if samples is not None and config.batch_size > samples:
            raise NodeError(
                f"batch_size {config.batch_size} is larger than the dataset ({samples} samples per epoch); "
                f"use a batch_size of at most {samples} or add images"
            )
        return config

    @staticmethod
    def preflight(host, config, memory_limit_gb: float = 0.0):
        """The memory/time estimate for ``config`` on the host's device; NodeError when it cannot fit."""
        from .estimate import GiB, Settings, estimate, read_model_shape, refusal_message

        try:
            shape = read_model_shape(config.checkpoint, config.family)
        except Exception:  # a diffusers folder or an unreadable header: the loader will say what is wrong
            return None
        memory = host.device_memory()
        free = int(memory_limit_gb * GiB) if memory_limit_gb and memory_limit_gb > 0 else memory["free"]
        settings = Settings(
            resolution=config.resolution,
            batch_size=config.batch_size,
            rank=config.rank,
            precision=config.precision,
            gradient_checkpointing=bool(getattr(config, "gradient_checkpointing", False)),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            steps=config.steps,
        )
        est = estimate(shape, settings, free, memory["type"], memory["name"], memory.get("cpu_count", 4))
        est.memory_note = "" if memory_limit_gb and memory_limit_gb > 0 else memory.get("note", "")
        if not est.fits:
            raise NodeError(refusal_message(est))
        return est

    @classmethod
    def execute(
        cls,
        host,
        checkpoint,
        dataset,
        steps,
        learning_rate,
        rank,
        alpha,
        resolution,
        batch_size,
        seed,
        output_name,
        precision="bf16",
        trigger_word="",
        overwrite=False,
        gradient_checkpointing=False,
        sample_every=0,
        sample_prompt="",
        save_every=0,
        resume=False,
        memory_limit_gb=0.0,
        options=None,
        node_id=None,
    ) -> NodeResult:
        from ..training.dataset import DatasetError
        from ..training.devices import resolve_precision
        from ..training.loop import train
        from ..training.plot import loss_chart
        from .runs import REGISTRY, progress_line, smoothed

        config = cls.build_config(
            host, checkpoint, dataset, steps, learning_rate, rank, alpha, resolution, batch_size, seed, output_name,
            precision, trigger_word, overwrite, gradient_checkpointing, sample_every, sample_prompt, save_every,
            resume, options,
        )
        report = getattr(dataset, "report", None)
        if report is not None and report.unreadable:
            names = ", ".join(c.rel for c in report.unreadable[:5])
            raise NodeError(
                f"dataset: {len(report.unreadable)} image(s) cannot be read ({names}); remove or re-save them "
                "(Load Dataset's report lists them)"
            )
        path = os.path.join(config.output_dir, config.output_name + ".safetensors")
        if os.path.exists(path) and not overwrite:
            raise NodeError(
                f"output_name: models/loras/{config.output_name}.safetensors already exists; "
                "choose another name or switch overwrite on"
            )

        clean_stale_saves(config.output_dir)
        if getattr(config, "state_dir", ""):
            clean_stale_saves(config.state_dir)
        host.free_memory()  # ComfyUI's models go first: the estimate compares against what is then free
        est = cls.preflight(host, config, memory_limit_gb)
        prompt_id, context_node = host.executing()
        node = node_id if node_id is not None else context_node
        record = REGISTRY.start(node, prompt_id, config.steps, config.output_name, {
            "checkpoint": checkpoint, "steps": config.steps, "rank": config.rank, "resolution": config.resolution,
            "batch_size": config.batch_size, "learning_rate": config.learning_rate, "resume": bool(resume),
        })
        run = record.run_id
        ids = {"run_id": run, "node": record.node, "prompt_id": prompt_id}
        if est is not None:
            REGISTRY.update(run, estimate=est.to_dict())
            host.progress_text(est.summary(), node)
        # build_config trains in what the device can do; a precision it changed is said aloud, never silent
        precision_note = resolve_precision(precision, host.torch_device())[1]
        if precision_note:
            logging.getLogger("comfyui_lora_trainer").warning(precision_note)
            host.progress_text(precision_note, node)
        host.send(RUN_EVENT, {**ids, "status": "starting", "total": config.steps, "name": config.output_name,
                              "estimate": est.to_dict() if est else None})

        progress = host.progress(config.steps, node)
        meter = SpeedMeter()
        state = {"preview": None, "chart_at": 0.0, "text_at": 0.0, "losses": [], "has_samples": False}

        def on_event(event):
            kind = event.get("type")
            if kind == "start" and event.get("losses"):
                # resumed: the earlier losses (kept in the state) come first, so the record, the live chart
                # and the preview show the whole curve from step 1
                history = [float(v) for v in event["losses"]]
                start = int(event.get("start_step") or len(history))
                first = max(0, start - len(history))
                state["losses"] = list(history)
                REGISTRY.update(run, losses=list(history), first_step=first, step=start, resumed_at=start,
                                status="running")
                host.send(RUN_EVENT, {**ids, "status": "running", "total": config.steps, "step": start,
                                      "first_step": first, "resumed_at": start, "losses": history})
            elif kind == "step":
                step, total, loss = event["step"], event.get("total", config.steps), float(event["loss"])
                meter.tick(step)
                REGISTRY.add_step(run, step, total, loss, event.get("elapsed", 0.0))
                state["losses"].append(loss)
                rate, eta = meter.rate(), meter.eta(step, total)
                smooth = smoothed(state["losses"][-200:])[-1]
                host.send(PROGRESS_EVENT, {**ids, "step": step, "total": total, "loss": loss,
                                           "elapsed": event.get("elapsed", 0.0), "rate": rate, "eta": eta})
                now = time.monotonic()
                preview = state.pop("preview", None)
                state["preview"] = None
                if preview is None and not state["has_samples"] and (
                    now - state["chart_at"] >= PREVIEW_CHART_SECONDS or step == total
                ):
                    state["chart_at"] = now
                    preview = loss_chart(state["losses"], 512, 288, f"{config.output_name} loss")
                progress.update(step, total, preview=preview)
                if now - state["text_at"] >= TEXT_SECONDS or step == total:
                    state["text_at"] = now
                    host.progress_text(progress_line(step, total, loss, smooth, rate, eta), node)
            elif kind == "sample":
                images = []
                for index, value in enumerate(event.get("images") or event.get("paths") or []):
                    try:
                        image = _pil(value)
                    except Exception as e:  # a sample must never end the run
                        host.progress_text(f"sample image {index} unreadable: {e}", node)
                        continue
                    images.append(host.save_temp_image(image, f"loratrainer/{config.output_name}_sample"))
                    if index == 0:
                        state["preview"], state["has_samples"] = image, True
                step = int(event.get("step", 0))
                REGISTRY.add_sample(run, step, images, event.get("prompts"))
                host.send(SAMPLE_EVENT, {**ids, "step": step, "images": images, "prompts": event.get("prompts") or []})
            elif kind in ("saved", "checkpoint", "state"):
                written = event.get("path", "")
                entry = {"kind": event.get("kind") or kind, "path": os.path.basename(written),
                         "step": event.get("step")}
                REGISTRY.add_file(run, entry)
                host.send(SAVED_EVENT, {**ids, **entry})
            elif kind == "log" and event.get("message"):
                host.progress_text(str(event["message"])[:300], node)

        try:
            result = train(config, events=on_event, should_stop=host.interrupted)
        except (DatasetError, FileExistsError) as e:
            REGISTRY.update(run, status="error", message=str(e))
            host.send(RUN_EVENT, {**ids, "status": "error", "message": str(e)})
            raise NodeError(str(e)) from None
        except BaseException as e:
            REGISTRY.update(run, status="error", message=f"{type(e).__name__}: {e}")
            host.send(RUN_EVENT, {**ids, "status": "error", "message": f"{type(e).__name__}: {e}"})
            raise
        finally:
            host.free_memory()  # give the device back to ComfyUI's other nodes
        status = "interrupted" if result.stopped_early else "done"
        file_name = os.path.relpath(result.path, config.output_dir) if result.path else ""
        REGISTRY.update(run, status=status, message=file_name)
        host.send(RUN_EVENT, {**ids, "status": status, "file": file_name, "step": result.steps_done,
                              "total": config.steps})
        if result.stopped_early:
            host.raise_interrupt()  # the work is saved; tell ComfyUI the prompt was cancelled
        final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        text = f"{file_name}: {result.steps_done} steps in {result.seconds:.0f}s, final loss {final}"
        if precision_note:
            text += f" ({precision_note})"
        return NodeResult((result.lora, {"loss": list(result.losses)}, file_name), ui={"text": [text]})
