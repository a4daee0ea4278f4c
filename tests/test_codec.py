import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dstcli.codec import compress, decode_index, decode_values, decompress, encode_index, encode_values
from dstcli.dtypes import INT_VIEW_NP
from dstcli.errors import DstError


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


@st.composite
def positions(draw):
    n = draw(st.integers(1, 5000))
    k = draw(st.integers(0, n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return n, np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


@given(positions())
@settings(max_examples=200, deadline=None)
def test_index_round_trip(case):
    n, idx = case
    codec, params, raw = encode_index(idx, n)
    method, stored = compress(raw)
    back = decode_index(codec, params, decompress(method, stored, len(raw)), n, len(idx))
    assert np.array_equal(back, idx)


@pytest.mark.parametrize("ratio", [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 1e-1, 0.2, 0.3, 0.5])
def test_index_bits_within_bound_on_random_positions(ratio):
    """At most 1.05x log2 C(n, k) plus 64 bits per tensor (issue #5's target)."""
    n = 4_000_000 if ratio < 1e-5 else 400_000
    k = max(1, round(ratio * n))
    idx = np.sort(np.random.default_rng(0).choice(n, size=k, replace=False)).astype(np.int64)
    codec, params, raw = encode_index(idx, n)
    _, stored = compress(raw)
    assert len(stored) * 8 <= 1.05 * log2_binom(n, k) + 64


@given(st.sampled_from([1, 2, 4, 8]), st.integers(0, 300), st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_values_round_trip(width, k, seed):
    raw_bits = np.random.default_rng(seed).integers(0, 256, size=k * width, dtype=np.uint8)
    xor = raw_bits.view(INT_VIEW_NP[width])
    xor[xor == 0] = 1  # a patch never stores a zero XOR
    for codec in ("xor-byteplanes", "xor"):
        raw = encode_values(xor, codec)
        assert len(raw) == k * width
        back = decode_values(raw, k, width, codec)
        assert back.dtype == xor.dtype and np.array_equal(back, xor)


def test_decoders_refuse_lies():
    idx = np.array([3, 7, 9], dtype=np.int64)
    codec, params, raw = encode_index(idx, 100)
    with pytest.raises(DstError):
        decode_index(codec, params, raw, 100, 4)  # wrong count
    with pytest.raises(DstError):
        decode_index(codec, params, raw[:-1], 100, 3)  # wrong size
    with pytest.raises(DstError):
        decode_values(b"\x00\x00", 1, 2)  # a zero XOR changes nothing
    method, stored = compress(b"\x00" * 10_000)
    with pytest.raises(DstError, match="declares"):
        decompress(method, stored, 100)  # a frame bigger than declared: no bomb


@given(st.integers(1, 63), st.integers(0, 40), st.integers(0, 2**32 - 1))
@settings(max_examples=80, deadline=None)
def test_fixed_width_packing_round_trips(width, k, seed):
    """The low-bit fields of Elias-Fano and Rice blocks: any width, values up to 2**width - 1."""
    from dstcli.codec import _pack_fixed, _unpack_fixed
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**width - 1, size=k, dtype=np.int64, endpoint=True)
    if k:
        values[0] = 2**width - 1  # the largest value a field holds
    raw = _pack_fixed(values, width)
    assert len(raw) == (k * width + 7) // 8
    assert np.array_equal(_unpack_fixed(raw, k, width), values)
    # MSB first, back to back: the first value's top bit is the first bit of the block
    if k:
        assert (raw[0] >> 7) == (int(values[0]) >> (width - 1)) & 1
