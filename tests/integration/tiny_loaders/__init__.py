"""Test-only ComfyUI nodes (never shipped): a tiny Flux.1 dev MODEL, CLIP and VAE for running
example_workflows/train_flux.json in a real ComfyUI on the CPU in seconds.

The harness links this folder into ``<base>/custom_nodes/`` (comfy_server.prepare_base_dir). What they give:

- ``ITTinyFluxModel`` (unet_name from models/diffusion_models): a tiny Flux file loaded by ComfyUI's own
  ``load_diffusion_model_state_dict``, with the sizes detection gets wrong told to it (comfy_tiny.told_sizes).
  Only where ComfyUI's Load Diffusion Model cannot load the file itself (0.3.64 fixes Flux's width, heads and
  context at the full model's); where :func:`unet_loader_reads_tiny_flux` is true the tests use the real
  UNETLoader on the same file.
- ``ITTinyFluxClip``: comfy_tiny.StandInClip (ComfyUI's CLIP interface: tokenize, encode_from_tokens_scheduled)
  with what ComfyUI's LoRA loader asks of a CLIP (cond_stage_model, clone, add_patches on a ModelPatcher), since
  no text encoder of ComfyUI loads at the tiny model's 64-wide context (T5-XXL's config is fixed).
- ``ITTinyFluxVae``: comfy_tiny.StandInVae with Flux's 16 latent channels (VAEEncode/VAEDecode's interface).

The test process imports :func:`write_tiny_flux` and :func:`unet_loader_reads_tiny_flux` (ComfyUI on sys.path).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

_INTEGRATION = Path(__file__).resolve().parents[1]  # tests/integration (this folder is linked, not copied)
if str(_INTEGRATION) not in sys.path:
    sys.path.insert(0, str(_INTEGRATION))

import comfy_tiny  # noqa: E402

CATEGORY = "_testing/lora_trainer"
TINY_FLUX_FILE = "tiny-flux-dev.safetensors"


def tiny_flux() -> comfy_tiny.TinyModel:
    """The tiny Flux.1 dev every node and test here uses (comfy_tiny's builder, seed 0)."""
    return comfy_tiny.flux(guidance=True, seed=0)


def write_tiny_flux(folder) -> str:
    """Write the tiny Flux.1 dev state dict (BFL key names, as flux1-dev.safetensors) into ``folder`` (a
    models/diffusion_models folder); returns its file name."""
    from safetensors.torch import save_file

    path = Path(folder) / TINY_FLUX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        save_file({k: v.contiguous() for k, v in tiny_flux().state_dict.items()}, str(path))
    return TINY_FLUX_FILE


def unet_loader_reads_tiny_flux() -> bool:
    """Whether this ComfyUI's model detection reads every size of the tiny Flux from its shapes (0.33 does,
    0.3.64 does not): then its own Load Diffusion Model (UNETLoader) loads the file unchanged."""
    import comfy.model_detection

    tiny = tiny_flux()
    config = comfy.model_detection.detect_unet_config(tiny.state_dict, "")
    return config is not None and not any(k not in config or comfy_tiny._differs(config[k], v)
                                          for k, v in tiny.config.items())


class ITTinyFluxModel:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, unet_name):
        import comfy.sd
        import comfy.utils
        import folder_paths
        import torch

        tiny = tiny_flux()
        tiny.state_dict = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        with comfy_tiny.told_sizes(tiny):
            patcher = comfy.sd.load_diffusion_model_state_dict(tiny.state_dict, model_options={"dtype": torch.float32})
        if patcher is None:
            raise RuntimeError(f"{unet_name}: ComfyUI did not recognise a Flux model")
        return (patcher,)


class TinyFluxClip(comfy_tiny.StandInClip):
    """The stand-in CLIP with the part of ComfyUI's CLIP that ``comfy.sd.load_lora_for_models`` uses: a
    ``cond_stage_model`` (no weights: a LoRA finds no text-encoder key in it), ``clone`` and ``add_patches``
    through a real ModelPatcher."""

    def __init__(self, tiny):
        import comfy.model_patcher
        import torch

        super().__init__(tiny)
        self.cond_stage_model = torch.nn.Module()
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))

    def clone(self):
        other = copy.copy(self)
        other.patcher = self.patcher.clone()
        return other

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


class ITTinyFluxClip:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (TinyFluxClip(tiny_flux()),)


class ITTinyFluxVae:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        import torch

        with torch.inference_mode(False):  # ordinary weights, as a VAE loaded outside a node's inference mode
            return (comfy_tiny.StandInVae(channels=16),)


NODE_CLASS_MAPPINGS = {"ITTinyFluxModel": ITTinyFluxModel, "ITTinyFluxClip": ITTinyFluxClip,
                       "ITTinyFluxVae": ITTinyFluxVae}
NODE_DISPLAY_NAME_MAPPINGS = {"ITTinyFluxModel": "IT tiny Flux model (tests only)",
                              "ITTinyFluxClip": "IT tiny Flux CLIP (tests only)",
                              "ITTinyFluxVae": "IT tiny Flux VAE (tests only)"}
