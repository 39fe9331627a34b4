"""Apply LoRA: MODEL + CLIP + a LoRA (from Train/Merge or a file) -> patched MODEL + CLIP."""

from __future__ import annotations

from ..training.formats.families import CONTEXT_WIDTH_FAMILY
from ..training.formats.names import SDXL_TE_KOHYA_PREFIXES
from .spec import LORA, In, NodeError, NodeResult, NodeSpec, Out, node_id

NO_FILE = "(none: use the lora input)"

# width of the text context a model's cross-attention reads: tells the base model a LoRA was made for
CONTEXT_FAMILIES = {width: {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[family]
                    for width, family in CONTEXT_WIDTH_FAMILY.items()}


def lora_context_dim(tensors) -> int | None:
    """The context width the LoRA's cross-attention key/value layers read (768 SD1.x, 1024 SD2.x, 2048
    SDXL), from its tensor shapes; None when it has no such layer (then only ComfyUI's own check runs)."""
    for key, value in tensors.items():
        k = key.replace(".", "_")
        if "attn2" in k and ("to_k" in k or "to_v" in k) and ("lora_down" in k or "lora_A" in k) \
                and getattr(value, "ndim", 0) == 2:
            return int(value.shape[1])
    if any(key.startswith(SDXL_TE_KOHYA_PREFIXES) for key in tensors):
        return 2048  # kohya names its two SDXL text encoders te1/te2
    return None


def base_model_mismatch(host, model, tensors) -> str | None:
    """Why this LoRA cannot be applied to ``model`` (made for another base model), or None."""
    model_dim_of = getattr(host, "model_context_dim", None)
    model_dim = model_dim_of(model) if model_dim_of is not None and model is not None else None
    lora_dim = lora_context_dim(tensors)
    if not model_dim or not lora_dim or model_dim == lora_dim:
        return None
    made_for = CONTEXT_FAMILIES.get(lora_dim, f"a model with {lora_dim}-wide text context")
    model_is = CONTEXT_FAMILIES.get(model_dim, f"a model with {model_dim}-wide text context")
    return (f"this LoRA was made for {made_for} but the model is {model_is}; nothing was applied. "
            "Pick a LoRA trained on this base model (or load the matching checkpoint)")


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
        In("lora_model", "LORA_MODEL", optional=True,
           tooltip="a LoRA from ComfyUI's core Train LoRA node (LORA_MODEL); chain Apply nodes to stack LoRAs"),
    ]
    outputs = [Out("model", "MODEL"), Out("clip", "CLIP")]

    @classmethod
    def execute(cls, host, model, clip, strength_model, strength_clip, lora=None, lora_name=NO_FILE,
                lora_model=None) -> NodeResult:
        given = [lora is not None, lora_name not in (None, "", NO_FILE), lora_model is not None]
        if sum(given) > 1:
            raise NodeError("connect a lora, a lora_model or pick a lora_name: only one of them")
        if lora_model is not None:
            if not isinstance(lora_model, dict) or not lora_model:
                raise NodeError("lora_model: expected the LORA_MODEL dict of ComfyUI's Train LoRA node")
            tensors = {k: v.detach() if hasattr(v, "detach") else v for k, v in lora_model.items()}
        elif lora is not None:
            tensors = lora.tensors
        elif lora_name not in (None, "", NO_FILE):
            tensors = host.read_lora_file(host.lora_path(lora_name))
        else:
            raise NodeError("no LoRA: connect the lora (or lora_model) input or pick a file in lora_name")
        if strength_model == 0 and strength_clip == 0:
            return NodeResult((model, clip))
        problem = base_model_mismatch(host, model, tensors)
        if problem:
            source = "lora" if lora is not None else "lora_model" if lora_model is not None else lora_name
            raise NodeError(f"{source}: {problem}")
        model, clip = host.apply_lora(model, clip, tensors, strength_model, strength_clip)
        return NodeResult((model, clip))
