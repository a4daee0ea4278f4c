"""Reading safetensors checkpoints lazily, and writing outputs atomically.

A checkpoint is a single ``.safetensors`` file or a directory holding ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Tensors are read one at a time; the whole
checkpoint is never held in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from dstcli.dtypes import BY_CODE, DType
from dstcli.errors import DstError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 << 20  # safetensors' own cap on header size
PIECE = 1 << 20  # bytes per read when a tensor is streamed (apply, lossless diff): 1 MiB stays in
# cache between read, hash, patch and write; 16 MiB pieces were 1.5-6x slower here (two threads writing)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: DType  # .torch for the torch dtype
    shape: tuple[int, ...]
    shard: Path  # the file holding it
    start: int  # absolute byte offset of its data in that file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def patchable(self) -> bool:
        return self.dtype.is_floating_point


def _read_header(path: Path) -> list[TensorInfo]:
    """Parse one safetensors file's header (validated by safe_open first) into tensor extents."""
    try:
        with safe_open(str(path), framework="numpy"):  # validates the header; "pt" would import torch
            pass
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                raise DstError(f"{path}: safetensors header of {size} bytes is over the {MAX_HEADER} cap")
            header = json.loads(f.read(size))
    except (SafetensorError, OSError, ValueError, struct.error) as e:
        raise DstError(f"cannot read safetensors file {path}: {e}; is it a complete .safetensors file?") from e
    base = 8 + size
    infos = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in BY_CODE:
            raise DstError(f"{path}: tensor {name!r} has dtype {spec['dtype']}, which dstcli cannot read")
        a, b = spec["data_offsets"]
        infos.append(TensorInfo(name, BY_CODE[spec["dtype"]], tuple(spec["shape"]), path, base + a, base + b))
    return sorted(infos, key=lambda t: t.start)


class Checkpoint:
    """A lazily read checkpoint. `tensors` maps name -> TensorInfo in name order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DstError(f"checkpoint {self.path} does not exist: pass a .safetensors file or a model directory")
        self.is_dir = self.path.is_dir()
        self.shards = self._find_shards()
        infos: dict[str, TensorInfo] = {}
        for shard in self.shards:
            for info in _read_header(shard):
                if info.name in infos:
                    raise DstError(f"tensor {info.name!r} appears in both {infos[info.name].shard.name} "
                                   f"and {shard.name}: the checkpoint is inconsistent")
                infos[info.name] = info
        self.tensors = dict(sorted(infos.items()))
        self._maps: dict[Path, np.memmap] = {}  # shard -> its copy-on-write map (see `mapped`)

    def _find_shards(self) -> list[Path]:
        if not self.is_dir:
            return [self.path]
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DstError(f"cannot read shard index {index}: {e}") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise DstError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [self.path / f for f in files]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        raise DstError(f"{self.path} holds no model.safetensors (nor {INDEX_NAME}): "
                       "pass a .safetensors file or a model directory")

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from disk into memory (imports torch)."""
        import torch

        info = self.tensors[name]
        with open(info.shard, "rb") as f:
            f.seek(info.start)
            data = f.read(info.end - info.start)
        if len(data) != info.end - info.start:
            raise DstError(f"{info.shard}: tensor {name!r} is truncated")
        if not data:
            return torch.empty(info.shape, dtype=info.dtype.torch)
        return torch.frombuffer(bytearray(data), dtype=info.dtype.torch).reshape(info.shape)

    def mapped(self, names: Iterable[str]) -> dict[str, torch.Tensor] | None:
        """Tensors memory-mapped from their files, not read: a shard's pages come from the page
        cache as they are touched, and stay shared and clean (they can be dropped and read
        again) while nothing writes them. The maps are copy-on-write (MAP_PRIVATE), so a write
        would stay in this process, never reach the file. None where a tensor is not in this
        checkpoint, its data does not start at a multiple of its dtype's width (the CPU kernels
        read whole entries) or its file cannot be mapped (some file systems): the caller reads
        instead. The file must not be rewritten in place while the tensors are in use (truncating
        it kills the reader with SIGBUS); replacing it (a new file renamed over it, as dstcli
        writes its outputs) leaves the maps on the old one."""
        import torch

        out = {}
        for name in names:
            info = self.tensors.get(name)
            if info is None or info.start % info.dtype.itemsize:
                return None
            if info.end == info.start:
                out[name] = torch.empty(info.shape, dtype=info.dtype.torch)
                continue
            mm = self._maps.get(info.shard)
            if mm is None:
                try:
                    mm = self._maps[info.shard] = np.memmap(info.shard, dtype=np.uint8, mode="c")
                except (OSError, ValueError):
                    return None
            if info.end > len(mm):  # shortened since its header was read
                return None
            out[name] = torch.from_numpy(mm[info.start:info.end]).view(info.dtype.torch).view(info.shape)
        return out

    def pieces(self, name: str, buf: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """One tensor's raw bytes, read piece by piece into `buf` (uint8, reused: a piece is
        valid until the next one is read): (first entry of the piece, piece). Pieces hold whole
        entries, so memory stays at len(buf) however large the tensor."""
        info = self.tensors[name]
        width = info.dtype.itemsize
        step = len(buf) - len(buf) % width
        if step <= 0:
            raise ValueError(f"a buffer of {len(buf)} bytes cannot hold one {info.dtype} entry")
        size = info.end - info.start
        with open(info.shard, "rb", buffering=0) as f:
            for at in range(0, size, step):
                piece = buf[:min(step, size - at)]
                got = 0
                while got < len(piece):
                    n = os.preadv(f.fileno(), [memoryview(piece)[got:]], info.start + at + got)
                    if n <= 0:
                        raise DstError(f"{info.shard}: tensor {name!r} is truncated")
                    got += n
                yield at // width, piece

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values() if t.patchable)

    @property
    def nbytes(self) -> int:
        return sum(t.end - t.start for t in self.tensors.values())


# --- atomic outputs -----------------------------------------------------------------------------
def check_output(out: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    out_r = out.resolve()
    for p in inputs:
        p_r = Path(p).resolve()
        if out_r == p_r or p_r in out_r.parents or out_r in p_r.parents:
            raise DstError(f"output {out} would overwrite the input {p}: choose another -o path")
    if out.exists() and not overwrite:
        raise DstError(f"output {out} already exists: pass --overwrite to replace it, or choose another -o path")
    if not out.parent.exists():
        raise DstError(f"directory {out.parent} does not exist: create it first")
    if not out.parent.is_dir():
        raise DstError(f"{out.parent} is a file, not a directory: choose another -o path")


@contextlib.contextmanager
def atomic_path(out: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `out`; on success rename it into place, on any failure remove it."""
    out = Path(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise DstError(f"cannot write {out}: {e.strerror or e}; check that {out.parent} is a writable directory") from e
    target = tmp if is_dir else tmp / out.name
    try:
        yield target
        if out.is_dir() and not out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(target, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, out)
    except OSError as e:
        raise DstError(f"cannot write {out}: {e.strerror or e}; check free space and permissions") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_range(src, dst, src_at: int, dst_at: int, n: int) -> None:
    """Copy n bytes between two open files at the given offsets, by kernel copy (copy_file_range)
    where the system has it, else through user space in 16 MiB pieces. Real errors (a full disk)
    are raised, not retried."""
    while n > 0:
        try:
            done = os.copy_file_range(src.fileno(), dst.fileno(), n, src_at, dst_at)
        except (AttributeError, OSError) as e:  # no copy_file_range here (or across file systems)
            if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = os.pwrite(dst.fileno(), os.pread(src.fileno(), min(n, 1 << 24), src_at), dst_at)
        if done <= 0:
            raise OSError(errno.EIO, f"could not copy bytes {src_at}..{src_at + n} of {src.name}")
        src_at, dst_at, n = src_at + done, dst_at + done, n - done


def _libc_fallocate():
    """fallocate(fd, 0, 0, size) from the C library as a function returning 0 or an errno; None
    where there is none (not Linux)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate  # Linux; not glibc's zero-writing emulation
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return lambda fd, size: 0 if fn(fd, 0, 0, size) == 0 else ctypes.get_errno()


_FALLOCATE = _libc_fallocate()


def preallocate(f, size: int) -> None:
    """Make an open output file `size` bytes long, its blocks allocated up front where the file
    system can (fallocate): writes into it then run ~20% faster here (ext4). A file system that
    cannot just gets the length; a full disk raises at once, before any byte is written."""
    if _FALLOCATE is not None and size > 0:
        err = _FALLOCATE(f.fileno(), size)
        if err == errno.ENOSPC:
            raise OSError(err, os.strerror(err), str(f.name))
    f.truncate(size)
