"""Merge LoRAs: 2 to 8 LoRAs with a weight each -> one LoRA (exact, or SVD to a rank / energy)."""

from __future__ import annotations

import os

from .spec import LORA, In, NodeError, NodeResult, NodeSpec, Out, node_id

MAX_INPUTS = 8
MODES = ["exact", "svd"]


def _weight(i: int, optional: bool) -> In:
    return In(f"weight_{i}", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01, optional=optional)


def save_to_loras(host, merged, save_name: str) -> str:
    """Write ``merged`` as models/loras/<save_name>.safetensors (never over an existing file)."""
    from ..training.config import output_name_problem
    from ..training.formats import save_lora_file

    name = save_name.strip()
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
    host.send("loratrainer.saved", {"path": name + ".safetensors"})
    return name + ".safetensors"


class MergeLoRAs(NodeSpec):
    """Combines LoRAs so the result equals applying each at its weight (exact), or a re-ranked approximation."""

    node_id = node_id("MergeLoRAs")
    display_name = "Merge LoRAs (LoRA Trainer)"
    description = (
        "exact: the merged LoRA changes every weight by exactly the weighted sum of the inputs' changes (ranks "
        "add up). svd: re-ranked to `rank` (0 = no limit) and/or the fewest singular values keeping `energy` of "
        "each module's change; the relative error is reported. Optionally saves to models/loras."
    )
    inputs = (
        [In("lora_1", LORA), _weight(1, False), In("lora_2", LORA), _weight(2, False)]
        + [item for i in range(3, MAX_INPUTS + 1) for item in (In(f"lora_{i}", LORA, optional=True), _weight(i, True))]
        + [
            In("mode", "COMBO", options=MODES, default="exact", optional=True),
            In("rank", "INT", default=0, min=0, max=1024, step=1, optional=True, tooltip="svd: target rank (0 = no limit)"),
            In("energy", "FLOAT", default=1.0, min=0.01, max=1.0, step=0.001, optional=True,
               tooltip="svd: keep this fraction of each module's squared singular values (1 = no limit)"),
            In("save_name", "STRING", default="", optional=True, tooltip="if set, also write models/loras/<name>"),
        ]
    )
    outputs = [Out("lora", LORA), Out("file_name", "STRING"), Out("report", "STRING")]

    @classmethod
    def execute(cls, host, **inputs) -> NodeResult:
        from ..training.merge import merge_loras

        items = [
            (inputs[f"lora_{i}"], float(inputs.get(f"weight_{i}", 1.0)))
            for i in range(1, MAX_INPUTS + 1)
            if inputs.get(f"lora_{i}") is not None
        ]
        if len(items) < 2:
            raise NodeError("connect at least two LoRAs (lora_1 and lora_2)")
        mode = inputs.get("mode") or "exact"
        rank = int(inputs.get("rank") or 0) or None
        energy = float(inputs.get("energy") if inputs.get("energy") is not None else 1.0)
        energy = energy if energy < 1.0 else None
        if mode == "svd" and rank is None and energy is None:
            raise NodeError("svd mode: set rank above 0 or energy below 1")
        try:
            merged, report = merge_loras(items, mode, rank=rank, energy=energy)
        except ValueError as e:
            raise NodeError(str(e)) from None
        file_name = save_to_loras(host, merged, inputs["save_name"]) if (inputs.get("save_name") or "").strip() else ""
        text = report.summary()
        return NodeResult((merged, file_name, text), ui={"text": [text]})
