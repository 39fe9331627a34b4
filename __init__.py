"""comfyui-lora-trainer: train, apply and merge LoRAs for Stable Diffusion inside ComfyUI.

ComfyUI imports this file from ``custom_nodes/<folder>``; ``pip install -e .`` exposes the same tree
as ``comfyui_lora_trainer``. Nothing heavy (torch, diffusers, ComfyUI) is imported here: the node
classes are built only when ComfyUI asks for them through ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]


async def comfy_entrypoint():
    from .nodes import LoraTrainerExtension

    return LoraTrainerExtension()
