"""A small declarative node description, free of ComfyUI imports.

Node files describe inputs and outputs with these classes and implement ``execute(host, **inputs)``;
``host.py`` turns each description into a ComfyUI V3 node. Tests run the same descriptions against a
test double of the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

PREFIX = "LoraTrainer"
CATEGORY = "LoRA Trainer"

# Value types that travel between our nodes; prefixed so they never collide with core or other packs.
LORA = "LORATRAINER_LORA"
DATASET = "LORATRAINER_DATASET"
OPTIONS = "LORATRAINER_OPTIONS"  # Training Options -> Train LoRA


@dataclass
class In:
    """One input. ``kind``: INT, FLOAT, STRING, BOOLEAN, COMBO or a socket type (MODEL, CLIP, LORA...)."""

    name: str
    kind: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: list[str] | Callable[[Any], list[str]] | None = None  # COMBO: list, or host -> list
    optional: bool = False
    multiline: bool = False
    tooltip: str | None = None
    # INT: the frontend's "control after generate" widget; None = its default (on for inputs named seed)
    control_after_generate: bool | None = None


@dataclass
class Out:
    name: str
    kind: str
    tooltip: str | None = None


@dataclass
class NodeResult:
    values: tuple
    ui: dict | None = None  # {"text": [...]} or {"images": [...]}


class NodeSpec:
    node_id: str = ""
    display_name: str = ""
    description: str = ""
    inputs: list[In] = []
    outputs: list[Out] = []
    output_node: bool = False
    # True: the host passes ``node_id`` (the node's id in the graph, as the frontend knows it) to execute
    wants_node_id: bool = False

    @classmethod
    def execute(cls, host, **inputs) -> NodeResult:
        raise NotImplementedError

    # Optional: a value that changes when the node must re-run although its inputs did not.
    fingerprint: Callable[..., Any] | None = None


def node_id(name: str) -> str:
    return f"{PREFIX}_{name}"


@dataclass
class NodeError(ValueError):
    """A user-facing error: names the input and what to do."""

    message: str
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


# ComfyUI imports a custom node folder under its file path and shows an error's type as
# ``<module>.<qualname>`` (execution.full_type_name), so the dialog read
# ``/.../custom_nodes/comfyui-lora-trainer.nodes.spec.NodeError``. The installed package's name is the clean one.
NodeError.__module__ = "comfyui_lora_trainer.nodes.spec"
