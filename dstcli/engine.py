"""The DST engine: after each optimizer step, keep per silo only the entries farthest from the seed.

Two ways to drive it. The lean one steps the optimizer of each bucket of consecutive tensors
(at most the largest tensor's size, or BUCKET_MIN entries) and projects those tensors right away,
so no copy of the seed is ever held (only the kept entries' seed values, O(epsilon n)):

    dst = DST(model.named_parameters(), epsilon=1e-3, seed="none")
    opts = bucket_optimizers(dst.buckets(), dict(model.named_parameters()),
                             lambda ps: torch.optim.AdamW(ps, lr=lr))  # one per tensor works too
    for batch in data:
        loss(batch).backward()
        stats = dst.step(opts)                 # per bucket: snapshot, opt.step(), project
        model.zero_grad()

The plain one projects after an ordinary optimizer step; it needs the whole seed, either copied
(``seed="copy"``, the default) or given as a mapping (e.g. tensors memory-mapped from the base
checkpoint):

    dst = DST(model.named_parameters(), epsilon=1e-3)
    loss(batch).backward(); opt.step(); opt.zero_grad()
    stats = dst.project()

The lean one takes such a seed too (`seed=checkpoint.mapped(names)`, as `dstcli train` does on
the CPU): the CPU kernels then read it where they would read a snapshot, and nothing is copied.
All of these give bit-identical parameters. The optimizer is untouched: a reset entry keeps its optimizer
state and can come back later (churn). Resets copy the seed bits exactly.

On a GPU the lean step runs batched (`batched=None` decides): each bucket (then 4 largest tensors)
is snapshotted, updated, measured, selected and reset in a fixed number of kernels and a few
waits for the device, since there kernel launches, not memory traffic, bound the per-tensor way.
On the CPU it runs batched for the global silo over small tensors (the bundled model), where
per-tensor overheads dominate. Both give the same kept sets and bits.

Why the lean way needs no seed: outside the kept set the value before a step *is* the seed value,
so a snapshot of a bucket taken just before its update, with the kept entries' stored seed
values written back, is its tensors' seed. Temporary memory is one bucket (the largest tensor,
or BUCKET_MIN entries), plus copies of the small silos' seeds (under SAMPLED_MIN entries each),
which are projected together at the end of the step or every BUCKET_MIN entries of them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from dstcli import heap, kernels
from dstcli.dtypes import bits_view
from dstcli.errors import DstError
from dstcli.patchfile import Change
from dstcli.select import (SAMPLED_MIN, DISTANCES, distance, kth_largest, positions_above, rows_indices, rows_keep,
                           sample_ends, segments_keep, sparse_bracket, top_indices)
from dstcli.silos import allocate, budget_total, silo_rows


# A batched step's bucket, in largest tensors: each bucket costs ~100 kernel launches and 3-4
# waits for the device, and holds ~13 bytes per entry of scratch (snapshot, updated copy,
# distances, masks), so 4 keeps the scratch near 4% of a 1.3B model's fp32 training memory.
BATCHED_BUCKET = 4
# With a seed held (memory-mapped: no snapshot to size), the CPU kernels' steps default to
# buckets of this many largest tensors: fewer optimizer calls and kernel calls, the extra memory
# only the kept entries' output (25M model, update-based DST / full step, buckets of 1 / 4 / 16
# largest tensors, epsilon 1e-1: bf16 tensor silo 1.054 / 1.048 / 1.041, row 1.052-1.055 / 1.050
# / 1.042; fp32 tensor 1.026 / 1.024 / 1.020; bf16 global silo's band 1.043 / 1.039 / 1.036).
HELD_BUCKET = 16
# Buckets hold at least this many entries (4 MB of fp32 scratch): on models whose tensors are all
# small, each optimizer call and bucket costs more than its work (the bundled model's DST step:
# buckets of its largest tensor, 65K entries, 1.08/1.18x full fine-tuning's at epsilon 1e-3/1e-2;
# of 16 of them, 1.06/1.14x).
BUCKET_MIN = 1 << 20
# On the CPU the global silo runs batched when tensors average fewer entries than this: the
# bundled model (26K a tensor) gains 4-11 points of step time, a 25M GPT (250K) loses 10-70%.
SMALL_TENSOR = 1 << 16
# The global silo's kernel path keeps each bucket's output buffers between steps while they add
# up to at most this many bytes: reuse saves faulting fresh pages in (~1 ms a step on the bundled
# model, all of whose buffers fit in 22 MB), but kept without a cap they held up to ~16 bytes a
# parameter through forward and backward, and the heap pages under them with it, written or not
# (25M model, peak RSS at epsilon 1e-3 / 1e-1: 1,215-1,230 / 1,357-1,371 MB uncapped, 1,031-1,043
# / 1,256-1,264 MB so, full fine-tuning's 941-987; 1e-1 pays 15-25 ms a step of page faults).
POOL_REUSE = 48 << 20
# ... and cuts its pool to the top-K once it holds more than POOL_CUT * K entries
POOL_CUT = 4
# With a seed held, the global silo's kernel path takes a band instead of a pool (_step_band):
# its bracket for the next step lies this many ranks either side of the K-th largest (a share of
# K, at least BAND_MARGIN_MIN), widened 2x after a miss and narrowed by BAND_NARROW after a hit,
# between BAND_MARGIN and BAND_MARGIN_MAX; and at least BAND_RELATIVE of tau either side. The
# band holds up to max(K / 4, BAND_MIN) values a thread.
BAND_MARGIN, BAND_MARGIN_MAX, BAND_NARROW, BAND_MARGIN_MIN = 1 / 64, 1 / 4, 0.8, 64
BAND_RELATIVE, BAND_MIN = 1 / 256, 1 << 16


@dataclass
class StepStats:
    step: int
    nonseed: int  # entries whose bits differ from the seed after projection
    entered: int  # entries that joined the kept set at this step's selection
    left: int  # entries that left it
    reselected: bool


class _Kept:
    """One tensor's kept set: ascending flat positions and the seed values there."""

    def __init__(self, idx: torch.Tensor, seed_vals: torch.Tensor):
        self.idx, self.seed_vals = idx, seed_vals


def _common(a: torch.Tensor, b: torch.Tensor, n: int) -> int | torch.Tensor:
    """How many positions in range(n) two index tensors share (a bitmap of n bools); on a GPU a
    0-dim tensor, so that counting never waits for the device (see `_total`)."""
    if not len(a) or not len(b):
        return 0
    if a.device.type == "cpu":  # NumPy's fancy indexing is 2-3x torch's on CPU
        seen = np.zeros(n, dtype=bool)
        seen[b.numpy()] = True
        return int(np.count_nonzero(seen[a.numpy()]))
    seen = torch.zeros(n, dtype=torch.bool, device=a.device)
    seen[b] = True
    return torch.count_nonzero(seen[a])


def _differ(vals: torch.Tensor, seed_vals: torch.Tensor) -> torch.Tensor:
    """How many kept entries differ from their seed values bit for bit (0-dim: no wait on a GPU;
    count_nonzero, since a bool sum copies the mask to int64 first)."""
    return torch.count_nonzero(bits_view(vals) != bits_view(seed_vals))


def _total(counts: Iterable[int | torch.Tensor]) -> int:
    """The sum of counts that are ints or 0-dim tensors, with one transfer per device."""
    out, by_device = 0, {}
    for c in counts:
        if isinstance(c, torch.Tensor):
            by_device.setdefault(c.device, []).append(c)
        else:
            out += c
    return out + sum(int(torch.stack(v).sum()) for v in by_device.values())


@dataclass
class _Plan:
    """A bucket's layout for the batched step: tensor boundaries (host and device), the silos
    selected along rows (start, end, rows, row length, budgets on the device or None for "all",
    largest budget), the small tensor silos as one padded batch (positions, budgets, largest
    budget) and the large tensor silos (start, end, budget) with their starts and budgets on
    the device."""
    names: tuple[str, ...]
    starts: list[int]
    starts_dev: torch.Tensor
    first: torch.Tensor
    rows: list[tuple]
    small: tuple[torch.Tensor, torch.Tensor, int] | None
    large: list[tuple[int, int, int]]
    large_starts: torch.Tensor
    large_ks: torch.Tensor


@dataclass
class _Candidates:
    """One bucket's entries in the batched global silo's pool: flat positions in the bucket
    (ascending), their seed values, current values and distances, and the bucket's kept
    positions before this step (for the churn counts)."""
    plan: _Plan
    idx: torch.Tensor
    seed_vals: torch.Tensor
    vals: torch.Tensor
    dist: torch.Tensor
    old_idx: torch.Tensor


def _offsets(first: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """For n kept entries of concatenated tensors whose first flat positions are `first`,
    counts[i] of them in the i-th tensor: each entry's tensor's first flat position (flat
    position = position in its tensor + this)."""
    return torch.repeat_interleave(first, counts, output_size=n)


def _pool_cut(dists: list[torch.Tensor], K: int, keep: torch.Tensor | None = None) -> tuple[list, float]:
    """A global silo's pool, as the distances of its parts (ascending position within each, the
    parts in order): the top-K (ties to the lower position), or the entries `keep` marks. Per
    part, the positions in it that stay (None where all do), and the K-th largest distance."""
    all_d = torch.cat(dists)
    chosen = top_indices(all_d, K) if keep is None else torch.nonzero(keep).view(-1)  # ascending
    lens = [len(v) for v in dists]
    starts = [0, *itertools.accumulate(lens)]
    cuts = torch.searchsorted(chosen, torch.tensor(starts, device=chosen.device)).tolist()  # each part's share
    mine = [None if b - a == n else chosen[a:b] - s0 for a, b, n, s0 in zip(cuts, cuts[1:], lens, starts)]
    return mine, (float(all_d[chosen].min()) if len(chosen) else 0.0)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i, in one multi-tensor kernel where torch has one."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dst, src)
    else:
        for a, b in zip(dst, src):
            a.copy_(b)


def bucket_optimizers(buckets: list[list[str]], params: Mapping[str, torch.nn.Parameter],
                      make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> dict[str, torch.optim.Optimizer]:
    """name -> optimizer for `DST.step`: one optimizer, make(its parameters), per bucket (in the
    bucket's order, which is its state's order)."""
    out = {}
    for names in buckets:
        opt = make([params[n] for n in names])
        out.update({n: opt for n in names})
    return out


class DST:
    """Dynamic Subset Tuning projection over a set of named parameters.

    Args:
        named_params: (name, parameter) pairs to constrain, in a fixed order (ties and the global
            silo follow it). Parameters not given here are not touched.
        epsilon: budget as a fraction of each silo (1e-7..1), or
        params: budget as an absolute count, spread over silos by size.
        silo: "tensor", "row" or "global".
        distance: "absolute", "relative" or "inverse-relative".
        reselect_every: choose the kept set every R steps and hold it fixed in between; None
            selects once, at the first step, and never again (static sparse tuning).
        seed: "copy" keeps a full copy of the seed (then call `project()` after each step);
            "none" keeps only the kept entries' seed values (then call `step(optimizers)`); or a
            mapping name -> seed tensor (same shape and dtype, e.g. memory-mapped from the base
            checkpoint: `Checkpoint.mapped`), never written, for either. `step` on the CPU
            kernels reads a held seed in place of its snapshot (the same kept sets and bits).
        shards, gather: for parameters split over processes (FSDP): the tensors given are each
            process's slice, `shards[name] = (whole shape, first flat position of the slice)`,
            and `gather(values, positions)` concatenates 1-D tensors over processes in order.
            A silo spanning processes then keeps exactly what one process would keep.
        batched: in `step`, project each bucket in one batch of kernels rather than tensor by
            tensor (seed="none", no `gather`). The default, None, batches when every parameter
            is on a GPU, where the per-tensor kernel launches and waits cost more than the work
            itself, and on the CPU for the global silo when tensors average under SMALL_TENSOR
            entries (the bundled model's DST step: 1.13-1.43x -> 1.08-1.31x full fine-tuning's;
            on a 25M model, 250K entries a tensor, it costs 10-70% more), unless dstcli.kernels
            serve every tensor and they have one dtype: then a kernel call a bucket (see
            `_step_pool_many`, with a seed held `_step_band`) is faster (the bundled model,
            epsilon 1e-6 to 1e-1: 1.06-1.14x batched, 1.04-1.08x with the pool, 1.03 with the
            band). The kept sets are the same either way.

    A DST that steps the global silo on the CPU kernels sets glibc's malloc thresholds for the
    whole process (dstcli.heap.keep_freed: the memory a step frees stays for the next step;
    DSTCLI_KEEP_HEAP=0 or a user's own MALLOC_*_ settings leave them alone).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, epsilon: float | None = None,
                 params: int | None = None, silo: str = "tensor", distance: str = "absolute",
                 reselect_every: int | None = 1, seed: str | Mapping[str, torch.Tensor] = "copy",
                 shards: Mapping[str, tuple[tuple[int, ...], int]] | None = None,
                 gather: Callable[..., list[torch.Tensor]] | None = None, batched: bool | None = None):
        self.params = dict(named_params)
        if not self.params:
            raise DstError("no parameters to tune")
        if distance not in DISTANCES:
            raise DstError(f"unknown distance {distance!r}: choose one of {', '.join(DISTANCES)}")
        if reselect_every is not None and reselect_every < 1:
            raise DstError(f"reselect_every must be at least 1 (or never), got {reselect_every}")
        self.silo, self.distance, self.reselect_every = silo, distance, reselect_every
        self.shards, self.gather = shards, gather
        shapes = {n: tuple(shards[n][0]) if shards else tuple(p.shape) for n, p in self.params.items()}
        self.shapes = shapes
        self.alloc = allocate(shapes, silo, epsilon=epsilon, params=params)
        self.budget = budget_total(self.alloc)
        if self.budget == 0:
            raise DstError("the budget rounds to zero in every silo: raise --epsilon or --params "
                           "(or use --silo tensor/global instead of row)")
        self.epsilon, self.params_budget = epsilon, params
        self.seed = self._seed_store(seed)
        self.kept = {n: _Kept(torch.empty(0, dtype=torch.long, device=p.device), p.detach().new_empty(0))
                     for n, p in self.params.items()}
        self.frozen = {n for n in self.params if self._budget_of(n) == 0}  # always the seed
        self._nonseed: dict[str, torch.Tensor | int] = {}
        self.step_count = 0
        self._scratch: torch.Tensor | None = None
        self._work: dict = {}  # kernels.top's scratch memory, reused from tensor to tensor
        # each row's (row silos) or small silo's (a batch of them) last k-th largest distance
        self._row_hints: dict[str | tuple[str, ...], np.ndarray] = {}
        # the CPU kernels can take a whole bucket in one call (kernels.many, kernels.pool_many);
        # the global silo's pool needs one dtype throughout
        bucket_kernels = (shards is None and all(map(kernels.serves, self.params.values()))
                          and all(map(kernels.serves, (self.seed or {}).values()))
                          and (silo != "global" or len({p.dtype for p in self.params.values()}) == 1))
        if batched is None:  # GPUs: a kernel launch costs more than most tensors' work
            sizes = [p.numel() for p in self.params.values()]
            batched = (all(p.device.type == "cuda" for p in self.params.values())
                       or (silo == "global" and sum(sizes) < SMALL_TENSOR * len(sizes) and not bucket_kernels))
        self.batched = bool(batched) and self.seed is None and gather is None
        # step a bucket, then project all its tensors in one kernel call (kernels.many); with a
        # seed held (a copy or a mapping) the kernels read it in place of a snapshot
        self._many = not self.batched and gather is None and bucket_kernels
        if self._many and silo == "global":  # the pool a step frees, kept for the next rather than
            heap.keep_freed(2 * sum(p.nbytes for p in self.params.values()))  # faulted in again (dstcli.heap)
        self._many_plans: dict[tuple, kernels.Bucket | list[int]] = {}
        self._views: dict[tuple, tuple] = {}  # see _flat and _step_with_seed
        self._counted = False  # whether the last step counted the non-finite kept entries
        # first name -> (names, kept objects, positions in each tensor, seed values, kept per tensor)
        self._bucket_kept: dict[str, tuple] = {}
        self._plans: dict[str, _Plan] = {}
        self._small_plans: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._nonfinite: dict[str, torch.Tensor] = {}  # per bucket, counted by the last batched step
        # _step_band's bracket for the next step (None: sample one), its margin (a share of K),
        # its band, how many times in a row it missed and how many steps the pool takes first
        self._bracket: tuple[float, float] | None = None
        self._margin, self._band, self._band_misses, self._band_wait = 4 * BAND_MARGIN, None, 0, 0

    def _seed_store(self, seed: str | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if isinstance(seed, str):
            if seed == "copy":
                return {n: p.detach().clone() for n, p in self.params.items()}
            if seed == "none":
                return None
            raise DstError(f"unknown seed store {seed!r}: use 'copy', 'none' or a mapping of tensors")
        out = {}
        for n, p in self.params.items():
            s = seed.get(n)
            if s is None or s.shape != p.shape or s.dtype != p.dtype or s.device != p.device:
                raise DstError(f"seed tensor {n!r} is missing or not {p.dtype}{list(p.shape)} on {p.device}: "
                               "the seed mapping must match the parameters")
            if not torch.equal(bits_view(s), bits_view(p.detach())):
                raise DstError(f"parameter {n!r} does not start at its seed value: build DST before training")
            out[n] = s
        return out

    def _budget_of(self, name: str) -> int:
        return self.alloc if self.silo == "global" else int(self.alloc[name].sum())

    def _due(self, step: int | None = None) -> bool:
        """Whether step `step` (default: the current one) selects the kept sets anew."""
        step = self.step_count if step is None else step
        if self.reselect_every is None:
            return step == 1
        return (step - 1) % self.reselect_every == 0

    # ---- driving -------------------------------------------------------------------------

    @torch.no_grad()
    def project(self) -> StepStats:
        """Call after each optimizer step: keep the top-k per silo, reset the rest to the seed."""
        if self.seed is None:
            raise DstError("this DST keeps no seed (seed='none'): call step(optimizers) instead of project()")
        return self._run(lambda name: self.seed[name])

    @torch.no_grad()
    def step(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> StepStats:
        """Step each bucket's optimizer and project its tensors at once (the lean path).

        `optimizers[name]` updates that parameter; several names may share one optimizer (see
        `buckets`), which then must update exactly those parameters, consecutive in this DST's
        order and of one dtype and device: it is stepped once, after a snapshot of all of them,
        so the temporary memory is the largest such group. Tensors whose budget is zero are not
        stepped at all (they would be reset to the seed anyway).
        """
        groups = self._groups(optimizers)
        if self.batched:
            return self._step_batched(optimizers, groups)
        if self._many and self._due(self.step_count + 1):
            if self.silo != "global":
                return self._step_many(optimizers, groups)
            return (self._step_pool_many if self.seed is None else self._step_band)(optimizers, groups)
        snap: dict[str, torch.Tensor] = {}

        def seed_of(name: str) -> torch.Tensor:
            if name not in snap:  # the first tensor of its group: snapshot the group, step it
                names = groups[name]
                if self.seed is None:
                    flat = self._buffer(sum(self.params[n].numel() for n in names), self.params[name])
                    at = 0
                    for n in names:  # before the step: the seed, except at the kept entries
                        p = self.params[n].detach()
                        snap[n] = flat[at:at + p.numel()].view(p.shape)
                        snap[n].copy_(p)
                        at += p.numel()
                optimizers[name].step()
                for n in names:
                    if self.seed is not None:
                        snap[n] = self.seed[n]
                    else:
                        snap[n].view(-1)[self.kept[n].idx] = self.kept[n].seed_vals
            return snap.pop(name)

        return self._run(seed_of)

    def _groups(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, list[str]]:
        """name -> the names its optimizer steps (in order); checks the mapping is usable."""
        order = [n for n in self.params if n not in self.frozen]
        missing = [n for n in order if n not in optimizers]
        if missing:
            raise DstError(f"no optimizer for {missing[0]!r}: give one optimizer per parameter or per bucket")
        by_opt: dict[int, list[str]] = {}
        for n in order:
            by_opt.setdefault(id(optimizers[n]), []).append(n)
        out = {}
        pos = {n: i for i, n in enumerate(order)}
        for names in by_opt.values():
            first = self.params[names[0]]
            if (pos[names[-1]] - pos[names[0]] != len(names) - 1
                    or any(self.params[n].dtype != first.dtype or self.params[n].device != first.device for n in names)):
                raise DstError(f"the optimizer of {names[0]!r} also steps {names[-1]!r}: one optimizer may only "
                               "hold consecutive parameters of one dtype and device (see DST.buckets)")
            for n in names:
                out[n] = names
        return out

    def _step_many(self, optimizers: Mapping[str, torch.optim.Optimizer], groups: dict[str, list[str]]) -> StepStats:
        """`step` with selection on the CPU kernels, a bucket at a time: snapshot its tensors,
        step its optimizer, then one kernel call (kernels.many) makes the snapshot the seed and
        projects every tensor of it (tensors under PARALLEL_MIN entries a thread each), counting
        what `step` reports. A few Python calls a tensor were most of the bundled model's DST
        overhead (53 tensors; at epsilon 1e-2 its update took 6.1-6.9 ms with a kernel call a
        tensor, 5.0-5.3 ms this way, full fine-tuning's 2.6-3.1 ms)."""
        self.step_count += 1
        self._counted = True
        both = new = old = 0
        for names in self._buckets(groups):
            b = self._many_plan(names)
            params, views = self._step_with_seed(b, names, optimizers[names[0]])
            before = [self.kept[n] for n in names]
            pos, seed_vals, out = kernels.many(b, params, views, [k.idx for k in before], self._old_seeds(before),
                                               self.distance, self._work)
            for n, idx, sv in zip(names, pos, seed_vals):
                self.kept[n] = _Kept(idx, sv)
                self._nonseed.pop(n, None)
            ok = out[:, 0] >= 0
            differ, nonfinite = int(out[ok, 1].sum()), int(out[ok, 3].sum())
            both += int(out[ok, 2].sum())
            new += int(out[ok, 0].sum())
            old += sum(k.idx.numel() for k in before)
            for t in np.flatnonzero(~ok):  # the sample misled (rare): the torch path, views[t] is the seed
                n = names[t]
                self._select_tensor(n, views[t].view(self.params[n].shape))
                k = self.kept[n]
                differ += self._nonseed.pop(n)
                nonfinite += int(torch.count_nonzero(~torch.isfinite(params[t][k.idx])))
                both += _common(k.idx, before[t].idx, b.sizes[t])
                new += len(k.idx)
            self._nonseed[names[0]], self._nonfinite[names[0]] = differ, nonfinite
        return StepStats(self.step_count, self.nonseed(), new - both, old - both, True)

    def _step_band(self, optimizers: Mapping[str, torch.optim.Optimizer], groups: dict[str, list[str]]) -> StepStats:
        """`step` for the global silo on the CPU kernels with a seed held: a band, not a pool.
        Right after each bucket's optimizer step one kernel call copies out the distances inside
        a bracket [lo, hi] (kernels.Band.add: a read of the bucket, nothing written), set from the
        last step's distances a margin of ranks either side of its K-th largest; once every
        bucket is stepped the band gives this step's K-th largest (Band.cut), and one call keeps
        and resets every tensor (Band.keep, as dst_top_*'s second pass). Where there is no
        bracket yet, or it missed (or its band would not fit: max(K / 4, BAND_MIN) values a
        thread), a sample of every tensor brackets the K-th largest instead (as
        select.top_indices does a silo's) for a second read; only where that misses too does the
        pool take the stepped tensors (_step_pool_many), and then it takes the next 1, 2, 4 ...
        64 steps before the band is tried again. At epsilon 1e-1 the pool held ~4K entries
        before its first cut (25M model, bf16: its shares, cuts and churn count 24 ms of a 50 ms
        update); the band holds a few hundredths of K."""
        K = self.alloc
        buckets = self._buckets(groups)
        if self._band_wait:
            self._band_wait -= 1
            return self._step_pool_many(optimizers, groups)
        dtype = next(iter(self.params.values())).dtype
        if self._band is None or self._band.dtype != dtype:
            self._band = kernels.Band(dtype, max(K // 4, BAND_MIN) + 64)
        band = self._band

        def read(bracket: tuple[float, float], step: bool):  # the band's pass over every bucket
            band.start(*bracket, self.distance)
            for names in buckets:
                if step:
                    optimizers[names[0]].step()
                band.add(self._flat(names), self._flat(names, self.seed))
            return band.cut(K, K + margin, K - margin)
        margin = max(math.ceil(self._margin * K), BAND_MARGIN_MIN)
        got = None if self._bracket is None else read(self._bracket, True)
        if got is None:
            if self._bracket is not None:  # it missed: a wider margin from here on
                self._margin = min(2 * self._margin, BAND_MARGIN_MAX)
                margin = max(math.ceil(self._margin * K), BAND_MARGIN_MIN)
            else:
                for names in buckets:
                    optimizers[names[0]].step()
            got = read(self._sampled_bracket(buckets, K), False)
        if got is None:
            self._bracket, self._band_misses = None, self._band_misses + 1
            self._band_wait = min(1 << (self._band_misses - 1), 64)
            return self._step_pool_many(optimizers, groups, stepped=True)
        self._band_misses = 0
        return self._keep_band(band, got, K, margin)

    def _sampled_bracket(self, buckets: list[tuple[str, ...]], K: int) -> tuple[float, float]:
        """A bracket of the global silo's K-th largest distance from a strided sample of every
        tensor (select.sparse_bracket's stride and ranks, the tensors as one array)."""
        names = [n for b in buckets for n in b]
        stride, j_lo, j_hi = sparse_bracket(sum(self.params[n].numel() for n in names), K)
        sample = np.concatenate([kernels.sample(p, s, self.distance, stride)
                                 for b in buckets for p, s in zip(self._flat(b), self._flat(b, self.seed))])
        lo, hi, _ = sample_ends(sample, min(j_lo, len(sample)), j_hi)
        return lo, hi

    def _keep_band(self, band: kernels.Band, got: tuple, K: int, margin: int) -> StepStats:
        """_step_band's second pass once its band gave tau (got: Band.cut's), and the bracket for
        the next step: the values `margin` ranks either side of the K-th largest, or where the
        band did not reach that far its own ends; at least BAND_RELATIVE of tau either side (a
        run of ties at tau); none where tau is 0."""
        res, budget, keep = got
        tau = float(res[0])
        self.step_count += 1
        self._counted = True
        self._nonfinite.clear()
        names = [n for n in self.params if n not in self.frozen]  # the band's tensors, in its order
        before = [self.kept[n].idx for n in names]
        pos, seeds, out = band.keep(tau, budget, keep, before, self._work)
        for n, idx, sv, differ in zip(names, pos, seeds, out[:, 1].tolist()):
            self.kept[n], self._nonseed[n] = _Kept(idx, sv), differ
        self._nonfinite["all"] = int(out[:, 3].sum())
        both, new, old = int(out[:, 2].sum()), int(out[:, 0].sum()), sum(i.numel() for i in before)
        lo = float(res[1]) if math.isfinite(res[1]) else band.lo
        hi = float(res[2]) if math.isfinite(res[2]) else math.inf if K - margin < 1 else band.hi
        self._bracket = (min(lo, tau * (1 - BAND_RELATIVE)), max(hi, tau * (1 + BAND_RELATIVE))) if tau > 0 else None
        self._margin = max(self._margin * BAND_NARROW, BAND_MARGIN)
        return StepStats(self.step_count, self.nonseed(), new - both, old - both, True)

    def _step_pool_many(self, optimizers: Mapping[str, torch.optim.Optimizer], groups: dict[str, list[str]],
                        stepped: bool = False) -> StepStats:
        """`step` for the global silo on the CPU kernels, a bucket at a time: snapshot, optimizer
        step, then one kernel call (kernels.pool_many) makes the snapshot the seed and takes each
        tensor's share of the pool (see _select_global) into a kernels.Pool; the pool is cut in
        one call or two (Pool.kth, Pool.cut) after a bucket once it holds more than 4K (so it holds
        at most 4K and a bucket's shares), and the churn and non-finite counts are one call at
        the end. Python's cost no longer grows with the number of tensors."""
        self.step_count += 1
        self._counted = True
        self._nonfinite.clear()
        K = self.alloc
        before = {n: k.idx for n, k in self.kept.items()}
        pool = kernels.Pool(next(iter(self.params.values())).dtype)
        floor = None
        for names in self._buckets(groups):
            b = self._many_plan(names)
            params, views = self._step_with_seed(b, names, None if stepped else optimizers[names[0]])
            at, ends = 0, self._pool_chunks(names, K)
            while at < len(names):  # before the first cut, chunks of at most 4K candidates (after it, few)
                end = next(e for e in ends if e > at) if floor is None else len(names)
                self._pool_share(pool, names[at:end], params[at:end], views[at:end], before, floor, K)
                at = end
                if pool.size > POOL_CUT * K:
                    floor, need, ties = self._pool_tau(pool, K)
                    pool.cut(floor, need, ties)
        # the last cut writes the kept sets; a pool of at most K keeps every entry above 0 (whole
        # parts hold the others, which it resets)
        kept = pool.cut(*(self._pool_tau(pool, K) if pool.size > K else (0.0, 0, 0)), last=K)
        self._keep_pool_buffers()
        names = list(self.params)
        for n, (idx, seed_vals), differ in zip(names, kept, pool.differ.tolist()):
            self.kept[n], self._nonseed[n] = _Kept(idx, seed_vals), differ
        both, self._nonfinite["all"] = kernels.churn([self.kept[n].idx for n in names], [before[n] for n in names],
                                                     self._flat(tuple(names)), self._work)
        new, old = int(pool.count.sum()), sum(i.numel() for i in before.values())
        return StepStats(self.step_count, self.nonseed(), new - both, old - both, True)

    def _keep_pool_buffers(self) -> None:
        """Keep the buckets' pool_many output buffers for the next step (no fresh pages to fault
        in) while they add up to at most POOL_REUSE bytes, in plan order; free the others."""
        held = 0
        for b in self._many_plans.values():
            if isinstance(b, kernels.Bucket) and b.bufs is not None:
                size = sum(t.nbytes for t in b.bufs)
                if held + size <= POOL_REUSE:
                    held += size
                else:
                    b.bufs = None

    def _pool_share(self, pool: kernels.Pool, names: tuple[str, ...], params: list[torch.Tensor],
                    views: list[torch.Tensor], before: dict[str, torch.Tensor], floor: float | None, K: int) -> None:
        """Add consecutive tensors' shares to a kernels.Pool in one call (kernels.pool_many;
        `views`: their snapshots), a tensor whose sample misled through _global_share."""
        b = self._many_plan(names)
        bufs, off, out, whole = kernels.pool_many(b, params, views, [before[n] for n in names],
                                                  self._old_seeds([self.kept[n] for n in names]), self.distance,
                                                  floor, K, self._work)
        at = 0
        for t in [*np.flatnonzero(out[:, 0] < 0), len(names)]:  # the sample misled (rare): the torch path
            if t > at:
                pool.add(params[at:t], *bufs, off[at:t], out[at:t, 0], out[at:t, 1], whole[at:t])
            if t < len(names):
                n = names[t]
                vals = self._global_share(n, views[t].view(self.params[n].shape), floor, K)
                k = self.kept[n]
                pool.add([params[t]], k.idx, k.seed_vals, vals.contiguous(), [0], [len(vals)], [self._nonseed.pop(n)])
            at = t + 1

    def _pool_chunks(self, names: tuple[str, ...], K: int) -> list[int]:
        """Where a bucket's runs of tensors end that can add at most 4K entries to the pool (at
        least one tensor each): before the pool's first cut, a cut sets the floor as early as
        a tensor at a time would, the kernel calls staying few."""
        key = ("chunks", names)
        if key not in self._many_plans:
            ends, room = [], 0
            for i, n in enumerate(names):
                m = min(self.params[n].numel(), K)
                if room and room + m > POOL_CUT * K:
                    ends.append(i)
                    room = 0
                room += m
            self._many_plans[key] = ends + [len(names)]
        return self._many_plans[key]

    def _pool_tau(self, pool: kernels.Pool, K: int) -> tuple[float, int, int]:
        """Where to cut a kernels.Pool to its top-K (ties to the lower position): its K-th largest,
        how many of the K largest equal it, how many in all do (Pool.kth, else kth_largest)."""
        got = pool.kth(K, *sparse_bracket(pool.size, K), self._work.setdefault("cut", {}))
        return got if got is not None else kth_largest(pool.values(), K)

    def _step_with_seed(self, b: kernels.Bucket, names: tuple[str, ...], opt: torch.optim.Optimizer | None):
        """Step a bucket's optimizer (None: stepped already, with a seed held); returns its
        tensors and what the kernels take as their seed (flat): with a seed held, its views;
        else copies of the tensors from before the step (a snapshot in the scratch, whose views
        are kept while it keeps its memory, as _flat keeps the tensors'), which the kernels make
        the seed by writing the kept seed values back. On the 25M model at epsilon 1e-1 the copy
        and the writing back cost 3-7 ms a step (BENCHMARKS.md, "The seed memory-mapped from the
        base")."""
        params = self._flat(names)
        if self.seed is not None:
            if opt is not None:
                opt.step()
            return params, self._flat(names, self.seed)
        scratch = self._buffer(int(b.n.sum()), params[0])
        key = ("scratch", names)
        if key not in self._views or self._views[key][0] != scratch.data_ptr():
            self._views[key] = (scratch.data_ptr(), list(scratch.split(b.sizes)))
        views = self._views[key][1]
        _copy_all(views, params)  # before the step: the seed, except at the kept entries
        opt.step()
        return params, views

    def _flat(self, names: tuple[str, ...], of: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The tensors' flat views (of the parameters, or of `of`: the seed), kept from step to
        step while each keeps its memory (a view holds its memory, so a tensor given new memory
        has a new address): making them again each step cost ~7 us a tensor, 0.36 ms a step on
        the bundled model with its snapshot's."""
        of = self.params if of is None else of
        key = names if of is self.params else ("seed", names)
        ptrs = tuple(of[n].data_ptr() for n in names)
        if key not in self._views or self._views[key][0] != ptrs:
            self._views[key] = (ptrs, [of[n].detach().view(-1) for n in names])
        return self._views[key][1]

    def _old_seeds(self, before: list[_Kept]) -> list[torch.Tensor] | None:
        """The kept seed values the kernels write back into a snapshot to make it the seed; None
        where a seed is held (nothing to write back)."""
        return None if self.seed is not None else [k.seed_vals for k in before]

    def _many_plan(self, names: tuple[str, ...]) -> kernels.Bucket:
        """A bucket's kernels.Bucket (made once, then kept in _many_plans): tensor silos of
        SAMPLED_MIN entries or more (with a budget short of the whole tensor) through dst_top_*,
        row silos and the other tensor silos through dst_rows_* (each row's last k-th largest
        distance kept in _row_hints); for the global silo, dst_top_* for a tensor's own top-K
        where it takes it."""
        if names in self._many_plans:
            return self._many_plans[names]
        sizes = [self.params[n].numel() for n in names]
        if self.silo == "global":
            K = self.alloc
            top = [(K, *sparse_bracket(m, K)) if SAMPLED_MIN <= m and 0 < K < m else None for m in sizes]
            b = self._many_plans[names] = kernels.Bucket(self.params[names[0]].dtype, sizes, top, pool=K)
            return b
        top, rows = [], []
        for n in names:
            m, R = self.params[n].numel(), silo_rows(self.shapes[n], self.silo)
            ks = self.alloc[n].numpy().astype(np.int64)
            if R == 1 and m >= SAMPLED_MIN and 0 < ks[0] < m:
                top.append((int(ks[0]), *sparse_bracket(m, int(ks[0]))))
                rows.append(None)
                continue
            if n not in self._row_hints or len(self._row_hints[n]) != R:
                self._row_hints[n] = kernels.hints(R, self.params[n].dtype)
            top.append(None)
            rows.append((np.arange(0, m + 1, m // R, dtype=np.int64), ks, self._row_hints[n]))
        b = self._many_plans[names] = kernels.Bucket(self.params[names[0]].dtype, sizes, top, rows)
        return b

    def _buckets(self, groups: dict[str, list[str]]) -> list[tuple[str, ...]]:
        """The buckets (tensors stepped by one optimizer) that hold a tuned tensor, in order."""
        return list(dict.fromkeys(tuple(groups[n]) for n in self.params if n not in self.frozen))

    def _step_batched(self, optimizers: Mapping[str, torch.optim.Optimizer], groups: dict[str, list[str]]) -> StepStats:
        """`step` a bucket at a time: snapshot, update, distances, selection and reset each run
        over the bucket's tensors together, in a fixed number of kernels per bucket."""
        self.step_count += 1
        self._counted = True
        reselect = self._due()
        buckets = self._buckets(groups)
        if reselect and self.silo == "global":
            churn = self._global_batched([list(b) for b in buckets], optimizers)
        else:
            churn = [self._project_bucket(list(b), optimizers[b[0]], reselect) for b in buckets]
        entered = left = 0
        if reselect:
            common = _total(c[0] for c in churn)
            entered = sum(c[1] for c in churn) - common
            left = sum(c[2] for c in churn) - common
        return StepStats(self.step_count, self.nonseed(), entered, left, reselect)

    def _update(self, names: list[str], opt: torch.optim.Optimizer):
        """Snapshot a bucket, step its optimizer, make the snapshot its seed. Returns the
        parameters, the plan, the seed (flat, with one spare entry past the bucket: the padding
        of the small silos' batch points there), views of it shaped like the parameters, the
        updated values (flat, with the spare) and the kept entries before the step."""
        params = [self.params[n].detach() for n in names]
        plan = self._plan(names)
        snap = self._buffer(plan.starts[-1] + 1, params[0])
        views = [snap[a:b].view(p.shape) for a, b, p in zip(plan.starts, plan.starts[1:], params)]
        _copy_all(views, params)  # before the step: the seed, except at the kept entries
        opt.step()
        old_idx, old_seed = self._kept_flat(plan)
        snap[old_idx] = old_seed  # now the bucket's seed
        cur = torch.cat([p.reshape(-1) for p in params] + [snap[-1:]])
        return params, plan, snap, views, cur, old_idx, old_seed

    def _project_bucket(self, names: list[str], opt: torch.optim.Optimizer, reselect: bool):
        """Update one bucket and project it (tensor and row silos, or any silo between
        re-selections); returns (kept both before and after, kept after, kept before)."""
        params, plan, snap, views, cur, old_idx, old_seed = self._update(names, opt)
        if reselect:
            d = distance(cur, snap, self.distance)
            d[-1] = -1.0  # the spare: below every distance, never kept
            idx, cuts = self._select_flat(plan, d)
            del d
            seed_vals = snap[idx]
        else:
            idx, seed_vals, cuts = old_idx, old_seed, None
        vals = cur[idx]
        snap[idx] = vals
        _copy_all(params, views)  # the seed, except the kept entries' new values
        self._record(plan, idx, seed_vals, vals, cuts)
        return _common(idx, old_idx, plan.starts[-1]), len(idx), len(old_idx)

    def _record(self, plan: _Plan, idx: torch.Tensor, seed_vals: torch.Tensor, vals: torch.Tensor,
                cuts: list[int] | None) -> None:
        """Store a bucket's kept set (flat positions, their seed and current values) as each
        tensor's kept set; `cuts` (where each tensor's share starts in idx) None: unchanged."""
        names = plan.names
        for n in names:
            self._nonseed.pop(n, None)
        self._nonseed[names[0]] = _differ(vals, seed_vals)
        self._nonfinite[names[0]] = torch.count_nonzero(~torch.isfinite(vals))  # vals are now the kept entries
        if cuts is None:
            return
        # each tensor's positions, as views of one tensor; the flat ones are not kept (8 bytes an
        # entry): `_kept_flat` rebuilds them from these and the per-tensor counts
        counts = torch.tensor(cuts, device=idx.device).diff()
        local = idx - _offsets(plan.first, counts, len(idx))
        kept = []
        for n, a, b in zip(names, cuts, cuts[1:]):
            self.kept[n] = _Kept(local[a:b], seed_vals[a:b])
            kept.append(self.kept[n])
        self._bucket_kept[names[0]] = (tuple(names), tuple(kept), local, seed_vals, counts)

    def _global_batched(self, buckets: list[list[str]], optimizers: Mapping[str, torch.optim.Optimizer]) -> list:
        """`_select_global` a bucket at a time: the pool holds per bucket its candidates (see
        `_Candidates`); a cut rewrites a bucket's parameters in one pass. Returns the churn
        counts per bucket."""
        K = self.alloc
        wide = torch.float64 if any(p.dtype == torch.float64 for p in self.params.values()) else torch.float32
        pool: list[_Candidates] = []
        size, floor = 0, None
        for names in buckets:
            params, plan, snap, views, cur, old_idx, _ = self._update(names, optimizers[names[0]])
            d = distance(cur, snap, self.distance)[:-1]
            idx = positions_above(d, floor, strict=True) if floor is not None else None
            if idx is None or len(idx) > K:
                idx = top_indices(d, K)
                if floor is not None:
                    idx = idx[d[idx] > floor]
            dist = d[idx].to(wide)
            del d
            c = _Candidates(plan, idx, snap[idx], cur[idx], dist, old_idx)
            snap[idx] = c.vals
            _copy_all(params, views)
            pool.append(c)
            size += len(idx)
            if size > 4 * K:
                floor, size = self._cut_batched(pool, K), K
        if size > K:
            self._cut_batched(pool, K)
        cuts = torch.cat([torch.searchsorted(c.idx, c.plan.starts_dev) for c in pool]).tolist()
        out, at = [], 0
        for c in pool:
            n = len(c.plan.starts)
            self._record(c.plan, c.idx, c.seed_vals, c.vals, cuts[at:at + n])
            at += n
            out.append((_common(c.idx, c.old_idx, c.plan.starts[-1]), len(c.idx), len(c.old_idx)))
        return out

    def _cut_batched(self, pool: list[_Candidates], K: int) -> float:
        """Keep the pool's top-K (ties to the lower position), put the rest back to the seed;
        return the K-th largest distance."""
        shares, kth = _pool_cut([c.dist for c in pool], K)
        for c, mine in zip(pool, shares):
            if mine is None:
                continue
            params = [self.params[n].detach() for n in c.plan.names]  # this bucket lost some entries
            flat = torch.cat([p.reshape(-1) for p in params])
            flat[c.idx] = c.seed_vals  # every candidate back to the seed, then the survivors' values
            c.idx, c.seed_vals, c.vals, c.dist = c.idx[mine], c.seed_vals[mine], c.vals[mine], c.dist[mine]
            flat[c.idx] = c.vals
            _copy_all(params, [flat[a:b].view(p.shape) for a, b, p in zip(c.plan.starts, c.plan.starts[1:], params)])
        return kth

    def _plan(self, names: list[str]) -> _Plan:
        """How `_select_flat` treats each tensor of a bucket (fixed for the run: made once)."""
        plan = self._plans.get(names[0])
        if plan is not None and plan.names == tuple(names):
            return plan
        dev = self.params[names[0]].device
        starts = [0, *itertools.accumulate(self.params[n].numel() for n in names)]
        rows, small, large = [], [], []
        for n, a, b in zip(names, starts, starts[1:]) if self.silo != "global" else ():
            k = self.alloc[n]
            r = silo_rows(self.shapes[n], self.silo)
            m, kmax = (b - a) // r, int(k.max())
            if kmax >= m and bool((k >= m).all()):  # every entry may stay: the moved ones do
                rows.append((a, b, r, m, None, kmax))
            elif r == 1 and m < SAMPLED_MIN:  # small silos: all of the bucket's in one padded batch
                small.append((a, b, kmax))
            elif r > 1:  # a tensor's rows: one topk along them
                rows.append((a, b, r, m, k.to(dev), kmax))
            else:
                large.append((a, b, kmax))
        pad = None
        if small:  # (silos, longest) positions into the flat bucket; the padding points at the spare
            width = max(b - a for a, b, _ in small)
            at = torch.full((len(small), width), starts[-1], dtype=torch.long)
            for i, (a, b, _) in enumerate(small):
                at[i, :b - a] = torch.arange(a, b)
            pad = (at.to(dev), torch.tensor([k for _, _, k in small], device=dev), max(k for _, _, k in small))
        starts_dev = torch.tensor(starts, device=dev)
        plan = _Plan(tuple(names), starts, starts_dev, starts_dev[:-1], rows, pad, large, torch.tensor([a for a, _, _ in large], device=dev),
                     torch.tensor([k for _, _, k in large], device=dev))
        self._plans[names[0]] = plan
        return plan

    def _kept_flat(self, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """A bucket's kept positions (flat over the bucket) and their seed values: from what the
        last batched step left, or gathered from the per-tensor kept sets (after `restore`)."""
        names = plan.names
        c = self._bucket_kept.get(names[0])
        if c is not None and c[0] == names and all(self.kept[n] is k for n, k in zip(names, c[1])):
            _, _, local, seed_vals, counts = c
            return local + _offsets(plan.first, counts, len(local)), seed_vals
        idx = torch.cat([self.kept[n].idx + a for n, a in zip(names, plan.starts)])
        return idx, torch.cat([self.kept[n].seed_vals for n in names])

    def _select_flat(self, plan: _Plan, d: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The kept positions of a bucket (flat, ascending) from its flat distances, and where
        each tensor's share starts and ends in them: every small or row silo by one topk along
        its rows, all large tensor silos together through `segments_keep`. Two waits for the
        device, three with large silos."""
        keep = torch.zeros(d.shape, dtype=torch.bool, device=d.device)  # with the spare entry
        for a, b, r, m, k, kmax in plan.rows:
            if k is None:
                torch.gt(d[a:b], 0, out=keep[a:b])
            else:
                keep[a:b] = rows_keep(d[a:b].view(r, m), k, kmax).view(-1)
        if plan.small is not None:
            at, k, kmax = plan.small
            keep[at] = rows_keep(d[at], k, kmax)  # the padding (distance -1) is never kept
        ok = segments_keep(d, keep, plan.large, plan.large_starts, plan.large_ks) if plan.large else None
        idx = torch.nonzero(keep[:-1]).reshape(-1)
        cuts = torch.searchsorted(idx, plan.starts_dev)
        info = (cuts if ok is None else torch.cat([cuts, ok.long()])).tolist()
        cuts = info[:len(plan.starts)]
        if not all(info[len(plan.starts):]):  # a sample misled: select those silos alone, exactly
            for (a, b, k), good in zip(plan.large, info[len(plan.starts):]):
                if not good:
                    keep[a:b] = False
                    keep[a:b][top_indices(d[a:b], k, numpy=False)] = True
            idx = torch.nonzero(keep[:-1]).reshape(-1)
            cuts = torch.searchsorted(idx, plan.starts_dev).tolist()
        return idx, cuts

    def buckets(self, limit: int | None = None, *, tensors: int | None = None) -> list[list[str]]:
        """The parameters to step, grouped for one optimizer each: consecutive tensors of one dtype
        and device whose entries add up to at most `limit`, or else `tensors` times the largest
        tensor's (default 1, BATCHED_BUCKET for a batched DST, HELD_BUCKET on the CPU kernels
        with a seed held), but at least BUCKET_MIN entries. With 1, stepping a
        bucket at once keeps the snapshot at one tensor's size.
        Fewer, larger optimizer calls save most of their per-call cost (one AdamW call per tensor
        of the bundled model took 4.7 ms per step against 2.8-3.6 ms for one call over all of
        them). A batched DST's default is BATCHED_BUCKET times the largest tensor: each bucket
        then costs a fixed number of kernel launches and waits, whatever its tensors (on an
        H200, 1.3B model: 1 / 4 / 16 largest tensors, DST step 4.5x / 2.3x / 1.7x full
        fine-tuning's, scratch +93 / +277 / +1,050 MB)."""
        order = [n for n in self.params if n not in self.frozen]
        if limit is None:
            if tensors is not None and tensors < 1:
                raise DstError(f"a bucket must hold at least 1 tensor's worth of entries, got {tensors}")
            largest = max((self.params[n].numel() for n in order), default=0)
            held = self.seed is not None and self._many
            per = tensors if tensors is not None else (BATCHED_BUCKET if self.batched else HELD_BUCKET if held else 1)
            limit = max(largest * per, BUCKET_MIN)
        out: list[list[str]] = []
        size = 0
        for n in order:
            p, prev = self.params[n], self.params[out[-1][0]] if out else None
            if prev is None or size + p.numel() > limit or p.dtype != prev.dtype or p.device != prev.device:
                out.append([])
                size = 0
            out[-1].append(n)
            size += p.numel()
        return out

    def _buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """A reused flat scratch of n entries (dtype and device of `like`)."""
        s = self._scratch
        if s is None or s.numel() < n or s.dtype != like.dtype or s.device != like.device:
            s = self._scratch = torch.empty(n, dtype=like.dtype, device=like.device)
        return s[:n]

    def _run(self, seed_of) -> StepStats:
        self.step_count += 1
        self._counted = False
        reselect = self._due()
        old = {n: k.idx for n, k in self.kept.items()} if reselect else None
        if reselect and self.silo == "global":
            self._select_global(seed_of)
        else:
            small: list[tuple[str, torch.Tensor]] = []  # small silos, projected together
            pending = 0  # their entries: at BUCKET_MIN they are projected, so copies stay one bucket
            for name, p in self.params.items():
                if name in self.frozen:
                    if self.seed is not None:
                        p.detach().copy_(self.seed[name])  # undo whatever the optimizer did
                    continue
                seed = seed_of(name)
                if p.numel() < SAMPLED_MIN and self.gather is None and silo_rows(self.shapes[name], self.silo) == 1:
                    small.append((name, seed.clone()))  # a snapshot's view: the next bucket reuses it
                    pending += p.numel()
                    if pending >= BUCKET_MIN:
                        self._project_small(small, reselect)
                        small, pending = [], 0
                elif reselect:
                    self._select_tensor(name, seed)
                else:  # the kept set stays; its seed values come out the same from `seed`
                    self._reset_outside(name, seed, self.kept[name].idx)
            if small:
                self._project_small(small, reselect)
        entered = left = 0
        if reselect:
            both = _total(_common(k.idx, old[name], self.params[name].numel()) for name, k in self.kept.items())
            entered = sum(len(k.idx) for k in self.kept.values()) - both
            left = sum(len(i) for i in old.values()) - both
        return StepStats(self.step_count, self.nonseed(), entered, left, reselect)

    # ---- projection of one tensor ----------------------------------------------------------

    def _project_small(self, small: list[tuple[str, torch.Tensor]], reselect: bool) -> None:
        """Project small tensor silos (under SAMPLED_MIN entries each; (name, seed) pairs) at once,
        one batch per dtype and device. Alone, each costs ~100 us of small kernels (LayerNorm
        weights, biases)."""
        kinds: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for name, seed in small:
            kinds.setdefault((self.params[name].dtype, self.params[name].device), []).append((name, seed))
        for batch in kinds.values():
            self._small_batch(batch, reselect)

    def _small_batch(self, small: list[tuple[str, torch.Tensor]], reselect: bool) -> None:
        """`_project_small` for one dtype and device: the silos concatenated, selected by one
        topk along the rows of a padded (silos, longest) matrix, reset by one multi-tensor copy."""
        names = tuple(n for n, _ in small)
        params = [self.params[n].detach() for n in names]
        starts = [0, *itertools.accumulate(p.numel() for p in params)]
        cur = torch.cat([p.reshape(-1) for p in params])
        seed = torch.cat([s.reshape(-1) for _, s in small])
        if reselect and kernels.serves(cur, seed):  # selection and reset in one call: cur becomes the result
            ks = self._small_plan(names, starts, cur.device)[1]
            if names not in self._row_hints:
                self._row_hints[names] = kernels.hints(len(names), cur.dtype)
            pos, seed_vals, differ = kernels.rows(cur, seed, ks.numpy(), self.distance, self._row_hints[names],
                                                  np.array(starts, dtype=np.int64))
            _copy_all(params, [cur[a:b].view(p.shape) for a, b, p in zip(starts, starts[1:], params)])
        else:
            if reselect:
                at, ks, kmax = self._small_plan(names, starts, cur.device)
                d = distance(cur, seed, self.distance)
                d = torch.cat([d, d.new_full((1,), -1.0)])  # the padding points here: never kept
                pos = at[rows_keep(d[at], ks, kmax, ties="check" if d.device.type == "cpu" else "always")]
            else:
                pos = torch.cat([self.kept[n].idx + a for n, a in zip(names, starts)])
            seed_vals, vals = seed[pos], cur[pos]
            seed[pos] = vals  # the seed, except the kept entries' new values
            _copy_all(params, [seed[a:b].view(p.shape) for a, b, p in zip(starts, starts[1:], params)])
            differ = _differ(vals, seed_vals)
        cuts = torch.searchsorted(pos, torch.tensor(starts, device=pos.device)).tolist()
        counts = torch.tensor(cuts, device=pos.device).diff()
        local = pos - _offsets(torch.tensor(starts[:-1], device=pos.device), counts, len(pos))
        for n, a, b in zip(names, cuts, cuts[1:]):
            self.kept[n] = _Kept(local[a:b], seed_vals[a:b])
            self._nonseed.pop(n, None)
        self._nonseed[names[0]] = differ

    def _small_plan(self, names: tuple[str, ...], starts: list[int], device: torch.device):
        """For `_project_small`: each silo's positions in the concatenation as a row padded with
        the spare position, the budgets, the largest budget (made once per group of names)."""
        if names not in self._small_plans:  # tensor silos, or vectors' row silos: one budget each
            width = max(b - a for a, b in zip(starts, starts[1:]))
            at = torch.full((len(names), width), starts[-1], dtype=torch.long)
            for i, (a, b) in enumerate(zip(starts, starts[1:])):
                at[i, :b - a] = torch.arange(a, b)
            ks = torch.stack([self.alloc[n].sum() for n in names])
            self._small_plans[names] = (at.to(device), ks.to(device), int(ks.max()))
        return self._small_plans[names]

    def _reset_outside(self, name: str, seed: torch.Tensor, idx: torch.Tensor) -> None:
        """Set the parameter to `seed` except at positions idx, which become its kept set."""
        flat = self.params[name].detach().view(-1)
        if kernels.serves(flat, seed):
            vals, seed_vals = kernels.reset(flat, seed.view(-1), idx)
        else:
            vals = flat[idx]
            seed_vals = seed.reshape(-1)[idx]
            flat.copy_(seed.reshape(-1))
            flat[idx] = vals
        self.kept[name] = _Kept(idx, seed_vals)
        self._nonseed[name] = _differ(vals, seed_vals)

    def _select_tensor(self, name: str, seed: torch.Tensor) -> None:
        p = self.params[name].detach()
        rows = silo_rows(self.shapes[name], self.silo)
        k = int(self.alloc[name][0])
        if rows == 1 and self.gather is None and self._top_fused(name, seed, k):
            return
        if rows > 1 and kernels.serves(p, seed):
            self._project_rows(name, seed)
            return
        d = distance(p, seed, self.distance)
        if rows == 1:
            idx = top_indices(d.view(-1), k)
            if self.gather is not None:  # the silo spans processes: agree on its top-k
                idx = self._agree(d.view(-1)[idx], idx, self.shards[name][1], k, p.numel())
        else:  # row silos: a process holds whole rows (fully_shard splits along dim 0)
            row_len = int(torch.Size(self.shapes[name][1:]).numel())
            first = self.shards[name][1] // row_len if self.shards else 0
            local = p.numel() // row_len
            idx = rows_indices(d.view(local, row_len), self.alloc[name][first:first + local])
        del d
        self._reset_outside(name, seed, idx)

    def _top_fused(self, name: str, seed: torch.Tensor, k: int) -> bool:
        """A tensor silo's selection and reset in one call on the CPU kernels (kernels.top: the
        sampled bracket of select.top_positions, no distance tensor); False where they do not
        serve (as top_positions) or the sample misled, having changed nothing."""
        p = self.params[name].detach()
        m = p.numel()
        if not (0 < k < m and m >= SAMPLED_MIN and kernels.serves(p, seed)):
            return False
        got = kernels.top(p.view(-1), seed.view(-1), self.distance, k, *sparse_bracket(m, k), work=self._work)
        if got is None:
            return False
        idx, seed_vals, self._nonseed[name] = got
        self.kept[name] = _Kept(idx, seed_vals)
        return True

    def _project_rows(self, name: str, seed: torch.Tensor) -> None:
        """Row silos' selection and reset in one call on the CPU kernels (kernels.rows), each row's
        ranking started from its k-th largest distance of the last selection."""
        p = self.params[name].detach()
        row_len = int(torch.Size(self.shapes[name][1:]).numel())
        local = p.numel() // row_len
        first = self.shards[name][1] // row_len if self.shards else 0  # a process holds whole rows
        hint = self._row_hints.get(name)
        if hint is None:
            hint = self._row_hints[name] = kernels.hints(local, p.dtype)
        idx, seed_vals, self._nonseed[name] = kernels.rows(
            p.view(local, row_len), seed.view(local, row_len), self.alloc[name][first:first + local].numpy(),
            self.distance, hint)
        self.kept[name] = _Kept(idx, seed_vals)

    def _agree(self, vals: torch.Tensor, idx: torch.Tensor, offset: int, k: int, n: int) -> torch.Tensor:
        """The local positions of a silo's top-k when each process offers its own top-k
        candidates: candidates arrive in ascending global position, so ranking them with the
        usual tie rule gives exactly the single-process answer."""
        all_vals, all_pos = self.gather(vals.to(torch.float64), idx + offset)
        chosen = all_pos[top_indices(all_vals, k)]
        return chosen[(chosen >= offset) & (chosen < offset + n)] - offset

    def _select_global(self, seed_of) -> None:
        """One silo over all tensors, tensor by tensor, in O(budget) memory.

        A pool holds the entries that can still be in the global top-K, in ascending global
        position, with their distances and seed values. Each tensor contributes at most its own
        top-K (nothing outside it can be in the global top-K), and only entries above the pool's
        running K-th largest distance once the pool has K (an entry equal to it has a later
        position than K entries at least as far, so it loses the tie). When the pool passes 4K it
        is cut back to its top-K, and the entries cut are reset to their seed values on the spot.
        """
        K = self.alloc
        # distances are float32 unless a tensor is float64 (select.distance): the pool's dtype
        wide = torch.float64 if any(p.dtype == torch.float64 for p in self.params.values()) else torch.float32
        pool: list[tuple[str, torch.Tensor]] = []  # (name, distances of that tensor's kept entries)
        size, floor = 0, None  # floor: the pool's K-th largest distance, once it holds K
        for name in self.params:
            vals = self._global_share(name, seed_of(name), floor, K)
            pool.append((name, vals.to(wide)))
            size += len(vals)
            if size > 4 * K:
                floor, size = self._cut_pool(pool, K), K
        if size > K:
            self._cut_pool(pool, K)
        if self.gather is not None:  # each process now holds its own top-K: agree on the global one
            self._cut_pool(pool, K, self._global_keep(pool, K))

    def _global_share(self, name: str, seed: torch.Tensor, floor: float | None, K: int) -> torch.Tensor:
        """Make a tensor's kept set the entries that can still be in the global top-K (its own
        top-K, of those only the ones above the pool's floor, if any) and reset the rest to
        `seed`; return their distances (ascending positions)."""
        p = self.params[name].detach()
        fused = kernels.serves(p, seed)  # on the CPU: no distance tensor
        if fused and (floor is not None or K >= p.numel()):  # all above the floor (or 0), if at most K
            got = kernels.share(p.view(-1), seed.view(-1), self.distance, floor or 0.0, True, K)
            if got is not None:
                idx, vals, seed_vals, self._nonseed[name] = got
                self.kept[name] = _Kept(idx, seed_vals)
                return vals
        # its own top-K: where more than K lie above the floor (or there is none) all of them do
        if fused and self._top_fused(name, seed, K):
            kept = self.kept[name]
            return distance(p.view(-1)[kept.idx], kept.seed_vals, self.distance)
        d = distance(p, seed, self.distance).view(-1)
        idx = positions_above(d, floor, strict=True) if floor is not None else None
        if idx is None or len(idx) > K:
            idx = top_indices(d, K)
        vals = d[idx]
        if floor is not None:
            above = vals > floor
            idx, vals = idx[above], vals[above]
        self._reset_outside(name, seed, idx)
        return vals

    def _global_keep(self, pool: list[tuple[str, torch.Tensor]], K: int) -> torch.Tensor:
        """Which local pool entries are in the top-K over all processes, by (distance, position
        in name order then flat order)."""
        start, starts = 0, {}
        for name in self.params:
            starts[name] = start
            start += int(torch.Size(self.shapes[name]).numel())
        pos = torch.cat([self.kept[name].idx + (starts[name] + self.shards[name][1]) for name, _ in pool])
        all_d, all_pos = self.gather(torch.cat([v for _, v in pool]), pos)
        order = torch.argsort(all_pos)
        chosen = all_pos[order][top_indices(all_d[order], K)]
        return torch.isin(pos, chosen)

    def _cut_pool(self, pool: list[tuple[str, torch.Tensor]], K: int, keep: torch.Tensor | None = None) -> float:
        """Keep the pool's top-K (ties to the lower position), or the entries `keep` marks, reset
        the rest; return the K-th largest distance."""
        if keep is None and all(self._cuttable(name, vals) for name, vals in pool):
            return self._cut_fused(pool, K)
        shares, kth = _pool_cut([v for _, v in pool], K, keep)
        for i, ((name, vals), mine) in enumerate(zip(pool, shares)):
            if mine is None:
                continue
            kept = self.kept[name]  # this tensor lost some entries
            flat = self.params[name].detach().view(-1)
            idx, seed_vals = kept.idx[mine], kept.seed_vals[mine]
            vals_now = flat[idx]
            flat[kept.idx] = kept.seed_vals  # all back to the seed, then the survivors' values again
            flat[idx] = vals_now
            self.kept[name] = _Kept(idx, seed_vals)
            self._nonseed[name] = _differ(vals_now, seed_vals)
            pool[i] = (name, vals[mine])
        return kth

    def _cuttable(self, name: str, vals: torch.Tensor) -> bool:
        """Whether kernels.cut_many takes this part of the pool (compacted in place)."""
        kept = self.kept[name]
        return (kernels.serves(self.params[name], kept.seed_vals) and kept.idx.dtype == torch.long
                and kept.idx.is_contiguous() and vals.is_contiguous())

    def _cut_fused(self, pool: list[tuple[str, torch.Tensor]], K: int) -> float:
        """`_cut_pool` on the CPU: the K-th largest distance from a sampled bracket, then one pass
        over each part keeps, compacts and resets (kernels.cut_many), in pool order for the ties
        (or on several threads where every tie fits)."""
        tau, need, ties = kth_largest([vals.numpy() for _, vals in pool], K)
        left = np.array([need], dtype=np.int64)  # ties at tau that still fit, counted down in order
        cuts = kernels.cut_many([(self.params[name].detach().view(-1), self.kept[name].idx, self.kept[name].seed_vals,
                                  vals) for name, vals in pool], tau, left, ties == need)
        for i, ((name, vals), (k, differ)) in enumerate(zip(pool, cuts)):
            kept = self.kept[name]
            if k == len(vals):
                continue
            idx, seed_vals, vals = kept.idx[:k], kept.seed_vals[:k], vals[:k]
            if 2 * k * idx.element_size() < idx.untyped_storage().nbytes():  # let larger buffers go
                idx, seed_vals, vals = idx.clone(), seed_vals.clone(), vals.clone()
            self.kept[name] = _Kept(idx, seed_vals)
            self._nonseed[name] = differ
            pool[i] = (name, vals)
        return tau

    # ---- resuming -------------------------------------------------------------------------------

    @torch.no_grad()
    def restore(self, kept: Mapping[str, torch.Tensor], step_count: int, values: Mapping[str, torch.Tensor]) -> None:
        """Continue a run: call while the parameters still hold the seed. `kept[name]` gives a
        tensor's kept positions (ascending) and `values[name]` its trained values there."""
        self._nonseed.clear()
        self._nonfinite.clear()
        self._counted = False
        for name, p in self.params.items():
            flat = p.detach().view(-1)
            # contiguous: the kernels read the kept positions by address
            idx = kept.get(name, torch.empty(0, dtype=torch.long)).to(device=p.device, dtype=torch.long).contiguous()
            vals = values.get(name, flat.new_empty(0)).to(p.device)
            if (len(vals) != len(idx) or vals.dtype != p.dtype or (len(idx) and (
                    int(idx.min()) < 0 or int(idx.max()) >= flat.numel() or not bool((idx[1:] > idx[:-1]).all())))):
                raise DstError(f"saved kept set of {name!r} does not fit {p.dtype}{list(p.shape)}: "
                               "the training state is corrupt or from another model")
            self.kept[name] = _Kept(idx, flat[idx].clone())
            flat[idx] = vals
            self._nonseed[name] = _differ(vals, self.kept[name].seed_vals)
        self.step_count = step_count

    def nonfinite(self) -> int:
        """How many kept entries are NaN or infinite (the optimizer diverged)."""
        if self._counted:  # counted bucket by bucket in the last step
            return _total(self._nonfinite.values())
        return _total(torch.count_nonzero(~torch.isfinite(self.params[n].detach().reshape(-1)[k.idx]))
                      for n, k in self.kept.items() if len(k.idx))

    # ---- reading the state ------------------------------------------------------------------

    def nonseed(self) -> int:
        """How many entries differ from the seed (bit for bit) after the last step: only kept
        entries can, and each projection counts them while it has them in hand."""
        return _total(self._nonseed.values())

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The kept sets as boolean masks shaped like the parameters."""
        out = {}
        for name, p in self.params.items():
            m = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            m[self.kept[name].idx] = True
            out[name] = m.view(p.shape)
        return out

    def seed_tensor(self, name: str) -> torch.Tensor:
        """The seed of one parameter (rebuilt from the kept entries when no copy is held)."""
        if self.seed is not None:
            return self.seed[name]
        s = self.params[name].detach().clone()
        k = self.kept[name]
        s.view(-1)[k.idx] = k.seed_vals
        return s

    def silo_info(self, name: str) -> dict:
        """A tensor's budget facts, as the patch header records them."""
        info = {"strategy": self.silo}
        if self.silo != "global":
            info.update(silos=silo_rows(self.shapes[name], self.silo), budget=int(self.alloc[name].sum()))
        return info

    def changes(self) -> list[Change]:
        """The trained state as patch entries: every non-seed entry, lossless against the seed."""
        if self.shards:
            raise DstError("this DST holds slices of the parameters: build the patch with "
                           "dstcli.distributed (each process's kept entries), not changes()")
        return [Change.between(name, self.seed_tensor(name).cpu(), p.detach().cpu(), silo=self.silo_info(name))
                for name, p in self.params.items()]
