"""LoRA file formats: kohya keys from peft models, metadata, atomic safetensors save/load."""

from .families import (
    BASE_MODEL_VERSION,
    DEFAULT_RESOLUTION,
    FAMILIES,
    MODELSPEC_ARCHITECTURE,
    family_from_metadata,
)
from .export import ExportResult, export_kohya
from .kohya import (
    LoraWeights,
    kohya_state_dict_from_models,
    load_lora_file,
    lora_delta,
    lora_scale,
    module_names,
    weights_from_state_dict,
)
from .modules import NeedsBaseWeightError, module_kind
from .metadata import RunInfo, make_metadata
from .safetensors_io import (
    cleanup_stale_temp_files,
    legacy_hash_of_file,
    model_hash_of_file,
    save_lora_file,
    serialize_lora,
)

__all__ = [
    "LoraWeights",
    "ExportResult",
    "export_kohya",
    "weights_from_state_dict",
    "NeedsBaseWeightError",
    "module_kind",
    "kohya_state_dict_from_models",
    "RunInfo",
    "make_metadata",
    "save_lora_file",
    "load_lora_file",
    "lora_delta",
    "module_names",
    "lora_scale",
    "cleanup_stale_temp_files",
    "model_hash_of_file",
    "legacy_hash_of_file",
    "serialize_lora",
    "family_from_metadata",
    "FAMILIES",
    "BASE_MODEL_VERSION",
    "MODELSPEC_ARCHITECTURE",
    "DEFAULT_RESOLUTION",
]
