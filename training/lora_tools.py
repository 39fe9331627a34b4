"""LoRA tools: resize (SVD), bake DoRA with a checkpoint, merge into a checkpoint, inspect.

* ``resize_lora``: every module's exact change, truncated by SVD to a rank and/or an energy fraction;
  the relative Frobenius error per module and overall is reported and written to the metadata.
  LoHa/LoKr/DoRA become plain LoRA modules (DoRA needs the checkpoint it was trained on).
* ``merge_into_checkpoint``: a new single-file checkpoint with LoRAs baked in at given strengths,
  the input's keys, dtypes and metadata kept, written atomically, never over an existing file.
* ``inspect_lora``: format, family, per-block rank/alpha, metadata, hashes, and the modules a given
  base model would not use.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from .formats.families import family_from_metadata
from .formats.kohya import LoraWeights, load_lora_file, module_names
from .formats.modules import has_dora, module_alpha, module_delta, module_kind, module_rank
from .formats.names import DIFF_B, DORA, TE_KOHYA_PREFIXES, UNET_PREFIX_KOHYA, Target, checkpoint_targets
from .merge import REPORT_KEY, MergeReport, merge_loras, network_metadata


# ------------------------------------------------------------------------------------ checkpoints
def read_checkpoint_shapes(path) -> tuple[dict, dict]:
    from .models import read_shapes

    return read_shapes(os.fspath(path))


def checkpoint_family(shapes: dict, metadata: dict, path) -> str:
    from .models import detect_family

    try:
        return detect_family(shapes, metadata)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _targets_for(path) -> tuple[dict[str, Target], str, dict]:
    shapes, meta = read_checkpoint_shapes(path)
    family = checkpoint_family(shapes, meta, path)
    return checkpoint_targets(shapes, family), family, shapes


def _check_family(weights: LoraWeights, family: str, path, what: str) -> None:
    base = lambda f: "sd2" if f == "sd2-v" else f  # noqa: E731
    if weights.family is not None and base(weights.family) != base(family):
        raise ValueError(f"{what} was made for {weights.family} but {path} is a {family} checkpoint.")


def _unmatched(weights: LoraWeights, targets: dict[str, Target]) -> list[str]:
    return [n for n in module_names(weights) if n not in targets]


class _WeightReader:
    """Reads (and caches) checkpoint tensors as float32, slicing OpenCLIP's fused q/k/v."""

    def __init__(self, path):
        from safetensors import safe_open

        self._f = safe_open(os.fspath(path), framework="pt", device="cpu")

    def weight(self, target: Target) -> torch.Tensor:
        w = self._f.get_tensor(target.key).float()
        if target.part is not None:
            n = w.shape[0] // 3
            w = w[target.part * n:(target.part + 1) * n]
        return w


# ------------------------------------------------------------------------------------ bake DoRA
def bake_dora_with_checkpoint(weights: LoraWeights, checkpoint) -> LoraWeights:
    """DoRA modules -> exact ``diff`` modules (``W_dora - W0``) using the checkpoint's base weights."""
    dora = [n for n in module_names(weights) if has_dora(weights.tensors, n)]
    if not dora:
        return weights
    targets, family, _ = _targets_for(checkpoint)
    _check_family(weights, family, checkpoint, "the LoRA")
    missing = [n for n in dora if n not in targets]
    if missing:
        raise ValueError(f"{checkpoint} has no weight for DoRA module(s) {', '.join(missing[:5])}.")
    reader = _WeightReader(checkpoint)
    tensors = dict(weights.tensors)
    for name in dora:
        delta = module_delta(weights.tensors, name, base_weight=reader.weight(targets[name]))
        for k in [k for k in tensors if k.startswith(name + ".") and not k.endswith(DIFF_B)]:
            del tensors[k]
        tensors[name + ".diff"] = delta
    return LoraWeights(tensors, dict(weights.metadata), weights.family, weights.source_format)


# ------------------------------------------------------------------------------------ resize
def resize_lora(weights: LoraWeights, rank: int | None = None, energy: float | None = None,
                checkpoint=None) -> tuple[LoraWeights, MergeReport]:
    """SVD of each module's change to ``rank`` and/or ``energy``; returns (LoraWeights, report)."""
    if checkpoint is not None:
        weights = bake_dora_with_checkpoint(weights, checkpoint)
    if any(has_dora(weights.tensors, n) for n in module_names(weights)):
        raise ValueError("This LoRA has DoRA modules; resizing them needs the base checkpoint "
                         "(give checkpoint= / --checkpoint).")
    out, report = merge_loras([(weights, 1.0)], "svd", rank=rank, energy=energy)
    md = {k: v for k, v in (weights.metadata or {}).items() if not k.startswith("sshs_")}
    md.update(network_metadata(report.ranks))
    md[REPORT_KEY] = report.to_json()
    md["ss_training_comment"] = (md.get("ss_training_comment", "") + " | " if md.get("ss_training_comment") else "") \
        + f"resized (rank {rank}, energy {energy}); relative error {report.overall:.3e}"
    return LoraWeights(out.tensors, md, weights.family), report


# ------------------------------------------------------------------------------------ merge into
@dataclass
class MergeIntoReport:
    path: str
    family: str
    patched: int
    per_lora: list[dict]


def _apply_module(sd: dict, weights: LoraWeights, name: str, target: Target, strength: float) -> None:
    t = weights.tensors
    full = sd[target.key]
    if module_kind(t, name) != "full" or name + ".diff" in t:
        w = full.float()
        rows = slice(None) if target.part is None else slice(target.part * (w.shape[0] // 3),
                                                               (target.part + 1) * (w.shape[0] // 3))
        base = w[rows]
        delta = module_delta(t, name, shape=tuple(base.shape), base_weight=base if has_dora(t, name) else None)
        w[rows] = base + strength * delta
        sd[target.key] = w
    if name + DIFF_B in t:
        bkey = re.sub(r"weight$", "bias", target.key)
        if bkey not in sd:
            raise ValueError(f"module {name!r} changes a bias, but the checkpoint has no {bkey}.")
        b = sd[bkey].float()
        rows = slice(None) if target.part is None else slice(target.part * (b.shape[0] // 3),
                                                               (target.part + 1) * (b.shape[0] // 3))
        b[rows] = b[rows] + strength * t[name + DIFF_B].float().reshape(b[rows].shape)
        sd[bkey] = b


def merge_into_checkpoint(checkpoint, loras, out_path, overwrite: bool = False,
                          allow_unused: bool = False) -> MergeIntoReport:
    """Write ``out_path``: ``checkpoint`` with ``loras`` = [(LoraWeights, strength), ...] baked in.

    Keys, tensor dtypes and header metadata are those of the input (plus a record of the merge).
    Modules the checkpoint has no weight for raise ValueError unless ``allow_unused``.
    """
    from safetensors.torch import load_file

    checkpoint = os.fspath(checkpoint)
    out_path = os.path.abspath(os.fspath(out_path))
    if os.path.abspath(checkpoint) == out_path:
        raise ValueError("merge-into writes a new file; give an output path other than the input checkpoint.")
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} already exists; choose another name or pass overwrite.")
    targets, family, _ = _targets_for(checkpoint)
    shapes_meta = read_checkpoint_shapes(checkpoint)[1]
    per_lora = []
    for i, (w, _) in enumerate(loras):
        _check_family(w, family, checkpoint, f"LoRA {i + 1}")
        unused = _unmatched(w, targets)
        if unused and not allow_unused:
            raise ValueError(f"LoRA {i + 1}: {len(unused)} module(s) have no weight in {checkpoint} "
                             f"(e.g. {', '.join(unused[:5])}); check the base model, or allow unused modules.")
        per_lora.append({"name": (w.metadata or {}).get("modelspec.title") or f"lora{i + 1}",
                         "sshs_model_hash": (w.metadata or {}).get("sshs_model_hash"), "unused": unused})
    sd = load_file(checkpoint)
    dtypes = {k: v.dtype for k, v in sd.items()}
    patched: set[str] = set()
    for (w, strength), info in zip(loras, per_lora):
        info["strength"] = float(strength)
        for name in module_names(w):
            if name in targets:
                _apply_module(sd, w, name, targets[name], float(strength))
                patched.add(targets[name].key)
    for k in patched:
        sd[k] = sd[k].to(dtypes[k]).contiguous()
    for k, v in sd.items():
        if v.dtype != dtypes[k]:
            sd[k] = v.to(dtypes[k]).contiguous()
    meta = dict(shapes_meta)
    meta["lora_trainer.merged_loras"] = json.dumps(per_lora)
    _save_atomic(sd, meta, out_path, overwrite)
    return MergeIntoReport(out_path, family, len(patched), per_lora)


def _save_atomic(sd: dict, meta: dict, path: str, overwrite: bool) -> None:
    from safetensors.torch import save_file

    from .formats.safetensors_io import write_atomically

    try:
        write_atomically(path, lambda tmp: save_file(sd, tmp, metadata={str(k): str(v) for k, v in meta.items()}),
                         overwrite)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite.") from None


# ------------------------------------------------------------------------------------ inspect
_UNET = re.escape(UNET_PREFIX_KOHYA)
_TE = "|".join(re.escape(p[:-1]) for p in TE_KOHYA_PREFIXES)  # lora_te|lora_te1|lora_te2
_BLOCK_RES = [
    re.compile(rf"^{_UNET}_((?:down|up)_blocks_\d+|mid_block|(?:input|output)_blocks_\d+|middle_block)"),
    re.compile(rf"^{_UNET}_(conv_in|conv_out|time_embedding|add_embedding|time_embed|label_emb)"),
    re.compile(rf"^({_TE})_text_model_encoder_layers_(\d+)"),
]


def block_of(name: str) -> str:
    for rx in _BLOCK_RES:
        m = rx.match(name)
        if m:
            return f"{m.group(1)} layer {int(m.group(2)):02d}" if len(m.groups()) > 1 else "unet " + m.group(1)
    return "other"


def _kind_label(t: dict, name: str) -> str:
    kind = module_kind(t, name)
    if kind == "lora" and t[name + ".lora_down.weight"].dim() == 4 and t[name + ".lora_down.weight"].shape[-1] > 1:
        kind = "locon"
    return kind + ("+dora" if has_dora(t, name) else "")


def _blocks(weights: LoraWeights) -> dict[str, dict]:
    out: dict[str, dict] = {}
    t = weights.tensors
    for name in module_names(weights):
        b = out.setdefault(block_of(name), {"modules": 0, "ranks": set(), "alphas": set(), "kinds": set()})
        b["modules"] += 1
        r, a = module_rank(t, name), module_alpha(t, name)
        if r is not None:
            b["ranks"].add(r)
        if a is not None:
            b["alphas"].add(round(a, 6))
        b["kinds"].add(_kind_label(t, name))
    return {k: {"modules": v["modules"], "ranks": sorted(v["ranks"]), "alphas": sorted(v["alphas"]),
                "kinds": sorted(v["kinds"])} for k, v in sorted(out.items())}


def _raw_key_issues(raw_keys, family) -> list[str]:
    issues = []
    if any(re.match(rf"({_TE})_encoder_layers_", k) for k in raw_keys):
        issues.append("text-encoder names lack 'text_model_' (diffusers' converter): ComfyUI ignores them; "
                      "this package adds it on load")
    if family == "sdxl" and any(re.match(rf"{_UNET}_(down_blocks|up_blocks|mid_block)_", k) for k in raw_keys):
        issues.append("SDXL UNet modules in diffusers names: kohya's sdxl_merge_lora.py skips them and A1111 "
                      "maps upsamplers wrong; re-save with this package to get SAI names")
    if any(k.endswith(("lora_down.weight", "lora_A.weight")) for k in raw_keys) and \
            not any(k.endswith(".alpha") for k in raw_keys):
        issues.append("no .alpha tensors: ComfyUI/A1111 use scale 1 (alpha = rank)")
    return issues


def inspect_lora(path, base=None) -> dict:
    """What a LoRA file holds and, with ``base`` (a checkpoint), which of its modules that model ignores."""
    from safetensors import safe_open

    from .formats.safetensors_io import model_hash_of_file

    path = os.fspath(path)
    weights = load_lora_file(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        raw_keys = list(f.keys())
    info = inspect_weights(weights, base=base, raw_keys=raw_keys)
    info["file"] = os.path.abspath(path)
    stored = info["sshs_model_hash"]
    info["sshs_model_hash_ok"] = (stored == model_hash_of_file(path)) if stored else None
    return info


def inspect_weights(weights: LoraWeights, base=None, raw_keys=None) -> dict:
    """:func:`inspect_lora` for an in-memory LoRA (``raw_keys``: the keys as stored, if known)."""
    t = weights.tensors
    raw_keys = list(t) if raw_keys is None else raw_keys
    kinds: dict[str, int] = {}
    for n in module_names(weights):
        k = _kind_label(t, n)
        kinds[k] = kinds.get(k, 0) + 1
    md = weights.metadata or {}
    info = {
        "file": None,
        "format": weights.source_format,
        "family": weights.family,
        "family_from_metadata": family_from_metadata(md),
        "modules": len(module_names(weights)),
        "tensors": len(raw_keys),
        "kinds": kinds,
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in t.values()}),
        "blocks": _blocks(weights),
        "metadata": md,
        "sshs_model_hash": md.get("sshs_model_hash"),
        "sshs_model_hash_ok": None,
        "issues": _raw_key_issues(raw_keys, weights.family),
    }
    if any(has_dora(t, n) for n in module_names(weights)):
        info["issues"].append("DoRA: A1111 uses the input axis and diffusers drops dora_scale; bake it for a file "
                              "that loads the same everywhere")
    if base is not None:
        info["base"] = _base_report(weights, base)
    return info


def _base_report(weights: LoraWeights, base) -> dict:
    targets, family, _ = _targets_for(base)
    unused, shape_mismatch, aliases = [], [], []
    for n in module_names(weights):
        tg = targets.get(n)
        if tg is None:
            unused.append(n)
            continue
        if tg.alias:
            aliases.append(n)
        try:
            if module_kind(weights.tensors, n) != "full" or n + ".diff" in weights.tensors:
                module_delta(weights.tensors, n, shape=tg.shape,
                             base_weight=torch.zeros(tg.shape) if has_dora(weights.tensors, n) else None)
        except ValueError:
            shape_mismatch.append(n)
    return {"checkpoint": os.path.abspath(os.fspath(base)), "family": family, "unused_modules": unused,
            "shape_mismatch": shape_mismatch, "names_not_kohya_standard": aliases,
            "used_modules": len(module_names(weights)) - len(unused) - len(shape_mismatch)}


def format_inspect(info: dict) -> str:
    """Human-readable text of :func:`inspect_lora`'s result."""
    lines = [
        f"file:    {info['file'] or '(in memory)'}",
        f"format:  {info['format']}   family: {info['family'] or 'unknown'}   modules: {info['modules']}   "
        f"tensors: {info['tensors']}   dtypes: {', '.join(info['dtypes'])}",
        "kinds:   " + ", ".join(f"{k} {v}" for k, v in sorted(info["kinds"].items())),
    ]
    if info["sshs_model_hash"] and info["sshs_model_hash_ok"] is not None:
        ok = "matches the file" if info["sshs_model_hash_ok"] else "DOES NOT match the file"
        lines.append(f"sshs_model_hash: {info['sshs_model_hash'][:12]}... ({ok})")
    lines.append("blocks (modules, ranks, alphas, kinds):")
    for b, v in info["blocks"].items():
        lines.append(f"  {b:<28} {v['modules']:>4}  r={','.join(map(str, v['ranks'])) or '-'}  "
                     f"alpha={','.join(f'{a:g}' for a in v['alphas']) or '-'}  {','.join(v['kinds'])}")
    md = info["metadata"]
    shown = [k for k in ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                         "ss_network_args", "ss_output_name", "ss_steps", "ss_epoch", "ss_resolution",
                         "ss_sd_model_name", "modelspec.title", "modelspec.trigger_phrase", "modelspec.date",
                         REPORT_KEY) if k in md]
    if shown:
        lines.append("metadata:")
        lines += [f"  {k}: {md[k][:200]}" for k in shown]
        lines.append(f"  ({len(md)} keys in all; --json shows every one)")
    for issue in info["issues"]:
        lines.append(f"note: {issue}")
    base = info.get("base")
    if base:
        lines.append(f"base {base['checkpoint']} ({base['family']}): {base['used_modules']} module(s) used, "
                     f"{len(base['unused_modules'])} unused, {len(base['shape_mismatch'])} with the wrong shape")
        for n in base["unused_modules"][:50]:
            lines.append(f"  unused: {n}")
        for n in base["shape_mismatch"][:50]:
            lines.append(f"  wrong shape: {n}")
        if base["names_not_kohya_standard"]:
            lines.append(f"  {len(base['names_not_kohya_standard'])} module(s) use names ComfyUI/A1111 accept but "
                         "kohya's own loader does not")
    return "\n".join(lines)
