"""Base models: offline loading of SD1/SD2/SDXL checkpoints, LDM<->diffusers names, tiny models, conditioning."""
from .conditioning import Conditioning, encode_images, encode_prompts, tokenize
from .families import FAMILIES, UnsupportedModelError, detect_family, family_config
from ..formats.ldm_names import unet_module_path_to_ldm
from .loader import BaseModel, ldm_state_dict, load_base_model, read_shapes, tiny_tokenizer_dir, write_checkpoint
from .tiny import build_components, build_tiny_components, write_tiny_checkpoint

__all__ = [
    "BaseModel", "load_base_model", "detect_family", "UnsupportedModelError",
    "build_tiny_components", "write_tiny_checkpoint", "write_checkpoint", "tiny_tokenizer_dir",
    "unet_module_path_to_ldm", "encode_prompts", "encode_images", "Conditioning",
    "build_components", "family_config", "FAMILIES", "ldm_state_dict", "read_shapes", "tokenize",
]
