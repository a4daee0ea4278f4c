"""The DST engine: after each optimizer step, keep per silo only the entries farthest from the seed.

Two ways to drive it. The lean one steps the optimizer of each bucket of consecutive tensors
(at most the largest tensor's size) and projects those tensors right away, so no copy of the seed
is ever held (only the kept entries' seed values, O(epsilon n)):

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

Both give bit-identical parameters. The optimizer is untouched: a reset entry keeps its optimizer
state and can come back later (churn). Resets copy the seed bits exactly.

Why the lean way needs no seed: outside the kept set the value before a step *is* the seed value,
so a snapshot of a bucket taken just before its update, with the kept entries' stored seed
values written back, is its tensors' seed. Temporary memory is one bucket (the largest tensor).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from dstcli.dtypes import bits_view
from dstcli.errors import DstError
from dstcli.patchfile import Change
from dstcli.select import DISTANCES, distance, positions_above, top_indices, topk_mask
from dstcli.silos import allocate, budget_total, silo_rows


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


def _common(a: torch.Tensor, b: torch.Tensor, n: int) -> int:
    """How many positions in range(n) two index tensors share (a bitmap of n bools)."""
    if not len(a) or not len(b):
        return 0
    if a.device.type == "cpu":  # NumPy's fancy indexing is 2-3x torch's on CPU
        seen = np.zeros(n, dtype=bool)
        seen[b.numpy()] = True
        return int(np.count_nonzero(seen[a.numpy()]))
    seen = torch.zeros(n, dtype=torch.bool, device=a.device)
    seen[b] = True
    return int(seen[a].sum())


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
            mapping name -> seed tensor (same shape and dtype, e.g. memory-mapped) for `project()`.
        shards, gather: for parameters split over processes (FSDP): the tensors given are each
            process's slice, `shards[name] = (whole shape, first flat position of the slice)`,
            and `gather(values, positions)` concatenates 1-D tensors over processes in order.
            A silo spanning processes then keeps exactly what one process would keep.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, epsilon: float | None = None,
                 params: int | None = None, silo: str = "tensor", distance: str = "absolute",
                 reselect_every: int | None = 1, seed: str | Mapping[str, torch.Tensor] = "copy",
                 shards: Mapping[str, tuple[tuple[int, ...], int]] | None = None,
                 gather: Callable[..., list[torch.Tensor]] | None = None):
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
        self._nonseed: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self._scratch: torch.Tensor | None = None

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

    def _due(self) -> bool:
        if self.reselect_every is None:
            return self.step_count == 1
        return (self.step_count - 1) % self.reselect_every == 0

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

    def buckets(self, limit: int | None = None) -> list[list[str]]:
        """The parameters to step, grouped for one optimizer each: consecutive tensors of one dtype
        and device whose entries add up to at most `limit` (default: the largest tensor's), so
        stepping a bucket at once keeps the snapshot at one tensor's size. Fewer, larger
        optimizer calls save most of their per-call cost (one AdamW call per tensor of the
        bundled model took 4.7 ms per step against 2.8-3.6 ms for one call over all of them)."""
        order = [n for n in self.params if n not in self.frozen]
        if limit is None:
            limit = max((self.params[n].numel() for n in order), default=0)
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
        reselect = self._due()
        old = {n: k.idx for n, k in self.kept.items()} if reselect else None
        if reselect and self.silo == "global":
            self._select_global(seed_of)
        else:
            for name, p in self.params.items():
                if name in self.frozen:
                    if self.seed is not None:
                        p.detach().copy_(self.seed[name])  # undo whatever the optimizer did
                    continue
                seed = seed_of(name)
                if reselect:
                    self._select_tensor(name, seed)
                else:  # the kept set stays; its seed values come out the same from `seed`
                    self._reset_outside(name, seed, self.kept[name].idx)
        entered = left = 0
        if reselect:
            for name, k in self.kept.items():
                both = _common(k.idx, old[name], self.params[name].numel())
                entered += len(k.idx) - both
                left += len(old[name]) - both
        return StepStats(self.step_count, self.nonseed(), entered, left, reselect)

    # ---- projection of one tensor ----------------------------------------------------------

    def _reset_outside(self, name: str, seed: torch.Tensor, idx: torch.Tensor) -> None:
        """Set the parameter to `seed` except at positions idx, which become its kept set."""
        flat = self.params[name].detach().view(-1)
        vals = flat[idx]
        seed_vals = seed.reshape(-1)[idx]
        flat.copy_(seed.reshape(-1))
        flat[idx] = vals
        self.kept[name] = _Kept(idx, seed_vals)
        self._nonseed[name] = (bits_view(vals) != bits_view(seed_vals)).sum()

    def _select_tensor(self, name: str, seed: torch.Tensor) -> None:
        p = self.params[name].detach()
        d = distance(p, seed, self.distance)
        rows = silo_rows(self.shapes[name], self.silo)
        if rows == 1:
            k = int(self.alloc[name][0])
            idx = top_indices(d.view(-1), k)
            if self.gather is not None:  # the silo spans processes: agree on its top-k
                idx = self._agree(d.view(-1)[idx], idx, self.shards[name][1], k, p.numel())
        else:  # row silos: a process holds whole rows (fully_shard splits along dim 0)
            row_len = int(torch.Size(self.shapes[name][1:]).numel())
            first = self.shards[name][1] // row_len if self.shards else 0
            local = p.numel() // row_len
            mask = topk_mask(d.view(local, row_len), self.alloc[name][first:first + local].to(d.device))
            idx = torch.nonzero(mask.view(-1)).view(-1)
        del d
        self._reset_outside(name, seed, idx)

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
            p = self.params[name].detach()
            seed = seed_of(name)
            d = distance(p, seed, self.distance).view(-1)
            idx = positions_above(d, floor, strict=True) if floor is not None else None
            if idx is None or len(idx) > K:
                idx = top_indices(d, K)
            vals = d[idx]
            del d
            if floor is not None:
                above = vals > floor
                idx, vals = idx[above], vals[above]
            self._reset_outside(name, seed, idx)
            pool.append((name, vals.to(wide)))
            size += len(idx)
            if size > 4 * K:
                floor, size = self._cut_pool(pool, K), K
        if size > K:
            self._cut_pool(pool, K)
        if self.gather is not None:  # each process now holds its own top-K: agree on the global one
            self._cut_pool(pool, K, self._global_keep(pool, K))

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
        all_d = torch.cat([v for _, v in pool])
        chosen = top_indices(all_d, K) if keep is None else torch.nonzero(keep).view(-1)  # ascending
        lens = [len(v) for _, v in pool]
        starts = [0, *itertools.accumulate(lens)]
        cuts = torch.searchsorted(chosen, torch.tensor(starts, device=chosen.device)).tolist()  # each tensor's share
        for i, (name, vals) in enumerate(pool):
            n = lens[i]
            if cuts[i + 1] - cuts[i] == n:
                continue
            mine = chosen[cuts[i]:cuts[i + 1]] - starts[i]  # this tensor lost some entries
            kept = self.kept[name]
            flat = self.params[name].detach().view(-1)
            idx, seed_vals = kept.idx[mine], kept.seed_vals[mine]
            vals_now = flat[idx]
            flat[kept.idx] = kept.seed_vals  # all back to the seed, then the survivors' values again
            flat[idx] = vals_now
            self.kept[name] = _Kept(idx, seed_vals)
            self._nonseed[name] = (bits_view(vals_now) != bits_view(seed_vals)).sum()
            pool[i] = (name, vals[mine])
        return float(all_d[chosen].min()) if len(chosen) else 0.0

    # ---- resuming -------------------------------------------------------------------------------

    @torch.no_grad()
    def restore(self, kept: Mapping[str, torch.Tensor], step_count: int, values: Mapping[str, torch.Tensor]) -> None:
        """Continue a run: call while the parameters still hold the seed. `kept[name]` gives a
        tensor's kept positions (ascending) and `values[name]` its trained values there."""
        for name, p in self.params.items():
            flat = p.detach().view(-1)
            idx = kept.get(name, torch.empty(0, dtype=torch.long)).to(device=p.device, dtype=torch.long)
            vals = values.get(name, flat.new_empty(0)).to(p.device)
            if (len(vals) != len(idx) or vals.dtype != p.dtype or (len(idx) and (
                    int(idx.min()) < 0 or int(idx.max()) >= flat.numel() or not bool((idx[1:] > idx[:-1]).all())))):
                raise DstError(f"saved kept set of {name!r} does not fit {p.dtype}{list(p.shape)}: "
                               "the training state is corrupt or from another model")
            self.kept[name] = _Kept(idx, flat[idx].clone())
            flat[idx] = vals
            self._nonseed[name] = (bits_view(vals) != bits_view(self.kept[name].seed_vals)).sum()
        self.step_count = step_count

    def nonfinite(self) -> int:
        """How many kept entries are NaN or infinite (the optimizer diverged)."""
        counts = [(~torch.isfinite(self.params[n].detach().reshape(-1)[k.idx])).sum().cpu()
                  for n, k in self.kept.items() if len(k.idx)]
        return int(torch.stack(counts).sum()) if counts else 0

    # ---- reading the state ------------------------------------------------------------------

    def nonseed(self) -> int:
        """How many entries differ from the seed (bit for bit) after the last step: only kept
        entries can, and each projection counts them while it has them in hand."""
        counts = [c.cpu() for c in self._nonseed.values()]
        return int(torch.stack(counts).sum()) if counts else 0

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
