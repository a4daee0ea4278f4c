"""Distances and exact top-k selection: which entries of a silo keep their new values.

The rule (docs/DST.md): in a silo with budget k, keep the k entries of largest distance; among
equal distances the lower flat index wins; an entry whose distance is 0 is never kept. Distances
are computed in float32 (float64 for float64 tensors); a NaN distance counts as +inf.
"""

from __future__ import annotations

import numpy as np
import torch

from dstcli import kernels
from dstcli.errors import DstError

RELATIVE_DELTA = 1e-8  # keeps `relative` finite where the seed value is exactly 0
DISTANCES = ("absolute", "relative", "inverse-relative")


def distance(x: torch.Tensor, x0: torch.Tensor, kind: str = "absolute") -> torch.Tensor:
    """d(x, x0) >= 0 elementwise:

    - absolute:         |x - x0|
    - relative:         |x - x0| / (|x0| + 1e-8)
    - inverse-relative: |x - x0| * |x0|
    """
    if kind not in DISTANCES:
        raise DstError(f"unknown distance {kind!r}: choose one of {', '.join(DISTANCES)}")
    if x.dtype == torch.bfloat16 and kernels.serves(x, x0):  # one pass, not five: 3x torch's here
        return kernels.distance(x, x0, kind)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    x0w = x0.to(wide)  # may be x0 itself: never modify it in place
    d = (x.to(wide) - x0w).abs_()
    if kind == "relative":
        d = d.div_(x0w.abs().add_(RELATIVE_DELTA))
    elif kind == "inverse-relative":
        d = d.mul_(x0w.abs())
    return d.nan_to_num_(nan=float("inf"), posinf=float("inf"))


SAMPLED_MIN = 1 << 13  # below this, torch.topk is already cheap
_SAMPLE = 1 << 16  # the largest sample; smaller silos sample 1 in 64 (at least 4,096 values)


def _numpy_ok(flat: torch.Tensor) -> bool:
    """On CPU, NumPy's compare, fancy indexing and partition run 2-5x torch's at these sizes."""
    return flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)


def positions_above(flat: torch.Tensor, lo: torch.Tensor | float, *, strict: bool = False) -> torch.Tensor:
    """Ascending flat positions with flat >= lo (flat > lo if strict), in one pass. On CPU NumPy's
    compare + flatnonzero is ~2x torch's boolean indexing; positions are int64, so silos past 2^31
    entries are fine."""
    if _numpy_ok(flat):
        a = flat.numpy()
        v = a.dtype.type(float(lo))
        return torch.from_numpy(np.flatnonzero(a > v if strict else a >= v))
    return torch.nonzero(flat > lo if strict else flat >= lo).reshape(-1)


def sample_bracket(m: int, k: int, size: int | None = None) -> tuple[int, int, int]:
    """For the k-th largest of m values: the stride of the sample (odd: no aliasing with
    power-of-2 rows) and the ranks j_lo, j_hi in the sample whose values bracket it about 4
    sigma each side (j_hi < 1: no upper end). The sample has about `size` values (default 1 in
    64, at least 4,096 and at most 65,536)."""
    size = size or max(4096, min(_SAMPLE, m // 64))
    stride = max(16, m // size) | 1
    s = -(-m // stride)
    expect = k / m * s  # how many sample values should lie above the k-th largest
    margin = 4 * (expect * (1 - k / m)) ** 0.5 + 8
    return stride, min(s, int(expect + margin) + 1), int(expect - margin)


def _nth(vals: np.ndarray, j: int, ties: bool) -> float:
    """The j-th smallest of vals (0-based). NumPy's partition slows down 10-25x on masses of equal
    values (bf16 distances: a bracket of 30K-170K values with 3-170 distinct ones took 2-9 ms,
    a sort 0.1-0.9), so where the sample showed such ties (`ties`) the values are sorted."""
    return np.sort(vals)[j] if ties else np.partition(vals, j)[j]


def _tied(bracket: np.ndarray) -> bool:
    """Whether a sample's values inside a bracket repeat (under half of them distinct)."""
    return len(bracket) > 16 and 2 * len(np.unique(bracket)) < len(bracket)


def top_indices(flat: torch.Tensor, k: int, *, numpy: bool | None = None) -> torch.Tensor:
    """Ascending positions of the k largest values of a 1-D tensor of distances (exact).

    Ties at the k-th value go to the lower positions; a zero distance is never chosen, so fewer
    than k come back when fewer than k are positive. Silos of 8,192+ entries are not sorted: a
    strided sample (1 in 64 entries, at least 4,096 and at most 65,536 values) brackets the k-th
    largest about 4 sigma each side, one pass collects the entries above the bracket's low end,
    and only those are ranked (for large k, only those inside the bracket). If the sample misled
    (fewer than k collected, or k or more above the high end) it falls back to a full torch.topk,
    so the answer never depends on the sample.

    On CPU the candidates are ranked in NumPy; elsewhere (and with numpy=False, which the tests
    use to check that path on CPU) in torch, waiting for the device only where a size must be
    known: the candidates, the count above the bracket and the kept positions themselves.
    """
    m = flat.numel()
    k = min(int(k), m)
    if numpy is None:
        numpy = _numpy_ok(flat)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if k == m:
        return positions_above(flat, 0.0, strict=True) if numpy else torch.nonzero(flat > 0).reshape(-1)
    if m < SAMPLED_MIN:
        vals, idx = torch.topk(flat, k, sorted=False)
        tau = vals.min()
        # on CPU the scalar checks are cheap: without ties at tau the top-k is the set
        if numpy and float(tau) > 0 and int(torch.count_nonzero(flat >= tau)) == k:
            return torch.sort(idx).values
        return torch.nonzero(_settle_mask(flat, tau, k)).reshape(-1)
    stride, j_lo, j_hi = sample_bracket(m, k)
    ranked = torch.topk(flat[::stride], j_lo, sorted=True).values
    lo, hi = ranked[-1], (ranked[j_hi - 1] if j_hi >= 1 else None)
    if numpy:
        idx = _bracketed_numpy(flat.numpy(), positions_above(flat, lo).numpy(), k,
                               hi.item() if hi is not None else None, _tied(ranked[max(j_hi, 0):].numpy()))
        idx = torch.from_numpy(idx) if idx is not None else None
    else:
        idx = _bracketed_torch(flat, k, lo, hi)
    if idx is not None:
        return idx
    tau = torch.topk(flat, k, sorted=False).values.min()  # the sample was fooled: rank everything
    cand = torch.nonzero(flat >= tau).reshape(-1)
    return cand[_settle_mask(flat[cand], tau, k)]


def top_positions(x: torch.Tensor, x0: torch.Tensor, k: int, kind: str = "absolute") -> torch.Tensor | None:
    """top_indices(distance(x, x0, kind).view(-1), k), fused on the CPU by dstcli.kernels: the
    sample's distances bracket the k-th largest as in top_indices, one pass computes the distances
    and collects the entries at or above the bracket's low end (no distance tensor is made), and
    only those inside the bracket are ranked. None where the kernels do not serve (another device
    or dtype, no compiler, a silo under SAMPLED_MIN entries or a budget of 0 or all of it) or where
    the sample misled (fewer than k at or above its low end, or k or more above its high end): the
    caller then takes the torch path, which gives the same positions."""
    m = x.numel()
    k = min(int(k), m)
    if not 0 < k < m or m < SAMPLED_MIN or not kernels.serves(x, x0):
        return None
    flat, flat0 = x.view(-1), x0.view(-1)
    stride, j_lo, j_hi = sparse_bracket(m, k)
    lo, hi, ties = sample_ends(kernels.sample(flat, flat0, kind, stride), j_lo, j_hi)
    # no cap below m: with quantized distances (bf16) the count at lo can be far above the
    # sample's estimate, and only the pages the candidates fill are ever touched
    pos, val = kernels.candidates(flat, flat0, kind, lo, False, m)
    if len(pos) < k:
        return None
    inside, n_above = kernels.split(val, hi)
    if n_above >= k:
        return None
    tau, need = _kth_inside(inside, n_above, k, ties)
    return kernels.keep(pos, val, tau, need)[0]


def sparse_bracket(m: int, k: int) -> tuple[int, int, int]:
    """sample_bracket for samples taken 1 in 256 (4,096 to 65,536 values): a strided sample misses
    the cache at every value, and the wider bracket costs a larger partition, far less than the
    misses it saves."""
    return sample_bracket(m, k, max(4096, min(_SAMPLE, m // 256)))


def sample_ends(sample: np.ndarray, j_lo: int, j_hi: int) -> tuple[float, float, bool]:
    """A sample's j_lo-th and j_hi-th largest values (the bracket's ends; hi = inf where j_hi < 1)
    and whether its values inside the bracket repeat (`_tied`). Partitions the sample in place."""
    s = len(sample)
    sample.partition([s - j_lo, s - max(j_hi, 1)])
    hi = float(sample[s - j_hi]) if j_hi >= 1 else float("inf")
    return float(sample[s - j_lo]), hi, _tied(sample[s - j_lo:s - max(j_hi, 0)])


def _kth_inside(inside: np.ndarray, n_above: int, k: int, ties: bool) -> tuple[float, int]:
    """The k-th largest of values of which n_above (< k) lie above a bracket and `inside` within
    it, and how many of the k largest equal it (the ties at it that still fit)."""
    tau = _nth(inside, len(inside) - (k - n_above), ties)
    return float(tau), k - n_above - int(np.count_nonzero(inside > tau))


def kth_largest(parts: list[np.ndarray], k: int) -> tuple[float, int, int]:
    """For non-negative values in parts (1-D float arrays, taken together in order; a cut never
    keeps a zero, so tau = 0 keeps every positive value), more than k in all: the k-th largest,
    tau, how many of the k largest equal it (the ties at tau that fit: top_indices keeps them from
    the lowest position) and how many values in all equal it (where the two agree, every tie fits
    and the order of the parts does not matter). Bracketed by a sample as top_indices (1 in 256,
    strided through the parts as if they were one array), so apart from the sample one pass over
    the parts (kernels.bracket where built) collects the values inside the bracket; a sample that
    misled costs a partition of everything instead."""
    m = sum(len(p) for p in parts)
    if m > _SAMPLE:
        stride, j_lo, j_hi = sparse_bracket(m, k)
        picks, start = [], 0
        for p in parts:
            picks.append(p[(-start) % stride::stride])
            start += len(p)
        lo, hi, ties = sample_ends(np.concatenate(picks), j_lo, j_hi)
        if kernels.lib() is not None:
            got = [kernels.bracket(np.ascontiguousarray(p), lo, hi) for p in parts]
            inside, n_above = np.concatenate([g[0] for g in got]), sum(g[1] for g in got)
        else:
            cand = np.concatenate([p[p >= p.dtype.type(lo)] for p in parts])
            above = cand > cand.dtype.type(hi)
            inside, n_above = cand[~above], int(np.count_nonzero(above))
        if len(inside) + n_above >= k and n_above < k:  # else the sample misled
            tau, need = _kth_inside(inside, n_above, k, ties)
            return tau, need, int(np.count_nonzero(inside == inside.dtype.type(tau)))  # ties are inside
    every = np.concatenate(parts)
    tau = _nth(every, m - k, False)
    return float(tau), k - int(np.count_nonzero(every > tau)), int(np.count_nonzero(every == tau))


def _bracketed_numpy(a: np.ndarray, cand: np.ndarray, k: int, hi: float | None,
                     ties: bool = False) -> np.ndarray | None:
    """top_indices on CPU once the sample gave the bracket [lo, hi] and `cand` holds the positions
    at or above lo (`ties`: the sample's bracket values repeat, see _nth); None when the sample
    misled."""
    if len(cand) < k:
        return None
    vals = a[cand]
    if hi is None:
        tau = _nth(vals, len(vals) - k, ties)
    else:
        above = vals > a.dtype.type(hi)  # surely in: rank only the entries inside the bracket
        n_above = int(np.count_nonzero(above))
        if n_above >= k:
            return None
        inside = vals[~above]
        tau = _nth(inside, len(inside) - (k - n_above), ties)
    if not tau > 0:  # fewer than k positive distances: every positive one, never a zero
        return cand[vals > 0]
    keep = vals > tau
    need = k - int(np.count_nonzero(keep))
    ties = np.flatnonzero(vals == tau)
    keep[ties[:need]] = True  # ties at tau: the lower positions win
    return cand[keep]


def _bracketed_torch(flat: torch.Tensor, k: int, lo: torch.Tensor, hi: torch.Tensor | None) -> torch.Tensor | None:
    """The same in torch, for GPUs: three waits for the device (the candidates' count, the count
    above the bracket, the kept positions); None when the sample misled."""
    cand = torch.nonzero(flat >= lo).reshape(-1)
    if len(cand) < k:
        return None
    vals = flat[cand]
    if hi is None:
        tau = torch.topk(vals, k, sorted=False).values.min()
    else:
        above = vals > hi  # surely in: rank only the entries inside the bracket
        n_above = int(torch.count_nonzero(above))
        if n_above >= k:
            return None
        j = k - n_above  # tau is the j-th largest inside the bracket, the r-th smallest
        r = len(vals) - n_above - j + 1
        if j <= r:  # entries above the bracket become -inf (+inf) so they never rank
            tau = torch.topk(vals.masked_fill(above, float("-inf")), j, sorted=False).values.min()
        else:
            tau = torch.topk(vals.masked_fill(above, float("inf")), r, largest=False, sorted=False).values.max()
    return cand[_settle_mask(vals, tau, k)]


def _settle_mask(vals: torch.Tensor, tau: torch.Tensor, k: int) -> torch.Tensor:
    """Which of ascending-position values whose k-th largest is tau are kept: all above tau,
    then ties at tau from the lowest position while they fit, never a zero. No wait on the device."""
    gt = vals > tau
    eq = vals == tau
    eq &= eq.cumsum(0) <= k - torch.count_nonzero(gt)
    return (gt | eq) & (vals > 0)


def topk_mask(d: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Keep-mask for silos laid out as the rows of d (R, m) with budgets k (R,) or one int.

    Exactly min(k_r, #positive in row r) entries are kept per row: the largest distances, ties to
    the lower index, never a zero distance.
    """
    R, m = d.shape
    k = torch.as_tensor(k, dtype=torch.long).expand(R).clamp(0, m)  # budgets on the CPU: no wait here
    kmax = int(k.max()) if R else 0
    if kmax == 0:
        return torch.zeros_like(d, dtype=torch.bool)
    if kmax == m and bool((k == m).all()):
        return d > 0
    if R == 1:  # one silo (tensor or global strategy)
        keep = torch.zeros(m, dtype=torch.bool, device=d.device)
        keep[top_indices(d[0], kmax)] = True
        return keep.reshape(1, m)
    return rows_keep(d, k, kmax, ties="check" if d.device.type == "cpu" else "always")


def rows_indices(d: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Ascending flat positions of topk_mask(d, k) for row silos (R, m).

    On the CPU, where every row's k-th largest distance is positive and shared by no entry
    outside the row's top k (one compare pass checks it), the kept set is the top k itself: a
    torch.topk along the rows gives the positions directly (budgets of up to 8 entries, or up to
    1/8 of rows of 1,024+ entries: there it beats a partition), or a NumPy partition gives each
    row's k-th value and one pass marks what is at or above it (other budgets, or budgets that
    differ between rows). Where a row has ties at its k-th value or fewer than k positive
    distances, the k-th values found settle them as topk_mask does.
    """
    R, m = d.shape
    k = torch.as_tensor(k, dtype=torch.long).expand(R).clamp(0, m)
    if _numpy_ok(d) and R > 1 and d.is_contiguous():
        kmin, kmax = int(k.min()), int(k.max())
        if 0 < kmin and kmax < m:
            top = kmin == kmax and (kmax <= 8 or (m >= 1024 and 8 * kmax <= m))  # measured on a 2-core CPU
            if top:
                return _rows_top(d, k, kmax)
            if len(np.unique(k.numpy())) <= 4:
                return _rows_partition(d, k)
    return torch.nonzero(topk_mask(d, k).view(-1)).view(-1)


def _rows_top(d: torch.Tensor, k: torch.Tensor, kk: int) -> torch.Tensor:
    """rows_indices with one budget kk for every row, by torch.topk along the rows."""
    vals, idx = torch.topk(d, kk, dim=1, sorted=False)
    a, tau = d.numpy(), vals.min(1, keepdim=True).values.numpy()
    if kernels.lib() is not None and a.flags.c_contiguous:
        return _rows_fused(a, k.numpy(), tau)
    if not _rows_exact(a >= tau, tau, kk * d.shape[0]):
        return _rows_settle_numpy(a, k.numpy(), tau)
    pos = np.sort(idx.numpy(), axis=1)
    pos += np.arange(0, d.shape[0] * d.shape[1], d.shape[1], dtype=np.int64)[:, None]
    return torch.from_numpy(pos.reshape(-1))


def _rows_partition(d: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """rows_indices by NumPy's partition at each row's k-th largest (a few distinct budgets; a
    sort where a sample of the distances repeats: 11x faster on bf16 rows of 2,048)."""
    R, m = d.shape
    a, kn = d.numpy(), k.numpy()
    if _tied(a.reshape(-1)[::max(1, a.size // 4096)]):  # masses of equal values (bf16): see _nth
        tau = np.sort(a, axis=1)[np.arange(R), m - kn][:, None]
    else:
        tau = np.partition(a, np.unique(m - kn), axis=1)[np.arange(R), m - kn][:, None]
    if kernels.lib() is not None and a.flags.c_contiguous:
        return _rows_fused(a, kn, tau)
    mask = a >= tau
    if not _rows_exact(mask, tau, int(kn.sum())):
        return _rows_settle_numpy(a, kn, tau)
    return torch.from_numpy(np.flatnonzero(mask))


def _rows_fused(a: np.ndarray, k: np.ndarray, tau: np.ndarray) -> torch.Tensor:
    """The kept positions of rows a (R, m) whose k-th largest values are tau (R, 1), on the
    kernels: the entries at or above tau, in one pass, where that is exactly k a row (every tau
    positive and no tie at it: each row has at least k there, so a total of sum(k) says so);
    else the tie rule (`_rows_settle_numpy`)."""
    if bool((tau > 0).all()):
        pos = kernels.rows_above(a, tau.reshape(-1), int(k.sum()))
        if pos is not None:
            return torch.from_numpy(pos)
    return _rows_settle_numpy(a, k, tau)


def _rows_exact(mask: np.ndarray, tau: np.ndarray, total: int) -> bool:
    """Whether rows whose k-th largest values are tau (R, 1), budgets adding up to total, keep
    exactly the entries at or above tau (mask, (R, m)): every tau positive and no row with a
    tie at it. Each row has at least k entries at or above its tau, so one count over the whole
    mask equals total exactly when every row has k (counting per row costs 2-10x more)."""
    return bool((tau > 0).all()) and int(np.count_nonzero(mask)) == total


def _rows_settle_numpy(a: np.ndarray, k: np.ndarray, tau: np.ndarray) -> torch.Tensor:
    """`_rows_settle` on the CPU, as ascending flat positions: NumPy's compares and row counts
    are 2-3x torch's, and only rows with surplus ties at tau get a running count (with bf16
    weights ties at the k-th value are common, surplus ones rarer)."""
    gt = a > tau
    eq = a == tau
    need = k - np.count_nonzero(gt, axis=1)  # how many entries at tau still fit
    over = np.flatnonzero(np.count_nonzero(eq, axis=1) > need)
    if len(over):  # surplus ties: lower indices win
        sub = eq[over]
        sub &= np.cumsum(sub, axis=1, dtype=np.int32) <= need[over, None]
        eq[over] = sub
    keep = np.logical_or(gt, eq, out=gt)
    if not (tau > 0).all():  # fewer than k positive distances: never a zero
        keep &= a > 0
    return torch.from_numpy(np.flatnonzero(keep))


def _rows_settle(d: torch.Tensor, k: torch.Tensor, tau: torch.Tensor, ties: str = "always") -> torch.Tensor:
    """The keep-mask of rows (R, m) with budgets k (R,) whose k-th largest values are tau (R, 1):
    all above tau, then ties at tau from the lowest index while they fit, never a zero (`ties`
    as in rows_keep)."""
    gt = d > tau
    need = k[:, None] - gt.sum(1, keepdim=True, dtype=torch.int32)  # at tau, still fit (int32: bool to int64 is 10x slower)
    eq = d == tau
    if ties == "always" or bool((eq.sum(1, keepdim=True, dtype=torch.int32) > need).any()):  # surplus ties: lower indices win
        eq &= eq.cumsum(1, dtype=torch.int32) <= need
    return (gt | eq) & (d > 0)


def rows_keep(d: torch.Tensor, k: torch.Tensor, kmax: int, ties: str = "always") -> torch.Tensor:
    """topk_mask's rule for rows (R, m) by one torch.topk along the rows, with budgets k (R,)
    (any device) and kmax = max(k) >= 1. Ties at a row's k-th value are settled by a running
    count, always (no wait for the device), or only where a row has surplus ties ("check": one
    wait, but on the CPU the count costs more than the check)."""
    k = k.to(d.device)
    top = torch.topk(d, kmax, dim=1, sorted=True).values  # (R, kmax), descending
    tau = top.gather(1, (k - 1).clamp(min=0)[:, None])  # (R, 1) the k-th largest
    tau = torch.where(k[:, None] == 0, torch.full_like(tau, float("inf")), tau)
    return _rows_settle(d, k, tau, ties)


def segments_keep(d: torch.Tensor, keep: torch.Tensor, segs: list[tuple[int, int, int]],
                  starts: torch.Tensor | None = None, ks: torch.Tensor | None = None) -> torch.Tensor:
    """top_indices for several large silos at once: segs are (start, end, k) slices of the flat
    distances d, each of 8,192+ entries with 0 < k < its size; their kept entries are set in the
    bool mask `keep` (False there before). Each silo's strided sample brackets its k-th largest
    as in top_indices; then one pass collects every silo's candidates, and the ones inside their
    brackets are ranked all together by (silo, distance descending, position): two waits for
    the device in all. Returns a bool per silo, False where its sample misled (then its entries
    in `keep` are wrong and the caller must select that silo alone). `starts` and `ks`, the
    silos' starts and budgets on d's device, may be given to spare the copies."""
    dev = d.device
    cmask = torch.zeros_like(keep)
    lo, hi = [], []
    inf = torch.full((1,), float("inf"), dtype=d.dtype, device=dev)
    for a, b, k in segs:
        stride, j_lo, j_hi = sample_bracket(b - a, k)
        ranked = torch.topk(d[a:b:stride], j_lo, sorted=True).values
        lo.append(ranked[j_lo - 1:j_lo])
        hi.append(ranked[j_hi - 1:j_hi] if j_hi >= 1 else inf)
        torch.ge(d[a:b], lo[-1], out=cmask[a:b])
    hi_t = torch.cat(hi)
    if starts is None:
        starts = torch.tensor([a for a, _, _ in segs], device=dev)
    if ks is None:
        ks = torch.tensor([k for _, _, k in segs], device=dev)
    S = len(segs)
    cand = torch.nonzero(cmask).reshape(-1)  # ascending
    del cmask
    cseg = torch.searchsorted(starts, cand, right=True) - 1
    vals = d[cand]
    above = vals > hi_t[cseg]  # surely kept: fewer than k lie above the bracket
    n_above = torch.zeros(S, dtype=torch.long, device=dev).index_add_(0, cseg, above.long())
    need = ks - n_above
    ok = (torch.bincount(cseg, minlength=S) >= ks) & (need > 0)
    ins = torch.nonzero(~above).reshape(-1)
    iv, iseg = vals[ins], cseg[ins]
    order = torch.sort(iv, descending=True, stable=True).indices  # ties keep the lower position first
    order = order[torch.sort(iseg[order], stable=True).indices]  # then by silo, stably
    sseg = iseg[order]
    rank = torch.arange(len(order), device=dev) - torch.searchsorted(sseg, torch.arange(S, device=dev))[sseg]
    keep_c = above
    keep_c[ins[order]] = (rank < need[sseg]) & (iv[order] > 0)
    keep[cand] = keep_c
    return ok


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
