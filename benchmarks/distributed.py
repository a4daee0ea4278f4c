"""Throughput and memory per rank: one process against DDP and FSDP on the same devices.

    python benchmarks/distributed.py                          # CPU: 1 process x 2 threads vs 2 x 1
    python benchmarks/distributed.py --layers 8 --width 512   # a random 26M-parameter GPT instead
    python benchmarks/distributed.py --device cuda --nproc 8  # GPUs: 1 GPU alone vs DDP/FSDP on 8

Each configuration is `dstcli train` on the bundled model and task with the same global batch and
steps (through dstcli.train.train, so every rank can report its own peak memory): tokens per
second over the whole run (rank 0's clock), and each rank's peak resident memory (VmHWM; on CUDA
also torch.cuda.max_memory_allocated). On CPU the single process gets as many threads as the
distributed run has processes, so each uses the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    import torch

    from dstcli.train import TrainOptions, train

    rank = int(os.environ.get("RANK", "0"))
    last: dict = {}
    r = train(TrainOptions(base=args.base, output=str(args.out / "patch.dst"), steps=args.steps, batch_size=args.batch_size,
                           epsilon=args.epsilon, strategy=args.strategy, device=args.device, overwrite=True),
              on_step=lambda rec: last.update(rec))
    report = {"rank": rank, "rss_mb": vm_hwm_mb(), "seconds": r.seconds}
    if torch.cuda.is_available() and args.device == "cuda":
        report["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if last:
        report["tokens_per_s"] = last["tokens_per_s"]
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16, help="the global batch")
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=0, help="train a random GPT of this depth instead of the sample")
    ap.add_argument("--width", type=int, default=512, help="its hidden size (with --layers)")
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    me = [sys.executable, __file__, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
          "--epsilon", str(args.epsilon), "--device", args.device, "--worker"]
    if args.layers:  # the model's directory lives as long as the runs do
        keep = tempfile.TemporaryDirectory()
        import torch

        from dstcli.model import GPT, GPTConfig, save_model
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=args.layers, n_head=max(1, args.width // 64), n_embd=args.width))
        save_model(model, Path(keep.name) / "gpt")
        me += ["--base", str(Path(keep.name) / "gpt")]
        print(f"random GPT: {sum(p.numel() for p in model.parameters()):,} parameters")
    print("| run | processes | tokens/s | s | peak RSS per rank (MB) |" + (" CUDA MB per rank |" if args.device == "cuda" else ""))
    print("|---|---:|---:|---:|---|" + ("---|" if args.device == "cuda" else ""))
    for strategy in ("none", "ddp", "fsdp"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            env = dict(os.environ)
            if strategy == "none":
                env["OMP_NUM_THREADS"] = str(args.nproc if args.device == "cpu" else 1)
                cmd = me + ["--strategy", "none", "--out", tmp]
                procs = 1
            else:
                env["OMP_NUM_THREADS"] = "1"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={args.nproc}"] + me[1:] + ["--strategy", strategy, "--out", tmp]
                procs = args.nproc
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{strategy} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(procs)]
            rss = ", ".join(f"{r['rss_mb']:.0f}" for r in ranks)
            name = strategy if strategy != "none" else "one process"
            line = f"| {name} | {procs} | {ranks[0]['tokens_per_s']:,.0f} | {ranks[0]['seconds']:.1f} | {rss} |"
            if args.device == "cuda":
                line += " " + ", ".join(f"{r['cuda_mb']:.0f}" for r in ranks) + " |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
