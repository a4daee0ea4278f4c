"""Silos and budgets: how the trainable scalars are grouped and how many each group may change.

Strategies: ``tensor`` (one silo per tensor), ``row`` (one silo per row of each matrix, i.e. per
slice along dim 0 of a tensor with 2+ dims; a vector is one silo), ``global`` (one silo).
Budgets: ``epsilon`` gives k_S = floor(epsilon * |S|), with epsilon read as the exact decimal
written; ``params`` N spreads min(N, n) over the silos in proportion to their size by the
largest-remainder rule (ties to the earlier silo), so the total is exactly min(N, n).
"""

from __future__ import annotations

import fnmatch
import math
from fractions import Fraction
from typing import TYPE_CHECKING

from dstcli.errors import DstError

if TYPE_CHECKING:
    import torch

SILOS = ("tensor", "global", "row")


def silo_rows(shape: tuple[int, ...], strategy: str) -> int:
    """How many silos (rows of the (R, m) view) one tensor splits into."""
    if strategy == "row" and len(shape) >= 2 and math.prod(shape) > 0:
        return shape[0]
    return 1


def check_budget(epsilon: float | None, params: int | None) -> None:
    if (epsilon is None) == (params is None):
        raise DstError("give exactly one budget: --epsilon (a fraction) or --params (a count)")
    if epsilon is not None and not (1e-7 <= epsilon <= 1):
        raise DstError(f"--epsilon {epsilon} is out of range: use a fraction from 1e-7 to 1")
    if params is not None and params < 1:
        raise DstError(f"--params {params} must be a positive number of parameters")


def allocate(shapes: dict[str, tuple[int, ...]], strategy: str, *, epsilon: float | None = None,
             params: int | None = None) -> dict[str, torch.Tensor] | int:
    """Per-silo budgets: name -> LongTensor (rows,) for tensor/row, or one int K for global.

    Tensor order (for ties and the global silo) is the order of `shapes`.
    """
    import torch  # here, not at the top: apply, lossless diff and inspect run without torch

    if strategy not in SILOS:
        raise DstError(f"unknown silo strategy {strategy!r}: choose one of {', '.join(SILOS)}")
    check_budget(epsilon, params)
    sizes = {name: math.prod(s) for name, s in shapes.items()}
    n = sum(sizes.values())
    if strategy == "global":
        return math.floor(Fraction(str(epsilon)) * n) if epsilon is not None else min(params, n)
    rows = {name: silo_rows(shapes[name], strategy) for name in shapes}
    if epsilon is not None:
        eps = Fraction(str(epsilon))
        return {name: torch.full((rows[name],), math.floor(eps * (sizes[name] // rows[name])), dtype=torch.long)
                for name in shapes}
    total = min(params, n)
    out, rems = {}, []
    for order, name in enumerate(shapes):
        per_row = sizes[name] // rows[name]
        q, r = divmod(total * per_row, n) if n else (0, 0)
        out[name] = torch.full((rows[name],), q, dtype=torch.long)
        rems.append((-r, order, name))
    extra = total - sum(int(v.sum()) for v in out.values())
    for neg_r, _, name in sorted(rems):
        if extra <= 0 or neg_r == 0:
            break
        give = min(extra, rows[name])
        out[name][:give] += 1
        extra -= give
    return out


def budget_total(alloc: dict[str, torch.Tensor] | int) -> int:
    return alloc if isinstance(alloc, int) else sum(int(v.sum()) for v in alloc.values())


def select_names(names: list[str], include: list[str] | None, exclude: list[str] | None) -> list[str]:
    """Names matching any include pattern (all if none) and no exclude pattern (fnmatch globs)."""
    chosen = [n for n in names if not include or any(fnmatch.fnmatchcase(n, p) for p in include)]
    chosen = [n for n in chosen if not exclude or not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    for pats, flag in ((include, "--include"), (exclude, "--exclude")):
        for p in pats or []:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise DstError(f"{flag} pattern {p!r} matches no tensor; names look like {names[0]!r}")
    if not chosen:
        raise DstError("--include/--exclude leave no tensor to train: loosen the patterns")
    return chosen
