"""Distances and exact top-k selection: which entries of a silo keep their new values.

The rule (docs/DST.md): in a silo with budget k, keep the k entries of largest distance; among
equal distances the lower flat index wins; an entry whose distance is 0 is never kept. Distances
are computed in float32 (float64 for float64 tensors); a NaN distance counts as +inf.
"""

from __future__ import annotations

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


_FAST_MIN = 1 << 20  # below this, torch.topk is already cheap
_SAMPLE = 1 << 16


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest value of a 1-D tensor (1 <= k <= numel), without sorting it all.

    A strided sample gives a lower bound that, with a wide margin, has at least k values at or
    above it; those few candidates are then ranked exactly. If the bound was too high (the data
    fooled the sample) it falls back to a full torch.topk, so the answer is always exact.
    """
    m = flat.numel()
    if m < _FAST_MIN or k > m // 16:
        return torch.topk(flat, k, sorted=False).values.min()
    stride = m // _SAMPLE
    sample = flat[::stride]
    expect = k / m * sample.numel()  # how many sample values should lie above the k-th largest
    j = min(sample.numel(), int(expect + 4 * expect ** 0.5 + 8))  # ~4 sigma above the expected rank
    lo = torch.topk(sample, j, sorted=False).values.min()
    cand = flat[flat >= lo]
    if cand.numel() < k:
        return torch.topk(flat, k, sorted=False).values.min()
    return torch.topk(cand, k, sorted=False).values.min()


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
    if R == 1:  # one silo (tensor or global strategy): the sampled exact threshold
        tau = kth_largest(d[0], kmax).reshape(1, 1)
    else:
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
            tau = kth_largest(d, kk)
            cand = torch.nonzero(d >= tau).reshape(-1)
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
