"""dstcli.heap: the freed heap kept mapped from step to step (glibc), and left alone where the
user or the C library says so."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dstcli import heap, kernels
from dstcli.engine import DST

glibc = pytest.mark.skipif(heap._glibc() is None, reason="the C library is not glibc")

# Four 24 MiB blocks allocated, written and freed, six rounds: glibc maps the first round's and
# raises its thresholds to 24 / 48 MiB, so later rounds come from the heap and the 96 MiB free at
# its top is given back each round, then faulted in again, unless keep_freed kept it.
ROUNDS = textwrap.dedent("""
    import ctypes, resource, sys
    from dstcli import heap
    if sys.argv[1] == "keep":
        assert heap.keep_freed(256 << 20)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    for r in range(6):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(24 << 20) for _ in range(4)]
        for b in blocks:
            ctypes.memset(b, 1, 24 << 20)
        for b in reversed(blocks):
            libc.free(b)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(sum(faults[2:]))
""")


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DSTCLI_KEEP_HEAP"}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout)


@pytest.fixture
def no_user_settings(monkeypatch):
    """An environment without malloc settings of the user's or DSTCLI_KEEP_HEAP."""
    monkeypatch.delenv("DSTCLI_KEEP_HEAP", raising=False)
    for k in heap._USER:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "")


@glibc
def test_kept_heap_is_not_faulted_in_again():
    plain, kept = _faults("plain"), _faults("keep")
    # rounds 3-6 each fault 96 MiB in again: 24,576 pages of 4 KiB, or at least 48 of 2 MiB where
    # transparent huge pages are always on
    assert plain >= 4 * (96 << 20) // (2 << 20)
    assert kept < plain // 20


@glibc
def test_keep_freed_only_raises_and_caps(monkeypatch, no_user_settings):
    calls = []
    monkeypatch.setattr(heap, "_state", {"trim": 0})
    monkeypatch.setattr(heap, "_glibc", lambda: type("L", (), {"mallopt": staticmethod(lambda p, v: calls.append((p, v)) or 1)})())
    assert heap.keep_freed(1 << 20)  # below glibc's own ceiling: that ceiling
    assert calls == [(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD), (heap.M_TRIM_THRESHOLD, heap.TRIM_MIN)]
    assert heap.keep_freed(heap.TRIM_MIN) and len(calls) == 2  # not lowered, not set again
    assert heap.keep_freed(1 << 40)
    assert calls[-1] == (heap.M_TRIM_THRESHOLD, heap.TRIM_MAX)  # mallopt takes an int


@pytest.mark.parametrize("env, why", [
    ({"DSTCLI_KEEP_HEAP": "0"}, "DSTCLI_KEEP_HEAP=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "100000"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"MALLOC_MMAP_THRESHOLD_": "100000"}, "MALLOC_MMAP_THRESHOLD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=100000"}, "GLIBC_TUNABLES sets glibc.malloc"),
])
def test_a_users_own_settings_are_left_alone(monkeypatch, no_user_settings, env, why):
    monkeypatch.setattr(heap, "_glibc", lambda: pytest.fail("mallopt called"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert heap.left_alone() == why
    assert heap.keep_freed(1 << 30) is False


def test_another_c_library_is_left_alone(monkeypatch, no_user_settings):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.left_alone() == "the C library is not glibc"
    assert heap.keep_freed(1 << 30) is False


@pytest.mark.skipif(kernels.lib() is None, reason=f"no CPU kernels here: {kernels.why()}")
def test_the_global_silo_on_the_kernels_keeps_twice_its_parameters(monkeypatch):
    asked = []
    monkeypatch.setattr(heap, "keep_freed", asked.append)
    ps = [(f"w{i}", torch.nn.Parameter(torch.randn(64, 64))) for i in range(3)]
    DST(ps, epsilon=0.1, silo="global", seed="none")
    assert asked == [2 * 3 * 64 * 64 * 4]
    DST(ps, epsilon=0.1, silo="global", seed="copy")  # a seed held: step() reads it on the kernels
    assert asked == [2 * 3 * 64 * 64 * 4] * 2
    DST(ps, epsilon=0.1, silo="tensor", seed="none")  # tensor silos free little from step to step
    assert len(asked) == 2
