"""The DST engine: after each optimizer step, keep per silo only the entries farthest from the seed.

    dst = DST(model.named_parameters(), epsilon=1e-3)     # snapshot the seed
    for batch in data:
        loss(batch).backward(); opt.step(); opt.zero_grad()
        stats = dst.project()                              # reset all but the top-k per silo

Plain arguments only (no config objects). The optimizer is untouched: a reset entry keeps its
optimizer state and can come back later (churn). Resets copy the seed bits exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from dstcli.codec import bits_view
from dstcli.errors import DstError
from dstcli.patchfile import Change
from dstcli.select import DISTANCES, GlobalTopK, distance, topk_mask
from dstcli.silos import allocate, budget_total, silo_rows


@dataclass
class StepStats:
    step: int
    nonseed: int  # entries whose bits differ from the seed after projection
    entered: int  # entries that joined the kept set at this step's selection
    left: int  # entries that left it
    reselected: bool


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
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, epsilon: float | None = None,
                 params: int | None = None, silo: str = "tensor", distance: str = "absolute",
                 reselect_every: int | None = 1):
        self.params = dict(named_params)
        if not self.params:
            raise DstError("no parameters to tune")
        if distance not in DISTANCES:
            raise DstError(f"unknown distance {distance!r}: choose one of {', '.join(DISTANCES)}")
        if reselect_every is not None and reselect_every < 1:
            raise DstError(f"reselect_every must be at least 1 (or never), got {reselect_every}")
        self.silo, self.distance, self.reselect_every = silo, distance, reselect_every
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.alloc = allocate(shapes, silo, epsilon=epsilon, params=params)
        self.budget = budget_total(self.alloc)
        if self.budget == 0:
            raise DstError("the budget rounds to zero in every silo: raise --epsilon or --params "
                           "(or use --silo tensor/global instead of row)")
        self.epsilon, self.params_budget = epsilon, params
        self.seed = {n: p.detach().clone() for n, p in self.params.items()}
        self.masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.step = 0

    def _due(self) -> bool:
        if self.reselect_every is None:
            return self.step == 1
        return (self.step - 1) % self.reselect_every == 0

    def _distances(self, name: str) -> torch.Tensor:
        return distance(self.params[name].detach(), self.seed[name], self.distance)

    @torch.no_grad()
    def project(self) -> StepStats:
        """Call after each optimizer step: keep the top-k per silo, reset the rest to the seed."""
        self.step += 1
        reselect = self._due()
        entered = left = 0
        if reselect:
            new_masks = {}
            if self.silo == "global":
                top = GlobalTopK(self.alloc)
                offsets = {}
                for name in self.params:
                    offsets[name] = top.offset
                    top.add(self._distances(name))
                thr = top.threshold()
                for name in self.params:
                    new_masks[name] = top.mask(self._distances(name), offsets[name], thr)
            else:
                for name, p in self.params.items():
                    rows = silo_rows(tuple(p.shape), self.silo)
                    d = self._distances(name).reshape(rows, -1)
                    new_masks[name] = topk_mask(d, self.alloc[name].to(d.device)).reshape(p.shape)
            for name, m in new_masks.items():
                old = self.masks[name]
                entered += int((m & ~old).sum())
                left += int((old & ~m).sum())
            self.masks = new_masks
        nonseed = 0
        for name, p in self.params.items():
            p.copy_(torch.where(self.masks[name], p, self.seed[name]))
            nonseed += int((bits_view(p.detach()) != bits_view(self.seed[name])).sum())
        return StepStats(self.step, nonseed, entered, left, reselect)

    def changes(self) -> list[Change]:
        """The trained state as patch entries: every non-seed entry, lossless against the seed."""
        out = []
        for name, p in self.params.items():
            rows = silo_rows(tuple(p.shape), self.silo)
            info = {"strategy": self.silo}
            if self.silo != "global":
                info.update(silos=rows, budget=int(self.alloc[name].sum()))
            out.append(Change.between(name, self.seed[name].cpu(), p.detach().cpu(), silo=info))
        return out
