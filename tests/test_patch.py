import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from conftest import make_pair
from dstcli import ops
from dstcli.dtypes import bits_view
from dstcli.errors import DstError
from dstcli.patchfile import Patch
from reference import ref_distance, ref_keep


def files_equal(a, b) -> bool:
    return open(a, "rb").read() == open(b, "rb").read()


@given(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.lists(st.integers(1, 30), min_size=1, max_size=3), st.floats(0, 1), st.integers(0, 999),
       st.sampled_from([1, 6, 64, 1 << 24]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_lossless_round_trip_is_bit_exact(tmp_path_factory, monkeypatch, dtype, shape, frac, seed, piece):
    """Also in pieces of a few bytes: apply and diff stream tensors, and a piece holds whole entries
    (1 byte rounds up to none: refused; 6 bytes: one fp32 entry or three 16-bit ones)."""
    monkeypatch.setattr(ops, "PIECE", max(piece, 4 if dtype == torch.float32 else 2))
    tmp = tmp_path_factory.mktemp("rt")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g).to(dtype)
    move = torch.rand(shape, generator=g) < frac
    b = torch.where(move, torch.randn(shape, generator=g).to(dtype), a)
    save_file({"w": a, "v": a.flatten()[:3].clone()}, str(tmp / "a.safetensors"))
    save_file({"w": b, "v": a.flatten()[:3].clone()}, str(tmp / "b.safetensors"))
    header = ops.diff(tmp / "a.safetensors", tmp / "b.safetensors", tmp / "p.dst")
    assert header["changed"] == int((bits_view(a) != bits_view(b)).sum())
    ops.apply(tmp / "a.safetensors", [tmp / "p.dst"], tmp / "out.safetensors")
    assert files_equal(tmp / "out.safetensors", tmp / "b.safetensors")
    ops.apply(tmp / "out.safetensors", [tmp / "p.dst"], tmp / "back.safetensors", revert=True)
    assert files_equal(tmp / "back.safetensors", tmp / "a.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_directory_round_trip_copies_everything(tmp_path, dtype):
    base, ft, _, _ = make_pair(tmp_path, sharded=True, dtype=dtype)
    ops.diff(base, ft, tmp_path / "p.dst")
    ops.apply(base, [tmp_path / "p.dst"], tmp_path / "out")
    for f in sorted(os.listdir(ft)):
        assert files_equal(tmp_path / "out" / f, ft / f), f
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(ft))


def test_empty_and_full_patches(tmp_path):
    a = torch.randn(10, 10)
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": a + 1}, str(tmp_path / "b.safetensors"))
    assert ops.diff(tmp_path / "a.safetensors", tmp_path / "a.safetensors", tmp_path / "e.dst")["changed"] == 0
    h = ops.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "f.dst")
    assert h["changed"] == 100 and h["tensors"]["w"]["index"]["codec"] == "all"
    ops.apply(tmp_path / "a.safetensors", [tmp_path / "e.dst", tmp_path / "f.dst"], tmp_path / "o.safetensors")
    assert files_equal(tmp_path / "o.safetensors", tmp_path / "b.safetensors")


@pytest.mark.parametrize("silo", ["tensor", "row", "global"])
@pytest.mark.parametrize("dist", ["absolute", "relative", "inverse-relative"])
def test_budgeted_diff_keeps_top_k_per_silo(tmp_path, silo, dist):
    base, ft, a, b = make_pair(tmp_path, frac=0.3)
    eps = 0.1
    ops.diff(base, ft, tmp_path / "p.dst", epsilon=eps, silo=silo, dist=dist)
    ops.apply(base, [tmp_path / "p.dst"], tmp_path / "out.safetensors")
    got = load_file(str(tmp_path / "out.safetensors"))
    names = sorted(k for k in a if a[k].is_floating_point())
    ds = {k: ref_distance(b[k], a[k], dist) for k in names}
    if silo == "global":
        n = sum(ds[k].numel() for k in names)
        flat = ref_keep(torch.cat([ds[k].reshape(-1) for k in names]), int(eps * n))
        at = 0
        want = {}
        for k in names:
            want[k] = flat[at:at + ds[k].numel()].reshape(a[k].shape)
            at += ds[k].numel()
    else:
        want = {}
        for k in names:
            rows = a[k].shape[0] if silo == "row" and a[k].dim() >= 2 else 1
            m = ds[k].reshape(rows, -1)
            kk = int(eps * m.shape[1] + 1e-9)
            want[k] = torch.stack([ref_keep(m[r], kk) for r in range(rows)]).reshape(a[k].shape)
    for k in names:
        assert torch.equal(got[k], torch.where(want[k], b[k], a[k])), k
    header = Patch(tmp_path / "p.dst").header
    assert header["budget"]["silo"] == silo and header["budget"]["distance"] == dist


def test_params_budget_total_is_exact(tmp_path):
    base, ft, _, _ = make_pair(tmp_path, frac=0.5)
    h = ops.diff(base, ft, tmp_path / "p.dst", params=123)
    assert h["budget"]["total"] == 123 and h["changed"] <= 123


def test_wrong_base_is_refused_and_leaves_nothing(tmp_path, pair):
    base, ft, _, _ = pair
    ops.diff(base, ft, tmp_path / "p.dst")
    with pytest.raises(DstError, match="model.*is not the one .*p.dst was made for"):
        ops.apply(ft, [tmp_path / "p.dst"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_mismatched_checkpoints_are_listed(tmp_path):
    save_file({"w": torch.zeros(3), "x": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(4), "y": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(DstError) as e:
        ops.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "p.dst")
    msg = str(e.value)
    assert "w is float32[3] in the base but float32[4]" in msg and "x only in" in msg and "y only in" in msg


def test_every_truncation_and_bit_flip_is_refused(tmp_path):
    a = torch.randn(40, 8)
    b = a.clone()
    b[3, :5] += 1
    b[30, 2] -= 0.5
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    ops.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "p.dst")
    data = (tmp_path / "p.dst").read_bytes()
    bad = tmp_path / "bad.dst"
    for cut in range(len(data)):
        bad.write_bytes(data[:cut])
        with pytest.raises(DstError):
            ops.apply(tmp_path / "a.safetensors", [bad], tmp_path / "o.safetensors")
        assert not (tmp_path / "o.safetensors").exists()
    rng = np.random.default_rng(0)
    wrong = 0
    for pos in range(len(data)):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        bad.write_bytes(bytes(flipped))
        try:
            ops.apply(tmp_path / "a.safetensors", [bad], tmp_path / "o.safetensors", overwrite=True)
        except DstError:
            continue
        # a flip the reader accepts must not change the result (e.g. JSON whitespace or padding)
        wrong += load_file(str(tmp_path / "o.safetensors"))["w"].ne(b).any().item()
    assert wrong == 0


def test_existing_output_needs_overwrite(tmp_path, pair):
    base, ft, _, _ = pair
    ops.diff(base, ft, tmp_path / "p.dst")
    with pytest.raises(DstError, match="--overwrite"):
        ops.diff(base, ft, tmp_path / "p.dst")
    ops.diff(base, ft, tmp_path / "p.dst", overwrite=True)
    with pytest.raises(DstError, match="overwrite the input"):
        ops.apply(base, [tmp_path / "p.dst"], base, overwrite=True)


def test_inspect_reads_the_header(tmp_path, pair):
    base, ft, _, _ = pair
    ops.diff(base, ft, tmp_path / "p.dst", epsilon=0.01)
    info = ops.inspect(tmp_path / "p.dst", sort="changed", by="layer")
    assert {r["name"] for r in info["rows"]} == {"layer 0", "layer 1", "other"}
    assert info["changed"] == sum(r["changed"] for r in info["rows"])
    assert info["effective_epsilon"] == info["changed"] / info["base_params"]
    json.dumps(info)


def test_fp8_and_fp64_round_trip_and_int_tensors_untouched(tmp_path):
    g = torch.Generator().manual_seed(3)
    a = {"f8": torch.randn(64, generator=g).to(torch.float8_e4m3fn), "f64": torch.randn(9, 9, generator=g).double(),
         "ids": torch.arange(5)}
    b = {"f8": (a["f8"].float() * 1.5).to(torch.float8_e4m3fn), "f64": a["f64"] + 1e-12, "ids": torch.arange(5)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    h = ops.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "p.dst")
    assert "ids" not in h["tensors"] and h["tensors"]["f8"]["changed"] > 0
    ops.apply(tmp_path / "a.safetensors", [tmp_path / "p.dst"], tmp_path / "o.safetensors")
    assert files_equal(tmp_path / "o.safetensors", tmp_path / "b.safetensors")
    b["ids"] = torch.arange(5) + 1
    save_file(b, str(tmp_path / "c.safetensors"))
    with pytest.raises(DstError, match="'ids' \\(int64\\) differs, but only floating-point"):
        ops.diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors", tmp_path / "q.dst")


def _rewrite_header(src, dst, mutate):
    """Write a copy of a patch whose dstcli header was changed by `mutate` (a header that lies)."""
    import struct
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    st = json.loads(data[8:8 + n])
    h = json.loads(st["__metadata__"]["dstcli"])
    mutate(h)
    st["__metadata__"]["dstcli"] = json.dumps(h)
    head = json.dumps(st).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])


@pytest.mark.parametrize("lie", [
    lambda h: h["tensors"]["w"].update(changed=h["tensors"]["w"]["changed"] + 1),
    lambda h: h["tensors"]["w"].update(shape=[10**12, 10**6], numel=10**18),
    lambda h: h["tensors"]["w"]["values"].update(raw_bytes=10**12),
    lambda h: h["tensors"]["w"]["index"].update(raw_bytes=-1),
    lambda h: h["tensors"]["w"].update(delta_l2="lots"),
    lambda h: h.update(changed="many"),
    lambda h: h.update(format_version=99),
    lambda h: h["tensors"].update(ghost=dict(h["tensors"]["w"])),
    lambda h: h["tensors"]["w"].update(dtype="int8"),
])
def test_headers_that_lie_are_refused(tmp_path, lie):
    a = torch.randn(30, 30)
    b = a.clone()
    b[::4, ::3] += 1
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    ops.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "p.dst")
    _rewrite_header(tmp_path / "p.dst", tmp_path / "bad.dst", lie)
    with pytest.raises(DstError):
        ops.inspect(tmp_path / "bad.dst")
        ops.apply(tmp_path / "a.safetensors", [tmp_path / "bad.dst"], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("version", [1, 2])
def test_patches_of_earlier_formats_still_apply(tmp_path, version):
    """tests/fixtures/v1.dst was written by dstcli 0.1.0 (format 1: Elias-Fano and bitmap indexes,
    byte-plane values), v2.dst by the last format-2 dstcli (Rice and varint indexes, raw XOR values);
    both carry SHA-256 fingerprints. Today's reader must apply and revert them bit for bit."""
    patch = FIXTURES / f"v{version}.dst"
    assert Patch(patch).header["format_version"] == version
    assert all(e["base_fingerprint"].startswith("sha256:") for e in Patch(patch).tensors.values())
    ops.apply(FIXTURES / "v1-base.safetensors", [patch], tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == (FIXTURES / "v1-result.safetensors").read_bytes()
    ops.apply(tmp_path / "out.safetensors", [patch], tmp_path / "back.safetensors", revert=True)
    assert (tmp_path / "back.safetensors").read_bytes() == (FIXTURES / "v1-base.safetensors").read_bytes()


def test_new_patches_are_format_3_with_xxh3_fingerprints(tmp_path, pair):
    base, ft, _, _ = pair
    ops.diff(base, ft, tmp_path / "p.dst")
    p = Patch(tmp_path / "p.dst")
    assert p.header["format_version"] == 3
    fps = [e[f] for e in p.tensors.values() for f in ("base_fingerprint", "result_fingerprint")]
    assert fps and all(fp.startswith("xxh3:") and len(fp) == 5 + 32 for fp in fps)


def _states(tmp: Path) -> list[Path]:
    """Three checkpoints, each a fine-tune of the one before (bf16, fp32 and an int tensor)."""
    g = torch.Generator().manual_seed(5)
    s = {"w": torch.randn(67, 61, generator=g).to(torch.bfloat16), "b": torch.randn(29, generator=g),
         "n": torch.arange(5)}
    paths = []
    for i in range(3):
        if i:
            s = {k: v.clone() for k, v in s.items()}
            s["w"].view(-1)[i::5] += 0.25 * i
            s["b"][i::3] *= -2.0
        paths.append(tmp / f"s{i}.safetensors")
        save_file(s, str(paths[-1]))
    return paths


@pytest.mark.parametrize("piece", [1 << 20, 64, 6])
def test_stacked_patches_apply_revert_and_scale_in_pieces(tmp_path, monkeypatch, piece):
    """Several patches in one apply, the second made against the first's result; --revert undoes
    both; a patch out of order is refused; --scale moves only the patched entries. Tensors are
    streamed in pieces of `piece` bytes, so patches and checks cross piece boundaries."""
    monkeypatch.setattr(ops, "PIECE", piece)
    s0, s1, s2 = _states(tmp_path)
    ops.diff(s0, s1, tmp_path / "p1.dst")
    ops.diff(s1, s2, tmp_path / "p2.dst")
    ops.apply(s0, [tmp_path / "p1.dst", tmp_path / "p2.dst"], tmp_path / "top.safetensors")
    assert files_equal(tmp_path / "top.safetensors", s2)
    ops.apply(s2, [tmp_path / "p1.dst", tmp_path / "p2.dst"], tmp_path / "back.safetensors", revert=True)
    assert files_equal(tmp_path / "back.safetensors", s0)
    with pytest.raises(DstError, match="not the one .*p2.dst was made for"):
        ops.apply(s0, [tmp_path / "p2.dst"], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    ops.apply(s0, [tmp_path / "p1.dst"], tmp_path / "half.safetensors", scale=0.5)
    a, b, half = (load_file(str(p)) for p in (s0, s1, tmp_path / "half.safetensors"))
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(half[k], a[k])
            continue
        wide = a[k].double()
        want = torch.where(bits_view(a[k]).view(a[k].shape) != bits_view(b[k]).view(a[k].shape),
                           (wide + 0.5 * (b[k].double() - wide)).to(a[k].dtype), a[k])
        assert torch.equal(bits_view(half[k]), bits_view(want)), k


def test_a_format_2_patch_and_a_new_one_stack(tmp_path):
    """A SHA-256 patch (format 2) and an XXH3 patch (format 3) made on its result, in one apply."""
    res = load_file(str(FIXTURES / "v1-result.safetensors"))
    top = {k: (v * 3 if v.is_floating_point() else v) for k, v in res.items()}
    save_file(top, str(tmp_path / "top.safetensors"))
    ops.diff(FIXTURES / "v1-result.safetensors", tmp_path / "top.safetensors", tmp_path / "new.dst")
    patches = [FIXTURES / "v2.dst", tmp_path / "new.dst"]
    ops.apply(FIXTURES / "v1-base.safetensors", patches, tmp_path / "out.safetensors")
    assert files_equal(tmp_path / "out.safetensors", tmp_path / "top.safetensors")
    ops.apply(tmp_path / "out.safetensors", patches, tmp_path / "back.safetensors", revert=True)
    assert files_equal(tmp_path / "back.safetensors", FIXTURES / "v1-base.safetensors")


@pytest.mark.parametrize("index_codec", ["elias-fano", "bitmap", "rice", "varint"])
@pytest.mark.parametrize("value_codec", ["xor-byteplanes", "xor"])
def test_every_codec_round_trips_the_same_data(tmp_path, monkeypatch, index_codec, value_codec):
    """Force each codec on the same tensors (sparse, dense, clustered) and check the round trip."""
    import dstcli.codec as codec_mod
    import dstcli.patchfile as pf
    def forced(idx, n):
        if index_codec == "bitmap":
            bm = np.zeros(n, dtype=np.uint8)
            bm[idx] = 1
            return "bitmap", {}, np.packbits(bm).tobytes()
        if index_codec == "rice":
            return ("rice", *codec_mod._rice(idx))
        if index_codec == "varint":
            return ("varint", *codec_mod._varint(idx))
        l = codec_mod.ef_low_bits(n, len(idx))
        low = codec_mod._pack_fixed(idx & ((1 << l) - 1), l) if l else b""
        high = np.zeros(codec_mod.ef_sizes(n, len(idx), l)[1] * 8, dtype=np.uint8)
        high[(idx >> l) + np.arange(len(idx))] = 1
        return "elias-fano", {"l": l}, low + np.packbits(high).tobytes()

    def forced_block(idx, n):  # what the writer calls: the codec's raw bytes and their compression
        codec, params, raw = forced(idx, n)
        return codec, params, raw, codec_mod.compress(raw)

    monkeypatch.setattr(pf, "index_block", forced_block)
    monkeypatch.setattr(pf, "VALUE_CODECS", (value_codec,))
    g = torch.Generator().manual_seed(1)
    a = {"sparse": torch.randn(300, 40, generator=g), "dense": torch.randn(1000, generator=g).to(torch.bfloat16),
         "clustered": torch.randn(64, 64, generator=g).half()}
    b = {k: v.clone() for k, v in a.items()}
    b["sparse"].view(-1)[torch.randperm(12000, generator=g)[:25]] += 1
    b["dense"][::2] += 1
    b["clustered"][10:14, :] += 1
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    ops.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "p.dst")
    h = Patch(tmp_path / "p.dst").tensors
    assert {e["index"]["codec"] for e in h.values()} == {index_codec}
    assert {e["values"]["codec"] for e in h.values()} == {value_codec}
    ops.apply(tmp_path / "a.safetensors", [tmp_path / "p.dst"], tmp_path / "o.safetensors")
    got = load_file(str(tmp_path / "o.safetensors"))
    assert all(torch.equal(got[k].view(torch.uint8), b[k].view(torch.uint8)) for k in b)
