"""The plain, obvious DST projection: the oracle the engine and diff are checked against.

Everything here is written for clarity, not speed: a full sort per silo, Python-level loops.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def ref_distance(x: torch.Tensor, x0: torch.Tensor, kind: str) -> torch.Tensor:
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    diff = (x.to(wide) - x0.to(wide)).abs()
    if kind == "relative":
        diff = diff / (x0.to(wide).abs() + 1e-8)
    elif kind == "inverse-relative":
        diff = diff * x0.to(wide).abs()
    return torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)


def ref_keep(d: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest of a flat silo: sort by (-d, index); never keep d == 0."""
    flat = d.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    for i in order[:k]:
        if flat[i] > 0:
            keep[i] = True
    return keep.reshape(d.shape)


def ref_budgets(shapes: list[tuple[int, ...]], strategy: str, epsilon: float) -> list[list[int]]:
    eps = Fraction(str(epsilon))
    out = []
    for s in shapes:
        n = math.prod(s)
        rows = s[0] if strategy == "row" and len(s) >= 2 and n else 1
        out.append([math.floor(eps * (n // rows))] * rows)
    return out


def ref_project(candidates: list[torch.Tensor], seeds: list[torch.Tensor], *, epsilon: float, silo: str,
                distance: str, mask: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One DST projection. With `mask` given, it is used as is (no re-selection)."""
    if mask is None:
        ds = [ref_distance(c, s, distance) for c, s in zip(candidates, seeds)]
        if silo == "global":
            n = sum(d.numel() for d in ds)
            k = math.floor(Fraction(str(epsilon)) * n)
            flat = ref_keep(torch.cat([d.reshape(-1) for d in ds]), k)
            mask, at = [], 0
            for d in ds:
                mask.append(flat[at:at + d.numel()].reshape(d.shape))
                at += d.numel()
        else:
            budgets = ref_budgets([tuple(c.shape) for c in candidates], silo, epsilon)
            mask = []
            for d, ks in zip(ds, budgets):
                rows = d.reshape(len(ks), -1)
                mask.append(torch.stack([ref_keep(rows[r], ks[r]) for r in range(len(ks))]).reshape(d.shape))
    out = [torch.where(m, c, s) for c, s, m in zip(candidates, seeds, mask)]
    return out, mask
