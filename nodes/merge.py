"""Merge LoRAs: two or more LoRAs with a weight each -> one LoRA (exact: ranks concatenated)."""

from __future__ import annotations

import os

from .spec import LORA, In, NodeError, NodeResult, NodeSpec, Out, node_id

MAX_INPUTS = 4


class MergeLoRAs(NodeSpec):
    """Combines LoRAs so the result equals applying each at its weight."""

    node_id = node_id("MergeLoRAs")
    display_name = "Merge LoRAs (LoRA Trainer)"
    description = (
        "Exact merge: the merged LoRA's change to every weight equals the weighted sum of the inputs' "
        "changes (ranks add up). Optionally saves it to models/loras."
    )
    inputs = [
        In("lora_1", LORA),
        In("weight_1", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01),
        In("lora_2", LORA),
        In("weight_2", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01),
    ] + [
        item
        for i in range(3, MAX_INPUTS + 1)
        for item in (
            In(f"lora_{i}", LORA, optional=True),
            In(f"weight_{i}", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True),
        )
    ] + [In("save_name", "STRING", default="", optional=True, tooltip="if set, also write models/loras/<name>")]
    outputs = [Out("lora", LORA), Out("file_name", "STRING")]

    @classmethod
    def execute(cls, host, **inputs) -> NodeResult:
        from ..training.config import output_name_problem
        from ..training.formats import save_lora_file
        from ..training.merge import merge_exact

        items = [
            (inputs[f"lora_{i}"], float(inputs.get(f"weight_{i}", 1.0)))
            for i in range(1, MAX_INPUTS + 1)
            if inputs.get(f"lora_{i}") is not None
        ]
        try:
            merged = merge_exact(items)
        except ValueError as e:
            raise NodeError(str(e)) from None
        name = (inputs.get("save_name") or "").strip()
        file_name = ""
        if name:
            if name.lower().endswith(".safetensors"):
                name = name[: -len(".safetensors")]
            problem = output_name_problem(name)
            if problem:
                raise NodeError(f"save_name '{name}': {problem}")
            path = os.path.join(host.loras_directory(), name + ".safetensors")
            try:
                save_lora_file(path, merged)
            except FileExistsError as e:
                raise NodeError(str(e)) from None
            file_name = name + ".safetensors"
            host.send("loratrainer.saved", {"path": file_name})
        return NodeResult((merged, file_name))
