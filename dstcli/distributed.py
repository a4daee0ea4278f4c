"""Training on several processes with PyTorch's own stack: torchrun, DDP and FSDP (fully_shard).

    torchrun --nproc-per-node 2 -m dstcli train ... --strategy ddp    # or fsdp

- `ddp`: every rank holds the whole model; DistributedDataParallel averages the gradients, so
  every rank steps and projects identical parameters. `Dist.check_same` compares a digest of
  each rank's kept set (and at the end its values) and stops the run if they ever differ.
- `fsdp`: `fully_shard` splits every parameter along dim 0 (rank r holds rows
  [r*c, (r+1)*c), c = ceil(rows / world)). The engine works on each rank's slice; a silo that
  spans ranks finds its exact top-k collectively (`Dist.gather`: every rank's local top-k
  candidates, at most k per rank, are gathered and ranked the same way on every rank), so the
  kept set is the one a single process would keep with the same parameters. Row silos never span
  ranks. The patch is assembled on rank 0 from each rank's kept entries (O(k) data), with the
  rest of each tensor read from the base checkpoint, never by gathering a parameter.

The global batch is split evenly over ranks, and each rank's loss is scaled so that the averaged
gradient is the mean over the global batch's target tokens, as in one process. Sums over ranks
happen in another order than in one process, so results agree to rounding, not to the bit
(docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch

from dstcli.errors import DstError

STRATEGIES = ("none", "ddp", "fsdp")
LAUNCH = "torchrun --nproc-per-node N -m dstcli train ... --strategy {}"


@dataclass
class Dist:
    strategy: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- collectives -------------------------------------------------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor (1-D, same length across the arguments) concatenated over ranks in rank
        order; lengths may differ between ranks."""
        n = torch.tensor([len(tensors[0])], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        top = max(sizes)
        out = []
        for t in tensors:
            padded = t.new_zeros(top)
            padded[:len(t)] = t
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            torch.distributed.all_gather(parts, padded)
            out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
        return out

    def check_same(self, what: str, tensors: list[torch.Tensor]) -> None:
        """Stop if the ranks' tensors differ (a digest per rank, compared on all ranks)."""
        if self.strategy != "ddp":
            return
        h = hashlib.blake2b(digest_size=8)
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        mine = torch.tensor([int.from_bytes(h.digest(), "little", signed=True)], device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine)
        if any(int(e) != int(mine) for e in every):
            raise DstError(f"the ranks disagree on {what}: DDP replicas drifted apart (a non-deterministic "
                           "kernel or different data per rank); rerun with --strategy none to compare")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ---- the model ---------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module, named: dict[str, torch.nn.Parameter]
             ) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
        """The module to run the training forward through, and `named` (checkpoint key ->
        parameter) pointing at the parameters that module trains (FSDP replaces them)."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids), named
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard
            path = {id(p): n for n, p in model.named_parameters()}
            where = {key: path[id(p)] for key, p in named.items()}
            blocks = set(getattr(model, "_no_split_modules", None) or ()) | {"Block"}  # HF's layers, dstcli's
            for module in list(model.modules())[1:]:
                if type(module).__name__ in blocks:
                    fully_shard(module)
            fully_shard(model)
            params = dict(model.named_parameters())
            return model, {key: params[p] for key, p in where.items()}
        return model, named

    def shard(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
        """FSDP: this rank's slice of a parameter (writable, shares storage) and its first flat
        position in the whole tensor. Otherwise the parameter itself at 0."""
        if self.strategy != "fsdp":
            return p, 0
        local = p.detach().to_local()
        rows = p.shape[0] if p.dim() else 1
        chunk = -(-rows // self.world)
        start = min(self.rank * chunk, rows)
        if local.shape[:1] != (min(chunk, rows - start),) and p.dim():
            raise DstError(f"unexpected FSDP shard {tuple(local.shape)} of a {tuple(p.shape)} parameter: "
                           "dstcli expects fully_shard's even split along dim 0")
        return local, start * (p[0].numel() if p.dim() else 1)

    def split(self, batch: list) -> list:
        """This rank's part of a global batch."""
        if not self.active:
            return batch
        per = len(batch) // self.world
        return batch[self.rank * per:(self.rank + 1) * per]


_joined = False  # this process created a process group (see joined())


def joined() -> bool:
    """Whether this process joined a torch.distributed process group. torch 2.13's DDP keeps
    the gloo group and its worker threads alive after destroy_process_group() (it leaks a
    reference), so such a process can abort during interpreter shutdown ("terminate called
    without an active exception", seen once in CI); the CLI leaves those processes with
    os._exit after flushing its output."""
    return _joined


def init(strategy: str, device: str) -> Dist:
    """Join the process group torchrun set up (or check that none is expected)."""
    if strategy not in STRATEGIES:
        raise DstError(f"unknown --strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "none":
        if world > 1:
            raise DstError(f"launched as {world} processes but --strategy is none: every process would train "
                           "alone and write the same file; add --strategy ddp or --strategy fsdp")
        return Dist()
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise DstError(f"--strategy {strategy} runs one process per device under torchrun: "
                       + LAUNCH.format(strategy))
    import torch.distributed as dist

    if not dist.is_available():
        raise DstError("this torch build has no torch.distributed: install a build with it or use --strategy none")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DstError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    global _joined
    _joined = True
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(strategy, dist.get_rank(), dist.get_world_size(), dev)
