"""Patch size against the information-theoretic bound, and apply/diff speed against `cp`.

    python benchmarks/format_size.py              # sizes, plus a 1 GB checkpoint timing
    python benchmarks/format_size.py --gb 0       # sizes only
    python benchmarks/format_size.py --gb 0 --real a.dst b.dst   # also measure real patches

Index bits are compared with log2 C(n, k) for random positions; values are random perturbations
of N(0, 0.02) weights (relative change ~1e-2), as a fine-tune makes them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dstcli import ops  # noqa: E402
from dstcli.codec import VALUE_CODECS, compress, encode_index, encode_values  # noqa: E402
from dstcli.patchfile import Change, Patch  # noqa: E402


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _varint_zstd_bytes(idx: np.ndarray) -> int:
    """The baseline the issue names: LEB128 gap varints, zstd-compressed."""
    from dstcli.codec import _varint
    return len(compress(_varint(idx)[1])[1])


def sizes() -> None:
    rng = np.random.default_rng(0)
    print("Random positions (index) and values moved by ~1% of N(0, 0.02) weights:")
    print("| k/n | n | k | index codec | index bits / log2 C(n,k) | varint+zstd / log2 C(n,k) | fp32 bits/value | bf16 bits/value |")
    print("|---|---|---|---|---|---|---|---|")
    for ratio in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 1e-1, 0.2, 0.3, 0.5):
        n = 16_000_000 if ratio <= 1e-6 else 4_000_000
        k = max(1, round(ratio * n))
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        codec, _, raw = encode_index(idx, n)
        _, stored = compress(raw)
        bound = log2_binom(n, k)
        row = [f"{ratio:g}", f"{n:,}", f"{k:,}", codec, f"{len(stored) * 8 / bound:.3f}",
               f"{_varint_zstd_bytes(idx) * 8 / bound:.3f}"]
        for dtype in (torch.float32, torch.bfloat16):
            base = (torch.randn(k, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
            new = (base.float() * (1 + 0.01 * torch.randn(k))).to(dtype)
            ch = Change.between("w", base, new)
            best = min(len(compress(encode_values(ch.xor, c))[1]) for c in VALUE_CODECS)
            row.append(f"{best * 8 / max(1, len(ch.index)):.1f}")
        print("| " + " | ".join(row) + " |")


def real(paths: list[str]) -> None:
    """Per real patch: index bits against the bound and against varint+zstd, and bits per value for
    each value codec and for the per-tensor best (what the writer stores)."""
    print("\nReal patches:")
    print("| patch | dtype | changed | index bits / log2 C(n,k) | index / varint+zstd | "
          + " | ".join(f"{c} bits/value" for c in VALUE_CODECS) + " | best per tensor bits/value | file bytes | header bytes |")
    print("|---|---|---|---|---|" + "---|" * len(VALUE_CODECS) + "---|---|---|")
    for path in paths:
        p = Patch(path)
        k_all, idx_bytes, bound, vint, per_codec, best = 0, 0, 0.0, 0, {c: 0 for c in VALUE_CODECS}, 0
        dtypes = set()
        for name, e in p.tensors.items():
            if not e["changed"]:
                continue
            idx, xor = p.read_change(name)
            dtypes.add(e["dtype"])
            k_all += len(idx)
            idx_bytes += len(compress(encode_index(idx, e["numel"])[2])[1])
            bound += log2_binom(e["numel"], len(idx))
            vint += _varint_zstd_bytes(idx)
            sizes_ = {c: len(compress(encode_values(xor, c))[1]) for c in VALUE_CODECS}
            for c, b in sizes_.items():
                per_codec[c] += b
            best += min(sizes_.values())
        with open(path, "rb") as f:
            head = int.from_bytes(f.read(8), "little") + 8
        print(f"| {Path(path).name} | {'/'.join(sorted(dtypes))} | {k_all:,} | {idx_bytes * 8 / bound:.3f} | "
              f"{idx_bytes / vint:.3f} | " + " | ".join(f"{per_codec[c] * 8 / k_all:.1f}" for c in VALUE_CODECS)
              + f" | {best * 8 / k_all:.1f} | {Path(path).stat().st_size:,} | {head:,} |")


def timing(gb: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dstcli-bench-"))
    try:
        base, ft = tmp / "base", tmp / "ft"
        base.mkdir(), ft.mkdir()
        per_shard = 256 << 20
        shards = max(1, int(gb * (1 << 30)) // per_shard)
        g = torch.Generator().manual_seed(0)
        for s in range(shards):
            names = {f"model.layers.{s}.mlp.w{j}": torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
                     for j in range(per_shard // (4096 * 4096 * 2))}
            save_file(names, str(base / f"model-{s:05d}.safetensors"))
            for t in names.values():
                m = torch.rand(t.shape, generator=g) < 1e-3
                t.copy_(torch.where(m, t * 1.01 + 1e-3, t))
            save_file(names, str(ft / f"model-{s:05d}.safetensors"))
        for d in (base, ft):
            weight_map = {}
            for f in sorted(d.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as sf:
                    weight_map.update({k: f.name for k in sf.keys()})
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        total = sum(f.stat().st_size for f in base.iterdir())
        for _ in range(2):  # warm the page cache
            for f in list(base.iterdir()) + list(ft.iterdir()):
                f.read_bytes()
        t = time.perf_counter()
        shutil.copytree(base, tmp / "copy")
        t_cp = time.perf_counter() - t
        t = time.perf_counter()
        ops.diff(base, ft, tmp / "p.dst")
        t_diff = time.perf_counter() - t
        t = time.perf_counter()
        ops.apply(base, [tmp / "p.dst"], tmp / "out")
        t_apply = time.perf_counter() - t
        print(f"\ncheckpoint {total / 2**30:.2f} GiB bf16 in {shards} shards, 1e-3 of entries changed; "
              f"patch {(tmp / 'p.dst').stat().st_size / 2**20:.1f} MiB")
        print("| operation | seconds | GB/s | speed vs cp |")
        print("|---|---|---|---|")
        for name, sec in (("cp (copytree)", t_cp), ("dstcli diff (lossless)", t_diff), ("dstcli apply", t_apply)):
            print(f"| {name} | {sec:.2f} | {total / sec / 1e9:.2f} | {t_cp / sec:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.0, help="size of the synthetic checkpoint (0: skip timing)")
    ap.add_argument("--real", nargs="*", default=[], help="real patches to measure too")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sizes()
    if args.real:
        real(args.real)
    if args.gb > 0:
        timing(args.gb)
