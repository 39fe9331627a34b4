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

    def __init__(self, total: int, node_id: str | None = None, host=None):
        import comfy.utils

        self._bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self._host = host

    def update(self, value: int, total: int | None = None, preview=None) -> None:
        """``preview``: a PIL image shown on the node by the stock frontend (ComfyUI's preview frames)."""
        import comfy.model_management

        try:
            self._bar.update_absolute(value, total, ("JPEG", preview, 512) if preview is not None else None)
        except comfy.model_management.InterruptProcessingException:
            # ComfyUI clears its flag as it raises: remember the Cancel for Host.interrupted(), which the
            # loop asks at the step boundary, where the work gets saved
            if self._host is not None:
                self._host.cancel_seen = True


def _figure(query, device) -> int | None:
    """One of ComfyUI's memory figures for ``device``, or None where it has none for this device type."""
    try:
        value = query(device)
    except Exception:
        return None
    return None if value is None else int(value)


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

    def state_directory(self) -> str:
        """Where Train LoRA keeps resumable states (``<name>_state_step<N>.pt``): ``output/loratrainer_state``.

        Not models/loras: ``.pt`` is one of that folder's LoRA extensions, so every state showed up in
        LoraLoader's list, and a state (adapter + optimizer + RNG) is no LoRA. Not another ``models/``
        folder either: states are a run's by-products, not models, and ``extra_model_paths.yaml`` setups
        often share ``models/`` between installs. The output folder is where a user looks for what a run
        wrote (ComfyUI's own SaveLoRA writes to ``output/loras``), it follows ``--output-directory`` and
        ``--base-directory``, and folder_paths never lists it as a model folder.
        """
        import folder_paths

        return os.path.join(folder_paths.get_output_directory(), "loratrainer_state")

    def tokenizer_dir(self) -> str:
        """The CLIP tokenizer every ComfyUI install bundles (no download needed)."""
        import comfy.sd1_clip

        return os.path.join(os.path.dirname(os.path.abspath(comfy.sd1_clip.__file__)), "sd1_tokenizer")

    # -- devices and memory --------------------------------------------------------------------
    def torch_device(self):
        import comfy.model_management

        return comfy.model_management.get_torch_device()

    def free_memory(self) -> None:
        """Unload every model ComfyUI holds, so training has the whole GPU; give cached blocks back."""
        import gc

        import comfy.model_management

        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache(True)

    def device_memory(self) -> dict:
        """Free/total bytes of the training device as ComfyUI sees them (``get_free_memory(device)``, for
        every device type), with its type, name and a note on what the figures mean: on the CPU and MPS the
        free figure is the system's available memory; a device without a figure (DirectML) gets None."""
        import os

        import comfy.model_management as mm

        from ..training.devices import host_memory_info

        device = mm.get_torch_device()
        try:
            name = mm.get_torch_device_name(device)  # covers cuda (incl. ROCm), xpu, mps, cpu
        except Exception:
            name = str(device)
        info = host_memory_info(device, _figure(mm.get_free_memory, device), _figure(mm.get_total_memory, device))
        return {
            "free": info.free,
            "total": info.total,
            "type": device.type,
            "name": name,
            "cpu_count": os.cpu_count() or 1,
            "note": info.note,
        }

    def executing(self) -> tuple[str | None, str | None]:
        """(prompt_id, node_id) of the node being executed, when ComfyUI says so."""
        try:
            from comfy_execution.utils import get_executing_context

            context = get_executing_context()
        except ImportError:
            context = None
        if context is None:
            return None, None
        return context.prompt_id, context.node_id

    # -- progress and cancel -------------------------------------------------------------------
    cancel_seen = False

    def progress(self, total: int, node_id: str | None = None) -> Progress:
        self.cancel_seen = False
        return Progress(total, node_id, self)

    def progress_text(self, text: str, node_id: str | None) -> None:
        """A line of text under the node in the stock frontend (ComfyUI's progress_text message)."""
        if node_id is None:
            return
        try:
            from server import PromptServer

            PromptServer.instance.send_progress_text(text, node_id)
        except Exception:  # no server: nothing listens
            pass

    def save_temp_image(self, image, prefix: str) -> dict:
        """Write a PIL image to ComfyUI's temp folder; returns the {filename, subfolder, type} /view serves."""
        import folder_paths

        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, folder_paths.get_temp_directory(), image.width, image.height
        )
        filename = f"{name}_{counter:05}_.png"
        image.save(os.path.join(folder, filename), compress_level=1)
        return {"filename": filename, "subfolder": subfolder, "type": "temp"}

    def interrupted(self) -> bool:
        import comfy.model_management

        return self.cancel_seen or comfy.model_management.processing_interrupted()

    def raise_interrupt(self) -> None:
        import comfy.model_management

        raise comfy.model_management.InterruptProcessingException()

    def send(self, event: str, data: dict) -> None:
        try:
            from server import PromptServer

            PromptServer.instance.send_sync(event, data)
        except Exception:  # no server (scripts, tests): nothing listens
            pass

    # -- the graph's models as a training base ---------------------------------------------------
    def base_model(self, model, clip=None, vae=None, **options):
        """The MODEL (+ CLIP, VAE) of the graph as what the training loop needs (nodes/comfy_model.py:
        ComfyBaseModel; ``options``: family, guidance). Refuses untested families by name."""
        from .comfy_model import ComfyBaseModel

        return ComfyBaseModel(model, clip, vae, **options)

    # -- LoRA patching -------------------------------------------------------------------------
    def apply_lora(self, model, clip, tensors: dict, strength_model: float, strength_clip: float):
        import comfy.sd

        if any(k.endswith(".dora_scale") for k in tensors) and comfy_dora_divides_by_base_norm():
            tensors = dora_for_comfy(model, clip, tensors)
        return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)

    def read_lora_file(self, path: str) -> dict:
        import comfy.utils

        return comfy.utils.load_torch_file(path, safe_load=True)

    def model_context_dim(self, model) -> int | None:
        """The text-context width the MODEL's cross-attention reads (768 SD1.x, 1024 SD2.x, 2048 SDXL)."""
        try:
            value = model.model.model_config.unet_config.get("context_dim")
            return int(value) if value else None
        except Exception:  # not a UNet model (or not a ModelPatcher): no check
            return None


_DORA_PROBE: list[bool] = []


def comfy_dora_divides_by_base_norm() -> bool:
    """Whether this ComfyUI's ``weight_decompose`` divides an output-axis ``dora_scale`` by ``||W0||`` instead of
    ``||W0 + dW||`` (<= 0.3.64; PR Comfy-Org/ComfyUI#15458). Asked of ComfyUI itself, once, so a fixed
    version gets the file unchanged."""
    if not _DORA_PROBE:
        import torch

        try:
            from comfy.weight_adapter.base import weight_decompose

            # W0 = (3, 4), dW = W0: ||W0 + dW|| = 10, ||W0|| = 5, m = 5 -> right: (3, 4); by ||W0||: (6, 8)
            w0 = torch.tensor([[3.0, 4.0]])
            out = weight_decompose(torch.tensor([[5.0]]), w0.clone(), w0.clone(), 1.0, 1.0, torch.float32,
                                   lambda d: d)
            _DORA_PROBE.append(bool(out[0, 0] > 4.5))
        except Exception:  # another signature: a newer ComfyUI, which we do not second-guess
            _DORA_PROBE.append(False)
    return _DORA_PROBE[0]


def dora_for_comfy(model, clip, tensors: dict) -> dict:
    """``tensors`` with each output-axis DoRA module's ``dora_scale`` set so that ComfyUI's ``||W0||`` division
    applies the module exactly (training/formats/modules.py: dora_scale_for_base_norm), from the weights of the
    model and text encoders it is applied to. In memory only: the file stays standard."""
    import comfy.lora
    import comfy.utils
    import torch

    from ..training.formats.modules import dora_is_output_axis, dora_scale_for_base_norm

    owners = []
    if model is not None:
        owners.append((model.model, comfy.lora.model_lora_keys_unet(model.model, {})))
    if clip is not None:
        owners.append((clip.cond_stage_model, comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})))
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".dora_scale")]:
        name = key[: -len(".dora_scale")]
        for owner, key_map in owners:
            target = key_map.get(name)
            if target is None:
                continue
            weight_key, part = (target, None) if isinstance(target, str) else target
            with torch.no_grad():
                weight = comfy.utils.get_attr(owner, weight_key)
                if part is not None:
                    weight = weight.narrow(*part)
                weight = weight.detach().float().cpu()
                if dora_is_output_axis(tensors[key], weight.shape):
                    out[key] = dora_scale_for_base_norm(tensors, name, weight)
            break
    return out


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
    if spec_input.kind == "INT" and spec_input.control_after_generate is not None:
        kwargs["control_after_generate"] = spec_input.control_after_generate
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
            hidden=[io.Hidden.unique_id] if spec.wants_node_id else [],
        )

    def execute(cls, **inputs):
        if spec.wants_node_id:
            inputs["node_id"] = cls.hidden.unique_id
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
            register_routes()
            clean_stale_saves_at_start()
            return [comfy_node(spec) for spec in specs]

    return LoraTrainerExtension()


def clean_stale_saves_at_start() -> None:
    """At ComfyUI's start: remove temp files of saves a crash or SIGKILL cut off in models/loras and in
    the state folder."""
    from .train import clean_stale_saves

    host = get_host()
    for name in ("loras_directory", "state_directory"):  # the folders this package writes LoRAs and states to
        try:
            folder = getattr(host, name)()
        except Exception:  # no folder_paths (scripts)
            continue
        clean_stale_saves(folder)


# -- HTTP: the run records the Train LoRA node's chart re-draws from ------------------------------------
_routes_registered = False


def register_routes() -> None:
    """Read-only routes (also under /api/): ``GET /loratrainer/runs`` lists the runs this server holds,
    ``GET /loratrainer/runs/{run_id}`` returns one (a 32-hex-digit id; anything else is a 400, an
    unknown id a 404). They serve only the in-process run records of nodes/runs.py."""
    global _routes_registered
    if _routes_registered:
        return
    try:
        from aiohttp import web
        from server import PromptServer

        routes = PromptServer.instance.routes
    except Exception:  # no server (scripts): nothing to register
        return
    from .runs import REGISTRY, valid_run_id

    @routes.get("/loratrainer/runs")
    async def loratrainer_runs(request):
        return web.json_response({"runs": REGISTRY.summaries()}, headers={"Cache-Control": "no-store"})

    @routes.get("/loratrainer/runs/{run_id}")
    async def loratrainer_run(request):
        run_id = request.match_info.get("run_id", "")
        if not valid_run_id(run_id):
            return web.json_response({"error": "run_id must be 32 lowercase hex digits"}, status=400)
        record = REGISTRY.get(run_id)
        if record is None:
            return web.json_response({"error": f"no run {run_id} on this server"}, status=404)
        return web.json_response(record, headers={"Cache-Control": "no-store"})

    _routes_registered = True
