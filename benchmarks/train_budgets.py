"""Base vs DST-tuned quality on the bundled task across budgets, with training time.

    python benchmarks/train_budgets.py                      # ~6 minutes on 2 CPU cores
    python benchmarks/train_budgets.py --steps 100 --eps 1e-3   # a quick look

Prints a Markdown table for BENCHMARKS.md. Each run is exactly what `dstcli train --epsilon E`
does with the other options at their defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dstcli.train import TrainOptions, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1.0])
    ap.add_argument("--steps", type=int, default=None, help="default: dstcli train's default")
    ap.add_argument("--lr", type=float, nargs="+", default=None, help="per-eps learning rates (default: 1e-2, and 1e-3 at eps=1)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("| epsilon | budget | changed | lr | steps | base loss | tuned loss | base acc | tuned acc | train s | patch KB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, eps in enumerate(args.eps):
            lr = args.lr[i] if args.lr else (1e-3 if eps >= 1 else 1e-2)
            opts = TrainOptions(epsilon=eps, lr=lr, output=f"{tmp}/p{i}.dst")
            if args.steps:
                opts.steps = args.steps
            r = train(opts)
            print(f"| {eps:g} | {r.budget:,} | {r.changed:,} | {lr:g} | {r.steps} | {r.base_metrics['loss']:.3f} | "
                  f"{r.final_metrics['loss']:.3f} | {r.base_metrics['accuracy']:.3f} | "
                  f"{r.final_metrics['accuracy']:.3f} | {r.seconds:.0f} | {r.patch_bytes / 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
