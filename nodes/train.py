"""Train LoRA: checkpoint + dataset -> a LoRA file in models/loras, the LoRA itself and its loss.

The node builds a TrainConfig from its inputs and the Training Options, checks that the run fits
(unreadable images, the memory/time estimate of nodes/estimate.py), and trains with a reporter
(nodes/progress.py) that shows the run: progress bar, preview, status line, live chart and run record.
The backend's own checks (output file exists, batch larger than the dataset, ...) are not repeated here:
their errors reach the user with their words.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .fields import config_input
from .runs import loss_maps
from .progress import (PROGRESS_EVENT, RUN_EVENT, SAMPLE_EVENT, SAVED_EVENT, VALIDATION_EVENT,  # noqa: F401
                       RunReporter, SpeedMeter)
from .spec import DATASET, LORA, OPTIONS, In, NodeError, NodeResult, NodeSpec, Out, node_id


def clean_stale_saves(folder: str) -> list[str]:
    """Remove temp files that a save killed mid-write (crash, SIGKILL) left in ``folder``; never raises."""
    from ..training.formats.safetensors_io import cleanup_stale_temp_files

    try:
        return cleanup_stale_temp_files(folder)
    except OSError:
        return []


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


def sample_prompts(text: str, dataset) -> list[str]:
    """One prompt per non-empty line; none: the dataset's first caption."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return prompts or [next((item.caption for item in dataset.items if item.caption), "")]


def resume_state(host, config) -> str:
    """The state a resumed run continues from; NodeError when this output_name left none."""
    # the state folder first; models/loras holds the states of runs from before it existed
    state = state_path_for([config.state_dir or config.output_dir, config.output_dir], config.output_name)
    if state is None:
        states = state_directory(host)
        where = f"{states} (nor in models/loras)" if states else "models/loras"
        raise NodeError(
            f"resume: no saved state for '{config.output_name}' in {where}; a run saves one when it "
            "is cancelled, and every save_every steps with save_state on (Training Options). Switch resume "
            "off to start afresh."
        )
    return state


def preflight(host, config, dataset, memory_limit_gb: float = 0.0, base=None):
    """What must hold before the device is touched: readable images, then the memory/time estimate for
    ``config`` on the host's device (after ComfyUI's models are unloaded), for the checkpoint file or the
    model input ``base`` (a ComfyBaseModel); ``blocks_to_swap = auto`` becomes the count it needs. NodeError
    when it cannot run; returns the estimate, or None where the checkpoint's shapes cannot be read (the
    loader says why)."""
    from .estimate import DitShape, GiB, Settings, estimate, pick_blocks_to_swap, read_model_shape, refusal_message

    report = getattr(dataset, "report", None)
    if report is not None and report.unreadable:
        names = ", ".join(c.rel for c in report.unreadable[:5])
        raise NodeError(
            f"dataset: {len(report.unreadable)} image(s) cannot be read ({names}); remove or re-save them "
            "(Load Dataset's report lists them)"
        )
    for folder in dict.fromkeys(f for f in (config.output_dir, config.state_dir) if f):
        clean_stale_saves(folder)
    host.free_memory()  # ComfyUI's models go first: the estimate compares against what is then free
    if base is not None:
        shape = base.memory_shape()
    else:
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
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        steps=config.steps,
        fp8_base=config.fp8_base,
        optimizer=config.optimizer,
        blocks_to_swap=0 if config.blocks_to_swap == "auto" else int(config.blocks_to_swap),
    )
    if config.blocks_to_swap == "auto":  # the fewest blocks that make the run fit; none for UNets
        picked = pick_blocks_to_swap(shape, settings, free, memory["type"]) \
            if isinstance(shape, DitShape) and free is not None else 0
        if picked is not None:
            config.blocks_to_swap = picked
            settings = replace(settings, blocks_to_swap=picked)
    limited = bool(memory_limit_gb and memory_limit_gb > 0)
    est = estimate(shape, settings, free, memory["type"], memory["name"], memory.get("cpu_count", 4),
                   memory_note="" if limited else memory.get("note", ""))  # what the device's free figure means
    if not est.fits:
        raise NodeError(refusal_message(est))
    return est


# the checkpoint list's last entry: train the MODEL input (also what a graph without checkpoint files can pick)
FROM_MODEL_INPUT = "(model input)"


class TrainLoRA(NodeSpec):
    """Trains a LoRA on an SD1.x/SD2.x/SDXL checkpoint, or on the graph's MODEL, inside ComfyUI's process."""

    node_id = node_id("TrainLoRA")
    display_name = "Train LoRA (LoRA Trainer)"
    description = (
        "Trains a LoRA for an SD1.x/SD2.x/SDXL checkpoint, or for the model connected to its model input "
        "(Flux.1, SD3, Chroma, Lumina2, Qwen-Image with their CLIP and VAE), on a dataset from Load Dataset and "
        "writes it to models/loras, with a live loss chart and sample images. Checks memory before it starts. "
        "Cancel stops within one step and saves <name>_interrupted_stepN plus a resumable state; queue again "
        "with resume on to continue."
    )
    # Order matters: saved workflows store widget values by position. Append new inputs at the end.
    # Inputs named after a TrainConfig key take its range and help from the field (nodes/fields.py).
    inputs = [
        In("checkpoint", "COMBO", options=lambda host: [*host.checkpoint_names(), FROM_MODEL_INPUT],
           tooltip=f"base model to train on (SD1.x/SD2.x/SDXL file), or {FROM_MODEL_INPUT} to train the model "
                   "connected to the model input"),
        In("dataset", DATASET),
        config_input("steps"),
        config_input("learning_rate", tooltip=None),
        config_input("rank"),
        config_input("alpha"),
        config_input("resolution", tooltip=None),
        config_input("batch_size", tooltip=None),
        config_input(
            "seed", control_after_generate=False,
            tooltip="same seed, same run; fixed so that queueing again with resume on continues the same run",
        ),
        config_input("output_name", tooltip="file name in models/loras (no extension)"),
        config_input("precision", options=["bf16", "fp32", "fp16"], default="bf16", tooltip=None, optional=True),
        config_input("trigger_word", optional=True),
        config_input("overwrite", optional=True),
        config_input("gradient_checkpointing", optional=True),
        config_input(
            "sample_every_n_steps", "sample_every", optional=True,
            tooltip="draw sample images every N steps (0: off); they show on the node",
        ),
        In(
            "sample_prompt", "STRING", default="", multiline=True, optional=True,
            tooltip="one prompt per line for the sample images (empty: the first caption of the dataset)",
        ),
        config_input(
            "save_every_n_steps", "save_every", optional=True,
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
        In("model", "MODEL", optional=True,
           tooltip="train the model the graph loaded (Load Checkpoint, Load Diffusion Model; Flux.1, SD3, Chroma, "
                   "Lumina2, Qwen-Image) instead of the checkpoint file; connect its CLIP and VAE too"),
        In("clip", "CLIP", optional=True, tooltip="the MODEL's text encoder(s): captions are encoded once with it"),
        In("vae", "VAE", optional=True, tooltip="the MODEL's VAE: images are encoded once with it"),
    ]
    outputs = [
        Out("lora", LORA, "the trained LoRA, usable by Apply LoRA without loading the file"),
        Out("loss", "LOSS_MAP", "loss per step (core Plot Loss Graph accepts it)"),
        Out("file_name", "STRING", "the file written in models/loras"),
        # last, so existing workflows' links keep their slots
        Out("validation_loss", "LOSS_MAP",
            "the validation loss (Training Options: validation_split or validation_dataset), held per step for "
            "core Plot Loss Graph; empty without validation"),
    ]
    output_node = True
    wants_node_id = True

    @classmethod
    def build_config(cls, host, checkpoint, dataset, steps, learning_rate, rank, alpha, resolution, batch_size,
                     seed, output_name, precision="bf16", trigger_word="", overwrite=False,
                     gradient_checkpointing=False, sample_every=0, sample_prompt="", save_every=0, resume=False,
                     options=None, model_given=False):
        """The run's TrainConfig: the node's inputs, then the Training Options for every other key.
        ``model_given``: the model input is connected and is what trains (no checkpoint file is read)."""
        from ..training.config import ConfigError, TrainConfig
        device = host.torch_device()  # the precision goes to the backend as asked: it says what the device runs
        if model_given:
            checkpoint_path = tokenizer = ""
        elif checkpoint == FROM_MODEL_INPUT:
            raise NodeError(f"checkpoint = {FROM_MODEL_INPUT}: connect a model to the model input (with its clip "
                            "and vae), or pick a checkpoint file")
        else:
            checkpoint_path = host.checkpoint_path(checkpoint)
            tokenizer = tokenizer_for_checkpoint(host, checkpoint_path)
        own = dict(
            checkpoint=checkpoint_path, tokenizer=tokenizer,
            dataset=dataset.root, output_dir=host.loras_directory(), output_name=output_name.strip(),
            steps=steps, rank=rank, alpha=float(alpha), learning_rate=float(learning_rate), resolution=resolution,
            batch_size=batch_size, seed=seed, precision=precision, trigger_word=(trigger_word or "").strip(),
            overwrite=bool(overwrite), device=str(device), gradient_checkpointing=bool(gradient_checkpointing),
            sample_every_n_steps=int(sample_every or 0), save_every_n_steps=int(save_every or 0),
        )
        if sample_every:
            own["sample_prompts"] = sample_prompts(sample_prompt, dataset)
        states = state_directory(host)
        if states:
            own["state_dir"] = states
        try:
            config = TrainConfig.from_dict({**(options or {}), **own}, source="options")  # the node's own win
            if resume:
                config.resume_from = resume_state(host, config)
            return config.validate(model_given=model_given)
        except ConfigError as e:
            raise NodeError(str(e)) from None

    @classmethod
    def execute(cls, host, checkpoint, dataset, steps, learning_rate, rank, alpha, resolution, batch_size, seed,
                output_name, precision="bf16", trigger_word="", overwrite=False, gradient_checkpointing=False,
                sample_every=0, sample_prompt="", save_every=0, resume=False, memory_limit_gb=0.0, options=None,
                model=None, clip=None, vae=None, node_id=None) -> NodeResult:
        from ..training.dataset import DatasetError
        from ..training.loop import TrainingError, train

        # the graph's model, checked (family tested, CLIP and VAE present) before anything runs
        base = host.base_model(model, clip, vae) if model is not None else None
        config = cls.build_config(
            host, checkpoint, dataset, steps, learning_rate, rank, alpha, resolution, batch_size, seed, output_name,
            precision, trigger_word, overwrite, gradient_checkpointing, sample_every, sample_prompt, save_every,
            resume, options, model_given=base is not None,
        )
        estimate = preflight(host, config, dataset, memory_limit_gb, base)
        prompt_id, context_node = host.executing()
        reporter = RunReporter(host, config, node_id if node_id is not None else context_node, prompt_id, {
            "checkpoint": base.source if base is not None else checkpoint, "steps": config.steps,
            "rank": config.rank, "resolution": config.resolution, "batch_size": config.batch_size,
            "learning_rate": config.learning_rate, "resume": bool(resume),
        })
        reporter.started(estimate)
        try:
            result = train(config, base=base, events=reporter, should_stop=host.interrupted)
        except (DatasetError, FileExistsError, TrainingError) as e:  # the backend's refusals, in its words
            reporter.failed(str(e))
            raise NodeError(str(e)) from None
        except BaseException as e:
            reporter.failed(f"{type(e).__name__}: {e}")
            raise
        finally:
            if base is not None:  # the graph's model goes back without our adapters
                base.release()
            host.free_memory()  # give the device back to ComfyUI's other nodes
        file_name = reporter.finished(result)
        if result.stopped_early:
            host.raise_interrupt()  # the work is saved; tell ComfyUI the prompt was cancelled
        final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        text = f"{file_name}: {result.steps_done} steps in {result.seconds:.0f}s, final loss {final}"
        if reporter.precision_note:  # a precision the device could not run, said by the backend at the start
            text += f" ({reporter.precision_note})"
        if result.best_validation_step is not None:
            text += (f", validation {result.validation[-1][1]:.4f} (best {result.best_validation_loss:.4f} at step "
                     f"{result.best_validation_step})")
        training_map, validation_map = loss_maps(
            result.losses, [{"step": s, "loss": v} for s, v in result.validation], result.steps_done)
        return NodeResult((result.lora, training_map, file_name, validation_map), ui={"text": [text]})
