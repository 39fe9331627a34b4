"""Apply LoRA: MODEL + CLIP + a LoRA (from Train/Merge or a file) -> patched MODEL + CLIP."""

from __future__ import annotations

from .spec import LORA, In, NodeError, NodeResult, NodeSpec, Out, node_id

NO_FILE = "(none: use the lora input)"


class ApplyLoRA(NodeSpec):
    """Patches a model and its text encoder with a LoRA through ComfyUI's own LoRA loader."""

    node_id = node_id("ApplyLoRA")
    display_name = "Apply LoRA (LoRA Trainer)"
    description = "Applies a LoRA from Train/Merge LoRA, or a file from models/loras, at the given strengths."
    inputs = [
        In("model", "MODEL"),
        In("clip", "CLIP"),
        In("strength_model", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01),
        In("strength_clip", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01),
        In("lora", LORA, optional=True, tooltip="a LoRA from Train LoRA or Merge LoRAs"),
        In("lora_name", "COMBO", options=lambda host: [NO_FILE] + host.lora_names(), default=NO_FILE, optional=True),
    ]
    outputs = [Out("model", "MODEL"), Out("clip", "CLIP")]

    @classmethod
    def execute(cls, host, model, clip, strength_model, strength_clip, lora=None, lora_name=NO_FILE) -> NodeResult:
        if lora is not None and lora_name not in (None, "", NO_FILE):
            raise NodeError("connect a lora or pick a lora_name, not both")
        if lora is not None:
            tensors = lora.tensors
        elif lora_name not in (None, "", NO_FILE):
            tensors = host.read_lora_file(host.lora_path(lora_name))
        else:
            raise NodeError("no LoRA: connect the lora input or pick a file in lora_name")
        if strength_model == 0 and strength_clip == 0:
            return NodeResult((model, clip))
        model, clip = host.apply_lora(model, clip, tensors, strength_model, strength_clip)
        return NodeResult((model, clip))
