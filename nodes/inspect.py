"""LoRA Info: what a LoRA holds (format, base model, per-block rank/alpha, metadata) and, given a
checkpoint, which of its modules that model would not use. Also passes the LoRA on, so a file can feed
Merge LoRAs."""

from __future__ import annotations

from .spec import LORA, In, NodeError, NodeResult, NodeSpec, Out, node_id

NO_FILE = "(none: use the lora input)"
NO_CHECKPOINT = "(none)"


class LoRAInfo(NodeSpec):
    """Shows a LoRA's format, family, ranks, alphas and metadata; outputs the LoRA and the report."""

    node_id = node_id("LoRAInfo")
    display_name = "LoRA Info (LoRA Trainer)"
    description = (
        "Inspects a LoRA (connected, or a file from models/loras): format, base model family, rank and alpha per "
        "block, metadata, and with a checkpoint the modules that model would not use. Outputs the LoRA too."
    )
    inputs = [
        In("lora", LORA, optional=True, tooltip="a LoRA from Train/Merge LoRA"),
        In("lora_name", "COMBO", options=lambda host: [NO_FILE] + host.lora_names(), default=NO_FILE, optional=True),
        In("checkpoint", "COMBO", options=lambda host: [NO_CHECKPOINT] + host.checkpoint_names(),
           default=NO_CHECKPOINT, optional=True, tooltip="check which modules this base model would not use"),
    ]
    outputs = [Out("lora", LORA), Out("info", "STRING")]
    output_node = True

    @classmethod
    def execute(cls, host, lora=None, lora_name=NO_FILE, checkpoint=NO_CHECKPOINT) -> NodeResult:
        from ..training.formats import load_lora_file
        from ..training.lora_tools import format_inspect, inspect_lora, inspect_weights

        has_file = lora_name not in (None, "", NO_FILE)
        if lora is not None and has_file:
            raise NodeError("connect a lora or pick a lora_name, not both")
        base = host.checkpoint_path(checkpoint) if checkpoint not in (None, "", NO_CHECKPOINT) else None
        try:
            if has_file:
                path = host.lora_path(lora_name)
                info = inspect_lora(path, base=base)
                lora = load_lora_file(path)
            elif lora is not None:
                info = inspect_weights(lora, base=base)
            else:
                raise NodeError("no LoRA: connect the lora input or pick a file in lora_name")
        except (ValueError, FileNotFoundError) as e:
            raise NodeError(str(e)) from None
        text = format_inspect(info)
        return NodeResult((lora, text), ui={"text": [text]})
