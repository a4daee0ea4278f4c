"""Coding of one changed tensor: which positions changed (index codecs) and how (value codec).

Index codecs, for k strictly increasing positions in [0, n):
- ``all``: k == n, nothing stored.
- ``elias-fano``: the low ``l`` bits of each position packed MSB-first (k*l bits, padded to a
  byte), then the high parts as a bit vector of k + ((n-1) >> l) + 1 bits with bit
  ``(pos >> l) + i`` set for the i-th position (padded to a byte). Within a few percent of
  log2 C(n, k) for sparse sets.
- ``bitmap``: n bits, bit i set iff position i changed (MSB-first within each byte).

Value codec ``xor-byteplanes``: the XOR of the new and old bit patterns of each changed entry in
the tensor's own width (so it is exact and its own inverse), split into byte planes: plane j holds
byte j (little-endian) of every entry. Each block is stored raw or zstd-compressed, whichever is
smaller. Every decoder checks what it is given and raises `DstError` on any inconsistency.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from dstcli.errors import DstError

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20  # positions packed per chunk: bounds temporaries to ~l MB; a multiple of 8


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The flat integer view of a tensor's bit patterns (same width, no copy when contiguous)."""
    return t.contiguous().reshape(-1).view(INT_VIEW[t.element_size()])


# --- index codecs -----------------------------------------------------------------------------
def ef_low_bits(n: int, k: int) -> int:
    """The low-bit width l that minimises the Elias-Fano size k*l + k + ((n-1) >> l) + 1."""
    best, best_l = None, 0
    for l in range(0, max(1, (n - 1).bit_length()) + 1):
        size = k * l + k + ((n - 1) >> l) + 1
        if best is None or size < best:
            best, best_l = size, l
    return best_l


def ef_sizes(n: int, k: int, l: int) -> tuple[int, int]:
    """(low bytes, high bytes) of an Elias-Fano block."""
    return (k * l + 7) // 8, (k + ((n - 1) >> l) + 1 + 7) // 8


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    out = []
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    for s in range(0, len(values), _CHUNK):
        v = values[s:s + _CHUNK].astype(np.uint64)
        out.append(np.packbits(((v[:, None] >> shifts) & 1).astype(np.uint8)).tobytes())
    return b"".join(out)


def _unpack_fixed(data: bytes, k: int, width: int) -> np.ndarray:
    out = np.empty(k, dtype=np.int64)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    buf = np.frombuffer(data, dtype=np.uint8)
    for s in range(0, k, _CHUNK):
        m = min(_CHUNK, k - s)
        byte0 = s * width // 8
        bits = np.unpackbits(buf[byte0:byte0 + (m * width + 7) // 8])[:m * width]
        out[s:s + m] = bits.reshape(m, width).astype(np.int64) @ weights
    return out


def encode_index(idx: np.ndarray, n: int) -> tuple[str, dict, bytes]:
    """Code sorted unique positions; returns (codec, params, raw bytes): the smaller of EF and bitmap."""
    k = len(idx)
    if k == n:
        return "all", {}, b""
    l = ef_low_bits(n, k)
    low_b, high_b = ef_sizes(n, k, l)
    if (n + 7) // 8 < low_b + high_b:
        bitmap = np.zeros(n, dtype=np.uint8)
        bitmap[idx] = 1
        return "bitmap", {}, np.packbits(bitmap).tobytes()
    low = _pack_fixed(idx & ((1 << l) - 1), l) if l else b""
    high = np.zeros(high_b * 8, dtype=np.uint8)
    high[(idx >> l) + np.arange(k, dtype=np.int64)] = 1
    return "elias-fano", {"l": l}, low + np.packbits(high).tobytes()


def index_raw_size(codec: str, params: dict, n: int, k: int) -> int:
    """The exact raw size an index block must have; a header claiming otherwise is lying."""
    if codec == "all":
        return 0
    if codec == "bitmap":
        return (n + 7) // 8
    if codec == "elias-fano":
        l = params.get("l")
        if type(l) is not int or not 0 <= l <= 64:
            raise DstError(f"Elias-Fano low-bit width {l!r} is invalid")
        return sum(ef_sizes(n, k, l))
    raise DstError(f"unknown index codec {codec!r}: this patch needs a newer dstcli (pip install -U dstcli)")


def decode_index(codec: str, params: dict, raw: bytes, n: int, k: int) -> np.ndarray:
    """Positions (int64, strictly increasing, in [0, n)) or DstError."""
    if len(raw) != index_raw_size(codec, params, n, k):
        raise DstError("index block has the wrong size")
    if codec == "all":
        if k != n:
            raise DstError(f"index codec 'all' claims {k} of {n} entries")
        return np.arange(n, dtype=np.int64)
    if codec == "bitmap":
        idx = np.flatnonzero(np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n])
    else:
        l = params["l"]
        low_b, _ = ef_sizes(n, k, l)
        high = np.flatnonzero(np.unpackbits(np.frombuffer(raw[low_b:], dtype=np.uint8)))
        if len(high) != k:
            raise DstError(f"index block holds {len(high)} positions, header says {k}")
        idx = ((high - np.arange(k, dtype=np.int64)) << l)
        if l:
            idx |= _unpack_fixed(raw[:low_b], k, l)
    if len(idx) != k:
        raise DstError(f"index block holds {len(idx)} positions, header says {k}")
    if k and (idx[-1] >= n or idx[0] < 0 or np.any(np.diff(idx) <= 0)):
        raise DstError("index block has positions out of range or not strictly increasing")
    return idx.astype(np.int64, copy=False)


# --- value codec ------------------------------------------------------------------------------
def encode_values(xor: torch.Tensor) -> bytes:
    """Byte planes of the XOR bit patterns (k,) -> plane 0 of all entries, then plane 1, ..."""
    width = xor.element_size()
    return xor.contiguous().view(torch.uint8).reshape(-1, width).T.contiguous().numpy().tobytes()


def decode_values(raw: bytes, k: int, width: int) -> torch.Tensor:
    """Inverse of encode_values: (k,) integer tensor of the given byte width; never a zero XOR."""
    if len(raw) != k * width:
        raise DstError("value block has the wrong size")
    if k == 0:
        return torch.empty(0, dtype=INT_VIEW[width])
    planes = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    xor = planes.reshape(width, k).T.flatten().clone().view(INT_VIEW[width])
    if k and bool((xor == 0).any()):
        raise DstError("value block holds an entry that does not change anything")
    return xor


# --- block compression --------------------------------------------------------------------------
def compress(raw: bytes, level: int = 9) -> tuple[str, bytes]:
    """zstd-compress a block, or keep it raw when that is smaller (tiny or random blocks)."""
    if not raw:
        return "none", raw
    packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return ("zstd", packed) if len(packed) < len(raw) else ("none", raw)


def decompress(method: str, stored: bytes, raw_size: int) -> bytes:
    """Undo `compress`, never producing more than raw_size bytes (no decompression bombs)."""
    if method == "none":
        out = stored
    elif method == "zstd":
        try:
            params = zstandard.get_frame_parameters(stored)
            if params.content_size != raw_size:
                raise DstError(f"compressed block declares {params.content_size} bytes, header says {raw_size}")
            out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_size)
        except zstandard.ZstdError as e:
            raise DstError(f"compressed block is corrupt ({e})") from e
    else:
        raise DstError(f"unknown block compression {method!r}: this patch needs a newer dstcli")
    if len(out) != raw_size:
        raise DstError(f"block decodes to {len(out)} bytes, header says {raw_size}")
    return out
