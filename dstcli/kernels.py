"""Compiled CPU kernels for the DST step (kernels.c), built on first use, with a torch fallback.

On the CPU the projection is bound by passes over memory: torch computes the distances, then
compares, gathers and copies, each a pass of its own. kernels.c fuses them and gives the same
bits: a tensor silo's whole projection in one call (`top`: sample, bracket, k-th largest, then
tie rule, reset and the kept entries in one pass), row silos' and small silos' likewise a row at a time (`rows`), the
global silo's share of each tensor with its reset in one pass (`share`) and each cut of the pool
in one call over its parts (`cut_many`), or with its seed held no pool: a band of the distances
near its K-th largest, then one keeping pass (`Band`). select.py and engine.py call them where they serve (a
CPU tensor of float32, bfloat16 or float64, laid out contiguously) and take their torch paths
otherwise.

The first call compiles kernels.c with the machine's C compiler (`$CC`, else `cc`; -O3
-march=native -fopenmp, dropping flags the compiler refuses) into dstcli's cache folder
(`$DSTCLI_CACHE`, else `$XDG_CACHE_HOME/dstcli`, else ~/.cache/dstcli; a private temp folder where
that cannot be written), named by a hash of the source, the flags, the compiler and the CPU, so
later processes load it in a millisecond. With OpenMP the largest passes use torch's threads
(the same runtime, already loaded), in runs put together in order: the bits never depend on the
number of threads. Without a compiler, with a damaged build in the cache, or with
DSTCLI_KERNELS=0, `lib()` is None and `why()` says why; results are the same, only slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("kernels.c")
PARALLEL_MIN = 1 << 18  # kernels.c's: tensors this large use every thread, smaller ones one
FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC"]
# tried in order, the first the compiler takes: -march=native for AVX-512 where the CPU has it,
# -fopenmp for a second core in the largest kernels
EXTRA_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])
KINDS = {"absolute": 0, "relative": 1, "inverse-relative": 2}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}
_WIDE = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float64: torch.float64}
_BITS = {2: "16", 4: "32", 8: "64"}
_NP_WIDE = {torch.float32: np.float32, torch.bfloat16: np.float32, torch.float64: np.float64}

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded CDLL or None, "why": the reason it is None


def _cache_dir() -> Path:
    if os.environ.get("DSTCLI_CACHE"):
        return Path(os.environ["DSTCLI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dstcli"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(cc: str, out: Path) -> str | None:
    """Build kernels.c at `out` (written beside it, then renamed); None, or why it failed."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    errors = []
    for extra in EXTRA_FLAGS:
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *extra, version, _cpu_id()]).encode())
        target = out / f"kernels-{key.hexdigest()[:16]}{'.dll' if os.name == 'nt' else '.so'}"
        if target.exists():
            _state["path"] = target
            return None
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=target.name, suffix=".tmp")
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                               text=True, timeout=300)
            if r.returncode == 0:
                os.replace(tmp, target)  # another process may have done the same: either copy is whole
                _state["path"] = target
                return None
            errors.append(r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return f"{cc} failed: {errors[-1][0]}"


def _load() -> None:
    if os.environ.get("DSTCLI_KERNELS", "1") == "0":
        _state.update(lib=None, why="DSTCLI_KERNELS=0")
        return
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        _state.update(lib=None, why=f"no C compiler ({cc!r} not found; set CC)")
        return
    folders = [_cache_dir()]
    if not os.environ.get("DSTCLI_CACHE"):  # a home that cannot be written: a private temp folder
        folders.append(Path(tempfile.gettempdir()) / f"dstcli-{os.getuid() if hasattr(os, 'getuid') else 0}")
    for folder in folders:
        try:
            why = _compile(cc, folder)
            break  # built, or the compiler failed: another folder would not help
        except (OSError, subprocess.SubprocessError) as e:
            why = f"could not build the kernels in {folder}: {e}"
    if why is not None:
        _state.update(lib=None, why=why)
        return
    try:
        lib = _bind(ctypes.CDLL(str(_state["path"])))
    except (OSError, AttributeError) as e:  # a damaged or foreign file in the cache
        _state.update(lib=None, why=f"could not load {_state['path']}: {e} (delete it to rebuild)")
        return
    _state.update(lib=lib, why=None)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernels' argument and result types."""
    P, I, F, D, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int
    for suf, real in (("f32", F), ("bf16", F), ("f64", D)):
        f = getattr(lib, f"dst_cand_{suf}")
        f.restype, f.argtypes = I, [P, P, I, C, real, C, P, P, I]
        f = getattr(lib, f"dst_distance_{suf}")
        f.restype, f.argtypes = None, [P, P, I, C, P]
        f = getattr(lib, f"dst_sample_{suf}")
        f.restype, f.argtypes = None, [P, P, I, I, C, P]
    for suf, real in (("f32", F), ("f64", D)):
        f = getattr(lib, f"dst_split_{suf}")
        f.restype, f.argtypes = I, [P, I, real, P]
        f = getattr(lib, f"dst_keep_{suf}")
        f.restype, f.argtypes = I, [P, P, I, real, I, P, P]
        f = getattr(lib, f"dst_bracket_{suf}")
        f.restype, f.argtypes = I, [P, I, real, real, P, P]
        f = getattr(lib, f"dst_rows_above_{suf}")
        f.restype, f.argtypes = I, [P, I, I, P, P, I]
    for suf, real in (("f32", F), ("bf16", F), ("f64", D)):
        f = getattr(lib, f"dst_share_{suf}")
        f.restype, f.argtypes = I, [P, P, I, C, real, C, P, P, P, I, P]
    for suf, real in (("f32", F), ("f64", D)):
        f = getattr(lib, f"dst_kth_{suf}")
        f.restype, f.argtypes = real, [P, I, I, P, P, I]
        f = getattr(lib, f"dst_kth_parts_{suf}")
        f.restype, f.argtypes = C, [I, P, P, I, I, I, I, P, P, P, P, P, P]
    lib.dst_threads.restype, lib.dst_threads.argtypes = C, []
    for suf in ("f32", "bf16", "f64"):
        f = getattr(lib, f"dst_rows_{suf}")
        f.restype, f.argtypes = I, [P, P, I, P, P, C, P, P, P, P, P, I, P]
    for suf, real in (("f32", F), ("bf16", F), ("f64", D)):
        f = getattr(lib, f"dst_top_{suf}")
        f.restype, f.argtypes = I, [P, P, I, C, I, I, I, I, P, P, P, P, P, P, P, P, I, P]
        f = getattr(lib, f"dst_many_{suf}")
        f.restype, f.argtypes = I, [I, P, P, P, P, P, P, P, P, P, P, C, P, C, P, P, P, P]
        f = getattr(lib, f"dst_pool_many_{suf}")
        f.restype, f.argtypes = I, [I, P, P, P, P, P, P, P, C, real, C, I, P, C, P, P, P, P, P]
    for suf, real in (("f32", F), ("bf16", F), ("f64", D)):
        f = getattr(lib, f"dst_band_{suf}")
        f.restype, f.argtypes = C, [I, P, P, P, C, real, real, C, P, P, P, P, P, P, P]
        f = getattr(lib, f"dst_band_keep_{suf}")
        f.restype, f.argtypes = C, [I, C, P, P, P, P, C, real, P, P, P, P, P, P, P, P, P]
    for suf, real in (("f32", F), ("f64", D)):
        f = getattr(lib, f"dst_band_cut_{suf}")
        f.restype, f.argtypes = C, [I, P, P, P, P, C, real, I, I, I, P, P, P, P, P]
    for bits in _BITS.values():
        f = getattr(lib, f"dst_reset_{bits}")
        f.restype, f.argtypes = None, [P, P, I, P, I, P, P]
        f = getattr(lib, f"dst_churn_{bits}")
        f.restype, f.argtypes = None, [I, P, P, P, P, P, P, P, C, P]
    for suf, real, bits in (("f32", F, "16"), ("f32", F, "32"), ("f64", D, "16"), ("f64", D, "32"), ("f64", D, "64")):
        f = getattr(lib, f"dst_cut_many_{suf}_{bits}")
        f.restype, f.argtypes = C, [I, P, P, P, P, P, real, P, C, P, P, P, P, P]
    return lib


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None where they cannot be had."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _load()
    return _state["lib"]


def why() -> str | None:
    """Why `lib()` is None (None when the kernels are loaded)."""
    lib()
    return _state["why"]


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: contiguous, on the CPU, one dtype they know."""
    t = tensors[0]
    return (t.dtype in _SUFFIX and all(u.device.type == "cpu" and u.dtype == t.dtype and u.is_contiguous()
                                       for u in tensors) and lib() is not None)


def hints(n: int, dtype: torch.dtype) -> np.ndarray:
    """n rows' starting k-th largest distances for `rows` / `many` (zero: no hint yet), in the
    width the kernels compute distances in for `dtype`."""
    return np.zeros(n, dtype=_NP_WIDE.get(dtype, np.float32))


def distance(x: torch.Tensor, x0: torch.Tensor, kind: str) -> torch.Tensor:
    """select.distance(x, x0, kind) in one pass (x and x0: `serves`)."""
    out = torch.empty(x.shape, dtype=_WIDE[x.dtype])
    getattr(_state["lib"], f"dst_distance_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), x0.data_ptr(), x.numel(), KINDS[kind], out.data_ptr())
    return out


def sample(x: torch.Tensor, x0: torch.Tensor, kind: str, stride: int) -> np.ndarray:
    """distance(x, x0, kind) at every stride-th position (x and x0: `serves`)."""
    out = np.empty(-(-x.numel() // stride), dtype=np.float64 if x.dtype == torch.float64 else np.float32)
    getattr(_state["lib"], f"dst_sample_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), x0.data_ptr(), x.numel(), stride, KINDS[kind], out.ctypes.data)
    return out


def candidates(x: torch.Tensor, x0: torch.Tensor, kind: str, lo: float, strict: bool,
               cap: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Ascending positions of the entries whose distance(x, x0, kind) is >= lo (> lo if strict),
    and those distances, in one pass; None when more than `cap` are (nothing else is done then).
    x and x0: `serves`."""
    cap = max(0, min(int(cap), x.numel()))
    pos = torch.empty(cap + 16, dtype=torch.long)
    val = torch.empty(cap + 16, dtype=_WIDE[x.dtype])
    c = getattr(_state["lib"], f"dst_cand_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), x0.data_ptr(), x.numel(), KINDS[kind], lo, int(strict), pos.data_ptr(), val.data_ptr(), cap)
    if c > cap:
        return None
    return pos[:c], val[:c]


def split(val: torch.Tensor, hi: float) -> tuple[np.ndarray, int]:
    """Distances (float32 or float64) not above hi, copied out, and how many are above it."""
    inside = torch.empty_like(val)
    m = getattr(_state["lib"], f"dst_split_{_SUFFIX[val.dtype]}")(val.data_ptr(), len(val), hi, inside.data_ptr())
    return inside[:m].numpy(), len(val) - m


def _np_suffix(a: np.ndarray) -> str:
    """The kernels' suffix for a NumPy array of distances (float32 or float64)."""
    return "f64" if a.dtype == np.float64 else "f32"


def bracket(val: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, int]:
    """Of values (float32 or float64, contiguous), the ones in [lo, hi] copied out, and how many
    are above hi."""
    inside = np.empty(len(val) + 16, dtype=val.dtype)
    above = ctypes.c_int64(0)
    m = getattr(_state["lib"], f"dst_bracket_{_np_suffix(val)}")(
        val.ctypes.data, len(val), lo, hi, inside.ctypes.data, ctypes.byref(above))
    return inside[:m], above.value


def rows_above(d: np.ndarray, tau: np.ndarray, cap: int) -> np.ndarray | None:
    """For row silos' distances d (R, m; float32 or float64, C-contiguous) and each row's
    threshold tau (R values, d's dtype): the ascending flat positions of the entries at or above
    their row's tau, in one pass; None when more than `cap` are (nothing else is done then)."""
    R, m = d.shape
    pos = np.empty(cap + 16, dtype=np.int64)
    tau = np.ascontiguousarray(tau, dtype=d.dtype)
    c = getattr(_state["lib"], f"dst_rows_above_{_np_suffix(d)}")(
        d.ctypes.data, R, m, tau.ctypes.data, pos.ctypes.data, cap)
    return None if c > cap else pos[:c]


def keep(pos: torch.Tensor, val: torch.Tensor, tau: float, need: int,
         values: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Of candidates (ascending positions, their distances) whose k-th largest distance is tau,
    the kept ones: all above tau, then ties at tau from the lowest position while `need` lasts,
    never a distance <= 0. Returns new tensors of their positions and (if `values`) distances."""
    kpos = torch.empty_like(pos)
    kval = torch.empty_like(val) if values else None
    k = getattr(_state["lib"], f"dst_keep_{_SUFFIX[val.dtype]}")(
        pos.data_ptr(), val.data_ptr(), len(pos), tau, need, kpos.data_ptr(), kval.data_ptr() if values else None)
    return kpos[:k].clone(), (kval[:k].clone() if values else None)


def reset(x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set x to x0 except at the ascending positions idx; return x's and x0's values there (as
    they were). Bits are moved, not computed. x and x0: `serves`, flat."""
    kx, kx0 = torch.empty(len(idx), dtype=x.dtype), torch.empty(len(idx), dtype=x.dtype)
    idx = idx.to(torch.long).contiguous()  # the kernel reads int64 positions (all in range: callers')
    getattr(_state["lib"], f"dst_reset_{_BITS[x.element_size()]}")(
        x.data_ptr(), x0.data_ptr(), x.numel(), idx.data_ptr(), len(idx), kx.data_ptr(), kx0.data_ptr())
    return kx, kx0


def share(x: torch.Tensor, x0: torch.Tensor, kind: str, lo: float, strict: bool,
          cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """A global silo's tensor in one pass: the ascending positions whose distance(x, x0, kind) is
    >= lo (> lo if strict), those distances and x0's values there; x is set to x0 everywhere else
    (bits moved). Also returns how many of the candidates differ from x0 bit for bit. None when
    more than `cap` are candidates: the pass stops there, having set only entries below lo to x0
    (which leaves x's top-`cap` alone whenever more than `cap` are at or above lo). x and x0:
    `serves`, flat."""
    cap = max(0, min(int(cap), x.numel()))
    room = int(share_room(x.numel(), cap, _state["lib"].dst_threads()))
    pos = torch.empty(room, dtype=torch.long)
    val = torch.empty(room, dtype=_WIDE[x.dtype])
    seed = torch.empty(room, dtype=x.dtype)
    differ = ctypes.c_int64(0)
    c = getattr(_state["lib"], f"dst_share_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), x0.data_ptr(), x.numel(), KINDS[kind], lo, int(strict), pos.data_ptr(), val.data_ptr(),
        seed.data_ptr(), cap, ctypes.byref(differ))
    if c > cap:
        return None
    return pos[:c], val[:c], seed[:c], differ.value


def share_room(n, cap, threads: int):
    """The room dst_share_* writes into (positions, distances, seed values) over n entries with at
    most `cap` kept (NumPy arrays or ints): from PARALLEL_MIN entries on each of up to `threads`
    runs collects min(cap, its length) + 1 from its own start, so min(n, threads * cap), else
    min(n, cap); plus 16 a run and 16 (16-wide stores)."""
    return np.where(np.asarray(n) >= PARALLEL_MIN, np.minimum(n, threads * cap), np.minimum(n, cap)) + 16 * threads + 16


def kth(values: np.ndarray, j: int, rounds: int = 64) -> tuple[float, int]:
    """The j-th smallest of values (float32 or float64, NaN-free; 0 <= j < len) and how many are
    above it, by dst_kth_* on a copy (`rounds`: the quickselect's rounds before it sorts what is
    left; dst_top_* uses 64)."""
    a = np.empty(len(values) + 32, dtype=values.dtype)
    a[:len(values)] = values
    tmp = np.empty_like(a)
    above = ctypes.c_int64(0)
    t = getattr(_state["lib"], f"dst_kth_{_np_suffix(a)}")(a.ctypes.data, len(values), j, tmp.ctypes.data,
                                                          ctypes.byref(above), rounds)
    return t, above.value


def _carve(work: dict | None, sizes: list[tuple[int, type]]) -> list[np.ndarray]:
    """Arrays of the given lengths and dtypes, laid out in `work["buf"]` (grown when too small and
    kept for the next call, so its pages are not faulted in again: a fresh allocation cost more
    than the kernel on tensors of ~100K entries), or freshly allocated where work is None."""
    if work is None:
        return [np.empty(n, dtype=t) for n, t in sizes]
    offsets, total = [], 0
    for n, t in sizes:
        offsets.append(total)
        total += -(-n * np.dtype(t).itemsize // 64) * 64
    buf = work.get("buf")
    if buf is None or len(buf) < total:
        buf = work["buf"] = np.empty(total, dtype=np.uint8)
    return [buf[o:o + n * np.dtype(t).itemsize].view(t) for o, (n, t) in zip(offsets, sizes)]


def _runs(work: dict, threads: int) -> list[dict]:
    """The scratch dicts of `threads` threads' runs: `work` itself for the first, kept in it for
    the others (work["run r"]), so that each keeps its memory from call to call."""
    return [work] + [work.setdefault(f"run {r}", {}) for r in range(1, threads)]


def _parts(buf: torch.Tensor, count: np.ndarray, room: np.ndarray) -> list[torch.Tensor]:
    """Views of consecutive parts of buf: part i is its first count[i] entries of room[i]."""
    cuts = np.empty(2 * len(count), dtype=np.int64)  # each part's entries, then the room left after them
    cuts[0::2], cuts[1::2] = count, room - count
    return list(buf.split(cuts.tolist())[0::2])


def top(x: torch.Tensor, x0: torch.Tensor, kind: str, k: int, stride: int, j_lo: int, j_hi: int,
        work: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """A tensor silo's projection in one call: select.top_positions(x, x0, k, kind) with the
    bracket of select.sparse_bracket (stride, j_lo, j_hi), then x set to x0 outside the kept
    positions (bits moved). Returns the kept positions (ascending), x0's values there and how many
    of the kept values differ from them bit for bit; None where the sample misled (x untouched:
    the caller takes the other path). x and x0: `serves`, flat, 0 < k < x.numel(). `work`: a dict
    the caller keeps to reuse the scratch memory between calls (see _carve)."""
    n = x.numel()
    sbuf, val, inside, tmp = top_scratch(n, -(-n // stride), x.dtype, work)
    room = k + 16 * _state["lib"].dst_threads() + 16  # each thread's run writes at its share + 16
    kpos, kx0 = torch.empty(room, dtype=torch.long), torch.empty(room, dtype=x.dtype)
    differ, counts = ctypes.c_int64(0), np.zeros(2, dtype=np.int64)  # no old kept set: counts unused
    kept = getattr(_state["lib"], f"dst_top_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), x0.data_ptr(), n, KINDS[kind], k, stride, j_lo, j_hi, sbuf.ctypes.data, val.ctypes.data,
        inside.ctypes.data, tmp.ctypes.data, kpos.data_ptr(), kx0.data_ptr(), ctypes.byref(differ), None, 0,
        counts.ctypes.data)
    if kept < 0:
        return None
    return kpos[:kept], kx0[:kept], differ.value


def top_scratch(n: int, s: int, dtype: torch.dtype, work: dict | None) -> list[np.ndarray]:
    """dst_top_*'s scratch for tensors of up to n entries and samples of up to s values (the
    sample twice, the distances inside the bracket as each thread's range collects them, the
    same put together for ranking, the quickselect's buffer), carved from `work` (see _carve)."""
    wide = _NP_WIDE[dtype]
    room = n + 16 * _state["lib"].dst_threads() + 16
    return _carve(work, [(2 * s + 64, wide), (room, wide), (n + 32, wide), (max(n, 2 * s) + 32, wide)])


def rows(x: torch.Tensor, x0: torch.Tensor, k: np.ndarray, kind: str, hint: np.ndarray,
         starts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row silos' projection in one call: of x (R, m) each row keeps its k[r] largest
    distance(x, x0, kind) by the tie rule (select.rows_indices) and goes back to x0 elsewhere (bits
    moved). With `starts` (R + 1 ascending offsets) x and x0 are flat and row r is
    [starts[r], starts[r + 1]): silos of any lengths laid end to end. Returns the kept flat
    positions (ascending), x0's values there and how many kept values differ from them bit for
    bit. hint (R values, float32, float64 for float64 tensors) holds each row's k-th largest
    distance of the last step, 0 for none: the ranking starts from 3/4 of it (any hint gives the
    same answer, a close one a faster one); it is overwritten with this step's. x and x0: `serves`;
    k: R values."""
    if starts is None:
        R, m = x.shape
        starts = np.arange(0, (R + 1) * m, m, dtype=np.int64)
    R = len(starts) - 1
    wide = np.float64 if x.dtype == torch.float64 else np.float32
    k = np.ascontiguousarray(k, dtype=np.int64)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    assert hint.dtype == wide and hint.flags.c_contiguous and len(hint) == R == len(k)
    total = int(np.minimum(k, np.diff(starts)).clip(0).sum()) + 16 * _state["lib"].dst_threads() + 16
    pos, seed = torch.empty(total, dtype=torch.long), torch.empty(total, dtype=x.dtype)
    differ, counts = ctypes.c_int64(0), np.zeros(2, dtype=np.int64)  # no old kept set: counts unused
    c = getattr(_state["lib"], f"dst_rows_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), x0.data_ptr(), R, starts.ctypes.data, k.ctypes.data, KINDS[kind], hint.ctypes.data,
        pos.data_ptr(), seed.data_ptr(), ctypes.byref(differ), None, 0, counts.ctypes.data)
    if c < 0:
        raise MemoryError("out of memory for the row kernels' scratch")
    return pos[:c], seed[:c], differ.value


class Bucket:
    """The fixed part of `many`'s and `pool_many`'s calls over a list of flat tensors of one
    dtype: per tensor, for `many`, either a tensor silo for dst_top_* (top[t] = (k, stride, j_lo,
    j_hi) of select.sparse_bracket, 0 < k < n) or silos along rows for dst_rows_* (rows[t] =
    (starts, k, hint) as `rows` takes them; a small tensor silo is one row); for `pool_many`
    (pool = the global silo's K) top[t] for the tensor's own top-K where dst_top_* takes it.
    Also where each tensor's output goes (`offsets`) and the scratch sizes."""

    def __init__(self, dtype: torch.dtype, sizes: list[int], top: list[tuple[int, int, int, int] | None],
                 rows: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None, pool: int | None = None):
        count = len(sizes)
        self.dtype, self.count, self.sizes, self.n = dtype, count, sizes, np.array(sizes, dtype=np.int64)
        self.pool = pool
        # pool_many's output buffers, reused from call to call while the caller leaves them here
        # (set None to free them)
        self.bufs: list[torch.Tensor] | None = None
        self._offsets: dict[int, np.ndarray] = {}
        self._scratch: tuple | None = None
        self.spec = np.zeros((count, 4), dtype=np.int64)
        self.rows = rows  # kept alive: the pointers below point into them
        P = ctypes.c_void_p * count
        self.starts, self.k, self.hint = P(), P(), P()
        # each tensor's room for its output: `room` entries, plus 16 per thread + 16 (see offsets)
        self.room = np.zeros(count, dtype=np.int64)
        self.top, self.top_small = (0, 0), (0, 0)  # dst_top_*'s largest (n, s), and under PARALLEL_MIN
        for t, n in enumerate(sizes):
            if top[t] is not None:
                self.spec[t] = top[t]
                ns = (n, -(-n // top[t][1]))
                self.top = max(self.top, ns)
                if n < PARALLEL_MIN:
                    self.top_small = max(self.top_small, ns)
            if pool is not None:  # the room: share_room (see offsets)
                continue
            if top[t] is not None:
                self.room[t] = top[t][0]
            else:
                starts, k, hint = rows[t]
                assert starts.dtype == k.dtype == np.int64 and hint.dtype == _NP_WIDE[dtype]
                self.spec[t, 0] = -(len(starts) - 1)
                self.starts[t], self.k[t], self.hint[t] = starts.ctypes.data, k.ctypes.data, hint.ctypes.data
                self.room[t] = np.minimum(k, np.diff(starts)).clip(0).sum()

    def offsets(self, threads: int) -> np.ndarray:
        """Where each tensor's output starts (and the total at the end) for a call on `threads`."""
        if threads not in self._offsets:
            room = (share_room(self.n, self.pool, threads) if self.pool is not None
                    else self.room + 16 * threads + 16)
            self._offsets[threads] = np.concatenate([[0], np.cumsum(room)]).astype(np.int64)
        return self._offsets[threads]

    def scratch(self, work: dict, threads: int):
        """The scratch sets (dst_top_*'s four arrays) for a call on `threads`, as a ctypes array
        of addresses: the first for the largest tensor, the others for the largest under
        PARALLEL_MIN. Kept for the next call while `work` holds the same buffers (the cache holds
        them too, so that no other array can take their ids): carving them again cost more than
        the kernel on small buckets."""
        runs = _runs(work, threads)
        key = tuple(id(run.get("buf")) for run in runs)
        if self._scratch is not None and self._scratch[0] == key:
            return self._scratch[2]
        out = []
        for (n, s), run in zip([self.top] + [self.top_small] * (threads - 1), runs):
            out += [a.ctypes.data for a in top_scratch(n, s, self.dtype, run)]
        key = tuple(id(run.get("buf")) for run in runs)
        held = [run.get("buf") for run in runs]
        self._scratch = (key, held, (ctypes.c_void_p * len(out))(*out))
        return self._scratch[2]


def _bucket_call(name: str, b: Bucket, x: list[torch.Tensor], x0: list[torch.Tensor], old_idx: list[torch.Tensor],
                 old_seed: list[torch.Tensor] | None, kind: str, work: dict | None, middle: tuple, ends: tuple,
                 outputs: list[torch.dtype], width: int, reuse: bool = False) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    """dst_many_* or dst_pool_many_*: the arguments they share and their output buffers (one
    tensor per dtype in `outputs`, each tensor's part at its offset; with `reuse`, the bucket's
    own from its last such call, which saves faulting fresh pages in). Returns the buffers, the
    offsets and the counts (out: `width` per tensor, the first how many it keeps or -1)."""
    T, threads = b.count, _state["lib"].dst_threads()
    P = ctypes.c_void_p * T
    off = b.offsets(threads)
    bufs = b.bufs if reuse else None
    if bufs is None or len(bufs[0]) < off[-1] or [t.dtype for t in bufs] != outputs:
        bufs = [torch.empty(int(off[-1]), dtype=d) for d in outputs]
        if reuse:
            b.bufs = bufs
    out = np.empty((T, width), dtype=np.int64)
    n_old = np.array([i.numel() for i in old_idx], dtype=np.int64)
    scratch = b.scratch(work if work is not None else {}, threads)
    seeds = P() if old_seed is None else P(*[t.data_ptr() for t in old_seed])  # NULLs: nothing restored
    if getattr(_state["lib"], f"{name}_{_SUFFIX[b.dtype]}")(
            T, P(*[t.data_ptr() for t in x]), P(*[t.data_ptr() for t in x0]), b.n.ctypes.data, b.spec.ctypes.data,
            *middle, P(*[t.data_ptr() for t in old_idx]), seeds, n_old.ctypes.data,
            KINDS[kind], *ends, scratch, threads,
            *[t.data_ptr() for t in bufs], off.ctypes.data, out.ctypes.data):
        raise MemoryError("out of memory for the row kernels' scratch")
    return bufs, off, out


def many(b: Bucket, x: list[torch.Tensor], x0: list[torch.Tensor], old_idx: list[torch.Tensor],
         old_seed: list[torch.Tensor] | None, kind: str, work: dict | None = None) -> tuple[list, list, np.ndarray]:
    """A bucket's projection in one call: x0[t] (x[t] before the optimizer step) gets old_seed[t]
    back at old_idx[t] (the kept set before it), which makes it the seed (old_seed None: x0 are
    the seeds already, e.g. memory-mapped, and are only read), then each tensor is
    projected as `top` or `rows` would (Bucket says which). Returns the kept positions and seed
    values of each tensor (views of one buffer), and per tensor (kept, differ, both, nonfinite):
    how many it keeps (-1: the sample misled; x[t] is untouched and x0[t] its seed: the caller
    takes the other path), how many of those differ from the seed bit for bit, how many of those
    it kept before too, how many are NaN or infinite. x, x0: `serves`, flat, b.dtype. `work`: a
    dict kept from call to call for the scratch memory."""
    bufs, off, out = _bucket_call("dst_many", b, x, x0, old_idx, old_seed, kind, work, (b.starts, b.k, b.hint), (),
                                  [torch.long, b.dtype], 4)
    pos, seed = (_parts(t, out[:, 0].clip(0), np.diff(off)) for t in bufs)
    return pos, seed, out


def pool_many(b: Bucket, x: list[torch.Tensor], x0: list[torch.Tensor], old_idx: list[torch.Tensor],
              old_seed: list[torch.Tensor] | None, kind: str, floor: float | None, K: int,
              work: dict | None = None) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray, np.ndarray]:
    """The global silo's shares of a bucket's tensors in one call (b: Bucket(..., pool=K)): x0[t] made
    the seed as in `many` (or the seed already: old_seed None), then, without a floor, a tensor of
    at most K entries whole (every entry's distance and seed value, nothing reset: see Pool), else
    what `share` with the pool's floor (strict) takes, capped at K, else the tensor's own top-K; the
    rest of x[t] back to the seed. Returns the kept positions (not written for a whole tensor), seed
    values and distances (float32, float64 for float64 tensors), per tensor (kept, differ): how many
    (-1: the sample misled, x[t]'s top-K untouched and x0[t] its seed: the caller takes the other
    path) and how many of those differ from the seed bit for bit (0 for a whole tensor, counted by
    the cut), and which tensors were taken whole (1, else 0). The first three come as buffers with
    each tensor's part at its offset, for Pool.add: `b.bufs`, allocated where None and written again
    by its next call (the pool's last cut copies what must last)."""
    (pos, val, seed), off, out = _bucket_call("dst_pool_many", b, x, x0, old_idx, old_seed, kind, work, (),
                                              (0.0 if floor is None else floor, int(floor is not None), K),
                                              [torch.long, _WIDE[b.dtype], b.dtype], 2, reuse=True)
    whole = ((b.n <= K) if floor is None else np.zeros(b.count, dtype=bool)).astype(np.int64)
    return [pos, seed, val], off[:-1], out, whole


def churn(kept: list[torch.Tensor], old: list[torch.Tensor], x: list[torch.Tensor], work: dict) -> tuple[int, int]:
    """How many positions of each kept set (ascending) were in the matching old one, and how many
    of x's values at the kept positions are NaN or infinite, summed over the tensors (flat,
    `serves`), in one call per width of x; tensors on several threads."""
    both = bad = 0
    threads = _state["lib"].dst_threads()
    for bits in {t.element_size() for t in x}:
        at = [i for i, t in enumerate(x) if t.element_size() == bits]
        T = len(at)
        P = ctypes.c_void_p * T
        big = max(x[i].numel() for i in at)
        maps = []
        for run in _runs(work, threads):
            if "map" not in run or len(run["map"]) < big:  # all 0 between calls (the kernel clears what it sets)
                run["map"] = np.zeros(max(big, 1), dtype=np.uint8)
            maps.append(run["map"].ctypes.data)
        out = np.empty((T, 2), dtype=np.int64)
        n_kept, n_old, n = (np.array([t[i].numel() for i in at], dtype=np.int64) for t in (kept, old, x))
        getattr(_state["lib"], f"dst_churn_{_BITS[bits]}")(
            T, P(*[kept[i].data_ptr() for i in at]), n_kept.ctypes.data, P(*[old[i].data_ptr() for i in at]),
            n_old.ctypes.data, P(*[x[i].data_ptr() for i in at]), n.ctypes.data, (ctypes.c_void_p * threads)(*maps),
            threads, out.ctypes.data)
        both, bad = both + int(out[:, 0].sum()), bad + int(out[:, 1].sum())
    return both, bad


class Pool:
    """The global silo's pool on the kernels (engine._step_pool_many), one dtype: its parts (a
    tensor's share each, in the tensors' order) as the addresses of the tensor, of the share's
    kept positions, seed values and distances, and how many each holds; the buffers behind them
    in blocks (pos, seed, val tensors, the first part, how many parts, each part's offset in
    them). A part may be whole (a tensor's every entry, as pool_many takes one before the pool
    has a floor: its positions not written, nothing reset, its distances of 0 included) until a
    cut, which compacts each part in place and leaves none whole. The buffers are pool_many's,
    which its Bucket holds through the step anyway (see engine._keep_pool_buffers), so a cut
    does not pack them into smaller ones: that only added memory and time."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.ptrs = np.empty((0, 4), dtype=np.uint64)  # x, pos, seed, val
        self.count, self.differ, self.off, self.whole = (np.empty(0, dtype=np.int64) for _ in range(4))
        self.blocks: list[list] = []

    @property
    def size(self) -> int:
        return int(self.count.sum())

    def add(self, x: list[torch.Tensor], pos: torch.Tensor, seed: torch.Tensor, val: torch.Tensor, off: np.ndarray,
            count: np.ndarray, differ: np.ndarray, whole: np.ndarray | None = None) -> None:
        """A block's parts: x[t]'s share at off[t] in pos, seed and val (count[t] entries, differ[t]
        of them different from the seed; whole[t]: taken whole, see the class)."""
        off = np.asarray(off, dtype=np.int64)
        ptrs = np.empty((len(x), 4), dtype=np.uint64)
        ptrs[:, 0] = [t.data_ptr() for t in x]
        for c, buf in enumerate((pos, seed, val), 1):
            ptrs[:, c] = buf.data_ptr() + off * buf.element_size()
        self.blocks.append([pos, seed, val, len(self.count), len(x)])
        self.ptrs = np.concatenate([self.ptrs, ptrs])
        whole = np.zeros(len(x), dtype=np.int64) if whole is None else whole
        self.count, self.differ, self.off, self.whole = (
            np.concatenate([a, np.asarray(b, dtype=np.int64)])
            for a, b in ((self.count, count), (self.differ, differ), (self.off, off), (self.whole, whole)))

    def values(self) -> list[np.ndarray]:
        """Each part's distances (NumPy views)."""
        out = []
        for pos, seed, val, first, n in self.blocks:
            out += [v.numpy() for v in self._split(val, first, n)]
        return out

    def _split(self, buf: torch.Tensor, first: int, n: int) -> list[torch.Tensor]:
        off = self.off[first:first + n]
        return _parts(buf, self.count[first:first + n], np.append(off[1:], len(buf)) - off)

    def kth(self, K: int, stride: int, j_lo: int, j_hi: int, work: dict) -> tuple[float, int, int] | None:
        """select.kth_largest over the parts' distances in one call, the sample's stride and
        ranks from select.sparse_bracket(size, K); None where the sample misled."""
        total, n = self.size, len(self.count)
        s = total // stride + 2
        wide = _NP_WIDE[self.dtype]
        sbuf, inside, tmp = _carve(work, [(2 * s + 64, wide), (2 * total + 64, wide), (max(total, 2 * s) + 32, wide)])
        tau, need, ties = (ctypes.c_double if wide == np.float64 else ctypes.c_float)(), ctypes.c_int64(), ctypes.c_int64()
        vals = np.ascontiguousarray(self.ptrs[:, 3])
        if getattr(_state["lib"], f"dst_kth_parts_{_np_suffix(sbuf)}")(
                n, vals.ctypes.data, self.count.ctypes.data, K, stride, j_lo, j_hi, sbuf.ctypes.data,
                inside.ctypes.data, tmp.ctypes.data, ctypes.byref(tau), ctypes.byref(need), ctypes.byref(ties)):
            return None
        return tau.value, need.value, ties.value

    def cut(self, tau: float, need: int, ties: int, last: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keep the entries above tau and the first `need` equal to it (in pool order), never a
        distance <= 0; set the others back to their seed values (dst_cut_many_*). The step's last
        cut (last: at most how many it keeps, the silo's K) writes the kept positions and seed
        values straight into two buffers of their size and returns each part's (views of them),
        so that the blocks' buffers may be reused (see pool_many; the pool is not to be cut
        again); the others compact the parts in place."""
        n = len(self.count)
        cols = [np.ascontiguousarray(self.ptrs[:, c]) for c in range(4)]
        left = np.array([need], dtype=np.int64)
        kept, differ = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        suffix = f"{'f64' if self.dtype == torch.float64 else 'f32'}_{_BITS[torch.empty(0, dtype=self.dtype).element_size()]}"
        out = None
        if last is not None:  # room for 16 more: the kernel's last writes go 16 wide
            out = [torch.empty(min(self.size, last) + 16, dtype=d) for d in (torch.long, self.dtype)]
        if getattr(_state["lib"], f"dst_cut_many_{suffix}")(
                n, *[c.ctypes.data for c in cols], self.count.ctypes.data, tau, left.ctypes.data, int(ties == need),
                self.whole.ctypes.data, kept.ctypes.data, differ.ctypes.data,
                *((None, None) if out is None else (t.data_ptr() for t in out))):
            raise MemoryError("out of memory for the pool cut's tie budgets")
        self.count, self.differ = kept, differ
        self.whole[:] = 0
        if out is None:
            return None
        size = self.size
        return list(zip(*(t[:size].split(self.count.tolist()) for t in out)))


def cut_many(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], tau: float,
             need: np.ndarray, all_fit: bool) -> list[tuple[int, int]]:
    """A global silo's pool cut at tau, over its parts in order, (x, pos, seed, val) each: of a
    part's candidates (ascending int64 positions in x, x0's values there, their distances, float32
    or float64) those above tau stay, then those equal to tau while `need` lasts (one int64 in a
    NumPy array, counted down in place: the parts share it, in order), never a distance <= 0; the
    others are set back to their x0 values in x. pos, seed and val are compacted in place; returns,
    for each part, how many stay and how many of those differ from x0. One call per run of parts of
    one kind (distances' dtype, x's width), the parts on several threads from 2^18 candidates on
    (each part's ties budgeted as the shared count would). all_fit: every value equal to tau fits
    (select.kth_largest's ties == need), which spares counting them. x: `serves`, flat."""
    out: list[tuple[int, int]] = []
    at = 0
    while at < len(parts):
        kind = (parts[at][3].dtype, parts[at][0].element_size())
        end = at
        while end < len(parts) and (parts[end][3].dtype, parts[end][0].element_size()) == kind:
            end += 1
        run, n = parts[at:end], end - at
        ptrs = [(ctypes.c_void_p * n)(*[t.data_ptr() for t in col]) for col in zip(*run)]
        count = np.array([len(p[1]) for p in run], dtype=np.int64)
        kept, differ = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        if getattr(_state["lib"], f"dst_cut_many_{_SUFFIX[kind[0]]}_{_BITS[kind[1]]}")(
                n, *ptrs, count.ctypes.data, tau, need.ctypes.data, int(all_fit), None, kept.ctypes.data,
                differ.ctypes.data, None, None):
            raise MemoryError("out of memory for the pool cut's tie budgets")
        out += zip(kept.tolist(), differ.tolist())
        at = end
    return out


class Band:
    """The global silo's band with its seed held (engine._step_band; kernels.c, dst_band_*): a
    step's distances inside a bracket [lo, hi], copied out bucket by bucket by `add` right after
    each optimizer step, and how many lie above hi; `cut` gives the K-th largest from them and
    `keep` keeps and resets every tensor added. One buffer of `cap` values a thread, kept from
    step to step: a band that would not fit (or a bracket that misses) answers None, and the
    tensors are untouched then (the caller takes the pool)."""

    def __init__(self, dtype: torch.dtype, cap: int):
        self.dtype, self.R = dtype, _state["lib"].dst_threads()
        self.bufs = [np.empty(cap, dtype=_NP_WIDE[dtype]) for _ in range(self.R)]
        self.ptrs = (ctypes.c_void_p * self.R)(*[b.ctypes.data for b in self.bufs])
        self.cap = np.full(self.R, cap, dtype=np.int64)
        self.at = np.zeros(self.R, dtype=np.int64)
        self.start(0.0, float("inf"), "absolute")

    def start(self, lo: float, hi: float, kind: str) -> None:
        """Empty the band for a step whose bracket is [lo, hi] (distances of `kind`)."""
        self.lo, self.hi, self.kind, self.ok = lo, hi, kind, True
        self.at[:] = 0
        self.parts: list[tuple] = []

    def add(self, x: list[torch.Tensor], x0: list[torch.Tensor]) -> bool:
        """The next tensors (stepped, flat, `serves`; x0: their seeds), in position order: their
        distances in [lo, hi] into the band (nothing is written to x). False once the band is
        dropped (it would not fit)."""
        if not self.ok:
            return False
        T, R = len(x), self.R
        P = ctypes.c_void_p * T
        n = np.array([t.numel() for t in x], dtype=np.int64)
        nruns, where, cnt, up = (np.empty(T * w, dtype=np.int64) for w in (1, 2 * R, R, R))
        self.ok = getattr(_state["lib"], f"dst_band_{_SUFFIX[self.dtype]}")(
            T, P(*[t.data_ptr() for t in x]), P(*[t.data_ptr() for t in x0]), n.ctypes.data, KINDS[self.kind], self.lo,
            self.hi, R, self.ptrs, self.at.ctypes.data, self.cap.ctypes.data, nruns.ctypes.data, where.ctypes.data,
            cnt.ctypes.data, up.ctypes.data) == 0
        self.parts.append((x, x0, n, nruns, where, cnt, up))
        return self.ok

    def cut(self, K: int, r_lo: int, r_hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The K-th largest distance of all the tensors added, tau, and the values at ranks r_lo
        and r_hi (1: the largest; NaN outside the band): res = [tau, at r_lo, at r_hi]; per piece
        (a run of a tensor, see kernels.c) the ties at tau it keeps and how many it keeps. None
        where the band is dropped or the bracket missed (K or more above hi, fewer than K at or
        above lo)."""
        if not self.ok:
            return None
        where, cnt, up = (np.concatenate([p[i] for p in self.parts]) for i in (4, 5, 6))
        one = self.lo == self.hi  # the band is one value, counted only
        m, P = 0 if one else int(cnt.sum()), len(cnt)
        wide = _NP_WIDE[self.dtype]
        scratch, tmp, res = np.empty(2 * m + 64, dtype=wide), np.empty(m + 32, dtype=wide), np.empty(3, dtype=wide)
        budget, keep = np.empty(P, dtype=np.int64), np.empty(P, dtype=np.int64)
        if getattr(_state["lib"], f"dst_band_cut_{_np_suffix(scratch)}")(
                P, self.ptrs, where.ctypes.data, cnt.ctypes.data, up.ctypes.data, int(one), self.lo, K, r_lo, r_hi,
                scratch.ctypes.data, tmp.ctypes.data, res.ctypes.data, budget.ctypes.data, keep.ctypes.data):
            return None
        return res, budget, keep

    def keep(self, tau: float, budget: np.ndarray, keep: np.ndarray, old_idx: list[torch.Tensor],
             work: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray]:
        """The second pass over every tensor added, with `cut`'s tau, budget and keep: each keeps
        by the tie rule and goes back to its seed elsewhere (bits moved). old_idx: the kept sets
        before (ascending, one a tensor). Returns the kept positions and seed values of each
        tensor (views of one buffer each) and per tensor (kept, differ, both, nonfinite) as `many`
        does."""
        x, x0 = [t for p in self.parts for t in p[0]], [t for p in self.parts for t in p[1]]
        n, nruns = (np.concatenate([p[i] for p in self.parts]) for i in (2, 3))
        T, R = len(x), self.R
        P = ctypes.c_void_p * T
        room = keep.reshape(T, R).sum(axis=1) + 16 * R + 16
        off = np.concatenate([[0], np.cumsum(room)]).astype(np.int64)
        pos, seed = torch.empty(int(off[-1]), dtype=torch.long), torch.empty(int(off[-1]), dtype=self.dtype)
        maps = []
        for run in _runs(work, R):  # a bitmap a thread of the old kept set (a bit an entry of a run)
            if len(run.get("bm", ())) < int(n.max()) // 8 + 64:
                run["bm"] = np.empty(int(n.max()) // 8 + 64, dtype=np.uint8)
            maps.append(run["bm"].ctypes.data)
        n_old = np.array([i.numel() for i in old_idx], dtype=np.int64)
        out = np.empty((T, 4), dtype=np.int64)
        if getattr(_state["lib"], f"dst_band_keep_{_SUFFIX[self.dtype]}")(
                T, R, nruns.ctypes.data, P(*[t.data_ptr() for t in x]), P(*[t.data_ptr() for t in x0]), n.ctypes.data,
                KINDS[self.kind], tau, budget.ctypes.data, keep.ctypes.data, P(*[t.data_ptr() for t in old_idx]),
                n_old.ctypes.data, pos.data_ptr(), seed.data_ptr(), off.ctypes.data, (ctypes.c_void_p * R)(*maps),
                out.ctypes.data):
            raise RuntimeError("the band's tensors changed between its two passes")
        return _parts(pos, out[:, 0], room), _parts(seed, out[:, 0], room), out
