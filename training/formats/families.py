"""Family ids and the metadata strings that name them (docs/lora-format.md §9).

``FAMILIES``: the checkpoint-file families the diffusers path trains. ``MODEL_FAMILIES``: the families trained
on the model ComfyUI holds (nodes/comfy_model.py), named by kohya sd-scripts' metadata values
(``library/sai_model_spec.py``, ``flux_utils.MODEL_VERSION_*``, ``sd3_utils`` model types, ``lumina_util``) where
kohya trains them; Qwen-Image and Z-Image, which kohya's sd-scripts does not train, by their own names.
"""

from __future__ import annotations

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
MODEL_FAMILIES = ("sd3", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell", "chroma", "lumina2",
                  "z-image", "qwen-image")
ALL_FAMILIES = FAMILIES + MODEL_FAMILIES

# ss_base_model_version (kohya train_network.py; read by A1111 NetworkOnDisk)
BASE_MODEL_VERSION = {
    "sd1": "sd_v1",
    "sd2": "sd_v2",
    "sd2-v": "sd_v2_v",
    "sdxl": "sdxl_base_v1-0",
    # kohya: the MMDiT's model type (sd3_utils), flux_utils.MODEL_VERSION_FLUX_V1 / _CHROMA, lumina_util
    "sd3": "medium",
    "sd3.5-medium": "5-medium",
    "sd3.5-large": "5-large",
    "flux-dev": "flux1",
    "flux-schnell": "flux1",
    "chroma": "chroma",
    "lumina2": "lumina2",
    "z-image": "z_image",
    "qwen-image": "qwen_image",
}

# modelspec.architecture for a LoRA (kohya library/sai_model_spec.py)
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sd2-v": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    # SD3: the SAI spec's id, as ComfyUI writes it (nodes_model_merging.py); kohya writes "stable-diffusion-3-..."
    "sd3": "stable-diffusion-v3-medium/lora",
    "sd3.5-medium": "stable-diffusion-v3-5-medium/lora",
    "sd3.5-large": "stable-diffusion-v3-5-large/lora",
    "flux-dev": "flux-1-dev/lora",
    "flux-schnell": "flux-1-schnell/lora",
    "chroma": "chroma/lora",
    "lumina2": "lumina-2/lora",
    "z-image": "z-image/lora",
    "qwen-image": "qwen-image/lora",
}

# the SD3 ids kohya writes (sai_model_spec.ARCH_SD3_M + "-" + model type), read as ours
KOHYA_ARCHITECTURE_ALIASES = {
    "stable-diffusion-3-medium": "sd3",
    "stable-diffusion-3-5-medium": "sd3.5-medium",
    "stable-diffusion-3-5-large": "sd3.5-large",
}

# ss_network_module of a plain LoRA where kohya's sd-scripts trains the family with a network module of its own
# (networks/lora_sd3.py, lora_flux.py, lora_lumina.py); the others write networks.lora
KOHYA_NETWORK_MODULE = {
    "sd3": "networks.lora_sd3", "sd3.5-medium": "networks.lora_sd3", "sd3.5-large": "networks.lora_sd3",
    "flux-dev": "networks.lora_flux", "flux-schnell": "networks.lora_flux", "chroma": "networks.lora_flux",
    "lumina2": "networks.lora_lumina", "z-image": "networks.lora_lumina",
}

MODELSPEC_IMPLEMENTATION = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sd2-v": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "sd3": "https://github.com/Stability-AI/sd3-ref",
    "sd3.5-medium": "https://github.com/Stability-AI/sd3.5",
    "sd3.5-large": "https://github.com/Stability-AI/sd3.5",
    "flux-dev": "https://github.com/black-forest-labs/flux",
    "flux-schnell": "https://github.com/black-forest-labs/flux",
    "chroma": "https://huggingface.co/lodestones/Chroma",
    "lumina2": "https://github.com/Alpha-VLLM/Lumina-Image-2.0",
    "z-image": "https://github.com/Tongyi-MAI/Z-Image",
    "qwen-image": "https://github.com/QwenLM/Qwen-Image",
}

# width of the text context a model's cross-attention reads -> the family it tells apart
CONTEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024, "sd3": 1024, "sd3.5-medium": 1024,
                      "sd3.5-large": 1024, "flux-dev": 1024, "flux-schnell": 1024, "chroma": 1024, "lumina2": 1024,
                      "z-image": 1024, "qwen-image": 1328}

# modelspec.prediction_type: the SAI spec knows epsilon and v; flow models get none (kohya writes none for Flux)
PREDICTION_TYPE = {"sd1": "epsilon", "sd2": "epsilon", "sd2-v": "v", "sdxl": "epsilon",
                   **{f: None for f in MODEL_FAMILIES}}


def check_family(family: str, allowed: tuple[str, ...] = FAMILIES) -> str:
    """``family`` if it is one of ``allowed`` (default: the checkpoint families), else a ValueError naming them."""
    if family not in allowed:
        raise ValueError(
            f"Unknown model family {family!r}; expected one of {', '.join(allowed)}."
        )
    return family


def family_from_metadata(metadata: dict | None) -> str | None:
    """Best-effort family from ss_* / modelspec.* header values; None if it cannot tell."""
    if not metadata:
        return None
    arch = str(metadata.get("modelspec.architecture", "") or "")
    by_arch = {MODELSPEC_ARCHITECTURE[f].split("/")[0]: f for f in MODEL_FAMILIES}
    by_arch.update(KOHYA_ARCHITECTURE_ALIASES)
    if arch.split("/")[0] in by_arch:  # before the SD ids: "stable-diffusion-v3..." is no SD1/SD2
        return by_arch[arch.split("/")[0]]
    bmv = str(metadata.get("ss_base_model_version", "") or "")
    by_version = {v: f for f, v in BASE_MODEL_VERSION.items() if f in MODEL_FAMILIES and v != "flux1"}
    if bmv in by_version:
        return by_version[bmv]
    if bmv == "flux1":  # dev and schnell share it; dev is what kohya trains by default
        return "flux-dev"
    if bmv.startswith("sdxl"):
        return "sdxl"
    if bmv == "sd_v2_v":
        return "sd2-v"
    if bmv == "sd_v2":
        return "sd2"
    if bmv in ("sd_v1", "sd_v1_v"):
        return "sd1"
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
