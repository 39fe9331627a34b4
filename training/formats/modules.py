"""What one LoRA module in a kohya/LyCORIS file means: its kind, rank, scale and weight delta.

Semantics are those of ComfyUI (``comfy/weight_adapter``) and A1111, which agree (docs/lora-format.md §4, §6):

* LoRA / LoCon: ``(alpha / r) * up @ [mid] @ down``, r = ``lora_down.shape[0]``; no alpha -> scale 1.
* LoHa: ``(alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Tucker ``hada_t*`` for convs), r = ``w1_b.shape[0]``.
* LoKr: ``kron(w1, w2)``, scaled by alpha / r only when a factor is low-rank (``w1_b`` or ``w2_b``).
* full: ``diff`` (weight delta) and ``diff_b`` (bias delta).
* DoRA (``dora_scale``, any kind above): ``W' = (W0 + dW) * dora_scale / ||W0 + dW||``, the norm per
  output row when ``dora_scale`` is ``[out, 1, ...]`` (current LyCORIS, peft), per input column when it
  is ``[1, in, ...]`` (older LyCORIS). Needs the base weight ``W0``.
"""

from __future__ import annotations

import re

import torch

from .names import ALPHA, DIFF, DIFF_B, DORA, DOWN, MID, UP

KINDS = ("lora", "loha", "lokr", "full")

# kohya/LDM names of 3x3 convolutions (used to restore [out, in, 3, 3] from a flattened delta)
_CONV3_RE = re.compile(
    r"(conv1|conv2|conv_in|conv_out|in_layers_2|out_layers_3|_op|downsamplers_0_conv|upsamplers_0_conv"
    r"|output_blocks_\d+_\d+_conv|input_blocks_0_0|_out_2)$"
)


class NeedsBaseWeightError(ValueError):
    """A DoRA module's change depends on the base model's weight."""


def module_kind(tensors: dict, name: str) -> str:
    if name + DOWN in tensors:
        return "lora"
    if name + ".hada_w1_a" in tensors:
        return "loha"
    if name + ".lokr_w1" in tensors or name + ".lokr_w1_a" in tensors:
        return "lokr"
    if name + DIFF in tensors or name + DIFF_B in tensors:
        return "full"
    keys = sorted(k for k in tensors if k.startswith(name + "."))
    raise ValueError(f"Module {name!r} is not a known LoRA type (keys: {', '.join(keys) or 'none'}).")


def has_dora(tensors: dict, name: str) -> bool:
    return name + DORA in tensors


def _alpha(tensors: dict, name: str):
    a = tensors.get(name + ALPHA)
    return None if a is None else float(a.float().item())


def module_rank(tensors: dict, name: str) -> int | None:
    """The rank loaders divide alpha by (None for full-factor LoKr and diff modules)."""
    kind = module_kind(tensors, name)
    if kind == "lora":
        return int(tensors[name + DOWN].shape[0])
    if kind == "loha":
        return int(tensors[name + ".hada_w1_b"].shape[0])
    if kind == "lokr":
        for k in (".lokr_w1_b", ".lokr_w2_b"):
            if name + k in tensors:
                return int(tensors[name + k].shape[0])
    return None


def module_alpha(tensors: dict, name: str):
    return _alpha(tensors, name)


def module_scale(tensors: dict, name: str) -> float:
    """The factor loaders apply to the module's product (alpha / rank, or 1)."""
    alpha, rank = _alpha(tensors, name), module_rank(tensors, name)
    if alpha is None or rank is None or module_kind(tensors, name) == "full":
        return 1.0
    return alpha / rank


def _f(tensors, key):
    return tensors[key].float()


def _lora_product(t, name):
    down, up = _f(t, name + DOWN), _f(t, name + UP)
    r = down.shape[0]
    if up.shape[1] != r:
        raise ValueError(f"Module {name!r}: lora_up {tuple(up.shape)} does not match rank {r} of lora_down.")
    if name + MID in t:  # Tucker LoCon: down [r,in,1,1], mid [r,r,k,k], up [out,r,1,1]
        mid = _f(t, name + MID)
        return torch.einsum("ijkl,jq,pi->pqkl", mid, down.flatten(1), up.flatten(1))
    delta = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
    if down.dim() == 4:
        delta = delta.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return delta


def _loha_product(t, name):
    w1a, w1b, w2a, w2b = (_f(t, name + s) for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"))
    if name + ".hada_t1" in t:
        t1, t2 = _f(t, name + ".hada_t1"), _f(t, name + ".hada_t2")
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        return m1 * m2
    return (w1a @ w1b) * (w2a @ w2b)


def _lokr_product(t, name):
    w1 = _f(t, name + ".lokr_w1") if name + ".lokr_w1" in t else _f(t, name + ".lokr_w1_a") @ _f(t, name + ".lokr_w1_b")
    if name + ".lokr_w2" in t:
        w2 = _f(t, name + ".lokr_w2")
    elif name + ".lokr_t2" in t:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", _f(t, name + ".lokr_t2"),
                          _f(t, name + ".lokr_w2_a"), _f(t, name + ".lokr_w2_b"))
    else:
        w2 = _f(t, name + ".lokr_w2_a") @ _f(t, name + ".lokr_w2_b")
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2)


def _to_shape(delta: torch.Tensor, name: str, shape) -> torch.Tensor:
    if shape is not None:
        shape = tuple(shape)
        if delta.numel() != _numel(shape):
            raise ValueError(f"Module {name!r}: its change has {tuple(delta.shape)} elements, the weight {shape}.")
        return delta.reshape(shape)
    if delta.dim() == 2 and _CONV3_RE.search(name) and delta.shape[1] % 9 == 0:
        return delta.reshape(delta.shape[0], delta.shape[1] // 9, 3, 3)
    return delta


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def module_product(tensors: dict, name: str, shape=None) -> torch.Tensor:
    """The module's unscaled weight change (float32), shaped like the module weight when known."""
    kind = module_kind(tensors, name)
    if kind == "lora":
        d = _lora_product(tensors, name)
    elif kind == "loha":
        d = _loha_product(tensors, name)
    elif kind == "lokr":
        d = _lokr_product(tensors, name)
    else:
        if name + DIFF not in tensors:
            raise ValueError(f"Module {name!r} only changes a bias (diff_b); it has no weight change.")
        d = _f(tensors, name + DIFF)
    return _to_shape(d, name, shape)


def module_delta(tensors: dict, name: str, shape=None, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight change a loader applies at strength 1 (float32).

    DoRA modules need ``base_weight`` (the module's weight in the base model); without it they raise
    NeedsBaseWeightError.
    """
    if base_weight is not None:
        shape = tuple(base_weight.shape)
    delta = module_product(tensors, name, shape) * module_scale(tensors, name)
    if not has_dora(tensors, name):
        return delta
    if base_weight is None:
        raise NeedsBaseWeightError(
            f"Module {name!r} is DoRA: its change depends on the base model's weights. Give a checkpoint "
            "(merge-into, or resize/bake with --checkpoint) to turn it into a plain LoRA first."
        )
    return dora_weight(base_weight.float(), delta, tensors[name + DORA].float()) - base_weight.float()


def dora_weight(w0: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """``(W0 + dW) * m / ||W0 + dW||`` with the norm on the axis ``dora_scale`` is laid out on."""
    w = w0 + delta
    if dora_is_output_axis(dora_scale, w.shape):
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        m = dora_scale.reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, w.shape[1], *[1] * (w.dim() - 2))
        m = dora_scale.reshape(1, w.shape[1], *[1] * (w.dim() - 2))
    return w * (m / norm)


def dora_is_output_axis(dora_scale: torch.Tensor, weight_shape) -> bool:
    return dora_scale.shape[0] == weight_shape[0] and (dora_scale.dim() < 2 or dora_scale.shape[1] == 1)


def dora_scale_for_base_norm(tensors: dict, name: str, base_weight: torch.Tensor) -> torch.Tensor:
    """The ``dora_scale`` with which a loader that divides by ``||W0||`` instead of ``||W0 + dW||`` (ComfyUI
    <= 0.3.64 on the output axis, PR Comfy-Org/ComfyUI#15458) applies exactly what the module means:
    ``m * ||W0|| / ||W0 + dW||`` per output row (shaped ``[out, 1, ...]``), so
    ``(W0 + dW) * s / ||W0|| == (W0 + dW) * m / ||W0 + dW||``.

    For a loader only, in memory: a file written with it would be wrong in every other loader.
    """
    w0 = base_weight.float()
    delta = module_product(tensors, name, tuple(w0.shape)) * module_scale(tensors, name)
    m = tensors[name + DORA].float()
    rows = (w0.shape[0],) + (1,) * (w0.dim() - 1)
    w0_norm = w0.reshape(w0.shape[0], -1).norm(dim=1).reshape(rows)
    w_norm = (w0 + delta).reshape(w0.shape[0], -1).norm(dim=1).reshape(rows)
    # shaped [out, 1, ...] whatever the file had: ComfyUI broadcasts a 1-D [out] scale to [out, out] (issue #12938)
    return m.reshape(rows) * w0_norm / w_norm


def module_tensors(tensors: dict, name: str) -> dict:
    """The tensors of one module, keyed by their suffix (".lora_down.weight", ".alpha", ...)."""
    p = name + "."
    return {k[len(name):]: v for k, v in tensors.items() if k.startswith(p)}


def module_in_out(tensors: dict, name: str) -> tuple[int, int] | None:
    """(out_features, in_features[*k*k]) of the module's weight, from its tensors."""
    kind = module_kind(tensors, name)
    if kind == "lora":
        up, down = tensors[name + UP], tensors[name + DOWN]
        if name + MID in tensors:
            mid = tensors[name + MID]
            return int(up.shape[0]), int(down.shape[1]) * int(mid[0, 0].numel())
        return int(up.shape[0]), int(down[0].numel())
    d = module_product(tensors, name)
    return int(d.shape[0]), int(d[0].numel())
