"""Fuzzing the patch reader: every hostile file ends in DstError or in exactly the right result.

Each case takes a valid patch (fp32 and bf16 tensors, Elias-Fano and bitmap indexes, zstd and raw
blocks) and damages it one way: truncation, bit flips, overwritten bytes, a dstcli header field set
to a hostile value, a lying safetensors header (offsets past the end or overlapping, duplicate
names, wrong dtypes or shapes), an index block re-encoded with unsorted, duplicate or out-of-range
positions (checksums fixed up, so only the decoder can notice), or a zstd decompression bomb.
Then `dstcli apply` runs on it. The property: it raises DstError and leaves no output behind, or it
succeeds and the result equals the undamaged patch's result bit for bit. Anything else (another
exception, a hang past the deadline, a wrong tensor) fails the test.

    python -m pytest tests/test_fuzz.py                        # 300 cases (CI)
    DSTCLI_FUZZ_EXAMPLES=10000 python -m pytest -m fuzz -s tests/test_fuzz.py   # the long run, with counts
"""

import json
import os
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from dstcli import ops
from dstcli.codec import _rice, _varint
from dstcli.errors import DstError

HOSTILE = [-1, 0, 1, 7, 2**31, 2**32 + 5, 2**63, -2**63, 10**30, 1.5, float("inf"), "x", "nan", None, True,
           [], {}, [1, -1], [2**40, 2**40], "sha256:00", "zstd", "none", "bitmap", "elias-fano", "all"]
KINDS = ("truncate", "bitflip", "overwrite", "header-field", "container", "index-content", "bomb")
COUNTS: Counter = Counter()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(64, 40, generator=g), "b": torch.randn(300, generator=g).to(torch.bfloat16),
            "c": torch.randn(20, 20, generator=g)}
    ft = {k: v.clone() for k, v in base.items()}
    ft["a"].view(-1)[torch.randperm(2560, generator=g)[:40]] += 0.5  # sparse: Elias-Fano
    ft["b"][::2] += 1  # dense: bitmap
    ft["c"][3, 4] = -ft["c"][3, 4]
    save_file(base, str(d / "base.safetensors"))
    save_file(ft, str(d / "ft.safetensors"))
    ops.diff(d / "base.safetensors", d / "ft.safetensors", d / "good.dst")
    return d, (d / "good.dst").read_bytes(), load_file(str(d / "ft.safetensors"))


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(head: dict | str, body: bytes) -> bytes:
    text = (head if isinstance(head, str) else json.dumps(head)).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _with_block(data: bytes, name: str, kind: str, stored: bytes, **update) -> bytes:
    """Swap one block's stored bytes, with a correct CRC and size: only the decoder can object."""
    st_head, body = _split(data)
    h = json.loads(st_head["__metadata__"]["dstcli"])
    h["tensors"][name][kind].update(stored_bytes=len(stored), crc32=f"{zlib.crc32(stored):08x}", **update)
    blocks = {k: body[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in st_head.items() if k != "__metadata__"}
    blocks[f"{name}::{kind}"] = stored
    head, at = {"__metadata__": {**st_head["__metadata__"], "dstcli": json.dumps(h)}}, 0
    for k in sorted(blocks):
        head[k] = {"dtype": "U8", "shape": [len(blocks[k])], "data_offsets": [at, at + len(blocks[k])]}
        at += len(blocks[k])
    return _join(head, b"".join(blocks[k] for k in sorted(blocks)))


def _zero_frame(size: int, content_size: bool) -> bytes:
    """A zstd frame of `size` zero bytes (declared or not), built without allocating them: for big
    sizes, a valid prefix of a few MB that still declares the whole size."""
    c = zstandard.ZstdCompressor(write_content_size=content_size).compressobj(size=size if content_size else -1)
    chunk, out, left = b"\0" * (1 << 20), [], size
    while left > 0 and len(out) < 4:
        out.append(c.compress(chunk[:min(left, 1 << 20)]))
        left -= 1 << 20
    out.append(c.flush() if left <= 0 else c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    return b"".join(out)


@st.composite
def damaged(draw, data: bytes):
    kind = draw(st.sampled_from(KINDS))
    if kind == "truncate":
        return kind, data[:draw(st.integers(0, len(data) - 1))]
    if kind == "bitflip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(out)
    if kind == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        return kind, data[:at] + junk + data[at + len(junk):]
    st_head, body = _split(data)
    h = json.loads(st_head["__metadata__"]["dstcli"])
    name = draw(st.sampled_from(sorted(h["tensors"])))
    if kind == "header-field":
        entry = h["tensors"][name]
        where = draw(st.sampled_from(["top", "entry", "index", "values"]))
        target = {"top": h, "entry": entry, "index": entry["index"], "values": entry["values"]}[where]
        field = draw(st.sampled_from(sorted(target)))
        target[field] = draw(st.sampled_from(HOSTILE))
        st_head["__metadata__"]["dstcli"] = json.dumps(h)
        return kind, _join(st_head, body)
    if kind == "container":
        blocks = sorted(k for k in st_head if k != "__metadata__")
        blk = draw(st.sampled_from(blocks))
        how = draw(st.sampled_from(["past-end", "overlap", "duplicate", "dtype", "shape", "negative", "hole"]))
        a, b = st_head[blk]["data_offsets"]
        if how == "past-end":
            st_head[blk]["data_offsets"] = [a, len(body) + draw(st.integers(1, 2**40))]
        elif how == "overlap":
            st_head[blk]["data_offsets"] = [max(0, a - draw(st.integers(1, 16))), b]
        elif how == "negative":
            st_head[blk]["data_offsets"] = [-1, b]
        elif how == "hole":
            st_head[blk]["data_offsets"] = [a + 1, b]
        elif how == "dtype":
            st_head[blk]["dtype"] = draw(st.sampled_from(["F32", "I64", "BOOL", "F8_E4M3", "XX"]))
        elif how == "shape":
            st_head[blk]["shape"] = [draw(st.integers(0, 2**40))]
        else:  # the same tensor name twice in the JSON text
            text = json.dumps(st_head)
            dup = json.dumps({blk: st_head[blk]})[1:-1]
            return kind, _join(text[:-1] + ", " + dup + "}", body)
        return kind, _join(st_head, body)
    e = h["tensors"][name]
    if kind == "index-content":
        n, k = e["numel"], e["changed"]
        how = draw(st.sampled_from(["unsorted", "duplicate", "out-of-range", "random"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        if how == "duplicate" and k > 1:
            idx[1] = idx[0]
        elif how == "out-of-range":
            idx[-1] = n + int(rng.integers(0, 1000))
        elif how == "unsorted" and k > 1:
            idx[[0, -1]] = idx[[-1, 0]]
        if how == "random":
            return kind, _with_block(data, name, "index", rng.bytes(e["index"]["raw_bytes"]), compression="none")
        enc = _rice if draw(st.booleans()) and how == "out-of-range" else _varint  # gap codes take any order
        codec, (params, raw) = ("rice" if enc is _rice else "varint"), enc(idx)
        return kind, _with_block(data, name, "index", raw, compression="none", codec=codec, raw_bytes=len(raw),
                                 **params)
    # bomb: a tiny zstd frame that inflates far past what the header allows
    stored = _zero_frame(draw(st.sampled_from([10**6, 10**8, 2 * 10**9])), draw(st.booleans()))
    return kind, _with_block(data, name, "values", stored, compression="zstd")


def _check(corpus, kind: str, bad_bytes: bytes) -> None:
    d, good, want = corpus
    bad, out = d / "bad.dst", d / "out.safetensors"
    bad.write_bytes(bad_bytes)
    if out.exists():
        out.unlink()
    try:
        ops.apply(d / "base.safetensors", [bad], out)
    except DstError:
        assert not out.exists()
        assert not [p for p in d.iterdir() if p.name.startswith(".out")], "a temp file was left behind"
        COUNTS[(kind, "refused")] += 1
        return
    got = load_file(str(out))
    for k, v in want.items():
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), f"{kind}: wrong tensor {k} returned"
    COUNTS[(kind, "same result")] += 1


def _run(corpus, examples: int) -> None:
    @given(st.data())
    @settings(max_examples=examples, deadline=5000, database=None, derandomize=examples <= 1000,
              suppress_health_check=list(HealthCheck))
    def prop(data):
        kind, bad = data.draw(damaged(corpus[1]))
        _check(corpus, kind, bad)
    prop()


def test_fuzz_patch_reader(corpus):
    _run(corpus, int(os.environ.get("DSTCLI_FUZZ_EXAMPLES", "300")))


@pytest.mark.fuzz
def test_fuzz_patch_reader_long(corpus):
    n = int(os.environ.get("DSTCLI_FUZZ_EXAMPLES", "10000"))
    COUNTS.clear()
    _run(corpus, n)
    total = sum(COUNTS.values())
    print(f"\n{total} damaged patches, {n} requested")
    for kind in KINDS:
        print(f"| {kind} | {COUNTS[(kind, 'refused')]} | {COUNTS[(kind, 'same result')]} |")
    assert total >= n * 0.95
