"""Keeping the memory a training step frees for the next step (glibc's malloc, Linux).

glibc gives the top of its heap back to the kernel once more than M_TRIM_THRESHOLD bytes of it
are free; by default that threshold follows the largest block freed so far, up to 64 MiB. A DST
step for the global silo on the CPU frees more than that at its end (its pool and the kept sets
it replaces: 41-83 MB at a time on a 25M-parameter model at epsilon 1e-1) and allocates as much
again in the next step, so those pages were faulted back in, zeroed, every step, in the
projection and in the optimizer's temporaries after it: 3,900-7,100 page faults a step with
bf16 weights, 6,500 with fp32. With the threshold above what a step frees, 900-1,400
(BENCHMARKS.md, "The heap kept from step to step").

`keep_freed` raises it for the whole process, once per size asked. Setting it turns glibc's
moving thresholds off, so the mmap threshold is set too, to glibc's own ceiling for it (32 MiB):
without it, every block over 128 KiB would be mapped and unmapped on its own. The process keeps
its heap between steps: its peak RSS grew by 30-40 MB (3%) on that model at 1e-1, by nothing
measurable at 1e-3. Left alone: other C libraries, a user's own malloc settings (MALLOC_*_
environment variables, glibc.malloc tunables), and DSTCLI_KEEP_HEAP=0.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for its moving mmap threshold (and for mallopt's)
TRIM_MIN = 64 << 20  # glibc's ceiling for its moving trim threshold
TRIM_MAX = (1 << 31) - 1  # mallopt takes an int
_USER = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_state = {"trim": 0}  # the trim threshold this process has set so far


@functools.cache
def _glibc():
    """The process's C library where it is glibc (it has mallopt), else None (looked up once:
    left_alone and keep_freed both ask)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) (Windows)
        return None


def left_alone() -> str | None:
    """Why keep_freed leaves malloc's settings alone here, or None where it sets them."""
    if os.environ.get("DSTCLI_KEEP_HEAP", "1") == "0":
        return "DSTCLI_KEEP_HEAP=0"
    user = [k for k in _USER if k in os.environ]
    if user:
        return f"{user[0]} is set"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    if _glibc() is None:
        return "the C library is not glibc"
    return None


def keep_freed(nbytes: int) -> bool:
    """Let glibc keep up to `nbytes` (at least TRIM_MIN, at most TRIM_MAX) of freed heap mapped
    rather than give it back to the kernel; never lowers what an earlier call set. Returns
    whether the settings are in place (False where left_alone() says why not)."""
    if left_alone() is not None:
        return False
    trim = min(max(int(nbytes), TRIM_MIN), TRIM_MAX)
    if trim <= _state["trim"]:
        return True
    libc = _glibc()
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
    if ok:
        _state["trim"] = trim
    return ok
