"""Exact per-silo threshold selection against torch.topk, torch.kthvalue and a full sort.

    python benchmarks/selection.py                  # silos of 1M, 16M and 64M at epsilon 1e-3
    python benchmarks/selection.py --sizes 256      # add a 256M silo (needs ~4 GB)
    python benchmarks/selection.py --device cuda --sizes 1 16 64 256 --epsilon 1e-6 1e-3 1e-1
    python benchmarks/selection.py --sizes --rows 2048x512 8192x512 4096x4096 --epsilon 1e-2 1e-1
    python benchmarks/selection.py --sizes --fused 1 16 64 --epsilon 1e-3 1e-1   # CPU kernels
    python benchmarks/selection.py --sizes --project 25 100 1024 16384 --project-rows 2048x512 512x2048 \
        --epsilon 1e-3 1e-2 1e-1                  # a silo's whole projection on the CPU kernels

With --rows, also row silos (a matrix of R rows of M entries, budget epsilon * M per row): dstcli's
`rows_indices` (the kept positions) against torch.topk along the rows (the k-th values only).

Times the exact k-th largest |delta| (k = epsilon * n) of a silo of N(0,1) distances, best of 3
(best of 10 on a GPU, synchronized), and one read pass (d.sum()) for scale. With --fused (CPU), from
a seed x0 and its update x instead (fp32 and bf16): dstcli's fused `top_positions(x, x0, k)`
(dstcli/kernels.c: no distance tensor) against `top_indices(distance(x, x0), k)` and torch.topk of
the distances, the same positions checked, and a read pass over x and x0. With --project (CPU), a
tensor silo's whole projection (selection, reset to the seed outside the kept set, the count of
kept values that differ) in one kernel call, `kernels.top`, against the calls it replaced
(`top_positions`, `kernels.reset`, a count), on 2 threads and on 1 (OpenMP, where the kernels
were built with it); with --project-rows, row silos' `kernels.rows` (with no hint, and with
hints 0.8-1.25x each row's k-th value, as last step's would be) against `distance`,
`rows_indices`, `kernels.reset` and a count. Each timing includes restoring x (a copy, shown).
dstcli's `top_indices` returns the kept positions themselves
(ties resolved), which the others do not; the threshold is the smallest kept value. All methods
must agree on the value; the script checks that.
"""

from __future__ import annotations

import argparse
import time

import torch

import numpy as np

from dstcli import kernels
from dstcli.dtypes import bits_view
from dstcli.select import distance, rows_indices, sparse_bracket, top_indices, top_positions


def best(fn, device: torch.device, reps: int = 3) -> tuple[float, torch.Tensor]:
    out, t = None, float("inf")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: kernels loaded, allocator primed
    for _ in range(reps if device.type == "cpu" else reps * 3 + 1):
        sync()
        s = time.perf_counter()
        out = fn()
        sync()
        t = min(t, time.perf_counter() - s)
    return t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1, 16, 64], help="silo sizes in millions")
    ap.add_argument("--rows", nargs="*", default=[], metavar="RxM", help="row silos: R rows of M entries, e.g. 8192x512")
    ap.add_argument("--fused", type=int, nargs="*", default=[], metavar="MIL", help="CPU kernels on silos of MIL millions")
    ap.add_argument("--project", type=int, nargs="*", default=[], metavar="K",
                    help="CPU kernels: a tensor silo's projection in one call, silos of K thousand entries")
    ap.add_argument("--project-rows", nargs="*", default=[], metavar="RxM", help="CPU kernels: row silos' projection")
    ap.add_argument("--epsilon", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}, torch {torch.__version__}")
    if args.sizes:
        print("| silo | epsilon | k | read pass ms | dstcli ms | torch.topk ms | kthvalue ms | sort ms | topk / dstcli | dstcli / read |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for mil in args.sizes:
        n = mil << 20
        d = torch.randn(n, generator=torch.Generator().manual_seed(0)).abs_().to(device)
        for eps in args.epsilon:
            k = max(1, int(eps * n))
            t_read, _ = best(lambda: d.sum(), device)
            t_fast, v_fast = best(lambda: d[top_indices(d, k)].min(), device)
            t_topk, v_topk = best(lambda: torch.topk(d, k, sorted=False).values.min(), device)
            t_kth, v_kth = best(lambda: torch.kthvalue(d, n - k + 1).values, device, reps=1)
            t_sort, v_sort = best(lambda: torch.sort(d).values[n - k], device, reps=1)
            assert v_fast == v_topk == v_kth == v_sort, (v_fast, v_topk, v_kth, v_sort)
            print(f"| {mil}M | {eps:g} | {k:,} | {t_read * 1e3:.2f} | {t_fast * 1e3:.2f} | {t_topk * 1e3:.2f} | "
                  f"{t_kth * 1e3:.2f} | {t_sort * 1e3:.2f} | {t_topk / t_fast:.1f}x | {t_fast / t_read:.1f}x |", flush=True)
        d = None  # freed before the next size is allocated
    if args.rows:
        print("\n| rows | epsilon | k per row | dstcli ms | torch.topk ms | topk / dstcli |")
        print("|---|---|---|---|---|---|")
    for shape in args.rows:
        R, M = (int(v) for v in shape.lower().split("x"))
        d = torch.randn(R, M, generator=torch.Generator().manual_seed(0)).abs_().to(device)
        for eps in args.epsilon:
            k = max(1, int(eps * M))
            t_fast, pos = best(lambda: rows_indices(d, k), device)
            t_topk, kth = best(lambda: torch.topk(d, k, dim=1, sorted=False).values.min(1, keepdim=True).values, device)
            want = torch.nonzero((d >= kth).view(-1)).view(-1)  # continuous values: no ties
            assert torch.equal(pos.to(device), want), shape
            print(f"| {R}x{M} | {eps:g} | {k:,} | {t_fast * 1e3:.2f} | {t_topk * 1e3:.2f} | {t_topk / t_fast:.1f}x |", flush=True)
        d = None
    if args.fused:
        fused(args.fused, args.epsilon)
    if args.project or args.project_rows:
        project(args.project, args.project_rows, args.epsilon)


def fused(sizes: list[int], epsilons: list[float]) -> None:
    if kernels.lib() is None:
        print(f"no CPU kernels here: {kernels.why()}")
        return
    print("\n| silo | weights | epsilon | k | read pass ms | fused ms | distance + top_indices ms | distance + torch.topk ms "
          "| unfused / fused | topk / fused | fused / read |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cpu = torch.device("cpu")
    for mil in sizes:
        n = mil << 20
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(n, generator=g)
        x = x0 + torch.randn(n, generator=g) * 1e-3
        for weights in (torch.float32, torch.bfloat16):
            a, a0 = x.to(weights), x0.to(weights)
            for eps in epsilons:
                k = max(1, int(eps * n))
                t_read, _ = best(lambda: (a.sum(), a0.sum()), cpu)
                t_fused, pos = best(lambda: top_positions(a, a0, k), cpu)
                t_plain, want = best(lambda: top_indices(distance(a, a0), k), cpu)
                t_topk, _ = best(lambda: torch.topk(distance(a, a0), k, sorted=False), cpu)
                assert pos is not None and torch.equal(pos, want), (mil, weights, eps)
                print(f"| {mil}M | {str(weights).split('.')[1]} | {eps:g} | {k:,} | {t_read * 1e3:.2f} | {t_fused * 1e3:.2f} | "
                      f"{t_plain * 1e3:.2f} | {t_topk * 1e3:.2f} | {t_plain / t_fused:.1f}x | {t_topk / t_fused:.1f}x | "
                      f"{t_fused / t_read:.1f}x |", flush=True)
            a = a0 = None


def _threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)  # OpenMP's thread count, which the kernels share
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def project(sizes: list[int], shapes: list[str], epsilons: list[float]) -> None:
    if kernels.lib() is None:
        print(f"no CPU kernels here: {kernels.why()}")
        return
    cpu = torch.device("cpu")

    def differ(vals, seed_vals):
        return int(torch.count_nonzero(bits_view(vals) != bits_view(seed_vals)))
    if sizes:
        print("\n| silo | epsilon | k | copy ms | before ms | one call ms | one call, 1 thread ms | before / one call |")
        print("|---|---|---|---|---|---|---|---|")
    for thousands in sizes:
        n = thousands * 1000
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(n, generator=g)
        x = x0 + torch.randn(n, generator=g) * 1e-3
        xc, work = x.clone(), {}
        for eps in epsilons:
            k = max(1, int(eps * n))

            def before():
                xc.copy_(x)
                idx = top_positions(xc, x0, k)
                vals, seed_vals = kernels.reset(xc, x0, idx)
                return idx, differ(vals, seed_vals)

            def one():
                xc.copy_(x)
                idx, _, count = kernels.top(xc, x0, "absolute", k, *sparse_bracket(n, k), work=work)
                return idx, count
            t_copy, _ = best(lambda: xc.copy_(x), cpu, reps=10)
            t_before, want = best(before, cpu, reps=10)
            t_one, got = best(one, cpu, reps=10)
            t_one1, got1 = _threads(1, lambda: best(one, cpu, reps=10))
            assert torch.equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got1[0], want[0])
            print(f"| {n:,} | {eps:g} | {k:,} | {t_copy * 1e3:.3f} | {t_before * 1e3:.3f} | {t_one * 1e3:.3f} | "
                  f"{t_one1 * 1e3:.3f} | {t_before / t_one:.1f}x |", flush=True)
    if shapes:
        print("\n| rows | epsilon | k per row | copy ms | before ms | one call, no hint ms | one call, hints ms "
              "| hints, 1 thread ms | before / hints |")
        print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        R, M = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(R, M, generator=g)
        x = x0 + torch.randn(R, M, generator=g) * 1e-3
        xc = x.clone()
        for eps in epsilons:
            k = np.full(R, max(1, int(eps * M)), dtype=np.int64)
            kth = torch.topk(distance(x, x0), int(k[0]), dim=1).values[:, -1].numpy()
            near = kth * np.random.default_rng(0).uniform(0.8, 1.25, R).astype(np.float32)

            def before():
                xc.copy_(x)
                idx = rows_indices(distance(xc, x0), torch.from_numpy(k))
                vals, seed_vals = kernels.reset(xc.view(-1), x0.view(-1), idx)
                return idx, differ(vals, seed_vals)

            def one(hint):
                xc.copy_(x)
                idx, _, count = kernels.rows(xc, x0, k, "absolute", hint.copy())
                return idx, count
            t_copy, _ = best(lambda: xc.copy_(x), cpu, reps=10)
            t_before, want = best(before, cpu, reps=10)
            t_cold, got = best(lambda: one(np.zeros(R, dtype=np.float32)), cpu, reps=10)
            t_warm, got2 = best(lambda: one(near), cpu, reps=10)
            t_warm1, got3 = _threads(1, lambda: best(lambda: one(near), cpu, reps=10))
            assert all(torch.equal(r[0], want[0]) and r[1] == want[1] for r in (got, got2, got3))
            print(f"| {R}x{M} | {eps:g} | {int(k[0]):,} | {t_copy * 1e3:.3f} | {t_before * 1e3:.3f} | {t_cold * 1e3:.3f} | "
                  f"{t_warm * 1e3:.3f} | {t_warm1 * 1e3:.3f} | {t_before / t_warm:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
