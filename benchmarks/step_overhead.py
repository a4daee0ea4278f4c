"""Training-step time and memory of DST against full fine-tuning, side by side in one run.

    python benchmarks/step_overhead.py                          # bundled model and a 25M model, CPU
    python benchmarks/step_overhead.py --models 25m --eps 1e-3 --silos tensor
    python benchmarks/step_overhead.py --device cuda --models 1.3b --batch 8 --seq 512

Per configuration (model, epsilon, silo) it times, interleaved round by round on the same inputs:
  full    one AdamW over all parameters: forward, backward, step (plain fine-tuning; fused
          AdamW on a GPU, in every mode);
  dst     what `dstcli train` runs: one AdamW per bucket of consecutive tensors (DST.buckets),
          each bucket projected right after its own update by dstcli's engine (no seed copy):
          against the base's tensors memory-mapped from a safetensors file (--seed mapped, the
          CPU default, as `dstcli train` on a CPU), or against a snapshot of each bucket taken
          before its update (--seed snapshot, the default on a GPU);
  obvious the textbook projection after one AdamW step: a full fp32 copy of the seed, distance,
          torch.topk per silo, torch.where (the baseline the lean engine replaces).
Each step = forward + backward + optimizer + projection, median over the timed rounds. The update
(optimizer + projection) is also timed alone: forward and backward are the same work in every
mode, so "dst / full by updates" = (full step + dst update - full update) / full step is the
same ratio with far less of this machine's noise in it. Peak memory:
on CPU each mode runs alone in a child process for 3 steps and reports its peak RSS (VmHWM) and
the part of its RSS at the end mapped from files (RssFile: the libraries, and a mapped seed, whose
clean pages the kernel may drop and read again); on CUDA,
torch.cuda.max_memory_allocated per mode. Weights are float32 unless --weights bf16; autocast
bf16 on CUDA (as `dstcli train` does there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.nn import functional as F

from dstcli.checkpoint import Checkpoint
from dstcli.engine import DST, bucket_optimizers
from dstcli.errors import DstError
from dstcli.model import GPT, GPTConfig
from dstcli.silos import allocate, silo_rows

MODELS = {
    "tiny": GPTConfig(),  # the bundled samples/tiny-gpt architecture, 1.36M parameters
    "25m": GPTConfig(block_size=128, n_layer=8, n_head=8, n_embd=512),
    "1.3b": GPTConfig(block_size=512, n_layer=24, n_head=16, n_embd=2048),
}
MODES = ("full", "dst", "obvious")
BATCHED = {"auto": None, "on": True, "off": False}


class Obvious:
    """The obvious projection: full fp32 seed copy, distance, torch.topk per silo, torch.where."""

    def __init__(self, named: dict[str, torch.nn.Parameter], eps: float, silo: str):
        self.named = named
        self.seed = {n: p.detach().float().clone() for n, p in named.items()}
        self.alloc = allocate({n: tuple(p.shape) for n, p in named.items()}, silo, epsilon=eps)
        self.silo = silo

    @torch.no_grad()
    def project(self) -> None:
        ds = {n: (p.detach().float() - self.seed[n]).abs_() for n, p in self.named.items()}
        masks = {}
        if self.silo == "global":
            flat = torch.cat([d.view(-1) for d in ds.values()])
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.topk(flat, self.alloc, sorted=False).indices] = True
            at = 0
            for n, d in ds.items():
                masks[n] = keep[at:at + d.numel()].view(d.shape)
                at += d.numel()
        else:
            for n, d in ds.items():
                rows = d.view(silo_rows(tuple(d.shape), self.silo), -1)
                k = int(self.alloc[n].max())
                keep = torch.zeros_like(rows, dtype=torch.bool)
                if k:
                    keep.scatter_(1, torch.topk(rows, k, dim=1, sorted=False).indices, True)
                masks[n] = keep.view(d.shape)
        for n, p in self.named.items():
            p.copy_(torch.where(masks[n], p, self.seed[n].to(p.dtype)))


class Runner:
    def __init__(self, mode: str, cfg: GPTConfig, eps: float, silo: str, device: torch.device, weights: torch.dtype,
                 bucket: float | None = None, batched: bool | None = None, seed: str = "snapshot",
                 pool: bool = False):
        torch.manual_seed(0)
        with device:  # initialized where it runs (a 1.3B model's init on the CPU takes a minute)
            self.model = GPT(cfg)
        self.model.to(dtype=weights)
        self.mode, self.device = mode, device
        self.amp = torch.bfloat16 if device.type == "cuda" else None
        named = dict(self.model.named_parameters())
        fused = True if device.type == "cuda" else None  # as `dstcli train` does on a GPU

        def adamw(ps):
            return torch.optim.AdamW(ps, lr=1e-3, fused=fused)
        if mode == "dst":
            held = "none"
            if seed == "mapped":  # as `dstcli train` maps its base: the model saved, then mapped
                from safetensors.torch import save_file
                self.tmp = tempfile.TemporaryDirectory()
                path = os.path.join(self.tmp.name, "base.safetensors")
                save_file({n: p.detach() for n, p in named.items()}, path)
                held = Checkpoint(path).mapped(list(named))
            self.dst = DST(named.items(), epsilon=eps, silo=silo, seed=held, batched=batched)
            if pool:  # the global silo's pool at every step, as before the band (an A/B only)
                self.dst._band_wait = 1 << 62
            # as `dstcli train` does: one AdamW per bucket of tensors
            limit = None if bucket is None else int(bucket * max(p.numel() for p in named.values()))
            self.opts = bucket_optimizers(self.dst.buckets(limit), named, adamw)
        else:
            self.opt = adamw(list(self.model.parameters()))
            self.obvious = Obvious(named, eps, silo) if mode == "obvious" else None

    def step(self, x: torch.Tensor) -> tuple[float, float]:
        """Seconds for the whole step, and for its update (optimizer + projection) alone."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(x[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        u = time.perf_counter()
        if self.mode == "dst":
            self.dst.step(self.opts)
        else:
            self.opt.step()
            if self.obvious:
                self.obvious.project()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        return end - t, end - u


def batches(cfg: GPTConfig, args, device: torch.device, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device) for _ in range(n)]


def child(args) -> None:
    """One mode alone for --steps steps; prints its peak memory (the parent's memory column)."""
    device = torch.device(args.device)
    cfg = MODELS[args.models[0]]
    weights = torch.bfloat16 if args.weights == "bf16" else torch.float32
    r = Runner(args.child, cfg, args.eps[0], args.silos[0], device, weights, args.bucket, BATCHED[args.batched],
               args.seed, args.pool)
    for x in batches(cfg, args, device, args.steps):
        r.step(x)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec;
    # RssFile: the resident pages mapped from files (the libraries, and a mapped seed)
    status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status") if "kB" in line}
    print(json.dumps({"peak_rss_mb": status["VmHWM"] / 1024, "file_mb": status["RssFile"] / 1024}))


def peak_memory_mb(mode: str, model: str, eps: float, silo: str, args) -> str:
    """The mode's peak memory, as a table cell: on CPU "peak RSS / of it mapped from files"."""
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = MODELS[model]
        r = Runner(mode, cfg, eps, silo, torch.device("cuda"), torch.bfloat16 if args.weights == "bf16" else torch.float32,
                   args.bucket, BATCHED[args.batched], args.seed, args.pool)
        for x in batches(cfg, args, torch.device("cuda"), 3):
            r.step(x)
        del r
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
    cmd = [sys.executable, __file__, "--child", mode, "--models", model, "--eps", str(eps), "--silos", silo,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", "3", "--device", args.device,
           "--weights", args.weights, "--batched", args.batched, "--seed", args.seed] + (["--bucket", str(args.bucket)] if args.bucket else []) + (["--pool"] if args.pool else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return f"{got['peak_rss_mb']:.0f} / {got['file_mb']:.0f}"


def profile_update(r: Runner, x: torch.Tensor, device: torch.device) -> None:
    """Where one DST update (buckets' optimizer steps + projection) spends its time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.autocast(device.type, dtype=r.amp, enabled=r.amp is not None):
        logits = r.model(x[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
    with profile(activities=acts) as prof:
        r.dst.step(r.opts)
        if device.type == "cuda":
            torch.cuda.synchronize()
    r.model.zero_grad(set_to_none=True)
    for key in ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else []):
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40), flush=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "25m"], choices=list(MODELS))
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-6, 1e-4, 1e-3, 1e-2, 1e-1])
    ap.add_argument("--silos", nargs="+", default=["tensor", "row", "global"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed rounds per configuration (after 2 warm-up)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--weights", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-obvious", action="store_true", help="skip the obvious projection (saves memory)")
    ap.add_argument("--bucket", type=float, help="DST bucket limit in largest tensors (default: DST.buckets' own)")
    ap.add_argument("--batched", default="auto", choices=list(BATCHED),
                    help="DST's batched step: auto (DST's own choice), on or off")
    ap.add_argument("--seed", choices=["mapped", "snapshot"],
                    help="DST's seed: the base memory-mapped, or snapshots (default: mapped on cpu, as dstcli train)")
    ap.add_argument("--pool", action="store_true",
                    help="the global silo with a seed held takes its pool at every step, not the band (an A/B)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operations of one DST update per configuration")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seed is None:
        args.seed = "mapped" if args.device == "cpu" else "snapshot"
    if args.child:
        return child(args)
    device = torch.device(args.device)
    weights = torch.bfloat16 if args.weights == "bf16" else torch.float32
    modes = [m for m in MODES if not (args.no_obvious and m == "obvious")]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {dev}, torch {torch.__version__}, batch {args.batch}x{args.seq} tokens, {args.weights} weights, "
          f"median of {args.steps} interleaved steps, batched step {args.batched}, DST seed {args.seed}"
          + (", the global silo's pool" if args.pool else "") + ", DST buckets "
          + (f"{args.bucket:g} largest tensors" if args.bucket else "DST.buckets' default"))
    print("| model | params | epsilon | silo | full ms | dst ms | obvious ms | dst / full | obvious / full | "
          "update ms full / dst / obvious | dst / full by updates |"
          + ("" if args.no_memory else " full MB | dst MB | obvious MB |"))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("" if args.no_memory else "---|---|---|"))
    for model in args.models:
        cfg = MODELS[model]
        for silo in args.silos:
            for eps in args.eps:
                try:
                    runners = {m: Runner(m, cfg, eps, silo, device, weights, args.bucket, BATCHED[args.batched],
                                         args.seed, args.pool) for m in modes}
                except DstError as e:  # e.g. row silos at epsilon 1e-6: every budget is zero
                    print(f"| {model} | | {eps:g} | {silo} | {e} |||||")
                    continue
                n = sum(p.numel() for p in runners["full"].model.parameters())
                xs = batches(cfg, args, device, args.steps + 2)
                times = {m: [] for m in modes}
                updates = {m: [] for m in modes}
                for i, x in enumerate(xs):
                    for m in (modes if i % 2 == 0 else modes[::-1]):  # alternate the order
                        t, u = runners[m].step(x)
                        if i >= 2:
                            times[m].append(t)
                            updates[m].append(u)
                if args.profile:
                    profile_update(runners["dst"], xs[0], device)
                del runners
                med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
                upd = {m: statistics.median(v) * 1e3 for m, v in updates.items()}
                ob = med.get("obvious", float("nan"))
                # forward and backward are the same work in every mode: the full step plus the
                # difference of the updates is a far less noisy estimate of the DST step
                by_upd = (med["full"] + upd["dst"] - upd["full"]) / med["full"]
                row = (f"| {model} | {n / 1e6:.2f}M | {eps:g} | {silo} | {med['full']:.1f} | {med['dst']:.1f} | "
                       f"{ob:.1f} | {med['dst'] / med['full']:.3f} | {ob / med['full']:.3f} | "
                       f"{upd['full']:.1f} / {upd['dst']:.1f} / {upd.get('obvious', float('nan')):.1f} | {by_upd:.3f} |")
                if not args.no_memory:
                    mem = {m: peak_memory_mb(m, model, eps, silo, args) for m in modes}
                    row += " " + " | ".join(mem.get(m, "") for m in MODES) + " |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
