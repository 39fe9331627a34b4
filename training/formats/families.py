"""Family ids and the metadata strings that name them (docs/lora-format.md §9)."""

from __future__ import annotations

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")

# ss_base_model_version (kohya train_network.py; read by A1111 NetworkOnDisk)
BASE_MODEL_VERSION = {
    "sd1": "sd_v1",
    "sd2": "sd_v2",
    "sd2-v": "sd_v2_v",
    "sdxl": "sdxl_base_v1-0",
}

# modelspec.architecture for a LoRA (kohya library/sai_model_spec.py)
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sd2-v": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}

MODELSPEC_IMPLEMENTATION = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sd2-v": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}

# width of the text context a model's cross-attention reads -> the family it tells apart
CONTEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}

PREDICTION_TYPE = {"sd1": "epsilon", "sd2": "epsilon", "sd2-v": "v", "sdxl": "epsilon"}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(
            f"Unknown model family {family!r}; expected one of {', '.join(FAMILIES)}."
        )
    return family


def family_from_metadata(metadata: dict | None) -> str | None:
    """Best-effort family from ss_* / modelspec.* header values; None if it cannot tell."""
    if not metadata:
        return None
    bmv = str(metadata.get("ss_base_model_version", "") or "")
    if bmv.startswith("sdxl"):
        return "sdxl"
    if bmv == "sd_v2_v":
        return "sd2-v"
    if bmv == "sd_v2":
        return "sd2"
    if bmv in ("sd_v1", "sd_v1_v"):
        return "sd1"
    arch = str(metadata.get("modelspec.architecture", "") or "")
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2-768-v"):
        return "sd2-v"
    if arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1"):
        return "sd1"
    v2 = metadata.get("ss_v2")
    if v2 == "True":
        return "sd2-v" if metadata.get("ss_v_parameterization") == "True" else "sd2"
    return None
