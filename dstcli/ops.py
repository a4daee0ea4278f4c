"""What the commands do, as plain functions: diff, apply and inspect (no terminal code here)."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from dstcli.checkpoint import PIECE, Checkpoint, atomic_path, check_output, copy_range, preallocate
from dstcli.errors import DstError
from dstcli.fingerprint import Hasher, algorithm_of
from dstcli.patchfile import Change, Patch, PatchWriter
from dstcli.silos import SILOS, allocate, budget_total, select_names, silo_rows

# torch is imported only where tensors are computed with (a budgeted diff, apply --scale): apply,
# lossless diff and inspect move bits with NumPy and start ~2 s sooner without it

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
            problems.append(f"{name} is {a.dtype.name}{list(a.shape)} in the base but "
                            f"{b.dtype.name}{list(b.shape)} in {other.path}")
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
    budgeted = epsilon is not None or params is not None
    if silo not in SILOS:
        raise DstError(f"unknown silo strategy {silo!r}: choose one of {', '.join(SILOS)}")
    if budgeted:
        from dstcli.select import DISTANCES, GlobalTopK, distance, topk_mask

        if dist not in DISTANCES:
            raise DstError(f"unknown distance {dist!r}: choose one of {', '.join(DISTANCES)}")
    elif (silo, dist) != ("tensor", "absolute"):
        raise DstError("--silo and --distance choose entries for a budget: add --epsilon or --params, "
                       "or leave them out for a lossless diff")
    out = Path(out)
    base, ft = Checkpoint(base_path), Checkpoint(finetuned_path)
    check_output(out, overwrite, [base.path, ft.path])
    _pairs_or_error(base, ft)
    floats = [n for n, t in base.tensors.items() if t.patchable]
    for name, info in base.tensors.items():
        if not info.patchable and not _same_bytes(base, ft, name):
            raise DstError(f"tensor {name!r} ({info.dtype.name}) differs, but only floating-point "
                           "tensors can be patched: these checkpoints are not a fine-tune of one another")
    chosen = select_names(floats, include, exclude) if (include or exclude) else floats
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
        if not budgeted or name not in shapes:  # piece by piece: a tensor is never in memory whole
            return _streamed_change(base, ft if name in shapes else None, name, _buffers(3))
        a, b = base.read(name), ft.read(name)
        d = distance(b, a, dist)
        if gtop is not None:
            keep, info = gtop.mask(d, offsets[name], threshold), {"strategy": "global"}
        else:
            rows = silo_rows(a.shape, silo)
            keep = topk_mask(d.reshape(rows, -1), alloc[name]).reshape(a.shape)
            info = {"strategy": silo, "silos": rows, "budget": int(alloc[name].sum())}
        return Change.between(name, a, b.where(keep, a), silo=info)

    # two workers read, compare and hash tensors (both cores; a lossless one in 1 MiB pieces, a
    # budgeted one whole); at most WORKERS + 1 changes are in flight, and each finished change is
    # encoded and spilled to disk at once
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
    worker threads that stream them in 1 MiB pieces (read, hash, patch, hash, write), so memory
    stays at a few pieces whatever the tensor sizes.

    Every changed tensor's fingerprint is checked, patch by patch: the state a patch starts from
    (the base fingerprint, or with revert=True the result fingerprint, patches then undone in
    reverse order) and the state it leaves (the result, or with revert the base); a mismatch raises
    DstError, after the whole tensor was read, unless force=True. `scale`
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
            elif info.dtype.name != e["dtype"] or list(info.shape) != e["shape"]:
                bad.append(f"{name} is {info.dtype.name}{list(info.shape)}, patch expects {e['dtype']}{e['shape']}")
        if bad:
            raise DstError(f"{base.path} is not the base {p.path} was made for: {'; '.join(bad[:5])}: "
                           "apply the patch to the checkpoint it was made from")
    touched = sorted({n for p in patches for n, e in p.tensors.items() if e["changed"]})
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

        def patch_one(name: str) -> int:  # runs on a worker thread
            info = base.tensors[name]
            return _patch_streamed(base, name, patches, handles[info.shard].fileno(), force=force, scale=scale,
                                   revert=revert)

        try:
            # two workers: reads, hashing and writes release the GIL, so both cores work
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


_local = threading.local()


def _buffers(n: int) -> list[np.ndarray]:
    """This thread's n reusable read buffers of PIECE bytes (allocated once per thread)."""
    bufs = [b for b in getattr(_local, "bufs", []) if len(b) == PIECE]
    while len(bufs) < n:
        bufs.append(np.empty(PIECE, dtype=np.uint8))
    _local.bufs = bufs
    return bufs[:n]


def _streamed_change(base: Checkpoint, ft: Checkpoint | None, name: str, bufs: list[np.ndarray]) -> Change:
    """The lossless change of one tensor (none if ft is None), read piece by piece: both
    fingerprints, the positions whose bits differ and their XOR, in memory O(piece + changes)."""
    info = base.tensors[name]
    ints = info.dtype.ints
    hb, hf = Hasher(), Hasher()
    idx, old, new = [], [], []
    if ft is None:
        for _, a in base.pieces(name, bufs[0]):
            hb.update(a)
    else:
        differ = bufs[2].view(bool)
        for (first, a), (_, b) in zip(base.pieces(name, bufs[0]), ft.pieces(name, bufs[1])):
            hb.update(a)
            hf.update(b)
            ai, bi = a.view(ints), b.view(ints)
            at = np.flatnonzero(np.not_equal(ai, bi, out=differ[:len(ai)]))  # 6x nonzero of the XOR
            if len(at):
                idx.append(at + first)
                old.append(ai[at])
                new.append(bi[at])
    before = np.concatenate(old) if idx else np.empty(0, dtype=ints)
    return Change.at(name, info.dtype, info.shape, np.concatenate(idx) if idx else np.empty(0, dtype=np.int64),
                     before, np.concatenate(new) if idx else before, hb.value(), hf.value() if idx else hb.value())


def _same_bytes(a: Checkpoint, b: Checkpoint, name: str) -> bool:
    """Whether one tensor's bytes are the same in two checkpoints (read piece by piece)."""
    bufs = [np.empty(max(PIECE, 8), dtype=np.uint8) for _ in range(2)]  # 8: an entry of any dtype
    return all(np.array_equal(x, y) for (_, x), (_, y) in zip(a.pieces(name, bufs[0]), b.pieces(name, bufs[1])))


def _patch_streamed(base: Checkpoint, name: str, patches: list[Patch], out_fd: int, *, force: bool,
                    scale: float, revert: bool) -> int:
    """Read one base tensor piece by piece, apply every patch's XOR to each piece, hash the states
    the patches name, and write each piece to `out_fd` at the tensor's offset. Then check, patch by
    patch: the state before it has the fingerprint it expects (else: wrong base), the state after
    it the one it promises (else: a corrupt patch). Returns the number of entries changed."""
    info = base.tensors[name]
    width = info.dtype.itemsize
    ints = info.dtype.ints
    before, after = ("result_fingerprint", "base_fingerprint") if revert else ("base_fingerprint", "result_fingerprint")
    stages = [(p, p.tensors[name]) for p in patches if p.tensors[name]["changed"]]
    changes = [p.read_change(name) for p, _ in stages]
    # states[s]: the tensor after s patches; the fingerprints each state must have, by algorithm
    hashers: list[dict[str, Hasher]] = [{} for _ in range(len(stages) + 1)]
    if not force:
        for i, (_, e) in enumerate(stages):
            for s, fp in ((i, e[before]), (i + 1, e[after])):
                algo = algorithm_of(fp)
                hashers[s].setdefault(algo, Hasher(algo))
    for first, piece in base.pieces(name, _buffers(1)[0]):
        bits = piece.view(ints)
        end = first + len(bits)
        spans = [np.searchsorted(pos, (first, end)) for pos, _ in changes]
        if scale != 1.0:
            touched = np.unique(np.concatenate([pos[a:b] for (pos, _), (a, b) in zip(changes, spans)])) - first
            orig = bits[touched].copy()
        for h in hashers[0].values():
            h.update(piece)
        for s, ((pos, xor), (a, b)) in enumerate(zip(changes, spans), start=1):
            if b > a:
                bits[pos[a:b] - first] ^= xor[a:b]
            for h in hashers[s].values():
                h.update(piece)
        if scale != 1.0 and len(touched):  # arithmetic, not bit-exact; entries no patch touched stay
            bits[touched] = _scaled(orig, bits[touched], scale, info.dtype)
        if os.pwrite(out_fd, piece, info.start + first * width) != len(piece):
            raise OSError(errno.ENOSPC, f"short write of {name}")
    for i, (p, e) in enumerate([] if force else stages):
        for s, key in ((i, before), (i + 1, after)):
            got = hashers[s][algorithm_of(e[key])].value()
            if got == e[key]:
                continue
            if s == i:
                raise DstError(f"tensor {name!r} of {base.path} is not the one {p.path} was made for "
                               f"(fingerprint {got}, patch expects {e[key]}): apply it to the checkpoint "
                               "it was made from, or pass --force to apply it anyway")
            raise DstError(f"{p.path}: tensor {name!r} does not come out as the patch says (fingerprint "
                           f"{got}, expected {e[key]}); the patch is corrupt: make it again with dstcli "
                           "diff or train")
    return sum(len(pos) for pos, _ in changes)


def _scaled(was: np.ndarray, now: np.ndarray, scale: float, dtype) -> np.ndarray:
    """Bits of was + scale * (now - was), computed in float64 and rounded to dtype by torch (the
    one place apply needs it: NumPy has no bfloat16 or float8); entries with now == was stay."""
    import torch

    was_t, now_t = torch.from_numpy(was), torch.from_numpy(now)
    wide = was_t.view(dtype.torch).to(torch.float64)
    moved = (wide + scale * (now_t.view(dtype.torch).to(torch.float64) - wide)).to(dtype.torch)
    return torch.where(now_t != was_t, moved.view(was_t.dtype), was_t).numpy()


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
        preallocate(out, size)
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
