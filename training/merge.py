"""LoRA + LoRA merging without kohya's errors (docs/lora-format.md §11).

``exact``: for modules where every input is a plain LoRA, ``down`` blocks are stacked along the rank
axis and ``up`` blocks side by side, each input's weight ``w_i`` and scale ``alpha_i / r_i`` folded into
its ``up`` block; the output alpha equals the concatenated rank, so

    delta(merged) == sum_i w_i * delta_i        (up to float rounding)

with no cross terms and no squared ratios. Modules where an input is LoHa, LoKr, Tucker LoCon or a full
``diff`` are summed as full deltas and factored at their numerical rank (still exact to float32).

``svd``: every module's summed full delta is truncated to ``rank`` and/or the smallest rank keeping an
``energy`` fraction of its squared singular values (Eckart-Young optimal, no clamping); the relative
Frobenius error per module and overall is returned and written to the metadata.

DoRA modules depend on the base weights, so they are refused here: bake them first (``merge-into``
or ``resize --checkpoint``). Modules present in only some inputs are kept; negative weights are allowed.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field

import torch

from .formats.families import (
    BASE_MODEL_VERSION,
    MODELSPEC_ARCHITECTURE,
    MODELSPEC_IMPLEMENTATION,
    PREDICTION_TYPE,
)
from .formats.kohya import LoraWeights, module_names
from .formats.lowrank import common_alpha, exact_rank, lowrank_from_delta, lowrank_from_factors
from .formats.metadata import MODELSPEC_VERSION
from .formats.modules import has_dora, module_delta, module_kind, module_scale
from .formats.names import ALPHA, DIFF_B, DOWN, MID, UP

MODES = ("exact", "svd")
REPORT_KEY = "lora_trainer.merge_report"

_KEEP_FROM_FIRST = (
    "ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash", "ss_resolution",
    "modelspec.resolution",
)


@dataclass
class MergeReport:
    mode: str
    rel_errors: dict[str, float] = field(default_factory=dict)  # module -> ||d - d_merged|| / ||d||
    ranks: dict[str, int] = field(default_factory=dict)
    total_energy: float = 0.0
    discarded_energy: float = 0.0

    @property
    def overall(self) -> float:
        """Relative Frobenius error of all modules' deltas taken together."""
        return (self.discarded_energy / self.total_energy) ** 0.5 if self.total_energy > 0 else 0.0

    def summary(self) -> str:
        if not self.rel_errors:
            return f"{self.mode} merge: {len(self.ranks)} modules, exact"
        worst = max(self.rel_errors.items(), key=lambda kv: kv[1])
        return (f"{self.mode} merge: {len(self.ranks)} modules, relative error overall {self.overall:.3e}, "
                f"worst {worst[1]:.3e} ({worst[0]})")

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "overall_rel_error": self.overall,
                           "per_module_rel_error": self.rel_errors, "ranks": self.ranks})


def _input_name(w: LoraWeights, i: int) -> str:
    md = w.metadata or {}
    for k in ("modelspec.title", "ss_output_name"):
        if md.get(k):
            return str(md[k])
    return f"lora{i + 1}"


def _match_form(t: torch.Tensor, ref_shape, is_down: bool, module: str) -> torch.Tensor:
    """Reshape Linear <-> 1x1-conv LoRA factors (e.g. SD2 proj_in) to the first input's form."""
    if is_down:
        same = t.shape[1:] == ref_shape[1:]
        want = (t.shape[0],) + tuple(ref_shape[1:])
    else:
        same = t.shape[:1] == ref_shape[:1] and t.shape[2:] == ref_shape[2:]
        want = (t.shape[0], t.shape[1]) + tuple(ref_shape[2:])
    if same:
        return t
    n = 1
    for s in want:
        n *= s
    if n == t.numel() and all(s == 1 for s in tuple(t.shape[2:]) + tuple(ref_shape[2:])):
        return t.reshape(want)
    raise ValueError(
        f"Cannot merge module {module!r}: {'lora_down' if is_down else 'lora_up'} shapes "
        f"{tuple(t.shape)} and {tuple(ref_shape)} belong to different layers (different base models?)."
    )


def _check_inputs(items) -> str | None:
    if not items:
        raise ValueError("merge needs at least one (LoraWeights, weight) pair.")
    families = {w.family for w, _ in items if w.family is not None}
    if len(families) > 1:
        raise ValueError(
            "Cannot merge LoRAs made for different model families: "
            + ", ".join(f"{_input_name(w, i)}={w.family}" for i, (w, _) in enumerate(items))
        )
    for i, (w, _) in enumerate(items):
        for name in module_names(w):
            if has_dora(w.tensors, name):
                raise ValueError(
                    f"Input {_input_name(w, i)!r}: module {name!r} is DoRA, not a plain LoRA; its change depends on "
                    "the base model. Bake it first with `resize --checkpoint CKPT` (or merge it into the checkpoint).")
    return families.pop() if families else None


def _is_plain(w: LoraWeights, name: str) -> bool:
    t = w.tensors
    return name + DOWN in t and module_kind(t, name) == "lora" and name + MID not in t


def _out_dtype(items) -> torch.dtype:
    dtype = None
    for w, _ in items:
        for t in w.tensors.values():
            if t.is_floating_point() and t.dim() > 0:
                dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype or torch.float32


def _concat(parts, name: str, dtype) -> dict[str, torch.Tensor]:
    downs, ups = [], []
    for w, s in parts:
        down = w.tensors[name + DOWN].float()
        up = w.tensors[name + UP].float() * (s * module_scale(w.tensors, name))
        if downs:
            down = _match_form(down, downs[0].shape, True, name)
            up = _match_form(up, ups[0].shape, False, name)
        downs.append(down)
        ups.append(up)
    down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    return {DOWN: down.to(dtype).contiguous(), UP: up.to(dtype).contiguous(),
            ALPHA: torch.tensor(float(down.shape[0]), dtype=torch.float32)}


def _summed_delta(parts, name: str) -> torch.Tensor | None:
    total, shape = None, None
    for w, s in parts:
        if module_kind(w.tensors, name) == "full" and name + ".diff" not in w.tensors:
            continue  # bias-only module
        d = module_delta(w.tensors, name, shape=shape)
        if shape is None:
            shape = tuple(d.shape)
        elif tuple(d.shape) != shape:
            d = _reshape_like(d, shape, name)
        total = d * s if total is None else total + d * s
    return total


def _reshape_like(d: torch.Tensor, shape, name: str) -> torch.Tensor:
    n = 1
    for x in shape:
        n *= x
    if d.numel() != n:
        raise ValueError(f"Cannot merge module {name!r}: its changes have shapes {tuple(d.shape)} and {shape} "
                         "(LoRAs for different base models?).")
    return d.reshape(shape)


def _bias(parts, name: str):
    out = None
    for w, s in parts:
        b = w.tensors.get(name + DIFF_B)
        if b is not None:
            out = b.float() * s if out is None else out + b.float() * s
    return out


def _factor(delta: torch.Tensor, name: str, report: MergeReport, rank, energy, dtype) -> dict[str, torch.Tensor]:
    if report.mode == "exact":
        rank, energy = exact_rank(delta), None
    low = lowrank_from_delta(delta, rank=rank, energy=energy)
    report.total_energy += low.total_energy
    report.discarded_energy += low.discarded_energy * low.total_energy
    if report.mode == "svd":
        report.rel_errors[name] = low.rel_error
    return {DOWN: low.down.to(dtype), UP: low.up.to(dtype), ALPHA: low.alpha}


def _svd_of_concat(parts, name: str, report: MergeReport, rank, energy, dtype) -> dict[str, torch.Tensor]:
    cat = _concat(parts, name, torch.float64)  # alpha == concatenated rank: scale 1
    down, up = cat[DOWN], cat[UP]
    shape = (up.shape[0],) + tuple(down.shape[1:])
    low = lowrank_from_factors(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), shape, rank, energy)
    report.total_energy += low.total_energy
    report.discarded_energy += low.discarded_energy * low.total_energy
    report.rel_errors[name] = low.rel_error
    return {DOWN: low.down.to(dtype), UP: low.up.to(dtype), ALPHA: low.alpha}


def _merge_module(parts, name: str, report: MergeReport, rank, energy, dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    plain = all(_is_plain(w, name) for w, _ in parts)
    if report.mode == "exact" and plain:
        out = _concat(parts, name, dtype)
    elif report.mode == "svd" and plain:
        out = _svd_of_concat(parts, name, report, rank, energy, dtype)
    else:
        delta = _summed_delta(parts, name)
        if delta is not None:
            out = _factor(delta, name, report, rank, energy, dtype)
    bias = _bias(parts, name)
    if bias is not None:
        out[DIFF_B] = bias.to(dtype)
    if DOWN in out:
        report.ranks[name] = int(out[DOWN].shape[0])
    return out


def merge_loras(items, mode: str = "exact", rank: int | None = None, energy: float | None = None,
                title: str | None = None) -> tuple[LoraWeights, MergeReport]:
    """Merge ``[(LoraWeights, weight), ...]``; see the module doc for the modes."""
    if mode not in MODES:
        raise ValueError(f"merge mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "svd" and rank is None and energy is None:
        raise ValueError("svd merge needs a target rank or an energy fraction (e.g. rank=32 or energy=0.99)")
    items = [(w, float(s)) for w, s in items]
    family = _check_inputs(items)
    dtype = _out_dtype(items)
    report = MergeReport(mode)
    order: list[str] = []
    for w, _ in items:
        order += [n for n in module_names(w) if n not in order]
    tensors: dict[str, torch.Tensor] = {}
    for name in order:
        parts = [(w, s) for w, s in items if any(k.startswith(name + ".") for k in w.tensors)]
        for suffix, t in _merge_module(parts, name, report, rank, energy, dtype).items():
            tensors[name + suffix] = t.contiguous()
    common_alpha(tensors, order)
    md = merge_metadata(items, family, report, title, rank=rank, energy=energy)
    return LoraWeights(tensors=tensors, metadata=md, family=family), report


def merge_exact(items, title: str | None = None) -> LoraWeights:
    """Exact merge: the merged delta is the weighted sum of the inputs' deltas, per module."""
    return merge_loras(items, "exact", title=title)[0]


def merge_svd(items, rank: int | None = None, energy: float | None = None, title: str | None = None):
    """SVD merge re-ranked to ``rank`` / ``energy``; returns (LoraWeights, MergeReport)."""
    return merge_loras(items, "svd", rank=rank, energy=energy, title=title)


def family_metadata(family: str | None, fallback: dict) -> dict[str, str]:
    keys = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation",
            "modelspec.prediction_type")
    if family is None:
        return {k: fallback[k] for k in keys if k in fallback}
    return {
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family in ("sd2", "sd2-v")),
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION[family],
        "modelspec.prediction_type": PREDICTION_TYPE[family],
    }


def network_metadata(ranks: dict[str, int]) -> dict[str, str]:
    """ss_network_* for a plain LoRA whose modules share alpha = the largest rank."""
    max_rank = max(ranks.values()) if ranks else 0
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max_rank),
        "ss_network_alpha": str(max_rank),  # every module shares it (common_alpha)
        "ss_network_args": json.dumps({}),
    }


def merge_metadata(items, family, report: MergeReport, title=None, rank=None, energy=None) -> dict[str, str]:
    names = [_input_name(w, i) for i, (w, _) in enumerate(items)]
    recipe = [{"name": n, "weight": s, "sshs_model_hash": (w.metadata or {}).get("sshs_model_hash"),
               "family": w.family} for n, (w, s) in zip(names, items)]
    first_md = items[0][0].metadata or {}
    md: dict[str, str] = {k: first_md[k] for k in _KEEP_FROM_FIRST if k in first_md}
    md.update(network_metadata(report.ranks))
    how = "exact merge (rank concatenation)" if report.mode == "exact" else (
        f"svd merge (rank {rank}, energy {energy}); relative error {report.overall:.3e}")
    md.update({
        "ss_training_comment": how + ": " + ", ".join(f"{n} x {s:g}" for n, (_, s) in zip(names, items)),
        "ss_merge_recipe": json.dumps(recipe),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.title": title or "merged: " + " + ".join(names),
        "modelspec.merged_from": ", ".join(names),
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        REPORT_KEY: report.to_json(),
    })
    md.update(family_metadata(family, first_md))
    phrases: list[str] = []
    for w, _ in items:
        for p in str((w.metadata or {}).get("modelspec.trigger_phrase", "")).split(","):
            p = p.strip()
            if p and p not in phrases:
                phrases.append(p)
    if phrases:
        md["modelspec.trigger_phrase"] = ", ".join(phrases)
    return md
