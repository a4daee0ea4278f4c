"""What the commands do, as plain functions: diff, apply and inspect (no terminal code here)."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from dstcli.checkpoint import Checkpoint, atomic_path, check_output, copy_range, dtype_name
from dstcli.codec import bits_view
from dstcli.errors import DstError
from dstcli.patchfile import Change, Patch, PatchWriter, apply_change, fingerprint
from dstcli.select import DISTANCES, GlobalTopK, distance, topk_mask
from dstcli.silos import SILOS, allocate, budget_total, select_names, silo_rows

Progress = Callable[[str, int], None]  # (tensor name, bytes done) after each tensor
WORKERS = 2  # threads that read, hash and write tensors in apply and diff


def _pairs_or_error(base: Checkpoint, other: Checkpoint) -> None:
    problems = []
    for name in sorted(set(base.tensors) | set(other.tensors)):
        a, b = base.tensors.get(name), other.tensors.get(name)
        if a is None:
            problems.append(f"{name} only in {other.path}")
        elif b is None:
            problems.append(f"{name} only in {base.path}")
        elif a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name} is {dtype_name(a.dtype)}{list(a.shape)} in the base but "
                            f"{dtype_name(b.dtype)}{list(b.shape)} in {other.path}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DstError(f"checkpoints do not match: {'; '.join(problems[:5])}{more}: "
                       "diff needs two checkpoints of the same architecture")


def diff(base_path: str | Path, finetuned_path: str | Path, out: str | Path, *, epsilon: float | None = None,
         params: int | None = None, silo: str = "tensor", dist: str = "absolute",
         include: list[str] | None = None, exclude: list[str] | None = None, overwrite: bool = False,
         progress: Progress | None = None) -> dict:
    """Write the patch that turns base into finetuned; lossless unless a budget is given.

    With `epsilon` or `params`, each silo keeps only its top-k entries by `dist` (docs/DST.md).
    Returns the patch header. Raises DstError on mismatched checkpoints or bad options.
    """
    if silo not in SILOS:
        raise DstError(f"unknown silo strategy {silo!r}: choose one of {', '.join(SILOS)}")
    if dist not in DISTANCES:
        raise DstError(f"unknown distance {dist!r}: choose one of {', '.join(DISTANCES)}")
    out = Path(out)
    base, ft = Checkpoint(base_path), Checkpoint(finetuned_path)
    check_output(out, overwrite, [base.path, ft.path])
    _pairs_or_error(base, ft)
    floats = [n for n, t in base.tensors.items() if t.patchable]
    for name, info in base.tensors.items():
        if not info.patchable and not torch.equal(base.read(name), ft.read(name)):
            raise DstError(f"tensor {name!r} ({dtype_name(info.dtype)}) differs, but only floating-point "
                           "tensors can be patched: these checkpoints are not a fine-tune of one another")
    chosen = select_names(floats, include, exclude) if (include or exclude) else floats
    budgeted = epsilon is not None or params is not None
    shapes = {n: base.tensors[n].shape for n in chosen}
    alloc = allocate(shapes, silo, epsilon=epsilon, params=params) if budgeted else None
    if budgeted and budget_total(alloc) == 0:
        raise DstError("the budget rounds to zero in every silo: raise --epsilon or --params")
    threshold, offsets, gtop = None, {}, None
    if budgeted and silo == "global":
        gtop = GlobalTopK(alloc)
        for name in chosen:
            offsets[name] = gtop.offset
            gtop.add(distance(ft.read(name), base.read(name), dist))
        threshold = gtop.threshold()
    budget = {}
    if budgeted:
        budget = {"epsilon": epsilon, "params": params, "silo": silo, "distance": dist,
                  "total": budget_total(alloc), "trainable_params": sum(math.prod(s) for s in shapes.values())}
    run = {"command": "diff", "base": str(base.path), "finetuned": str(ft.path), "include": include,
           "exclude": exclude}
    def change_of(name: str) -> Change:  # runs on a worker thread
        a = base.read(name)
        if name not in shapes:
            return Change.between(name, a, a)
        if not budgeted:
            return Change.between(name, a, ft.read(name))
        b = ft.read(name)
        d = distance(b, a, dist)
        if gtop is not None:
            keep, info = gtop.mask(d, offsets[name], threshold), {"strategy": "global"}
        else:
            rows = silo_rows(a.shape, silo)
            keep = topk_mask(d.reshape(rows, -1), alloc[name]).reshape(a.shape)
            info = {"strategy": silo, "silos": rows, "budget": int(alloc[name].sum())}
        return Change.between(name, a, torch.where(keep, b, a), silo=info)

    # two workers read, compare and hash tensors (both cores); at most WORKERS + 1 tensors are in
    # flight, and each finished change is encoded and spilled to disk at once
    with PatchWriter(out) as writer, ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending: deque = deque()

        def write_oldest() -> None:
            name, fut = pending.popleft()
            writer.add(fut.result())
            if progress:
                progress(name, base.tensors[name].end - base.tensors[name].start)

        try:
            for name in floats:
                pending.append((name, pool.submit(change_of, name)))
                if len(pending) > WORKERS:
                    write_oldest()
            while pending:
                write_oldest()
        finally:
            for _, fut in pending:
                fut.cancel()
        return writer.finish(run=run, budget=budget, base_params=base.numel)


def base_fingerprint(header: dict) -> str:
    """One fingerprint for the whole base a patch applies to (over its per-tensor fingerprints)."""
    h = hashlib.sha256()
    for name, e in sorted(header["tensors"].items()):
        h.update(f"{name}\0{e['base_fingerprint']}\0".encode())
    return "sha256:" + h.hexdigest()[:32]


def apply(base_path: str | Path, patch_paths: list[str | Path], out: str | Path, *, force: bool = False,
          scale: float = 1.0, revert: bool = False, overwrite: bool = False,
          progress: Progress | None = None) -> dict:
    """Write base + patches (in order) to `out`, mirroring the base's layout, atomically.

    Each output byte is written once: unchanged ranges by kernel copy, patched tensors by two
    worker threads that read, check, patch, check and write them.

    Every changed tensor's fingerprint is checked before the patch touches it (the base fingerprint,
    or with revert=True the result fingerprint, patches then undone in reverse order) and after
    (the result, or with revert the base); a mismatch raises DstError unless force=True. `scale`
    multiplies the total change (not bit-exact).
    Returns a summary dict.
    """
    if not patch_paths:
        raise DstError("give at least one patch to apply")
    if revert and scale != 1.0:
        raise DstError("--revert and --scale cannot be combined: revert restores the exact base")
    if not math.isfinite(scale):
        raise DstError(f"--scale {scale} is not a finite number")
    out = Path(out)
    base = Checkpoint(base_path)
    patches = [Patch(p) for p in patch_paths]
    check_output(out, overwrite, [base.path] + [p.path for p in patches])
    if revert:
        patches = patches[::-1]
    for p in patches:
        bad = []
        for name, e in p.tensors.items():
            info = base.tensors.get(name)
            if info is None:
                bad.append(f"{name} is missing")
            elif dtype_name(info.dtype) != e["dtype"] or list(info.shape) != e["shape"]:
                bad.append(f"{name} is {dtype_name(info.dtype)}{list(info.shape)}, patch expects {e['dtype']}{e['shape']}")
        if bad:
            raise DstError(f"{base.path} is not the base {p.path} was made for: {'; '.join(bad[:5])}: "
                           "apply the patch to the checkpoint it was made from")
    touched = sorted({n for p in patches for n, e in p.tensors.items() if e["changed"]})
    check = "result_fingerprint" if revert else "base_fingerprint"
    changed = 0
    with atomic_path(out, is_dir=base.is_dir) as tmp:
        if base.is_dir:  # every other file (config, tokenizer, index) is copied as it is
            shards = set(base.shards)
            shutil.copytree(base.path, tmp, dirs_exist_ok=True, ignore=lambda d, names: [
                n for n in names if Path(d) / n in shards])
            target = {s: tmp / s.relative_to(base.path) for s in base.shards}
        else:
            target = {base.path: tmp}
        handles = {s: open(t, "wb") for s, t in target.items()}
        _copy_untouched(base, set(touched), handles)

        def patch_one(name: str) -> int:
            """Read, check, patch, check and write back one tensor (runs on a worker thread)."""
            info, n = base.tensors[name], 0
            orig = t = base.read(name)
            for p in patches:
                e = p.tensors[name]
                if not e["changed"]:
                    continue
                if not force and fingerprint(t) != e[check]:
                    raise DstError(f"tensor {name!r} of {base.path} is not the one {p.path} was made for "
                                   f"(fingerprint {fingerprint(t)}, patch expects {e[check]}): apply it to "
                                   "the checkpoint it was made from, or pass --force to apply it anyway")
                idx, xor = p.read_change(name)
                t = apply_change(t, idx, xor)
                n += len(idx)
                after = "base_fingerprint" if revert else "result_fingerprint"
                if not force and fingerprint(t) != e[after]:  # the blocks passed their CRCs but lie
                    raise DstError(f"{p.path}: tensor {name!r} does not come out as the patch says "
                                   f"(fingerprint {fingerprint(t)}, expected {e[after]}); the patch is "
                                   "corrupt: make it again with dstcli diff or train")
            if scale != 1.0:  # arithmetic, not bit-exact; entries no patch touched stay as they are
                moved = (bits_view(t) != bits_view(orig)).reshape(orig.shape)
                wide = orig.to(torch.float64)
                t = torch.where(moved, (wide + scale * (t.to(torch.float64) - wide)).to(orig.dtype), orig)
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            if os.pwrite(handles[info.shard].fileno(), data, info.start) != data.nbytes:
                raise OSError(errno.ENOSPC, f"short write of {name}")
            return n

        try:
            # two workers: SHA-256, reads and writes release the GIL, so both cores hash
            pool = ThreadPoolExecutor(max_workers=WORKERS)
            try:
                for name, fut in [(name, pool.submit(patch_one, name)) for name in touched]:
                    changed += fut.result()
                    if progress:
                        progress(name, base.tensors[name].end - base.tensors[name].start)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on an error, start nothing more
        finally:
            for f in handles.values():
                f.close()
    return {"output": str(out), "patches": [str(p.path) for p in patches], "tensors_patched": len(touched),
            "entries_changed": changed, "bytes": base.nbytes, "scale": scale, "revert": revert}


def _copy_untouched(base: Checkpoint, touched: set[str], handles: dict) -> None:
    """Write every byte of each shard that no patch changes (header, untouched tensors) into its
    output file at the same offset, by kernel copy (copy_file_range) where the system has it; the
    touched tensors' ranges are left for the workers to fill. Each output byte is written once."""
    for shard, out in handles.items():
        size = shard.stat().st_size
        holes = sorted((i.start, i.end) for n, i in base.tensors.items() if i.shard == shard and n in touched)
        ranges, at = [], 0
        for a, b in holes:
            if a > at:
                ranges.append((at, a))
            at = max(at, b)
        if size > at:
            ranges.append((at, size))
        out.truncate(size)
        with open(shard, "rb") as src:
            for a, b in ranges:
                copy_range(src, out, a, a, b - a)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|block|blocks)\.(\d+)\.")


def layer_of(name: str) -> str:
    """'layer N' for names like model.layers.3.*, transformer.h.3.*, BERT's encoder.layer.3.*;
    'encoder layer N' / 'decoder layer N' in encoder-decoder models (T5's encoder.block.3.*,
    decoder.block.3.*, BART's model.decoder.layers.3.*); else 'other'."""
    m = _LAYER.search(name)
    if not m:
        return "other"
    stack = re.search(r"(?:^|\.)(encoder|decoder)\.", name[:m.start() + 1])
    bert = stack and stack.group(1) == "encoder" and m.group(0).lstrip(".").startswith("layer.")  # encoder-only
    return f"{stack.group(1)} layer {int(m.group(1))}" if stack and not bert else f"layer {int(m.group(1))}"


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10 (and h.2 before h.10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


SORT_KEYS = ("name", "changed", "fraction", "delta_l2", "delta_max", "numel")


def inspect(patch_path: str | Path, *, sort: str = "name", top: int | None = None, by: str = "tensor") -> dict:
    """The patch header as a summary dict (the `inspect --json` document; schema in docs/FORMAT.md)."""
    if sort not in SORT_KEYS:
        raise DstError(f"unknown --sort {sort!r}: choose one of {', '.join(SORT_KEYS)}")
    if by not in ("tensor", "layer"):
        raise DstError(f"unknown --by {by!r}: choose tensor or layer")
    p = Patch(patch_path)
    h = p.header
    rows: dict[str, dict] = {}
    for name, e in h["tensors"].items():
        key = name if by == "tensor" else layer_of(name)
        r = rows.setdefault(key, {"name": key, "numel": 0, "changed": 0, "budget": None, "l2sq": 0.0,
                                  "delta_max": 0.0, "tensors": 0})
        r["numel"] += e["numel"]
        r["changed"] += e["changed"]
        r["tensors"] += 1
        if "budget" in e.get("silo", {}):
            r["budget"] = (r["budget"] or 0) + e["silo"]["budget"]
        l2, mx = (float(e["delta_l2"]), float(e["delta_max"]))
        r["l2sq"] += l2 * l2
        r["delta_max"] = max(r["delta_max"], mx) if not math.isnan(mx) else mx
    table = []
    for r in rows.values():
        l2 = math.sqrt(r.pop("l2sq"))
        r["delta_l2"] = l2 if math.isfinite(l2) else str(l2)
        r["delta_max"] = r["delta_max"] if math.isfinite(r["delta_max"]) else str(r["delta_max"])
        r["fraction"] = r["changed"] / r["numel"] if r["numel"] else 0.0
        if by == "tensor":
            e = h["tensors"][r["name"]]
            r.update(dtype=e["dtype"], shape=e["shape"])
            del r["tensors"]
        table.append(r)
    num = lambda v: float(v) if not isinstance(v, str) else float("inf")
    table.sort(key=(lambda r: _natural(r["name"])) if sort == "name" else (lambda r: (-num(r[sort]), _natural(r["name"]))))
    base_params = h.get("base_params") or 0
    return {"path": str(p.path), "format": h["format"], "format_version": h["format_version"],
            "producer": h.get("producer"), "patch_bytes": p.path.stat().st_size,
            "base_fingerprint": base_fingerprint(h), "base_params": base_params, "changed": h["changed"],
            "effective_epsilon": h["changed"] / base_params if base_params else 0.0,
            "tensors": len(h["tensors"]), "tensors_changed": sum(1 for e in h["tensors"].values() if e["changed"]),
            "budget": h.get("budget", {}), "run": h.get("run", {}), "group_by": by, "sort": sort,
            "rows": table[:top] if top else table}
