"""Element types without torch: widening bits to float64 must agree with torch, entry for entry."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dstcli.dtypes import BY_CODE, BY_NAME, FLOATS, INT_VIEW_NP, bits_view, of_torch
from conftest import make_pair


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float32", "float64"])
def test_to_float64_matches_torch_bit_for_bit(name):
    d = FLOATS[name]
    if d.itemsize <= 2:  # every bit pattern
        bits = np.arange(1 << (8 * d.itemsize), dtype=np.uint64).astype(f"u{d.itemsize}").view(d.ints)
    else:  # random patterns, plus infinities, NaNs, zeros and subnormals
        rng = np.random.default_rng(0)
        bits = rng.integers(0, 256, size=200_000 * d.itemsize, dtype=np.uint8).view(d.ints)
        specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324 if d.itemsize == 8 else 1e-45],
                            dtype=f"f{d.itemsize}").view(d.ints)
        bits = np.concatenate([bits, specials])
    want = torch.from_numpy(bits.copy()).view(d.torch).to(torch.float64).numpy()
    got = d.to_float64(bits)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])


def test_the_table_agrees_with_torch():
    for code, d in BY_CODE.items():
        assert d.torch.itemsize == d.itemsize and d.torch.is_floating_point == d.is_floating_point, code
        assert of_torch(d.torch) is d and BY_NAME[str(d)] is d
    for width, ints in INT_VIEW_NP.items():
        assert bits_view(torch.zeros(3, dtype=FLOATS["float64" if width == 8 else "float32"].torch)
                         if width >= 4 else torch.zeros(3, dtype=torch.bfloat16 if width == 2 else torch.float8_e5m2)
                         ).numpy().dtype == ints


def test_apply_diff_and_inspect_run_without_torch(tmp_path):
    """The byte-moving commands never import torch (it costs ~2 s per process); a budgeted diff,
    which ranks entries, does."""
    base, ft, _, _ = make_pair(tmp_path, sharded=True, dtype=torch.bfloat16)
    p, out, cut = tmp_path / "p.dst", tmp_path / "out", tmp_path / "cut.dst"
    script = f"""
import sys
from dstcli.cli import app
def run(*args):
    try:
        app(list(args), standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e
run("diff", {str(base)!r}, {str(ft)!r}, "-o", {str(p)!r}, "--json")
run("inspect", {str(p)!r}, "--json")
run("apply", {str(base)!r}, {str(p)!r}, "-o", {str(out)!r}, "--json")
run("apply", {str(out)!r}, {str(p)!r}, "-o", {str(tmp_path / 'back')!r}, "--revert", "--json")
print("TORCH", "torch" in sys.modules, file=sys.stderr)
run("diff", {str(base)!r}, {str(ft)!r}, "-o", {str(cut)!r}, "--epsilon", "0.01", "--json")
print("TORCH", "torch" in sys.modules, file=sys.stderr)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("TORCH")] == ["TORCH False", "TORCH True"]
    for shard in (ft).glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    for shard in (base).glob("*.safetensors"):
        assert (tmp_path / "back" / shard.name).read_bytes() == shard.read_bytes()
