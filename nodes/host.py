"""Every call into ComfyUI lives here (folder_paths, model_management, ProgressBar, PromptServer,
comfy.sd, comfy_api). The node files talk to a ``Host`` object; tests swap in a test double with
``set_host``.
"""

from __future__ import annotations

import os
from typing import Any

from .spec import CATEGORY, NodeError, NodeResult, NodeSpec

_host = None


def get_host():
    global _host
    if _host is None:
        _host = ComfyHost()
    return _host


def set_host(host) -> None:
    """Install a test double (or None to go back to the real ComfyUI host)."""
    global _host
    _host = host


class Progress:
    """A node's progress bar; Cancel is read through ``Host.interrupted`` so the run can save first."""

    def __init__(self, total: int):
        import comfy.utils

        self._bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, total: int | None = None, preview=None) -> None:
        import comfy.model_management

        try:
            self._bar.update_absolute(value, total, ("JPEG", preview, 512) if preview is not None else None)
        except comfy.model_management.InterruptProcessingException:
            pass  # seen again by Host.interrupted() at the step boundary, where the work gets saved


class ComfyHost:
    """The real host: ComfyUI's modules, imported on first use."""

    # -- folders -------------------------------------------------------------------------------
    def input_directory(self) -> str:
        import folder_paths

        return folder_paths.get_input_directory()

    def checkpoint_names(self) -> list[str]:
        import folder_paths

        return folder_paths.get_filename_list("checkpoints")

    def checkpoint_path(self, name: str) -> str:
        import folder_paths

        path = folder_paths.get_full_path("checkpoints", name)
        if path is None:
            raise NodeError(f"checkpoint '{name}' not found in models/checkpoints; pick one from the list")
        return path

    def lora_names(self) -> list[str]:
        import folder_paths

        return folder_paths.get_filename_list("loras")

    def lora_path(self, name: str) -> str:
        import folder_paths

        path = folder_paths.get_full_path("loras", name)
        if path is None:
            raise NodeError(f"LoRA '{name}' not found in models/loras; pick one from the list")
        return path

    def loras_directory(self) -> str:
        import folder_paths

        return folder_paths.get_folder_paths("loras")[0]

    def tokenizer_dir(self) -> str:
        """The CLIP tokenizer every ComfyUI install bundles (no download needed)."""
        import comfy.sd1_clip

        return os.path.join(os.path.dirname(os.path.abspath(comfy.sd1_clip.__file__)), "sd1_tokenizer")

    # -- devices and memory --------------------------------------------------------------------
    def torch_device(self):
        import comfy.model_management

        return comfy.model_management.get_torch_device()

    def free_memory(self) -> None:
        """Unload every model ComfyUI holds, so training has the whole GPU."""
        import comfy.model_management

        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache(True)

    # -- progress and cancel -------------------------------------------------------------------
    def progress(self, total: int) -> Progress:
        return Progress(total)

    def interrupted(self) -> bool:
        import comfy.model_management

        return comfy.model_management.processing_interrupted()

    def raise_interrupt(self) -> None:
        import comfy.model_management

        raise comfy.model_management.InterruptProcessingException()

    def send(self, event: str, data: dict) -> None:
        try:
            from server import PromptServer

            PromptServer.instance.send_sync(event, data)
        except Exception:  # no server (scripts, tests): nothing listens
            pass

    # -- LoRA patching -------------------------------------------------------------------------
    def apply_lora(self, model, clip, tensors: dict, strength_model: float, strength_clip: float):
        import comfy.sd

        return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)

    def read_lora_file(self, path: str) -> dict:
        import comfy.utils

        return comfy.utils.load_torch_file(path, safe_load=True)


# -- V3 adaptation ------------------------------------------------------------------------------
def _io_type(io, kind: str):
    builtin = {
        "INT": io.Int,
        "FLOAT": io.Float,
        "STRING": io.String,
        "BOOLEAN": io.Boolean,
        "COMBO": io.Combo,
        "MODEL": io.Model,
        "CLIP": io.Clip,
        "IMAGE": io.Image,
        "LOSS_MAP": io.LossMap,
        "LORA_MODEL": io.LoraModel,
    }
    return builtin.get(kind) or io.Custom(kind)


def _input(io, spec_input, host):
    cls = _io_type(io, spec_input.kind)
    kwargs: dict[str, Any] = {"optional": spec_input.optional, "tooltip": spec_input.tooltip}
    if spec_input.kind in ("INT", "FLOAT", "STRING", "BOOLEAN") and spec_input.default is not None:
        kwargs["default"] = spec_input.default
    if spec_input.kind in ("INT", "FLOAT"):
        for key in ("min", "max", "step"):
            value = getattr(spec_input, key)
            if value is not None:
                kwargs[key] = value
    if spec_input.kind == "STRING" and spec_input.multiline:
        kwargs["multiline"] = True
    if spec_input.kind == "COMBO":
        options = spec_input.options(host) if callable(spec_input.options) else spec_input.options
        kwargs["options"] = list(options)
        if spec_input.default is not None:
            kwargs["default"] = spec_input.default
    return cls.Input(spec_input.name, **kwargs)


def comfy_node(spec: type[NodeSpec]):
    """Build a ComfyUI V3 node class from a NodeSpec."""
    from comfy_api.latest import io

    def define_schema(cls):
        host = get_host()
        input_names = {i.name for i in spec.inputs}
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=CATEGORY,
            description=spec.description,
            inputs=[_input(io, i, host) for i in spec.inputs],
            outputs=[
                # V3 wants output ids distinct from input ids (Apply LoRA's model/clip in and out)
                _io_type(io, o.kind).Output(
                    o.name + "_out" if o.name in input_names else o.name, display_name=o.name, tooltip=o.tooltip
                )
                for o in spec.outputs
            ],
            is_output_node=spec.output_node,
        )

    def execute(cls, **inputs):
        result: NodeResult = spec.execute(get_host(), **inputs)
        return io.NodeOutput(*result.values, ui=result.ui)

    namespace = {
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
        "__doc__": spec.__doc__,
        "__module__": spec.__module__,
    }
    if spec.fingerprint is not None:

        def fingerprint_inputs(cls, **inputs):
            return spec.fingerprint(get_host(), **inputs)

        namespace["fingerprint_inputs"] = classmethod(fingerprint_inputs)
    return type(spec.__name__, (io.ComfyNode,), namespace)


def comfy_extension(specs: list[type[NodeSpec]]):
    from comfy_api.latest import ComfyExtension

    class LoraTrainerExtension(ComfyExtension):
        async def get_node_list(self):
            return [comfy_node(spec) for spec in specs]

    return LoraTrainerExtension()
