"""Test-only ComfyUI nodes that report what the server loaded (copied into <base>/custom_nodes/).

Not part of the package: the harness copies this file to ``<base>/custom_nodes/lora_trainer_it_probe.py``
so tests can inspect MODEL/CLIP/VAE objects over HTTP. Each node is an output node whose history
entry is ``outputs[node_id]["probe"] == [ {...} ]``.

    ITProbeModelInfo(model, clip?, vae?) -> {"config_class", "model_type", "unet_config",
        "latent_format", "dtype", "model_patches", "clip_class", "clip_patches", "vae_class"}
"""

import json


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return repr(value)


class ITProbeModelInfo:
    CATEGORY = "_testing/lora_trainer"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    NOT_IDEMPOTENT = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)},
                "optional": {"clip": ("CLIP",), "vae": ("VAE",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def probe(self, model, clip=None, vae=None):
        base = model.model
        info = {
            "config_class": type(base.model_config).__name__,
            "model_class": type(base).__name__,
            "model_type": getattr(base.model_type, "name", str(base.model_type)),
            "unet_config": _jsonable(dict(base.model_config.unet_config)),
            "latent_format": type(base.latent_format).__name__,
            "dtype": str(base.get_dtype()),
            "model_patches": len(model.patches),
            "model_patch_keys": sorted(model.patches)[:2000],
        }
        if clip is not None:
            info["clip_class"] = type(clip.cond_stage_model).__name__
            info["clip_patches"] = len(clip.patcher.patches)
            info["clip_patch_keys"] = sorted(clip.patcher.patches)[:2000]
        if vae is not None:
            info["vae_class"] = type(vae.first_stage_model).__name__
        return {"ui": {"probe": [info]}}


NODE_CLASS_MAPPINGS = {"ITProbeModelInfo": ITProbeModelInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"ITProbeModelInfo": "IT probe: model info (tests only)"}
