"""A full weight change -> plain LoRA factors by truncated SVD (Eckart-Young optimal, no clamping)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    down: torch.Tensor      # [r, in] or [r, in, k, k]
    up: torch.Tensor        # [out, r] or [out, r, 1, 1]
    alpha: torch.Tensor     # 0-dim float32 == r, so alpha / r == 1
    rank: int
    rel_error: float        # ||delta - up@down||_F / ||delta||_F  (0 for a zero delta)
    discarded_energy: float  # sum of the dropped sigma^2 / sum of all sigma^2
    total_energy: float = 0.0  # sum of all sigma^2 = ||delta||_F^2


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """Number of singular values kept: ``rank`` (capped), or the fewest whose squared sum reaches
    ``energy`` of the total (both given: the smaller of the two)."""
    n = int(s.numel())
    if rank is None and energy is None:
        raise ValueError("give a target rank or an energy fraction")
    k = n
    if rank is not None:
        if int(rank) < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        k = min(n, int(rank))
    if energy is not None:
        if not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        e = s.double() ** 2
        total = float(e.sum())
        if total > 0:
            cum = torch.cumsum(e, 0) / total
            need = int(torch.searchsorted(cum, torch.tensor(float(energy), dtype=cum.dtype) - 1e-12).item()) + 1
            k = min(k, max(1, need))
        else:
            k = 1
    return max(1, k)


def lowrank_from_delta(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
                       dtype: torch.dtype = torch.float32) -> LowRank:
    """Factor ``delta`` ([out, in] or [out, in, k, k]) into LoRA up/down at ``rank`` or ``energy``."""
    shape = tuple(delta.shape)
    mat = delta.reshape(shape[0], -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = choose_rank(s, rank, energy)
    e = s ** 2
    total = float(e.sum())
    dropped = float(e[k:].sum())
    rel = (dropped / total) ** 0.5 if total > 0 else 0.0
    up = (u[:, :k] * s[:k]).to(dtype)
    down = vh[:k].to(dtype)
    if len(shape) == 4:
        down = down.reshape(k, shape[1], shape[2], shape[3])
        up = up.reshape(shape[0], k, 1, 1)
    return LowRank(down.contiguous(), up.contiguous(), torch.tensor(float(k), dtype=torch.float32), k, rel,
                   dropped / total if total > 0 else 0.0, total)


def lowrank_from_factors(up: torch.Tensor, down: torch.Tensor, shape, rank: int | None = None,
                         energy: float | None = None, dtype: torch.dtype = torch.float32) -> LowRank:
    """:func:`lowrank_from_delta` of ``up @ down`` (``up`` [out, R], ``down`` [R, in*k*k]) without forming it:
    QR of both factors, then the SVD of the small R x R core. Same result, far less work when R << out, in."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().t())
    u, s, vh = torch.linalg.svd(ru @ rd.t(), full_matrices=False)
    k = choose_rank(s, rank, energy)
    e = s ** 2
    total = float(e.sum())
    dropped = float(e[k:].sum())
    new_up = ((qu @ u[:, :k]) * s[:k]).to(dtype)
    new_down = (vh[:k] @ qd.t()).to(dtype)
    shape = tuple(shape)
    if len(shape) == 4:
        new_down = new_down.reshape(k, shape[1], shape[2], shape[3])
        new_up = new_up.reshape(shape[0], k, 1, 1)
    return LowRank(new_down.contiguous(), new_up.contiguous(), torch.tensor(float(k), dtype=torch.float32), k,
                   (dropped / total) ** 0.5 if total > 0 else 0.0, dropped / total if total > 0 else 0.0, total)


def exact_rank(delta: torch.Tensor) -> int:
    """Numerical rank of ``delta`` (singular values above float32 round-off of the largest)."""
    s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    tol = float(s[0]) * max(delta.shape[0], delta[0].numel()) * 1e-7
    return max(1, int((s > tol).sum()))


def common_alpha(tensors: dict, names, shared: float | None = None) -> None:
    """Give the plain-LoRA modules ``names`` one shared alpha (default: the largest rank among them), folding each
    module's own alpha/rank into its ``lora_up`` so every loader computes the same change.

    diffusers keeps only the most common alpha for attention modules (their ``alpha_pattern`` keys match
    nothing; docs/lora-format.md §8), so per-module alphas from SVD ranks would load wrong there.
    """
    from .names import ALPHA, DOWN, UP

    names = [n for n in names if n + DOWN in tensors]
    if not names:
        return
    if shared is None:
        shared = float(max(int(tensors[n + DOWN].shape[0]) for n in names))
    for n in names:
        r = int(tensors[n + DOWN].shape[0])
        alpha = tensors.get(n + ALPHA)
        scale = 1.0 if alpha is None else float(alpha.float().item()) / r
        factor = scale * r / shared
        if factor != 1.0:
            up = tensors[n + UP]
            tensors[n + UP] = (up.float() * factor).to(up.dtype)
        tensors[n + ALPHA] = torch.tensor(shared, dtype=torch.float32)
