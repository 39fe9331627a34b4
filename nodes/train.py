"""Train LoRA: checkpoint + dataset -> a LoRA file in models/loras, the LoRA itself and its loss."""

from __future__ import annotations

import os

from .spec import DATASET, LORA, In, NodeError, NodeResult, NodeSpec, Out, node_id

PROGRESS_EVENT = "loratrainer.progress"


class TrainLoRA(NodeSpec):
    """Trains a LoRA on the UNet's attention layers inside ComfyUI's process."""

    node_id = node_id("TrainLoRA")
    display_name = "Train LoRA (LoRA Trainer)"
    description = (
        "Trains a LoRA for an SD1.x/SD2.x/SDXL checkpoint on a dataset from Load Dataset and writes it to "
        "models/loras. Cancel stops within one step and saves what was learned as <name>_interrupted_stepN."
    )
    inputs = [
        In("checkpoint", "COMBO", options=lambda host: host.checkpoint_names(), tooltip="base model to train on"),
        In("dataset", DATASET),
        In("steps", "INT", default=500, min=1, max=1_000_000, tooltip="optimizer steps"),
        In("learning_rate", "FLOAT", default=1e-4, min=1e-7, max=0.1, step=1e-5),
        In("rank", "INT", default=16, min=1, max=256, tooltip="LoRA rank (dim)"),
        In("alpha", "FLOAT", default=16.0, min=0.01, max=1024.0, step=0.5, tooltip="scale = alpha / rank"),
        In("resolution", "INT", default=512, min=64, max=4096, step=64),
        In("batch_size", "INT", default=1, min=1, max=64),
        In("seed", "INT", default=0, min=0, max=2**63 - 1),
        In("output_name", "STRING", default="my_lora", tooltip="file name in models/loras (no extension)"),
        In("precision", "COMBO", options=["bf16", "fp32", "fp16"], default="bf16", optional=True),
        In("trigger_word", "STRING", default="", optional=True, tooltip="prepended to every caption"),
        In("overwrite", "BOOLEAN", default=False, optional=True, tooltip="replace an existing file of that name"),
    ]
    outputs = [
        Out("lora", LORA, "the trained LoRA, usable by Apply LoRA without loading the file"),
        Out("loss", "LOSS_MAP", "loss per step (core Plot Loss Graph accepts it)"),
        Out("file_name", "STRING", "the file written in models/loras"),
    ]
    output_node = True

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
    ) -> NodeResult:
        from ..training.config import ConfigError, TrainConfig
        from ..training.dataset import DatasetError
        from ..training.loop import train

        device = host.torch_device()
        if str(device) == "cpu" and precision == "fp16":
            precision = "fp32"  # fp16 autocast needs a GPU; fp32 is what the CPU runs best
        config = TrainConfig(
            checkpoint=host.checkpoint_path(checkpoint),
            tokenizer=host.tokenizer_dir(),
            dataset=dataset.root,
            output_dir=host.loras_directory(),
            output_name=output_name.strip(),
            steps=steps,
            rank=rank,
            alpha=alpha,
            learning_rate=learning_rate,
            resolution=resolution,
            batch_size=batch_size,
            seed=seed,
            precision=precision,
            trigger_word=trigger_word.strip(),
            overwrite=overwrite,
            device=str(device),
        )
        try:
            config.validate()
        except ConfigError as e:
            raise NodeError(str(e)) from None
        path = os.path.join(config.output_dir, config.output_name + ".safetensors")
        if os.path.exists(path) and not overwrite:
            raise NodeError(
                f"output_name: models/loras/{config.output_name}.safetensors already exists; "
                "choose another name or switch overwrite on"
            )

        host.free_memory()
        progress = host.progress(steps)

        def on_event(event):
            if event["type"] == "step":
                progress.update(event["step"], event["total"])
                host.send(PROGRESS_EVENT, {k: event[k] for k in ("step", "total", "loss", "elapsed")})
            elif event["type"] == "saved":
                host.send("loratrainer.saved", {"path": os.path.basename(event["path"])})

        try:
            result = train(config, events=on_event, should_stop=host.interrupted)
        except (DatasetError, FileExistsError) as e:
            raise NodeError(str(e)) from None
        finally:
            host.free_memory()
        if result.stopped_early:
            host.raise_interrupt()  # the work is saved; tell ComfyUI the prompt was cancelled
        file_name = os.path.relpath(result.path, config.output_dir) if result.path else ""
        text = f"{file_name}: {result.steps_done} steps in {result.seconds:.0f}s, final loss {result.losses[-1]:.4f}"
        return NodeResult((result.lora, {"loss": result.losses}, file_name), ui={"text": [text]})
