"""diff and apply on a checkpoint of several GB: time against `cp`, and peak memory.

    python benchmarks/stream.py                 # 4 GiB bf16, transformer-like shapes, 5 shards
    python benchmarks/stream.py --gib 8 --keep  # bigger; keep the temp dir to look at
    python benchmarks/stream.py --in-process    # diff and apply as calls here: the work alone

Builds a synthetic sharded checkpoint in a temp dir (model.safetensors.index.json, 1 GiB shards;
an embedding and layers of qkv, output, up and down projections at hidden size 2048), and a
fine-tune of it with 1e-3 of the entries of every tensor changed. Then, for --rounds rounds,
times `cp -r` of the base, `dstcli diff` (lossless) and `dstcli apply`, each in its own process
with a warm page cache, and reads each dstcli process's peak resident memory (VmHWM).

Each command starts on a quiet disk: `sync` runs (untimed) before it, so no command pays for
the write-back of the one before (cp's 4 GiB of dirty pages used to slow whatever ran next), and
every earlier output (the copy, the applied checkpoint) is deleted first, so each command starts
with the same page cache (base, fine-tune, patch) and free memory. The order of the three
commands rotates from round to round (apply uses the latest diff's patch). Reported: the median seconds of each, its speed against the median cp, and the
range of the per-round ratios. Deletes everything afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = ("import sys, atexit\n"
         "atexit.register(lambda: sys.stderr.write('VMHWM ' + next(l for l in open('/proc/self/status') "
         "if l.startswith('VmHWM')).split()[1] + '\\n'))\n"
         "from dstcli.cli import main\n"
         "sys.argv = ['dstcli'] + sys.argv[1:]\n"
         "main()\n")


def layout(gib: float, hidden: int = 2048) -> list[tuple[str, tuple[int, int]]]:
    tensors = [("model.embed_tokens.weight", (32768, hidden))]
    per_layer = [("self_attn.qkv_proj.weight", (3 * hidden, hidden)), ("self_attn.o_proj.weight", (hidden, hidden)),
                 ("mlp.up_proj.weight", (4 * hidden, hidden)), ("mlp.down_proj.weight", (hidden, 4 * hidden))]
    size, i = 32768 * hidden * 2, 0
    while size < gib * 2**30:
        for name, shape in per_layer:
            tensors.append((f"model.layers.{i}.{name}", shape))
            size += shape[0] * shape[1] * 2
        i += 1
    return tensors


def build(root: Path, gib: float) -> int:
    """Write base/ and ft/ shard by shard (at most one shard's tensors in memory); return bytes."""
    g = torch.Generator().manual_seed(0)
    shards, cur, cur_bytes, total = [], [], 0, 0
    for name, shape in layout(gib):
        cur.append((name, shape))
        cur_bytes += shape[0] * shape[1] * 2
        if cur_bytes >= 2**30:
            shards.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for d in ("base", "ft"):
        (root / d).mkdir()
    for s, names in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        base, ft = {}, {}
        for name, shape in names:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            f = t.clone()
            idx = torch.randint(0, t.numel(), (t.numel() // 1000,), generator=g)
            f.view(-1)[idx] = (f.view(-1)[idx].float() * 1.01 + 1e-4).to(torch.bfloat16)
            base[name], ft[name] = t, f
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(base, str(root / "base" / fname), metadata={"format": "pt"})
        save_file(ft, str(root / "ft" / fname), metadata={"format": "pt"})
    for d in ("base", "ft"):
        (root / d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                          "weight_map": weight_map}))
        (root / d / "config.json").write_text('{"model_type": "llama"}')
    return total


def timed(cmd, cwd: Path) -> tuple[float, float | None]:
    """Seconds and peak RSS (MiB) of a command line, or seconds of a function called here."""
    subprocess.run(["sync"], check=True)  # the previous command's write-back is not this one's cost
    t = time.perf_counter()
    if callable(cmd):
        cmd()
        return time.perf_counter() - t, None
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    sec = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed: {r.stderr[-2000:]}")
    peak = next((int(line.split()[1]) / 1024 for line in r.stderr.splitlines() if line.startswith("VMHWM")), None)
    return sec, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of cp, diff and apply (median reported)")
    ap.add_argument("--in-process", action="store_true",
                    help="call dstcli's diff and apply in this process (no start-up or torch import; no RSS)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dstcli-stream-"))
    try:
        t = time.perf_counter()
        total = build(root, args.gib)
        largest = max(s[0] * s[1] * 2 for _, s in layout(args.gib))
        print(f"# {total / 2**30:.2f} GiB bf16 in {len(list((root / 'base').glob('*.safetensors')))} shards, "
              f"largest tensor {largest / 2**20:.0f} MiB, built in {time.perf_counter() - t:.0f} s")
        subprocess.run(["cat", *map(str, (root / "base").glob("*")), *map(str, (root / "ft").glob("*"))],
                       stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        py = [sys.executable, "-c", CHILD]
        commands = {"cp -r base": (["cp", "-r", "base", "copy"], "copy"),
                    "dstcli diff (lossless)": (py + ["diff", "base", "ft", "-o", "p.dst", "--overwrite"], None),
                    "dstcli apply": (py + ["apply", "base", "p.dst", "-o", "out"], "out")}
        if args.in_process:  # the work alone: no interpreter start, no torch import
            from dstcli import ops
            commands["dstcli diff (lossless)"] = (
                lambda: ops.diff(root / "base", root / "ft", root / "p.dst", overwrite=True), None)
            commands["dstcli apply"] = (lambda: ops.apply(root / "base", [root / "p.dst"], root / "out"), "out")
        secs: dict[str, list[float]] = {name: [] for name in commands}
        peaks: dict[str, list[float]] = {name: [] for name in commands}
        same = None  # checked after the first apply
        for r in range(args.rounds):
            order = list(commands)[r % 3:] + list(commands)[:r % 3]  # apply uses the last diff's patch
            for name in order:
                cmd, _ = commands[name]
                for _, out in commands.values():  # every command starts with the same page cache:
                    if out:                       # base, ft and the patch (no earlier outputs)
                        shutil.rmtree(root / out, ignore_errors=True)
                sec, peak = timed(cmd, root)
                if name == "dstcli apply" and same is None:
                    same = all((root / "out" / f.name).read_bytes() == f.read_bytes()
                               for f in (root / "ft").glob("*.safetensors"))
                secs[name].append(sec)
                if peak is not None:
                    peaks[name].append(peak)
            print(f"# round {r + 1}: " + ", ".join(f"{n.split(' (')[0]} {secs[n][-1]:.1f} s" for n in commands),
                  flush=True)
        _, baseline = timed(py + ["inspect", "p.dst"], root)
        cp = statistics.median(secs["cp -r base"])
        print(f"patch {(root / 'p.dst').stat().st_size / 2**20:.1f} MiB; median of {args.rounds} rounds")
        print("| operation | seconds (median) | GB/s | speed vs cp (medians) | per-round speed vs cp | "
              "peak RSS MiB | over the baseline MiB | bound: 2x largest + 256 MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for name in commands:
            sec = statistics.median(secs[name])
            ratios = [c / s for c, s in zip(secs["cp -r base"], secs[name])]
            peak = max(peaks[name]) if peaks[name] else None
            over = "-" if peak is None or baseline is None else f"{peak - baseline:.0f}"
            print(f"| {name} | {sec:.1f} | {total / sec / 1e9:.2f} | {cp / sec:.2f}x | "
                  f"{min(ratios):.2f}-{max(ratios):.2f}x | {'-' if peak is None else f'{peak:.0f}'} | {over} | "
                  f"{2 * largest / 2**20 + 256:.0f} |")
        print(f"| dstcli inspect (runtime baseline: interpreter and libraries, no tensors) | | | | | {baseline:.0f} | 0 | |")
        print(f"apply output equals the fine-tune byte for byte: {same}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
