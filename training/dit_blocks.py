"""The transformer blocks of a DiT (Flux, Chroma, SD3, Lumina2/Z-Image, Qwen-Image) and what training wraps
around them: per-block gradient checkpointing here, block swap in ``block_swap.py``.

The model is ComfyUI's and is handed back unchanged after training, so both wrap a block's ``forward`` as a
removable layer (:func:`wrap_forward` / :func:`restore_forward`, in any order) instead of replacing modules.
Blocks are found by attribute name (no ComfyUI import: ``training/`` never imports the host).
"""

from __future__ import annotations

import threading

import torch
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

# the block lists of ComfyUI's diffusion models, in the order the forward pass runs them
# (comfy/ldm/flux/model.py, chroma/model.py, modules/diffusionmodules/mmdit.py, lumina/model.py
#  ``patchify_and_embed`` then ``forward``, qwen_image/model.py)
BLOCK_LISTS = {
    "flux": ("double_blocks", "single_blocks"),
    "sd3": ("joint_blocks",),
    "lumina2": ("context_refiner", "siglip_refiner", "noise_refiner", "layers"),
    "qwen-image": ("transformer_blocks",),
}
FAMILY_ARCHITECTURE = {  # training/formats/families.py MODEL_FAMILIES -> BLOCK_LISTS key
    "flux-dev": "flux", "flux-schnell": "flux", "chroma": "flux",
    "sd3": "sd3", "sd3.5-medium": "sd3", "sd3.5-large": "sd3",
    "lumina2": "lumina2", "z-image": "lumina2",
    "qwen-image": "qwen-image",
}


def block_lists(model, family: str | None = None) -> list[tuple[str, list[torch.nn.Module]]]:
    """``[(attribute, blocks)]`` of a diffusion model (or of a ComfyUI BaseModel holding one as
    ``diffusion_model``) in execution order. ``family``: a family id (``flux-dev``, ``sd3.5-large``,
    ``z-image``, ...); None: the first architecture whose main block list the model has."""
    net = getattr(model, "diffusion_model", model)
    if family is not None:
        if family not in FAMILY_ARCHITECTURE:
            raise ValueError(f"family {family!r}: no transformer block lists known; known: "
                             f"{', '.join(FAMILY_ARCHITECTURE)}")
        names = BLOCK_LISTS[FAMILY_ARCHITECTURE[family]]
    else:
        names = next((n for n in BLOCK_LISTS.values() if isinstance(getattr(net, n[-1], None), torch.nn.ModuleList)),
                     None)
        if names is None:
            raise ValueError(f"{type(net).__name__}: none of the known transformer block lists "
                             f"({', '.join(sorted({a for n in BLOCK_LISTS.values() for a in n}))})")
    found = [(name, list(getattr(net, name))) for name in names if isinstance(getattr(net, name, None), torch.nn.ModuleList)]
    if not found or not any(blocks for _, blocks in found):
        raise ValueError(f"{type(net).__name__}: no transformer blocks under {', '.join(names)}")
    return found


def flat_blocks(model, family: str | None = None) -> list[torch.nn.Module]:
    """Every transformer block in execution order (what block swap counts: the last N of this list)."""
    return [b for _, blocks in block_lists(model, family) for b in blocks]


# -- removable forward layers ------------------------------------------------------------------------
class _LayeredForward:
    """A module's ``forward`` with layers around it; each layer is ``around(call, args, kwargs)``."""

    def __init__(self, original, previous):
        self.original = original  # the forward the module had (bound method or earlier instance attribute)
        self.previous = previous  # the instance attribute to put back (None: there was none)
        self.layers: list[tuple[str, object]] = []  # innermost first

    def __call__(self, *args, **kwargs):
        return self._call(len(self.layers), args, kwargs)

    def _call(self, depth, args, kwargs):
        if depth == 0:
            return self.original(*args, **kwargs)
        _, around = self.layers[depth - 1]
        return around(lambda *a, **k: self._call(depth - 1, a, k), args, kwargs)


def wrap_forward(module: torch.nn.Module, around, tag: str) -> None:
    """Put ``around(call, args, kwargs)`` around the module's forward (outermost), named ``tag``."""
    layered = module.__dict__.get("forward")
    if not isinstance(layered, _LayeredForward):
        layered = _LayeredForward(module.forward, module.__dict__.get("forward"))
        module.forward = layered
    if any(t == tag for t, _ in layered.layers):
        raise RuntimeError(f"{type(module).__name__}: forward is already wrapped for {tag}")
    layered.layers.append((tag, around))


def restore_forward(module: torch.nn.Module, tag: str) -> None:
    """Remove the ``tag`` layer; the module gets its own forward back when no layer is left."""
    layered = module.__dict__.get("forward")
    if not isinstance(layered, _LayeredForward):
        return
    layered.layers = [(t, a) for t, a in layered.layers if t != tag]
    if not layered.layers:
        if layered.previous is None:
            del module.forward
        else:
            module.forward = layered.previous


# -- autograd context ----------------------------------------------------------------------------------
def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpoint recomputing a block)."""
    return torch._C._current_graph_task_id() != -1


def _identity(t):
    return t


def outer_saved_tensor_hooks():
    """The (pack, unpack) saved-tensor hooks active around the caller, or identities: a hook of ours that
    handles some tensors passes the others on to these (the checkpoint's, the host's), as nesting would not."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top if top is not None else (_identity, _identity)


def is_activation(t) -> bool:
    """Tensors a block may write in place: not a leaf (weights, buffers) nor a view of one. The same test as
    nodes/comfy_model.py's saved-activation copy."""
    if not isinstance(t, torch.Tensor):
        return False
    return not (t.is_leaf or (t._base is not None and t._base.is_leaf))


# -- per-block gradient checkpointing ------------------------------------------------------------------
class _Saved:
    __slots__ = ("packed", "tensor", "version")

    def __init__(self, packed, tensor):
        self.packed, self.tensor, self.version = packed, tensor, tensor._version


def _copy_saved_activations():
    """During a checkpoint's recomputation: hand the checkpoint a copy of each saved activation. ComfyUI's
    blocks add into activations in place (``x += ...``) after an op saved them; the recomputation would
    otherwise keep the altered tensor (the checkpoint checks shapes, not versions) and give wrong gradients.
    Weights and other leaves are not copied (a block's weights would double its memory); one that a block
    alters after saving it stops the backward with autograd's own error instead of a wrong gradient."""
    pack, unpack = outer_saved_tensor_hooks()

    def pack_copy(t):
        return pack(t.clone()) if is_activation(t) else _Saved(pack(t), t)

    def unpack_checked(saved):
        if not isinstance(saved, _Saved):
            return unpack(saved)
        if saved.tensor._version != saved.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation "
                f"(a {tuple(saved.tensor.shape)} tensor without grad, inside a checkpointed block's recomputation)")
        return unpack(saved.packed)

    return torch.autograd.graph.saved_tensors_hooks(pack_copy, unpack_checked)


def _own_copy(t):
    return t.clone() if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) else t


_inside_checkpoint = threading.local()


def inside_checkpoint() -> bool:
    """Whether a checkpointed block's forward is running (the checkpoint keeps no saved tensors: a layer
    inside it has nothing to manage, and must hand the checkpoint every tensor it saves)."""
    return getattr(_inside_checkpoint, "depth", 0) > 0


def _run_checkpointed(call, *args, **kwargs):
    # the block writes into copies of its inputs: the checkpoint keeps the originals for the recomputation
    args, kwargs = tree_map(_own_copy, (args, kwargs))
    if in_backward():
        with _copy_saved_activations():
            return call(*args, **kwargs)
    _inside_checkpoint.depth = getattr(_inside_checkpoint, "depth", 0) + 1
    try:
        return call(*args, **kwargs)
    finally:
        _inside_checkpoint.depth -= 1


def _checkpointed(call, args, kwargs):
    if not torch.is_grad_enabled() or in_backward():
        return call(*args, **kwargs)
    # ComfyUI writes into transformer_options between blocks (block_index, ...): the recomputation must see
    # this call's values
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    return checkpoint(_run_checkpointed, call, *args, use_reentrant=False, **kwargs)


class CheckpointedBlocks:
    """Handle of :func:`checkpoint_blocks`; ``remove()`` (or leaving ``with``) restores every forward."""

    TAG = "gradient_checkpointing"

    def __init__(self, blocks):
        self.blocks = list(blocks)
        for block in self.blocks:
            wrap_forward(block, _checkpointed, self.TAG)

    def remove(self) -> None:
        for block in self.blocks:
            restore_forward(block, self.TAG)
        self.blocks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def checkpoint_blocks(blocks) -> CheckpointedBlocks:
    """Gradient checkpointing per block (``torch.utils.checkpoint``, non-reentrant): each block's activations
    are recomputed in backward instead of kept. Keyword arguments (ComfyUI's ``transformer_options`` ...) pass
    through. Only while grad is enabled; no-grad passes (sampling) run the block as it is."""
    return CheckpointedBlocks(blocks)
