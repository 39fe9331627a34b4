"""Resumable training state: adapter weights, optimizer, LR schedule, RNG, step, early-stopping state and
the loss history (``extra["losses"]``, one per step: a resumed run reports its whole curve from step 1).

One file per save, ``<output_name>_state_step<N>.pt`` (written atomically). The data order needs no
storage: it is a function of (seed, step), so restoring the step restores it. A run resumed from the state
of step N ends with the same weights as an uninterrupted run (bitwise on the CPU).
"""

from __future__ import annotations

import glob
import os
import re

import torch

from .formats.safetensors_io import write_atomically

STATE_VERSION = 1
# settings a resumed run must share with the saved one (others, e.g. steps or save options, may change)
TRAJECTORY_KEYS = (
    "seed", "batch_size", "gradient_accumulation_steps", "rank", "alpha", "adapter", "target", "target_modules",
    "conv_rank", "conv_alpha", "rslora", "train_unet", "train_text_encoder", "optimizer", "resolution",
    "enable_bucket", "num_processes", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
    "validation_split", "validation_seed",  # which images are held out changes the data order (issue 15)
)
_STEP = re.compile(r"_state_step(\d+)\.pt$")


class ResumeError(ValueError):
    pass


def state_path(output_dir: str, output_name: str, step: int) -> str:
    return os.path.join(output_dir, f"{output_name}_state_step{step}.pt")


def latest_state(folder: str, output_name: str | None = None) -> str | None:
    pattern = f"{glob.escape(output_name)}_state_step*.pt" if output_name else "*_state_step*.pt"
    found = [(int(_STEP.search(p).group(1)), p) for p in glob.glob(os.path.join(folder, pattern)) if _STEP.search(p)]
    return max(found)[1] if found else None


def trainable_state(models: dict) -> dict[str, torch.Tensor]:
    """{"<model>/<param name>": tensor} for every trainable parameter."""
    out = {}
    for label, model in models.items():
        for name, p in model.named_parameters():
            if p.requires_grad:
                out[f"{label}/{name}"] = p.detach().cpu().clone()
    return out


def save_state(path: str, *, step: int, models: dict, optimizer, lr_scheduler, extra: dict, config: dict) -> str:
    state = {
        "version": STATE_VERSION,
        "step": step,
        "params": trainable_state(models),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "extra": extra,
        "config": config,
    }
    # fsynced before the rename: after a crash or power cut the state to resume from is whole or absent
    write_atomically(path, lambda tmp: torch.save(state, tmp), overwrite=True)
    return path


def load_state(path: str) -> dict:
    if os.path.isdir(path):
        found = latest_state(path)
        if not found:
            raise ResumeError(f"resume_from = {path!r}: no *_state_step<N>.pt file in that folder")
        path = found
    if not os.path.isfile(path):
        raise ResumeError(f"resume_from = {path!r}: file not found; point it at a <name>_state_step<N>.pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"resume_from = {path!r}: not a training state file ({e})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ResumeError(f"resume_from = {path!r}: not a training state file of this version")
    state["path"] = path
    return state


def check_compatible(state: dict, config: dict) -> None:
    saved = state.get("config", {})
    diffs = [f"{k} (saved {saved.get(k)!r}, now {config.get(k)!r})" for k in TRAJECTORY_KEYS
             if k in saved and saved.get(k) != config.get(k)]
    if diffs:
        raise ResumeError(f"resume_from = {state['path']!r}: settings differ from the saved run: {', '.join(diffs)}; "
                          "use the same values to resume (or network_weights to start a new run from its LoRA)")
    if state["step"] >= int(config.get("steps", 0)):
        raise ResumeError(f"resume_from = {state['path']!r}: the state is at step {state['step']}, "
                          f"but steps = {config.get('steps')}; raise steps to continue")


@torch.no_grad()
def restore_params(state: dict, models: dict) -> None:
    params = state["params"]
    expected = set()
    for label, model in models.items():
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = f"{label}/{name}"
                expected.add(key)
                if key not in params:
                    raise ResumeError(f"resume_from = {state['path']!r}: no saved value for {key}")
                p.copy_(params[key].to(p.device, p.dtype))
    unused = set(params) - expected
    if unused:
        raise ResumeError(f"resume_from = {state['path']!r}: {len(unused)} saved tensors (e.g. {sorted(unused)[0]}) "
                          "have no place in this run's adapters")
