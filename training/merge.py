"""Exact LoRA + LoRA merging by rank concatenation (lora-format.md §11).

For every module, ``down`` blocks are stacked along the rank axis and ``up`` blocks side by side,
each input's weight ``w_i`` and scale ``alpha_i / r_i`` folded into its ``up`` block. The output
alpha equals the concatenated rank, so the loader's ``alpha / rank`` is 1 and

    delta(merged) == sum_i w_i * delta_i        (exactly, up to float rounding)

with no cross terms and no squared ratios (unlike kohya ``merge_lora.py``). Modules present in only
some inputs are kept; negative weights are allowed.
"""

from __future__ import annotations

import datetime as _dt
import json

import torch

from .formats.families import (
    BASE_MODEL_VERSION,
    MODELSPEC_ARCHITECTURE,
    MODELSPEC_IMPLEMENTATION,
    PREDICTION_TYPE,
)
from .formats.kohya import ALPHA, DOWN, UP, LoraWeights, lora_scale, module_names
from .formats.metadata import MODELSPEC_VERSION

_KEEP_FROM_FIRST = (
    "ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash", "ss_resolution",
    "modelspec.resolution",
)


def _input_name(w: LoraWeights, i: int) -> str:
    md = w.metadata or {}
    for k in ("modelspec.title", "ss_output_name"):
        if md.get(k):
            return str(md[k])
    return f"lora{i + 1}"


def _match_form(t: torch.Tensor, ref_shape: torch.Size, is_down: bool, module: str) -> torch.Tensor:
    """Reshape Linear <-> 1x1-conv LoRA factors (e.g. SD2 proj_in) to the first input's form."""
    if is_down:
        same = t.shape[1:] == ref_shape[1:]
        want = (t.shape[0],) + tuple(ref_shape[1:])
    else:
        same = t.shape[:1] == ref_shape[:1] and t.shape[2:] == ref_shape[2:]
        want = (t.shape[0], t.shape[1]) + tuple(ref_shape[2:])
    if same:
        return t
    numel_other = 1
    for s in want:
        numel_other *= s
    if numel_other == t.numel() and all(s == 1 for s in tuple(t.shape[2:]) + tuple(ref_shape[2:])):
        return t.reshape(want)
    raise ValueError(
        f"Cannot merge module {module!r}: {'lora_down' if is_down else 'lora_up'} shapes "
        f"{tuple(t.shape)} and {tuple(ref_shape)} belong to different layers (different base models?)."
    )


def merge_exact(items, title: str | None = None) -> LoraWeights:
    """Merge ``[(LoraWeights, weight), ...]`` so the merged delta is the weighted sum of deltas.

    Raises ValueError for an empty list, for inputs whose families differ (when known), and for
    modules that are not plain LoRA (LoHa/LoKr/DoRA keys) or whose shapes disagree.
    """
    items = [(w, float(s)) for w, s in items]
    if not items:
        raise ValueError("merge_exact needs at least one (LoraWeights, weight) pair.")
    families = {w.family for w, _ in items if w.family is not None}
    if len(families) > 1:
        raise ValueError(
            "Cannot merge LoRAs made for different model families: "
            + ", ".join(f"{_input_name(w, i)}={w.family}" for i, (w, _) in enumerate(items))
        )
    family = families.pop() if families else None

    # dtype of the result: the promoted dtype of the inputs' up/down tensors
    out_dtype = None
    for w, _ in items:
        for k, t in w.tensors.items():
            if k.endswith((DOWN, UP)):
                out_dtype = t.dtype if out_dtype is None else torch.promote_types(out_dtype, t.dtype)

    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    order: list[str] = []
    for i, (w, s) in enumerate(items):
        for name in module_names(w):
            keys = [k for k in w.tensors if k.startswith(name + ".")]
            bad = [k for k in keys if k not in (name + DOWN, name + UP, name + ALPHA)]
            if bad or name + DOWN not in w.tensors or name + UP not in w.tensors:
                raise ValueError(
                    f"Input {_input_name(w, i)!r}: module {name!r} is not a plain LoRA "
                    f"(keys: {', '.join(sorted(keys))}); exact merge supports lora_down/lora_up/alpha only."
                )
            down = w.tensors[name + DOWN].float()
            up = w.tensors[name + UP].float() * (s * lora_scale(w, name))
            if name not in per_module:
                per_module[name] = []
                order.append(name)
            else:
                ref_down, ref_up = per_module[name][0]
                down = _match_form(down, ref_down.shape, True, name)
                up = _match_form(up, ref_up.shape, False, name)
            per_module[name].append((down, up))

    tensors: dict[str, torch.Tensor] = {}
    ranks: list[int] = []
    for name in order:
        parts = per_module[name]
        down = torch.cat([d for d, _ in parts], dim=0)
        up = torch.cat([u for _, u in parts], dim=1)
        r = down.shape[0]
        ranks.append(r)
        tensors[name + DOWN] = down.to(out_dtype).contiguous()
        tensors[name + UP] = up.to(out_dtype).contiguous()
        tensors[name + ALPHA] = torch.tensor(float(r), dtype=torch.float32)

    names = [_input_name(w, i) for i, (w, _) in enumerate(items)]
    recipe = [
        {
            "name": n,
            "weight": s,
            "sshs_model_hash": (w.metadata or {}).get("sshs_model_hash"),
            "family": w.family,
        }
        for n, (w, s) in zip(names, items)
    ]
    first_md = items[0][0].metadata or {}
    md: dict[str, str] = {k: first_md[k] for k in _KEEP_FROM_FIRST if k in first_md}
    max_rank = max(ranks) if ranks else 0
    md.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max_rank),
        "ss_network_alpha": str(max_rank) if len(set(ranks)) <= 1 else "Dynamic",
        "ss_network_args": json.dumps({}),
        "ss_training_comment": "exact merge (rank concatenation): "
        + ", ".join(f"{n} x {s:g}" for n, (_, s) in zip(names, items)),
        "ss_merge_recipe": json.dumps(recipe),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.title": title or "merged: " + " + ".join(names),
        "modelspec.merged_from": ", ".join(names),
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    })
    if family is not None:
        md["ss_base_model_version"] = BASE_MODEL_VERSION[family]
        md["ss_v2"] = str(family in ("sd2", "sd2-v"))
        md["modelspec.architecture"] = MODELSPEC_ARCHITECTURE[family]
        md["modelspec.implementation"] = MODELSPEC_IMPLEMENTATION[family]
        md["modelspec.prediction_type"] = PREDICTION_TYPE[family]
    else:
        for k in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation",
                  "modelspec.prediction_type"):
            if k in first_md:
                md[k] = first_md[k]
    # trigger phrases of all inputs, de-duplicated in order
    phrases: list[str] = []
    for w, _ in items:
        for p in str((w.metadata or {}).get("modelspec.trigger_phrase", "")).split(","):
            p = p.strip()
            if p and p not in phrases:
                phrases.append(p)
    if phrases:
        md["modelspec.trigger_phrase"] = ", ".join(phrases)
    return LoraWeights(tensors=tensors, metadata=md, family=family)
