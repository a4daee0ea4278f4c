"""Coding of one changed tensor: which positions changed (index codecs) and how (value codec).

Index codecs, for k strictly increasing positions in [0, n):
- ``all``: k == n, nothing stored.
- ``elias-fano``: the low ``l`` bits of each position packed MSB-first (k*l bits, padded to a
  byte), then the high parts as a bit vector of k + ((n-1) >> l) + 1 bits with bit
  ``(pos >> l) + i`` set for the i-th position (padded to a byte). Within a few percent of
  log2 C(n, k) for sparse sets.
- ``bitmap``: n bits, bit i set iff position i changed (MSB-first within each byte).
- ``rice`` (format 2): Golomb-Rice codes of the gaps between positions; ``varint`` (format 2):
  LEB128 gaps. The writer keeps whichever codec's block is smallest after compression.

Value codecs: the XOR of the new and old bit patterns of each changed entry in the tensor's own
width (so it is exact and its own inverse), either split into byte planes (``xor-byteplanes``:
plane j holds byte j, little-endian, of every entry) or entry after entry (``xor``, format 2);
the writer keeps the smaller after compression, per tensor. Each block is stored raw or
zstd-compressed, whichever is smaller. Every decoder checks what it is given and raises
`DstError` on any inconsistency.
"""

from __future__ import annotations

import numpy as np
import zstandard

from dstcli.dtypes import INT_VIEW_NP
from dstcli.errors import DstError

_CHUNK = 1 << 20  # positions packed per chunk: bounds temporaries to ~l MB; a multiple of 8


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
    """Values below 2**width, `width` bits each, MSB first, back to back (padded to a byte)."""
    size = next(b for b in (1, 2, 4, 8) if 8 * b >= width)  # the narrowest integer holding them
    out = []
    for s in range(0, len(values), _CHUNK):
        v = values[s:s + _CHUNK].astype(f">u{size}")  # big-endian: unpackbits yields MSB first
        bits = np.unpackbits(v.view(np.uint8).reshape(-1, size), axis=1)[:, 8 * size - width:]
        out.append(np.packbits(bits).tobytes())
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


def _rice(idx: np.ndarray) -> tuple[dict, bytes]:
    """Golomb-Rice codes of the gaps g_i = p_i - p_{i-1} - 1 (p_-1 = -1): the low r bits of every
    gap packed MSB-first, then the high parts in unary (g >> r zeros, then a one) as one bit
    vector of `high_bits` bits. Within ~2% of log2 C(n, k) for random positions at any density."""
    k = len(idx)
    g = np.diff(idx, prepend=-1) - 1
    mean = max(1.0, float(g.mean()))
    best = None
    for r in range(max(0, int(np.log2(mean)) - 2), min(62, int(np.log2(mean)) + 3) + 1):
        hb = int((g >> r).sum()) + k
        size = (k * r + 7) // 8 + (hb + 7) // 8
        if best is None or size < best[0]:
            best = (size, r, hb)
    _, r, hb = best
    low = _pack_fixed(g & ((1 << r) - 1), r) if r else b""
    high = np.zeros((hb + 7) // 8 * 8, dtype=np.uint8)
    high[np.cumsum((g >> r) + 1) - 1] = 1
    return {"r": r, "high_bits": hb}, low + np.packbits(high).tobytes()


def _varint(idx: np.ndarray) -> tuple[dict, bytes]:
    """LEB128 varints of the same gaps: 7 bits per byte, high bit set on all but a gap's last byte.
    Loses to Rice on random positions but gives zstd byte-aligned runs to find in clustered ones."""
    g = (np.diff(idx, prepend=-1) - 1).astype(np.uint64)
    nbytes = np.ones(len(g), dtype=np.int64)
    for j in range(1, 10):
        nbytes += (g >> np.uint64(7 * j)) > 0
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        more = (nbytes[sel] - 1 > j).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (((g[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)) | more).astype(np.uint8)
    return {"bytes": len(out)}, out.tobytes()


def encode_index(idx: np.ndarray, n: int) -> tuple[str, dict, bytes]:
    """Code sorted unique positions: returns (codec, params, raw bytes), the codec whose block is
    smallest after compression among Golomb-Rice, Elias-Fano, gap varints and a bitmap."""
    return index_block(idx, n)[:3]


def index_block(idx: np.ndarray, n: int) -> tuple[str, dict, bytes, tuple[str, bytes]]:
    """`encode_index`, plus the compressed block it chose by: (codec, params, raw, (method, stored))."""
    k = len(idx)
    if k == n:
        return "all", {}, b"", compress(b"")
    if k == 0:
        return "rice", {"r": 0, "high_bits": 0}, b"", compress(b"")
    cands = []
    if (n + 7) // 8 <= 4 * k + 64:  # a bitmap only competes when changes are dense
        bitmap = np.zeros(n, dtype=np.uint8)
        bitmap[idx] = 1
        cands.append(("bitmap", {}, np.packbits(bitmap).tobytes()))
    params, raw = _rice(idx)
    cands.append(("rice", params, raw))
    params, raw = _varint(idx)
    cands.append(("varint", params, raw))
    l = ef_low_bits(n, k)
    low_b, high_b = ef_sizes(n, k, l)
    if low_b + high_b <= len(cands[-2][2]) * 1.1:
        low = _pack_fixed(idx & ((1 << l) - 1), l) if l else b""
        high = np.zeros(high_b * 8, dtype=np.uint8)
        high[(idx >> l) + np.arange(k, dtype=np.int64)] = 1
        cands.append(("elias-fano", {"l": l}, low + np.packbits(high).tobytes()))
    smallest = min(len(c[2]) for c in cands)
    best = None
    for codec, params, raw in cands:
        if len(raw) > 2 * smallest + 64:  # raw far larger: compression will not make up for it
            continue
        packed = compress(raw)
        if best is None or len(packed[1]) < len(best[3][1]):
            best = (codec, params, raw, packed)
    return best


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
    if codec == "rice":
        r, hb = params.get("r"), params.get("high_bits")
        if type(r) is not int or not 0 <= r <= 62 or type(hb) is not int or not k <= hb <= k + (n >> r) + 1:
            raise DstError(f"Golomb-Rice parameters r={r!r}, high_bits={hb!r} are invalid for {k} of {n}")
        return (k * r + 7) // 8 + (hb + 7) // 8
    if codec == "varint":
        b = params.get("bytes")
        if type(b) is not int or not k <= b <= 10 * k:
            raise DstError(f"varint block size {b!r} is invalid for {k} positions")
        return b
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
    elif codec == "rice":
        r, hb = params["r"], params["high_bits"]
        low_b = (k * r + 7) // 8
        ones = np.flatnonzero(np.unpackbits(np.frombuffer(raw[low_b:], dtype=np.uint8))[:hb])
        if len(ones) != k or (k and ones[-1] != hb - 1):
            raise DstError(f"index block holds {len(ones)} Rice codes, header says {k}")
        gaps = (np.diff(ones, prepend=-1) - 1) << r
        if r:
            gaps |= _unpack_fixed(raw[:low_b], k, r)
        idx = np.cumsum(gaps + 1) - 1
    elif codec == "varint":
        b = np.frombuffer(raw, dtype=np.uint8)
        ends = np.flatnonzero(b < 0x80)
        if len(ends) != k or (k and ends[-1] != len(b) - 1):
            raise DstError(f"index block holds {len(ends)} varints, header says {k}")
        starts = np.concatenate([[0], ends[:-1] + 1]) if k else ends
        if k and int((ends - starts).max()) > 8:
            raise DstError("index block holds a varint longer than 9 bytes")
        shift = (np.arange(len(b)) - np.repeat(starts, ends - starts + 1)) * 7
        gaps = np.bitwise_or.reduceat((b & 0x7F).astype(np.int64) << shift, starts) if k else starts
        if k and bool((gaps < 0).any()):
            raise DstError("index block holds a gap past 2^63")
        idx = np.cumsum(gaps + 1) - 1
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
VALUE_CODECS = ("xor-byteplanes", "xor")


def encode_values(xor: np.ndarray, codec: str = "xor-byteplanes") -> bytes:
    """XOR bit patterns (k,) as bytes: ``xor`` little-endian entry after entry; ``xor-byteplanes``
    plane 0 (least significant byte) of all entries, then plane 1, ..."""
    width = xor.itemsize
    raw = np.ascontiguousarray(xor).view(np.uint8).reshape(-1, width)
    return (raw if codec == "xor" else raw.T).tobytes()


def decode_values(raw: bytes, k: int, width: int, codec: str = "xor-byteplanes") -> np.ndarray:
    """Inverse of encode_values: (k,) integer array of the given byte width; never a zero XOR."""
    if codec not in VALUE_CODECS:
        raise DstError(f"unknown value codec {codec!r}: this patch needs a newer dstcli (pip install -U dstcli)")
    if len(raw) != k * width:
        raise DstError("value block has the wrong size")
    if k == 0:
        return np.empty(0, dtype=INT_VIEW_NP[width])
    planes = np.frombuffer(raw, dtype=np.uint8)
    xor = (planes.reshape(k, width) if codec == "xor" else planes.reshape(width, k).T).flatten().view(INT_VIEW_NP[width])
    if not xor.all():
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
