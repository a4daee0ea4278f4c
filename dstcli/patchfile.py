"""The dstcli sparse-patch file: a safetensors file of compressed uint8 blocks plus a JSON header.

    save_patch(path, changes, run=...)     # write (atomically)
    patch = open_patch(path)              # header only: cheap for any file size
    idx, xor = patch.read_change(name)    # one tensor's change, fully validated

See docs/FORMAT.md for the exact layout. Every reader check raises `DstError`.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

from dstcli import __version__
from dstcli.checkpoint import atomic_path, copy_range
from dstcli.codec import (VALUE_CODECS, compress, decode_index, decode_values, decompress, encode_values,
                          index_block, index_raw_size)
from dstcli.dtypes import FLOATS as DTYPES, DType, bits_view, of_torch
from dstcli.errors import DstError
from dstcli.fingerprint import algorithm_of, fingerprint

if TYPE_CHECKING:
    import torch

FORMAT = "dstcli-patch"
FORMAT_VERSION = 3
# what each format version may use: a v1 header naming a v2 codec is lying
INDEX_CODECS = {1: ("all", "elias-fano", "bitmap"), 2: ("all", "elias-fano", "bitmap", "rice", "varint"),
                3: ("all", "elias-fano", "bitmap", "rice", "varint")}
VALUE_CODECS_BY_VERSION = {1: ("xor-byteplanes",), 2: ("xor-byteplanes", "xor"), 3: ("xor-byteplanes", "xor")}
FINGERPRINTS_BY_VERSION = {1: ("sha256",), 2: ("sha256",), 3: ("sha256", "xxh3")}
METADATA_KEY = "dstcli"


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, not float: a header that says True for a size is lying


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


@dataclass
class Change:
    """The difference between two same-shaped tensors: positions and XOR bit patterns."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    index: np.ndarray  # (k,) int64, strictly increasing
    xor: np.ndarray  # (k,) integer view of the same width as dtype
    base_fingerprint: str
    result_fingerprint: str
    delta_l2: float | str = 0.0
    delta_max: float | str = 0.0
    silo: dict[str, Any] = field(default_factory=dict)  # budget facts for this tensor, if budgeted

    @classmethod
    def between(cls, name: str, base: torch.Tensor, new: torch.Tensor, *, silo: dict | None = None) -> "Change":
        """Every entry whose bits differ between two torch tensors of the same shape and dtype."""
        b, n = bits_view(base).numpy(), bits_view(new).numpy()
        idx = np.flatnonzero(b != n)
        base_fp = fingerprint(b)
        return cls.at(name, of_torch(base.dtype), tuple(base.shape), idx, b[idx], n[idx], base_fp,
                      fingerprint(n) if len(idx) else base_fp, silo=silo)

    @classmethod
    def at(cls, name: str, dtype: DType, shape: tuple[int, ...], idx: np.ndarray, old: np.ndarray,
           new: np.ndarray, base_fp: str, result_fp: str, *, silo: dict | None = None) -> "Change":
        """A change from its parts: positions and the bits there before and after (integer views
        of the tensor's width; the XOR is kept, the values give the delta statistics)."""
        delta = dtype.to_float64(new) - dtype.to_float64(old)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is a NaN delta, as it should be
            l2 = float(np.sqrt(np.sum(delta * delta))) if len(idx) else 0.0
            mx = float(np.max(np.abs(delta))) if len(idx) else 0.0
        return cls(name, dtype, shape, idx.astype(np.int64, copy=False), old ^ new, base_fp, result_fp,
                   _finite(l2), _finite(mx), silo or {})

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _block(raw: bytes, packed: tuple[str, bytes] | None = None) -> tuple[dict, bytes]:
    """A block's header description and stored bytes; `packed` = compress(raw) if already done."""
    method, stored = packed or compress(raw)
    return {"compression": method, "raw_bytes": len(raw), "stored_bytes": len(stored),
            "crc32": f"{zlib.crc32(stored):08x}"}, stored


def _encode(ch: Change) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One tensor's header entry and its stored blocks (per tensor: the smallest codecs)."""
    k, n = len(ch.index), ch.numel
    entry: dict[str, Any] = {"dtype": ch.dtype.name, "shape": list(ch.shape), "numel": n,
                             "changed": k, "base_fingerprint": ch.base_fingerprint,
                             "result_fingerprint": ch.result_fingerprint,
                             "delta_l2": ch.delta_l2, "delta_max": ch.delta_max}
    if ch.silo:
        entry["silo"] = ch.silo
    blocks: dict[str, bytes] = {}
    if k:
        codec, params, raw_idx, packed = index_block(ch.index, n)
        meta, stored = _block(raw_idx, packed)
        entry["index"] = {"codec": codec, **params, **meta}
        if stored:
            blocks[f"{ch.name}::index"] = stored
        best = None
        for codec in VALUE_CODECS:  # whichever layout compresses better
            meta, stored = _block(encode_values(ch.xor, codec))
            if best is None or len(stored) < len(best[2]):
                best = (codec, meta, stored)
        codec, meta, stored = best
        entry["values"] = {"codec": codec, **meta}
        blocks[f"{ch.name}::values"] = stored
    return entry, blocks


class PatchWriter:
    """Write a patch tensor by tensor, in bounded memory, atomically:

        with PatchWriter("out.dst") as w:
            for change in changes:      # any order; each is encoded and spilled at once
                w.add(change)
            header = w.finish(run=..., budget=..., base_params=...)

    Blocks go to a temporary data file as they are made; `finish` writes the safetensors header
    and then the blocks in name order (kernel copies), so the same changes always give the same
    bytes. An exception inside the `with` leaves no file behind.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, dict] = {}
        self._blocks: dict[str, tuple[int, int]] = {}  # name -> (offset in the data file, size)
        self._at = 0

    def __enter__(self) -> "PatchWriter":
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._data = open(self._tmp.with_name(self._tmp.name + ".blocks"), "w+b")
        return self

    def __exit__(self, *exc) -> bool:
        self._data.close()
        os.unlink(self._data.name)
        return bool(self._atomic.__exit__(*exc))

    def add(self, ch: Change) -> None:
        if ch.name in self.tensors:
            raise DstError(f"tensor {ch.name!r} is listed twice in one patch")
        entry, blocks = _encode(ch)
        self.tensors[ch.name] = entry
        for key, stored in blocks.items():
            self._data.write(stored)
            self._blocks[key] = (self._at, len(stored))
            self._at += len(stored)

    def finish(self, *, run: dict | None = None, budget: dict | None = None, base_params: int | None = None) -> dict:
        tensors = dict(sorted(self.tensors.items()))
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "producer": f"dstcli {__version__}",
                  "base_params": base_params if base_params is not None else sum(e["numel"] for e in tensors.values()),
                  "changed": sum(e["changed"] for e in tensors.values()),
                  "budget": budget or {}, "run": run or {}, "tensors": tensors}
        st: dict[str, Any] = {"__metadata__": dict(sorted({METADATA_KEY: json.dumps(header), "format": FORMAT}.items()))}
        at = 0
        for name in sorted(self._blocks):  # safetensors layout: blocks back to back in name order
            n = self._blocks[name][1]
            st[name] = {"dtype": "U8", "shape": [n], "data_offsets": [at, at + n]}
            at += n
        text = json.dumps(st, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
        self._data.flush()
        with open(self._tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            f.flush()
            at = 8 + len(text)
            for name in sorted(self._blocks):
                off, n = self._blocks[name]
                copy_range(self._data, f, off, at, n)
                at += n
        return header


def save_patch(path: str | os.PathLike, changes: list[Change], *, run: dict | None = None,
               budget: dict | None = None, base_params: int | None = None) -> dict:
    """Write a patch atomically; returns its header. Unchanged tensors are listed with changed=0.

    Args:
        path: output file (replaced atomically; the caller decides about overwriting).
        changes: one Change per patchable tensor of the base, in any order.
        run: free-form run metadata (epsilon, silo, distance, training config, final metrics).
        budget: the budget the patch was selected under, if any (see docs/FORMAT.md).
        base_params: number of patchable scalars in the base (default: the sum over `changes`).
    """
    with PatchWriter(path) as w:
        for ch in changes:
            w.add(ch)
        return w.finish(run=run, budget=budget, base_params=base_params)


class Patch:
    """An open patch file. The header is read (and checked) at once; blocks only on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DstError(f"patch {self.path} does not exist: pass a file written by dstcli train or diff")
        try:
            self._f = safe_open(str(self.path), framework="numpy")
            meta = self._f.metadata() or {}
            self._keys = set(self._f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise DstError(f"{self.path} is not a readable dstcli patch ({e}); it may be truncated or "
                           "corrupt: make it again with dstcli diff or train") from e
        if meta.get("format") != FORMAT or METADATA_KEY not in meta:
            raise DstError(f"{self.path} is a safetensors file but not a dstcli patch: "
                           "to patch a checkpoint from two checkpoints use `dstcli diff BASE FINETUNED`")
        try:
            self.header = json.loads(meta[METADATA_KEY])
        except ValueError as e:
            raise DstError(f"{self.path}: patch header is not valid JSON ({e})") from e
        self._check_header()

    def _bad(self, what: str) -> DstError:
        return DstError(f"{self.path}: {what}; the patch is corrupt: make it again with dstcli diff or train")

    def _check_header(self) -> None:
        h = self.header
        if not isinstance(h, dict) or not isinstance(h.get("tensors"), dict):
            raise self._bad("patch header has no tensor table")
        v = h.get("format_version")
        if not _is_int(v) or v > FORMAT_VERSION or v < 1:
            raise DstError(f"{self.path} has patch format version {v!r}; this dstcli reads versions 1 to "
                           f"{FORMAT_VERSION}: upgrade dstcli (pip install -U dstcli)")
        if not (_is_int(h.get("changed")) and _is_int(h.get("base_params"))
                and isinstance(h.get("budget", {}), dict) and isinstance(h.get("run", {}), dict)):
            raise self._bad("patch header lacks its totals, budget or run metadata")
        expected = set()
        for name, e in h["tensors"].items():
            try:
                if not isinstance(e, dict) or not all(algorithm_of(e.get(f)) in FINGERPRINTS_BY_VERSION[v]
                                                      for f in ("base_fingerprint", "result_fingerprint")):
                    raise self._bad(f"tensor {name!r} has no valid fingerprints")
                if not all(isinstance(e.get(f), (int, float)) or e.get(f) in ("inf", "-inf", "nan")
                           for f in ("delta_l2", "delta_max")):
                    raise self._bad(f"tensor {name!r} has no delta statistics")
                if e["dtype"] not in DTYPES:
                    raise self._bad(f"tensor {name!r} has unsupported dtype {e['dtype']!r}")
                shape = e["shape"]
                if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
                    raise self._bad(f"tensor {name!r} has an invalid shape {shape!r}")
                n = int(np.prod(shape, dtype=object)) if shape else 1
                k = e["changed"]
                if not _is_int(e["numel"]) or e["numel"] != n or not _is_int(k) or not 0 <= k <= n:
                    raise self._bad(f"tensor {name!r} claims {k!r} changes of {e['numel']!r} entries, shape {shape}")
                if k:
                    width = DTYPES[e["dtype"]].itemsize
                    idx, val = e["index"], e["values"]
                    if idx.get("codec") not in INDEX_CODECS[v]:
                        raise self._bad(f"tensor {name!r}: index codec {idx.get('codec')!r} is not part of format {v}")
                    if idx["raw_bytes"] != index_raw_size(idx["codec"], idx, n, k):
                        raise self._bad(f"tensor {name!r}: index block size does not match its codec")
                    if val.get("codec") not in VALUE_CODECS_BY_VERSION[v] or val["raw_bytes"] != k * width:
                        raise self._bad(f"tensor {name!r}: value block does not match {k} entries")
                    for kind, b in (("index", idx), ("values", val)):
                        if (b.get("compression") not in ("none", "zstd") or not isinstance(b.get("crc32"), str)
                                or not all(_is_int(b.get(f)) and b[f] >= 0 for f in ("raw_bytes", "stored_bytes"))):
                            raise self._bad(f"tensor {name!r}: {kind} block description is invalid")
                        if b["stored_bytes"]:
                            expected.add(f"{name}::{kind}")
            except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as ex:
                raise self._bad(f"tensor {name!r} has an incomplete header entry ({ex!r})") from ex
            except DstError as ex:
                if str(ex).startswith(str(self.path)):
                    raise
                raise self._bad(f"tensor {name!r}: {ex}") from ex
        if h["changed"] != sum(e["changed"] for e in h["tensors"].values()):
            raise self._bad("the header's total of changed entries does not add up")
        if expected != self._keys:
            raise self._bad("the blocks in the file do not match the header")
        for key in sorted(self._keys):
            name, _, kind = key.rpartition("::")
            sl = self._f.get_slice(key)
            if sl.get_dtype() != "U8" or sl.get_shape() != [self.tensors[name][kind]["stored_bytes"]]:
                raise self._bad(f"block {key!r} is {sl.get_dtype()}{sl.get_shape()}, not the U8 bytes the header describes")

    @property
    def tensors(self) -> dict[str, dict]:
        return self.header["tensors"]

    def _read_block(self, name: str, kind: str) -> bytes:
        b = self.tensors[name][kind]
        if b["stored_bytes"] == 0:
            stored = b""
        else:
            try:
                stored = self._f.get_tensor(f"{name}::{kind}").tobytes()
            except (SafetensorError, OSError) as e:
                raise self._bad(f"cannot read the {kind} block of {name!r} ({e})") from e
        if len(stored) != b["stored_bytes"] or f"{zlib.crc32(stored):08x}" != b["crc32"]:
            raise self._bad(f"checksum mismatch in the {kind} block of tensor {name!r}")
        return decompress(b["compression"], stored, b["raw_bytes"])

    def read_change(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions int64 (k,), XOR bit patterns (k,)) for one tensor; empty when unchanged."""
        e = self.tensors[name]
        k, n, width = e["changed"], e["numel"], DTYPES[e["dtype"]].itemsize
        if k == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=DTYPES[e["dtype"]].ints)
        try:
            idx = decode_index(e["index"]["codec"], e["index"], self._read_block(name, "index"), n, k)
            xor = decode_values(self._read_block(name, "values"), k, width, e["values"]["codec"])
        except DstError as ex:
            if str(ex).startswith(str(self.path)):
                raise
            raise self._bad(f"tensor {name!r}: {ex}") from ex
        except (ValueError, TypeError, OverflowError, IndexError) as ex:  # a lie the checks above missed
            raise self._bad(f"tensor {name!r} cannot be decoded ({ex})") from ex
        return idx, xor


def open_patch(path: str | os.PathLike) -> Patch:
    return Patch(path)

