"""Distances and exact top-k selection: which entries of a silo keep their new values.

The rule (docs/DST.md): in a silo with budget k, keep the k entries of largest distance; among
equal distances the lower flat index wins; an entry whose distance is 0 is never kept. Distances
are computed in float32 (float64 for float64 tensors); a NaN distance counts as +inf.
"""

from __future__ import annotations

import numpy as np
import torch

from dstcli.errors import DstError

RELATIVE_DELTA = 1e-8  # keeps `relative` finite where the seed value is exactly 0
DISTANCES = ("absolute", "relative", "inverse-relative")


def distance(x: torch.Tensor, x0: torch.Tensor, kind: str = "absolute") -> torch.Tensor:
    """d(x, x0) >= 0 elementwise:

    - absolute:         |x - x0|
    - relative:         |x - x0| / (|x0| + 1e-8)
    - inverse-relative: |x - x0| * |x0|
    """
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    x0w = x0.to(wide)  # may be x0 itself: never modify it in place
    d = (x.to(wide) - x0w).abs_()
    if kind == "relative":
        d = d.div_(x0w.abs().add_(RELATIVE_DELTA))
    elif kind == "inverse-relative":
        d = d.mul_(x0w.abs())
    elif kind != "absolute":
        raise DstError(f"unknown distance {kind!r}: choose one of {', '.join(DISTANCES)}")
    return d.nan_to_num_(nan=float("inf"), posinf=float("inf"))


_FAST_MIN = 1 << 13  # below this, torch.topk is already cheap
_SAMPLE = 1 << 16  # the largest sample; smaller silos sample 1 in 64 (at least 4,096 values)


def positions_above(flat: torch.Tensor, lo: torch.Tensor | float, *, strict: bool = False) -> torch.Tensor:
    """Ascending flat positions with flat >= lo (flat > lo if strict), in one pass. On CPU NumPy's
    compare + flatnonzero is ~2x torch's boolean indexing; positions are int64, so silos past 2^31
    entries are fine."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        a = flat.numpy()
        v = a.dtype.type(float(lo))
        return torch.from_numpy(np.flatnonzero(a > v if strict else a >= v))
    return torch.nonzero(flat > lo if strict else flat >= lo).reshape(-1)


def top_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending positions of the k largest values of a 1-D tensor of distances (exact).

    Ties at the k-th value go to the lower positions; a zero distance is never chosen, so fewer
    than k come back when fewer than k are positive. Silos of 8,192+ entries are not sorted: a
    strided sample (1 in 64 entries, at least 4,096 and at most 65,536 values) brackets the k-th
    largest about 4 sigma each side, one pass collects the entries above the bracket's low end,
    and only those are ranked (for large k, only those inside the bracket). If the sample misled
    (fewer than k collected, or k or more above the high end) it falls back to a full torch.topk,
    so the answer never depends on the sample.
    """
    m = flat.numel()
    k = min(int(k), m)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if k == m:
        return positions_above(flat, 0.0, strict=True)
    if m < _FAST_MIN:
        vals, idx = torch.topk(flat, k, sorted=False)
        tau = vals.min()
        if float(tau) > 0 and int((flat >= tau).sum()) == k:  # no ties at tau: the top-k is the set
            return torch.sort(idx).values
        cand = positions_above(flat, tau)
        return _settle(cand, flat[cand], tau, k)
    stride = max(16, m // max(4096, min(_SAMPLE, m // 64))) | 1  # odd: no aliasing with power-of-2 rows
    sample = flat[::stride]
    s = sample.numel()
    expect = k / m * s  # how many sample values should lie above the k-th largest
    margin = 4 * (expect * (1 - k / m)) ** 0.5 + 8
    j_lo, j_hi = min(s, int(expect + margin) + 1), int(expect - margin)
    ranked = torch.topk(sample, j_lo, sorted=True).values
    lo, hi = ranked[-1], (ranked[j_hi - 1] if j_hi >= 1 else None)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        idx = _bracketed_numpy(flat.numpy(), positions_above(flat, lo).numpy(), k,
                               hi.item() if hi is not None else None)
        if idx is not None:
            return torch.from_numpy(idx)
    else:
        cand = positions_above(flat, lo)
        if len(cand) >= k:
            vals = flat[cand]
            if hi is None:
                return _settle(cand, vals, torch.topk(vals, k, sorted=False).values.min(), k)
            above = vals > hi  # surely in: rank only the entries inside the bracket
            n_above = int(above.sum())
            if n_above < k:
                inside = vals[~above]
                r = len(inside) - (k - n_above) + 1  # tau is the r-th smallest inside the bracket
                tau = (torch.topk(inside, k - n_above, sorted=False).values.min() if k - n_above <= r
                       else torch.topk(inside, r, largest=False, sorted=False).values.max())
                return _settle(cand, vals, tau, k)
    tau = torch.topk(flat, k, sorted=False).values.min()  # the sample was fooled: rank everything
    cand = positions_above(flat, tau)
    return _settle(cand, flat[cand], tau, k)


def _bracketed_numpy(a: np.ndarray, cand: np.ndarray, k: int, hi: float | None) -> np.ndarray | None:
    """top_indices on CPU once the sample gave the bracket [lo, hi] and `cand` holds the positions
    at or above lo (NumPy's fancy indexing and partition are 2-5x torch's at these sizes); None
    when the sample misled."""
    if len(cand) < k:
        return None
    vals = a[cand]
    if hi is None:
        tau = np.partition(vals, len(vals) - k)[len(vals) - k]
    else:
        above = vals > a.dtype.type(hi)  # surely in: rank only the entries inside the bracket
        n_above = int(np.count_nonzero(above))
        if n_above >= k:
            return None
        inside = vals[~above]
        tau = np.partition(inside, len(inside) - (k - n_above))[len(inside) - (k - n_above)]
    if not tau > 0:  # fewer than k positive distances: every positive one, never a zero
        return cand[vals > 0]
    keep = vals > tau
    need = k - int(np.count_nonzero(keep))
    ties = np.flatnonzero(vals == tau)
    keep[ties[:need]] = True  # ties at tau: the lower positions win
    return cand[keep]


def _settle(cand: torch.Tensor, vals: torch.Tensor, tau: torch.Tensor, k: int) -> torch.Tensor:
    """Of ascending candidates whose k-th largest value is tau, the k kept (ties: lower first)."""
    keep = vals >= tau
    if int(keep.sum()) > k:  # surplus ties at tau: the lower positions win
        eq = vals == tau
        eq &= eq.cumsum(0) <= k - int((vals > tau).sum())
        keep = (vals > tau) | eq
    if not float(tau) > 0:
        keep &= vals > 0
    return cand[keep]


def topk_mask(d: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Keep-mask for silos laid out as the rows of d (R, m) with budgets k (R,) or one int.

    Exactly min(k_r, #positive in row r) entries are kept per row: the largest distances, ties to
    the lower index, never a zero distance.
    """
    R, m = d.shape
    k = torch.as_tensor(k, dtype=torch.long).expand(R).clamp(0, m)
    kmax = int(k.max()) if R else 0
    if kmax == 0:
        return torch.zeros_like(d, dtype=torch.bool)
    if kmax == m and bool((k == m).all()):
        return d > 0
    if R == 1:  # one silo (tensor or global strategy)
        keep = torch.zeros(m, dtype=torch.bool, device=d.device)
        keep[top_indices(d[0], kmax)] = True
        return keep.reshape(1, m)
    top = torch.topk(d, kmax, dim=1, sorted=True).values  # (R, kmax), descending
    tau = top.gather(1, (k - 1).clamp(min=0)[:, None])  # (R, 1) the k-th largest
    tau = torch.where(k[:, None] == 0, torch.full_like(tau, float("inf")), tau)
    gt = d > tau
    need = k[:, None] - gt.sum(1, keepdim=True)  # how many entries at tau still fit
    eq = d == tau
    if bool((eq.sum(1, keepdim=True) > need).any()):  # surplus ties at tau: the lower indices win
        eq &= eq.cumsum(1) <= need
    return (gt | eq) & (d > 0)


class GlobalTopK:
    """Exact top-k over many tensors seen one at a time, as one silo in the order they are added.

    Memory is O(k + ties at the boundary) whatever the total size. Use `add` for each tensor's
    flat distances in order, then `mask(d, offset)` per tensor for the keep-mask.
    """

    def __init__(self, k: int):
        self.k = k
        self.vals = torch.empty(0, dtype=torch.float64)
        self.pos = torch.empty(0, dtype=torch.long)
        self.offset = 0

    def add(self, d: torch.Tensor) -> None:
        d = d.reshape(-1)
        kk = min(self.k, d.numel())
        if kk:
            cand = top_indices(d, kk)  # only a tensor's own top-k can be in the global top-k
            vals = torch.cat([self.vals, d[cand].to(torch.float64)])
            pos = torch.cat([self.pos, cand + self.offset])  # ascending: earlier tensors first
            order = torch.sort(vals, descending=True, stable=True).indices[: self.k]
            self.vals, self.pos = vals[order], pos[order]
        self.offset += d.numel()

    def threshold(self) -> tuple[float, int]:
        """(tau, last position kept at distance tau)."""
        if self.k == 0 or len(self.vals) == 0:
            return float("inf"), -1
        if len(self.vals) < self.k:
            return float("-inf"), self.offset
        tau = float(self.vals[-1])
        return tau, int(self.pos[self.vals == tau].max())

    def mask(self, d: torch.Tensor, offset: int, threshold: tuple[float, int]) -> torch.Tensor:
        """Keep-mask of one tensor's distances d that started at global position `offset`."""
        tau, last = threshold
        flat = d.reshape(-1)
        keep = flat > tau
        if last >= offset:
            pos = torch.arange(offset, offset + flat.numel())
            keep |= (flat == tau) & (pos <= last)
        return (keep & (flat > 0)).reshape(d.shape)
