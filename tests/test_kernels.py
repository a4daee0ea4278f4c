"""The compiled CPU kernels (dstcli/kernels.c): the same bits as the torch paths they replace,
the torch fallback when they cannot be built, and the engine exact either way."""

import math
import os
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dstcli import engine, kernels
from dstcli.engine import DST
from dstcli.dtypes import bits_view
from dstcli.select import (DISTANCES, distance, kth_largest, rows_indices, sample_bracket, sparse_bracket, top_indices,
                           top_positions)

pytestmark = pytest.mark.skipif(kernels.lib() is None, reason=f"no CPU kernels here: {kernels.why()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def pair(m: int, dtype: torch.dtype, kind: str, seed: int):
    """A seed x0 and an update x of m entries; kind adds what the tie rule and the NaN rule meet."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(m, generator=g, dtype=torch.float64)
    x = x0 + torch.randn(m, generator=g, dtype=torch.float64) * 1e-2
    if kind == "ties":  # a few distinct distances: every threshold is a tie
        x = x0 + torch.randint(-3, 4, (m,), generator=g).double() * 0.25
    elif kind == "special":  # unchanged entries, zero seeds, NaN and infinite updates
        x[::7] = x0[::7]
        x0[5::1000] = 0
        x[11::5000] = float("nan")
        x[13::7000] = float("inf")
    elif kind == "fool":  # the sample sees only small distances: it misleads
        x = x0 + 1.0
        x[::sample_bracket(m, 1, max(4096, m // 256))[0]] = x0[::sample_bracket(m, 1, max(4096, m // 256))[0]] + 0.5
    return x.to(dtype), x0.to(dtype)


def threads(counts=(2, 1)):
    """Run the body once per OpenMP thread count (torch's, which the kernels share), checking the
    kernels see it (1 on a build without OpenMP)."""
    before = torch.get_num_threads()
    try:
        for t in counts:
            torch.set_num_threads(t)
            assert kernels._state["lib"].dst_threads() == (t if os.environ.get("DSTCLI_PORTABLE_RUN") != "1" else 1)
            yield t
    finally:
        torch.set_num_threads(before)


@given(st.integers(8192, 60_000), st.floats(1e-5, 0.999), st.sampled_from(DTYPES), st.sampled_from(DISTANCES),
       st.sampled_from(["rand", "ties", "special", "fool"]), st.integers(0, 10_000))
@settings(max_examples=120, deadline=None)
def test_top_positions_is_top_indices_of_the_distances(m, frac, dtype, kind, case, seed):
    x, x0 = pair(m, dtype, case, seed)
    k = max(1, min(m - 1, int(frac * m)))
    got = top_positions(x, x0, k, kind)
    want = top_indices(distance(x, x0, kind), k)
    if got is None:  # only where the sample misled (the caller then ranks the distances itself)
        assert case == "fool" or k > 0.9 * m
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DISTANCES)
def test_top_positions_serves_ordinary_tensors(dtype, kind):
    # not vacuous: on continuous values the fused path answers (and agrees) at every budget
    x, x0 = pair(100_000, dtype, "rand", 1)
    for k in (1, 10, 1000, 10_000, 50_000):
        got = top_positions(x, x0, k, kind)
        assert got is not None and torch.equal(got, top_indices(distance(x, x0, kind), k))


@given(st.integers(8192, 60_000), st.floats(1e-5, 0.999), st.sampled_from(DTYPES), st.sampled_from(DISTANCES),
       st.sampled_from(["rand", "ties", "special", "fool"]), st.integers(0, 10_000), st.booleans())
@settings(max_examples=120, deadline=None)
def test_top_is_top_indices_then_reset(m, frac, dtype, kind, case, seed, reuse):
    """dst_top_*: the kept positions of top_indices(distance()), x0's values there, x reset to x0
    elsewhere (bits moved) and the count of kept values that differ from x0, in one call; where the
    sample misled, None and x untouched."""
    x, x0 = pair(m, dtype, case, seed)
    k = max(1, min(m - 1, int(frac * m)))
    out = x.clone()
    work = {"buf": np.empty(100, dtype=np.uint8)} if reuse else None  # too small: grown
    got = kernels.top(out, x0, kind, k, *sparse_bracket(m, k), work=work)
    want = top_indices(distance(x, x0, kind), k)
    bits = bits_view
    if got is None:
        assert case == "fool" or k > 0.9 * m
        assert torch.equal(bits(out), bits(x))
        return
    idx, seed_vals, differ = got
    assert torch.equal(idx, want)
    assert torch.equal(bits(seed_vals), bits(x0[want]))
    expect = x0.clone()
    expect[want] = x[want]
    assert torch.equal(bits(out), bits(expect))
    assert differ == int(torch.count_nonzero(bits(x[want]) != bits(x0[want])))
    if reuse:
        assert len(work["buf"]) > 100


def test_top_serves_ordinary_tensors_and_reuses_its_scratch():
    # not vacuous: on continuous values the one-call path answers at every budget, and a scratch
    # kept from a larger tensor gives the same answer for a smaller one
    work = {}
    for m in (100_000, 20_000):
        x, x0 = pair(m, torch.float32, "rand", m)
        for k in (1, 10, 1000, m // 10, m // 2):
            out = x.clone()
            idx, _, _ = kernels.top(out, x0, "absolute", k, *sparse_bracket(m, k), work=work)
            assert torch.equal(idx, top_indices(distance(x, x0), k))
    assert len(work["buf"]) >= 100_000 * 8


@given(st.integers(1, 40), st.integers(1, 700), st.sampled_from(DTYPES), st.sampled_from(DISTANCES),
       st.sampled_from(["rand", "ties", "special"]), st.sampled_from(["none", "exact", "scaled", "wild"]),
       st.integers(0, 10_000), st.data())
@settings(max_examples=150, deadline=None)
def test_rows_is_rows_indices_then_reset(R, m, dtype, kind, case, hints, seed, data):
    """dst_rows_*: each row's kept positions as rows_indices(distance()) gives them (budgets 0 to
    the whole row, ties, zeros, NaN and inf), x0's values there, x reset to x0 elsewhere and the
    count of kept values that differ, whatever the hints (none, last step's exact k-th values,
    scaled ones, nonsense); the hints come back as each row's k-th largest distance."""
    x, x0 = pair(R * m, dtype, case, seed)
    x, x0 = x.view(R, m), x0.view(R, m)
    k = np.array(data.draw(st.lists(st.integers(0, m), min_size=R, max_size=R)), dtype=np.int64)
    d = distance(x, x0, kind)
    kth = torch.sort(d, dim=1, descending=True).values[torch.arange(R), torch.as_tensor(k).clamp(min=1) - 1]
    wide = np.float64 if dtype == torch.float64 else np.float32
    g = np.random.default_rng(seed)
    hint = {"none": np.zeros(R), "exact": kth.numpy(), "scaled": kth.numpy() * g.uniform(0.5, 2.0, R),
            "wild": g.choice([0.0, -1.0, np.nan, np.inf, 1e-30, 1e30], R)}[hints].astype(wide)
    out = x.clone()
    pos, seed_vals, differ = kernels.rows(out, x0, k, kind, hint)
    want = rows_indices(d, torch.from_numpy(k))
    assert torch.equal(pos, want)
    flat, flat0 = x.reshape(-1), x0.reshape(-1)
    assert torch.equal(bits_view(seed_vals), bits_view(flat0[want]))
    expect = flat0.clone()
    expect[want] = flat[want]
    assert torch.equal(bits_view(out.reshape(-1)), bits_view(expect))
    assert differ == int(torch.count_nonzero(bits_view(flat[want]) != bits_view(flat0[want])))
    assert np.array_equal(hint[k > 0], kth.numpy().astype(wide)[k > 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["rand", "ties", "special"])
def test_top_gives_the_same_on_any_number_of_threads(dtype, case):
    """From 2^18 entries on dst_top_* makes both its passes on several threads (the second with
    each run's ties at tau budgeted in position order; with "ties", k = 280,000 passes the entries
    at distance 0, so no tie at tau is kept): the same as top_indices + reset on 2 threads and
    on 1."""
    m = 300_001
    x, x0 = pair(m, dtype, case, 9)
    for kind in DISTANCES:
        d = distance(x, x0, kind)
        for k in (3, 3000, 100_000, 280_000):
            want = top_indices(d, k)
            expect = x0.clone()
            expect[want] = x[want]
            for _ in threads():
                out = x.clone()
                idx, seed_vals, differ = kernels.top(out, x0, kind, k, *sparse_bracket(m, k))
                assert torch.equal(idx, want) and torch.equal(bits_view(out), bits_view(expect))
                assert torch.equal(bits_view(seed_vals), bits_view(x0[want]))
                assert differ == int(torch.count_nonzero(bits_view(x[want]) != bits_view(x0[want])))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_gives_the_same_on_any_number_of_threads(dtype):
    """From 2^18 entries on dst_rows_* splits its rows between threads (OpenMP, where built with
    it): the same positions, values, hints and counts as rows_indices, on 2 threads and on 1."""
    R, m = 1536, 384  # 589,824 entries
    x, x0 = pair(R * m, dtype, "ties", 8)
    x, x0 = x.view(R, m), x0.view(R, m)
    k = np.random.default_rng(8).integers(0, 60, R)
    k[::97] = m  # whole rows, and rows of budget 0 between
    want = rows_indices(distance(x, x0), torch.from_numpy(k))
    wide = np.float64 if dtype == torch.float64 else np.float32
    got = {}
    for t in threads():
        out, hint = x.clone(), np.zeros(R, dtype=wide)
        got[t] = kernels.rows(out, x0, k, "absolute", hint) + (out, hint)
    for pos, seed_vals, differ, out, hint in got.values():
        assert torch.equal(pos, want) and torch.equal(bits_view(seed_vals), bits_view(x0.reshape(-1)[want]))
    a, b = got[2], got[1]
    assert a[2] == b[2] and torch.equal(bits_view(a[3]), bits_view(b[3])) and np.array_equal(a[4], b[4])


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=12), st.sampled_from(DTYPES), st.sampled_from(DISTANCES),
       st.sampled_from(["rand", "ties", "special"]), st.integers(0, 10_000), st.data())
@settings(max_examples=80, deadline=None)
def test_rows_takes_silos_of_any_lengths(lengths, dtype, kind, case, seed, data):
    """dst_rows_* over small silos laid end to end (`starts`), as the engine batches LayerNorm
    weights and biases: each silo's top_indices, offset to its start."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x, x0 = pair(int(starts[-1]), dtype, case, seed)
    k = np.array([data.draw(st.integers(0, n)) for n in lengths], dtype=np.int64)
    wide = np.float64 if dtype == torch.float64 else np.float32
    out = x.clone()
    pos, seed_vals, differ = kernels.rows(out, x0, k, kind, np.zeros(len(lengths), dtype=wide), starts)
    d = distance(x, x0, kind)
    want = torch.cat([top_indices(d[a:b], int(kk)) + int(a) for a, b, kk in zip(starts, starts[1:], k)])
    assert torch.equal(pos, want)
    expect = x0.clone()
    expect[want] = x[want]
    assert torch.equal(bits_view(out), bits_view(expect)) and torch.equal(bits_view(seed_vals), bits_view(x0[want]))
    assert differ == int(torch.count_nonzero(bits_view(x[want]) != bits_view(x0[want])))


def many_case(sizes, dtype, kind, case, seed, draw):
    """A bucket for kernels.many: per tensor of m entries an update x, its snapshot x0 whose old
    kept positions hold the update's values (the kernel puts the seed back there), the old kept
    set, and a dst_top_* or dst_rows_* spec (R rows, R | m) with budgets drawn; and the answer of
    kernels.top / kernels.rows a tensor at a time."""
    wide = np.float64 if dtype == torch.float64 else np.float32
    xs, snaps, seeds, olds, old_vals, top, rows = [], [], [], [], [], [], []
    for i, m in enumerate(sizes):
        x, x0 = pair(m, dtype, case, seed + i)
        old = np.random.default_rng(seed + i).choice(m, draw(st.integers(0, m)), replace=False)
        old = torch.from_numpy(np.sort(old))
        snap = x0.clone()
        snap[old] = x[old]
        xs.append(x), snaps.append(snap), seeds.append(x0), olds.append(old), old_vals.append(x0[old].clone())
        R = draw(st.sampled_from([r for r in (1, 2, 4, 8) if m % r == 0]))
        k = draw(st.integers(0, m // R))
        if R == 1 and m >= 8192 and 0 < k < m and draw(st.booleans()):
            top.append((k, *sparse_bracket(m, k)))
            rows.append(None)
        else:
            top.append(None)
            rows.append((np.arange(0, m + 1, m // R, dtype=np.int64),
                         np.array([draw(st.integers(0, m // R)) for _ in range(R)], dtype=np.int64),
                         np.zeros(R, dtype=wide)))
    want = []
    for x, x0, old, tp, rw in zip(xs, seeds, olds, top, rows):
        out = x.clone()
        got = (kernels.top(out, x0, kind, *tp) if tp else
               kernels.rows(out.view(len(rw[0]) - 1, -1), x0.view(len(rw[0]) - 1, -1), rw[1], kind, rw[2].copy()))
        if got is None:
            want.append(None)
            continue
        pos = got[0]
        both = len(np.intersect1d(pos.numpy(), old.numpy()))
        bad = int(torch.count_nonzero(~torch.isfinite(out[pos].float())))
        want.append((out, pos, got[1], [len(pos), got[2], both, bad]))
    return xs, snaps, seeds, olds, old_vals, kernels.Bucket(dtype, list(sizes), top, rows), want


@given(st.lists(st.integers(1, 40_000), min_size=1, max_size=6), st.sampled_from(DTYPES), st.sampled_from(DISTANCES),
       st.sampled_from(["rand", "ties", "special", "fool"]), st.integers(0, 10_000), st.data())
@settings(max_examples=60, deadline=None)
def test_many_is_top_and_rows_a_tensor_at_a_time(sizes, dtype, kind, case, seed, data):
    """kernels.many over a bucket (tensor silos by dst_top_*, silos along rows and small ones by
    dst_rows_*) on 2 threads and 1: each tensor as kernels.top / kernels.rows leave it, its kept
    positions and seed values, the counts (kept, differ, kept before too, non-finite), the seed
    put back into the snapshot, the rows' hints; a tensor whose sample misled untouched (-1).
    Given the seed itself (old_seed None, as a memory-mapped seed), the same, and the seed is
    only read."""
    xs, snaps, seeds, olds, old_vals, b, want = many_case(sizes, dtype, kind, case, seed, data.draw)
    work = {}
    def check(before, vals):
        x, x0 = [t.clone() for t in xs], [t.clone() for t in before]
        hints = [rw[2].copy() for rw in b.rows if rw is not None]
        pos, seed_vals, out = kernels.many(b, x, x0, olds, vals, kind, work)
        for t, w in enumerate(want):
            assert torch.equal(bits_view(x0[t]), bits_view(seeds[t]))  # the seed again
            if w is None:
                assert out[t, 0] == -1 and len(pos[t]) == 0 and torch.equal(bits_view(x[t]), bits_view(xs[t]))
                continue
            assert torch.equal(bits_view(x[t]), bits_view(w[0])) and torch.equal(pos[t], w[1])
            assert torch.equal(bits_view(seed_vals[t]), bits_view(w[2])) and out[t].tolist() == w[3]
        for rw, h in zip([rw for rw in b.rows if rw is not None], hints):  # this call's hints, then reset
            assert np.all(rw[2] >= 0)
            rw[2][:] = h

    for _ in threads():
        check(snaps, old_vals)
    check(seeds, None)


def _bracket_misses(v: np.ndarray, K: int, stride: int, j_lo: int, j_hi: int) -> bool:
    """Whether the sample of every stride-th value brackets the K-th largest of v wrongly, as
    dst_kth_parts_* judges it: between the sample's j_lo-th and j_hi-th largest lie too few values
    to reach K, or K or more lie above it."""
    sample = np.sort(v[::stride])[::-1]
    if len(sample) < j_lo or len(sample) == 0:
        return True
    lo, hi = sample[j_lo - 1], (sample[j_hi - 1] if j_hi >= 1 else np.inf)
    above, inside = int((v > hi).sum()), int(((v >= lo) & (v <= hi)).sum())
    return above + inside < K or above >= K


def _check_pool(lengths, dtype, case, seed, K, whole, last):
    """Pool.kth against select.kth_largest and Pool.cut against top_indices over the parts
    together (see the tests below); a whole part's positions are garbage the cut must not read,
    and some of its distances are 0 (never kept). last: the cut writes the kept sets into new
    buffers (a step's last cut) instead of compacting the parts in place, which a last cut at 0
    (every positive entry stays) then reads, as a step does after a cut in its middle."""
    g = np.random.default_rng(seed)
    total = sum(lengths)
    vals = [torch.from_numpy(np.abs(g.standard_normal(n)) + 1e-3) if case == "rand"
            else torch.from_numpy(g.integers(1, 5, n).astype(np.float64)) for n in lengths]
    vals = [(v * (torch.arange(len(v)) % 7 != 3) if w else v).to(dtype) for v, w in zip(vals, whole)]
    pool = kernels.Pool(dtype)
    x = [torch.zeros(max(n, 1), dtype=dtype) for n in lengths]
    pos = [torch.full((n,), -(1 << 40)) if w else torch.arange(n) for n, w in zip(lengths, whole)]
    seed_vals = [-1 - torch.arange(n, dtype=dtype) % 97 for n in lengths]  # seed of position j: seed_vals[j]
    original = [sv.clone() for sv in seed_vals]  # a cut compacts seed_vals in place
    for a, p, sv, v, n, w in zip(x, pos, seed_vals, vals, lengths, whole):
        pool.add([a], p, sv, v, [0], [n], [0], [int(w)])
    for a, v in zip(x, vals):  # x holds its values at the candidates; a cut sets the rest to the seed
        a[:len(v)] = v
    kernels.lib()
    got = pool.kth(K, *sparse_bracket(total, K), {})
    want = kth_largest([v.numpy() for v in vals], K)
    if got is None:  # the sample misled, as a sample may: its bracket truly misses the K-th largest
        assert _bracket_misses(torch.cat(vals).numpy(), K, *sparse_bracket(total, K))
        got = want
    assert got == want
    keep = top_indices(torch.cat(vals), K)  # before the cut, which compacts vals in place
    vals = [v.clone() for v in vals]
    kept = pool.cut(*got, last=K) if last else pool.cut(*got)
    assert not pool.whole.any() and (kept is None) != last
    if kept is None:
        kept = pool.cut(0.0, 0, 0, last=K)
    starts = np.cumsum([0, *lengths])
    for i, (a, (p, sv)) in enumerate(zip(x, kept)):
        mine = keep[(keep >= int(starts[i])) & (keep < int(starts[i + 1]))] - int(starts[i])
        assert torch.equal(p, mine) and torch.equal(sv, original[i][mine])
        expect = torch.zeros_like(a)
        expect[:lengths[i]] = original[i]
        expect[mine] = vals[i][mine]
        assert torch.equal(a, expect)


@given(st.lists(st.integers(0, 30_000), min_size=1, max_size=8), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from(["rand", "few"]), st.integers(0, 10_000), st.data())
@settings(max_examples=80, deadline=None)
def test_pool_kth_is_kth_largest_over_the_parts(lengths, dtype, case, seed, data):
    """Pool.kth (dst_kth_parts_*: the sample strided through the parts, the bracket, the k-th
    largest) gives select.kth_largest's (tau, need, ties) wherever the sample does not mislead;
    Pool.cut then keeps what top_indices over the parts together keeps, whole parts (every entry
    of a tensor, positions implicit, zeros among the distances) or not."""
    if sum(lengths) < 2:
        return
    whole = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    _check_pool(lengths, dtype, case, seed, data.draw(st.integers(1, sum(lengths) - 1)), whole, data.draw(st.booleans()))


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("case", ["rand", "few"])
def test_pool_cut_of_whole_parts_on_threads(case, last):
    """The same on large parts (from 32K candidates on, kernels.c's CUT_PARALLEL_MIN, Pool.cut goes
    on several threads; the hypothesis test above draws pools on both sides of it): whole parts
    and parts of candidates mixed, with four distinct values ("few") the ties at tau do not all
    fit and each part gets what the parts before it leave; the last cut writes each part's kept
    set at its own offset, none past it (a 16-wide store would overwrite the next part's)."""
    for _ in threads():
        _check_pool([150_000, 70_001, 20_000, 90_000], torch.float32, case, 5, 100_000, [True, False, True, True], last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["rand", "special"])
@pytest.mark.parametrize("path", ["top", "rows"])
def test_many_takes_a_bucket_of_large_tensors_only(dtype, case, path):
    """A bucket of tensors of PARALLEL_MIN entries or more (each on all threads: its kernels, the
    seed put back at the old kept set, the churn and non-finite counts, which the pass that keeps
    makes run by run), none smaller: the same as a tensor at a time."""
    sizes = [kernels.PARALLEL_MIN, 2 * kernels.PARALLEL_MIN + 5]
    big = kernels.PARALLEL_MIN + 10  # old kept entries and new ones: both on threads
    # for each tensor: old kept, R, k, then top? where R is 1, then each row's k for rows
    draws = iter([3, 1, 20_000, True, big, 1, big, True] if path == "top" else
                 [100_000, 8, 0, *[3000] * 8, big, 1, big, False, big])
    xs, snaps, seeds, olds, old_vals, b, want = many_case(sizes, dtype, "absolute", case, 0,
                                                          lambda strategy: next(draws))
    assert all(w is not None for w in want)
    if case == "special":  # kept NaN or infinite values, counted
        assert want[1][3][3] > 0
    for _ in threads():
        x, x0 = [t.clone() for t in xs], [t.clone() for t in snaps]
        pos, seed_vals, out = kernels.many(b, x, x0, olds, old_vals, "absolute", {})
        assert [r.tolist() for r in out] == [w[3] for w in want]
        assert all(torch.equal(p, w[1]) and torch.equal(bits_view(a), bits_view(w[0])) for p, a, w in zip(pos, x, want))


@given(st.integers(1, 5000), st.sampled_from([np.float32, np.float64]), st.sampled_from(["rand", "few", "inf"]),
       st.sampled_from([0, 1, 2, 64]), st.integers(0, 10_000), st.data())
@settings(max_examples=200, deadline=None)
def test_kth_is_the_sorted_jth(n, dtype, case, rounds, seed, data):
    """dst_kth_*: the j-th smallest and the count above it, after any number of quickselect rounds
    (0: the sort that ends a long quickselect, at once)."""
    g = np.random.default_rng(seed)
    a = np.abs(g.standard_normal(n)).astype(dtype)
    if case == "few":  # masses of equal values, as bf16 distances
        a = g.integers(0, 4, n).astype(dtype)
    elif case == "inf":
        a[g.integers(0, n, max(1, n // 10))] = np.inf
    j = data.draw(st.integers(0, n - 1))
    want = np.sort(a)[j]
    assert kernels.kth(a, j, rounds) == (want, int(np.count_nonzero(a > want)))


def test_candidates_stop_at_the_cap():
    x, x0 = pair(50_000, torch.float32, "rand", 2)
    d = distance(x, x0)
    lo = float(d.median())
    pos, val = kernels.candidates(x, x0, "absolute", lo, False, 50_000)
    assert torch.equal(pos, torch.nonzero(d >= lo).view(-1)) and torch.equal(val, d[pos])
    pos, val = kernels.candidates(x, x0, "absolute", lo, True, 50_000)
    assert torch.equal(pos, torch.nonzero(d > lo).view(-1))
    assert kernels.candidates(x, x0, "absolute", lo, False, len(pos) - 1) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_reset_moves_bits(dtype):
    g = torch.Generator().manual_seed(3)
    n = 20_000
    x0 = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(n, generator=g).to(dtype)
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    bits[::97] = -1  # NaNs with payloads: moved, never computed
    idx = torch.sort(torch.randperm(n, generator=g)[:777]).values
    want = x0.clone()
    want[idx] = x[idx]
    before, seed_vals = x.clone(), x0[idx]
    vals, got_seed = kernels.reset(x, x0, idx)
    assert torch.equal(x.view(bits.dtype), want.view(bits.dtype))
    assert torch.equal(vals.view(bits.dtype), before[idx].view(bits.dtype))
    assert torch.equal(got_seed.view(bits.dtype), seed_vals.view(bits.dtype))


BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DISTANCES)
@pytest.mark.parametrize("case", ["rand", "ties", "special"])
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("m", [30_001, 300_001])
def test_share_is_candidates_then_reset(dtype, kind, case, strict, m):
    # odd sizes: the 16-wide loop leaves a tail; 300,001 entries: split between threads
    x_, x0_ = pair(m, dtype, case, 5)
    lo = float(distance(x_, x0_, kind).median()) if case != "special" else 0.0
    for _ in threads() if m >= 1 << 18 else [1]:
        x, x0 = x_.clone(), x0_
        want_x = x.clone()
        pos, val = kernels.candidates(want_x, x0, kind, lo, strict, x.numel())
        vals, seed_vals = kernels.reset(want_x, x0, pos)
        bits = BITS[x.element_size()]
        before = x.clone()
        below = distance(before, x0, kind) <= lo if strict else distance(before, x0, kind) < lo
        # one too many, a quarter (one thread's range alone passes it), fewer than one 16-wide
        # block: x's top part stays
        for cap in [len(pos) - 1] + ([len(pos) // 4, 3, 0] if len(pos) >= 4 else []):
            x = before.clone()
            assert kernels.share(x, x0, kind, lo, strict, cap) is None
            assert torch.equal(x.view(bits)[~below], before.view(bits)[~below])
            xb, b0 = x.view(bits)[below], x0.view(bits)[below]
            assert bool(((xb == before.view(bits)[below]) | (xb == b0)).all())
            assert cap < 16 or not len(xb) or bool((xb == b0).any())  # the pass got past some
        x = before
        got_pos, got_val, got_seed, differ = kernels.share(x, x0, kind, lo, strict, len(pos))
        assert torch.equal(got_pos, pos) and torch.equal(got_val, val)
        assert torch.equal(got_seed.view(bits), seed_vals.view(bits)) and torch.equal(x.view(bits), want_x.view(bits))
        assert differ == int(torch.count_nonzero(vals.view(bits) != seed_vals.view(bits)))
        assert 0 < len(pos) < x.numel() or (case == "special" and not strict)  # lo = 0: everything is in


def top_k_mask(vals: np.ndarray, k: int) -> np.ndarray:
    """The reference: the k largest positive values, ties to the lower position, by a full sort."""
    order = np.lexsort((np.arange(len(vals)), -vals))[:k]
    keep = np.zeros(len(vals), dtype=bool)
    keep[order] = True
    return keep & (vals > 0)


def pool_values(draw_sizes, quantized: bool, dtype, seed: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    parts = []
    for n in draw_sizes:
        v = g.exponential(1.0, n)
        parts.append((np.ceil(v * 4) / 4 if quantized else v + 1e-3).astype(dtype))  # all positive
    return parts


@given(st.lists(st.integers(0, 40_000), min_size=1, max_size=6), st.floats(0.0, 1.0), st.booleans(),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_kth_largest_is_the_sorted_kth(sizes, frac, quantized, dtype, seed):
    parts = pool_values(sizes, quantized, dtype, seed)
    every = np.concatenate(parts)
    if len(every) < 2:
        return
    k = 1 + int(frac * (len(every) - 2))  # 1 .. m - 1
    ranked = np.sort(every)[::-1]
    want = (ranked[k - 1], k - int(np.count_nonzero(every > ranked[k - 1])), int(np.count_nonzero(every == ranked[k - 1])))
    assert kth_largest(parts, k) == want
    with mock.patch.dict(kernels._state, {"lib": None}):  # NumPy's compares instead of dst_bracket_*
        assert kth_largest(parts, k) == want


def test_kth_largest_when_the_sample_misleads():
    # the sample, strided through the parts as one array, sees only the small values
    m, k = 200_000, 5_000
    stride = sample_bracket(m, k, max(4096, min(1 << 16, m // 256)))[0]
    every = np.ones(m, dtype=np.float32)
    every[::stride] = 0.5
    parts = np.split(every, [70_000, 130_001])
    ones = int(np.count_nonzero(every == 1))
    assert kth_largest(parts, k) == (1.0, k, ones) and kth_largest(parts, m - 100) == (0.5, m - 100 - ones, m - ones)


@given(st.lists(st.integers(0, 30_000), min_size=1, max_size=5), st.floats(0.0, 1.0), st.booleans(),
       st.sampled_from([(np.float32, torch.float32), (np.float32, torch.bfloat16), (np.float64, torch.float16),
                        (np.float64, torch.float32), (np.float64, torch.float64)]),
       st.sampled_from(["dense", "sparse", "mixed"]), st.integers(0, 10_000), st.booleans())
@settings(max_examples=60, deadline=None)
def test_cut_keeps_the_pools_top_k(sizes, frac, quantized, types, layout, seed, many):
    """A pool cut, part by part (or all parts in one call: cut_many), keeps exactly the pool's
    top-k (ties to the earlier part and the lower position), sets every other candidate back to
    its seed value and counts the survivors that differ from theirs."""
    vdtype, xdtype = types
    parts = pool_values(sizes, quantized, vdtype, seed)
    m = sum(len(v) for v in parts)
    if m < 2:
        return
    k = 1 + int(frac * (m - 2))
    g = torch.Generator().manual_seed(seed)
    bits = BITS[torch.empty(0, dtype=xdtype).element_size()]
    keep = np.split(top_k_mask(np.concatenate(parts), k), np.cumsum([len(v) for v in parts])[:-1])
    tau, need, ties = kth_largest(parts, k)
    left = np.array([need], dtype=np.int64)
    built = []
    for i, (v, kept) in enumerate(zip(parts, keep)):
        n = len(v)
        sparse = layout == "sparse" or (layout == "mixed" and i % 2)
        size = 3 * n + 5 if sparse else n
        pos = torch.sort(torch.randperm(size, generator=g)[:n]).values if sparse else torch.arange(n)
        x = torch.randn(size, generator=g).to(xdtype)
        seed_vals = torch.randn(n, generator=g).to(xdtype)
        seed_vals[::3] = x[pos[::3]]  # survivors equal to their seed values are not counted
        want_x = x.clone()
        want_x[pos[~torch.from_numpy(kept)]] = seed_vals[~torch.from_numpy(kept)]
        ours = (pos.clone(), seed_vals.clone(), torch.from_numpy(v.copy()))
        built.append((x, ours, pos, seed_vals, want_x, v, kept))
    if many:
        results = kernels.cut_many([(b[0], *b[1]) for b in built], tau, left, ties == need)
    else:
        results = [kernels.cut_many([(b[0], *b[1])], tau, left, False)[0] for b in built]  # a call a part
    for (x, ours, pos, seed_vals, want_x, v, kept), (got, differ) in zip(built, results):
        mask = torch.from_numpy(kept)
        assert got == int(mask.sum())
        assert torch.equal(ours[0][:got], pos[mask]) and np.array_equal(ours[2][:got].numpy(), v[kept])
        assert torch.equal(ours[1][:got].view(bits), seed_vals[mask].view(bits))
        assert torch.equal(x.view(bits), want_x.view(bits))
        assert differ == int(torch.count_nonzero(x[pos[mask]].view(bits) != seed_vals[mask].view(bits)))
    assert left[0] == 0


@pytest.mark.parametrize("quantized", [False, True])
def test_cut_many_gives_the_same_on_any_number_of_threads(quantized):
    """From 2^18 candidates on, cut_many cuts the parts on several threads: where every tie fits
    (continuous values) each keeps its own, else (quantized values) each part's ties are counted
    and budgeted as the shared count would: the same as one thread and as a full sort."""
    parts = pool_values([60_000, 5, 90_000, 0, 70_000, 80_000], quantized, np.float32, 11)
    k = 123_457
    tau, need, ties = kth_largest(parts, k)
    assert (ties == need) != quantized
    keep = top_k_mask(np.concatenate(parts), k)
    got = {}
    for t in threads():
        g = torch.Generator().manual_seed(3)
        pool = [(torch.randn(len(v), generator=g), torch.arange(len(v)), torch.randn(len(v), generator=g),
                 torch.from_numpy(v.copy())) for v in parts]
        left = np.array([need], dtype=np.int64)
        res = kernels.cut_many(pool, tau, left, ties == need)
        assert sum(r[0] for r in res) == int(keep.sum()) and left[0] == 0
        got[t] = (res, [(x.view(torch.int32).clone(), pos[:r[0]].clone()) for (x, pos, _, _), r in zip(pool, res)])
    assert got[2][0] == got[1][0]
    for (xa, pa), (xb, pb) in zip(got[2][1], got[1][1]):
        assert torch.equal(xa, xb) and torch.equal(pa, pb)
    assert torch.equal(torch.cat([p for _, p in got[1][1]]),
                       torch.from_numpy(np.concatenate([np.flatnonzero(m) for m in np.split(
                           keep, np.cumsum([len(v) for v in parts])[:-1])])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 512), (37, 203), (5, 16), (300, 7)])
def test_rows_above_is_the_mask_of_each_rows_threshold(dtype, shape):
    g = np.random.default_rng(6)
    a = np.ceil(g.exponential(1.0, shape) * 8).astype(dtype) / 8  # ties at many thresholds
    tau = a[np.arange(shape[0]), g.integers(0, shape[1], shape[0])][:, None]
    want = np.flatnonzero(a >= tau)
    assert np.array_equal(kernels.rows_above(a, tau.ravel(), len(want)), want)
    assert np.array_equal(kernels.rows_above(a, tau.ravel(), a.size), want)
    assert kernels.rows_above(a, tau.ravel(), len(want) - 1) is None


@pytest.mark.parametrize("budgets", ["one", "several"])
@pytest.mark.parametrize("case", ["rand", "ties", "zeros"])
@pytest.mark.parametrize("shape", [(256, 512), (64, 2048), (300, 33)])
def test_rows_indices_is_the_same_without_kernels(budgets, case, shape):
    g = np.random.default_rng(7)
    a = g.exponential(1.0, shape).astype(np.float32)
    if case == "ties":
        a = np.ceil(a * 4) / 4
    elif case == "zeros":
        a[: shape[0] // 2, 3:] = 0  # rows with fewer positive distances than their budget
    for frac in (0.01, 0.1, 0.3):
        k = max(1, int(frac * shape[1]))
        ks = torch.full((shape[0],), k) if budgets == "one" else torch.from_numpy(g.integers(1, k + 2, shape[0]) // 2 * 2 + 1)
        got = rows_indices(torch.from_numpy(a), ks)
        with mock.patch.dict(kernels._state, {"lib": None}):
            assert torch.equal(got, rows_indices(torch.from_numpy(a), ks))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["absolute", "relative"])
@pytest.mark.parametrize("shared", [4, 19])
def test_the_global_pool_is_the_same_without_kernels(monkeypatch, dtype, kind, shared):
    """The global silo's pool on the CPU kernels (whole tensors shared while it has no floor,
    then only entries above it; cuts of more than 65,536 entries, by the sampled bracket) over
    steps with ties, a bucket a call (kernels.pool_many, on 2 threads and 1) and a tensor a call,
    against the same steps on the torch path: parameters, kept sets, step statistics (non-seed
    entries, churn, non-finite kept entries) bit for bit. One optimizer over the first `shared`
    tensors: 19 (all of them, at epsilon 0.05) makes a bucket whose shares go in three calls (two
    runs of at most 4K candidates, the first cut, the rest at once above its floor)."""
    def run(many=True):
        ran.clear()
        g = torch.Generator().manual_seed(1)
        shapes = [(120, 100)] * 16 + [(100_000,), (7,), (300, 30)]
        params = {f"w{i}": torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for i, s in enumerate(shapes)}
        dst = DST(params.items(), epsilon=0.1 if shared < 19 else 0.05, silo="global", distance=kind, seed="none",
                  batched=False)
        dst._many = dst._many and many
        opts = {n: torch.optim.Adam([p], lr=1e-2) for n, p in params.items()}
        one = torch.optim.Adam([params[f"w{i}"] for i in range(shared)], lr=1e-2)
        opts.update({f"w{i}": one for i in range(shared)})
        stats = []
        for step in range(4):
            for i, p in enumerate(params.values()):  # rounded in some tensors: ties across tensors
                grad = torch.randn(p.shape, generator=g)
                p.grad = (grad.round() if i % 3 == 0 else grad).to(dtype)
            if step == 2:
                params["w16"].grad[5] = float("nan")
            st = dst.step(opts)
            stats.append((st.nonseed, st.entered, st.left, dst.nonfinite()))
        held = [b.bufs is not None for b in dict.fromkeys(ran)]  # each bucket pool_many ran on: buffers kept?
        return {n: p.detach().clone() for n, p in params.items()}, {n: k.idx for n, k in dst.kept.items()}, stats, held

    calls, ran = [], []  # the kernel calls made, and the kernels.Buckets pool_many ran on in this run

    def record(name, real):
        def call(*a, **k):
            calls.append(name)
            if name == "pool_many":
                ran.append(a[0])
            return real(*a, **k)
        return call
    for owner, name in ((kernels, "share"), (kernels, "cut_many"), (kernels, "pool_many"), (kernels.Pool, "kth"),
                        (kernels.Pool, "cut")):
        monkeypatch.setattr(owner, name, record(name, getattr(owner, name)))
    fused, one_thread = [run() for _ in threads()]
    assert {"pool_many", "kth", "cut"} <= set(calls)  # the pool ran on the kernels
    assert shared < 19 or calls[:5] == ["pool_many", "pool_many", "kth", "cut", "pool_many"]
    with monkeypatch.context() as m:  # as where the sample misleads: select.kth_largest ranks the pool
        m.setattr(kernels.Pool, "kth", lambda *a, **k: None)
        unsampled = run()
    with monkeypatch.context() as m:  # no bucket keeps its output buffers between steps
        m.setattr(engine, "POOL_REUSE", 0)
        fresh = run()
    assert fused[3] and all(fused[3]) and not any(fresh[3])
    calls.clear()
    single = run(many=False)
    assert "pool_many" not in calls and {"share", "cut_many"} <= set(calls)
    monkeypatch.setitem(kernels._state, "lib", None)  # as without a compiler
    plain = run()
    for other in (one_thread, unsampled, fresh, single, plain):
        for a, b in zip(fused[:2], other[:2]):
            assert a.keys() == b.keys() and all(torch.equal(bits_view(a[n]), bits_view(b[n])) for n in a)
        assert fused[2] == other[2]
    assert any(s[1] for s in fused[2][1:]) and any(s[3] for s in fused[2])


@pytest.mark.parametrize("floor", [None, "low", "high"])
def test_pool_many_writes_within_each_tensors_room(floor):
    """kernels.pool_many's shares fit the rooms Bucket.offsets gives them, min(n, threads * K)
    for a tensor of PARALLEL_MIN entries or more (a thread's share of it stops at K): nothing is
    written past the last tensor's room, whether the share holds (a high floor), passes K and
    falls back to the tensor's top-K (a low one), or no floor sends it to its top-K at once; each
    tensor keeps what it should."""
    g = torch.Generator().manual_seed(3)
    sizes, K, guard = [300_001, 5_000, 300_001], 20_000, 4096
    x0s = [torch.randn(n, generator=g) for n in sizes]
    xs = [a + torch.randn(n, generator=g) * 1e-3 for a, n in zip(x0s, sizes)]
    d = [distance(x, x0, "absolute") for x, x0 in zip(xs, x0s)]
    lo = {None: None, "low": 1e-9, "high": float(torch.quantile(d[0][:100_000], 0.99))}[floor]
    top = [(K, *sparse_bracket(n, K)) if K < n else None for n in sizes]
    for t in threads():
        b = kernels.Bucket(torch.float32, sizes, top, pool=K)
        off = b.offsets(kernels._state["lib"].dst_threads())
        assert off[1] < sizes[0] or t == 1  # the room is a thread's K each, not the whole tensor
        b.bufs = [torch.full((int(off[-1]) + guard,), -7, dtype=dt) for dt in (torch.long, torch.float32, torch.float32)]
        x = [v.clone() for v in xs]
        none = torch.empty(0, dtype=torch.long)
        _, _, out, whole = kernels.pool_many(b, x, [v.clone() for v in x0s], [none] * 3, [torch.empty(0)] * 3,
                                             "absolute", lo, K, {})
        assert all(bool((buf[int(off[-1]):] == -7).all()) for buf in b.bufs)
        for i, n in enumerate(sizes):
            above = int((d[i] > (lo or 0)).sum())
            assert whole[i] == (lo is None and n <= K)  # no floor: a tensor of at most K entries whole
            assert out[i, 0] == (n if whole[i] else above if above <= K else K)
            assert out[i, 0] <= off[i + 1] - off[i]


@pytest.mark.parametrize("silo", ["tensor", "global", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_is_the_same_without_kernels(monkeypatch, silo, dtype):
    """Many steps of the lean engine on tensors large enough for the fused path, against the
    same steps with a kernel call a tensor (no kernels.many), on 2 threads and 1, and with the
    kernels switched off: the same parameters, kept sets, seed values and step statistics
    (non-seed entries, churn, non-finite kept entries), bit for bit. Two buckets (one optimizer
    over four tensors, one over one), a tensor of PARALLEL_MIN entries or more (all threads on it)
    and smaller ones (a thread each), one under SAMPLED_MIN, a frozen one, a NaN gradient. And
    with the seed held (a mapping, as `dstcli train` maps the base): the kernels read it in place
    of a snapshot, never writing it (the global silo: a band in place of the pool)."""
    def run(many=True, held=False):
        g = torch.Generator().manual_seed(0)
        params = {f"w{i}": torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
                  for i, s in enumerate([(300, 100), (64, 512), (40_000,), (600, 500), (100,), (3,)])}
        seed = {n: p.detach().clone() for n, p in params.items()} if held else "none"
        first_seen = {n: p.detach().clone() for n, p in params.items()}
        dst = DST(params.items(), epsilon=0.05, silo=silo, seed=seed, batched=False)  # per tensor
        assert dst._many == (kernels.lib() is not None)
        dst._many = dst._many and many
        ps = list(params.values())
        rest = [n for n in ("w4", "w5") if n not in dst.frozen]  # w5: frozen in tensor and row silos
        first, second = torch.optim.Adam(ps[:4], lr=1e-2), torch.optim.Adam([params[n] for n in rest], lr=1e-2)
        opts = {**{f"w{i}": first for i in range(4)}, **{n: second for n in rest}}
        stats = []
        for step in range(6):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            if step == 4:
                ps[1].grad.view(-1)[7] = float("nan")
            st = dst.step(opts)
            stats.append((st.nonseed, st.entered, st.left, dst.nonfinite()))
        if held:  # read in place, never written
            assert all(dst.seed[n] is seed[n] and torch.equal(bits_view(seed[n]), bits_view(first_seen[n]))
                       for n in params)
        return ({n: p.detach().clone() for n, p in params.items()}, {n: k.idx for n, k in dst.kept.items()},
                {n: k.seed_vals for n, k in dst.kept.items()}, stats)

    calls = []
    for owner, name in ((kernels, "top"), (kernels, "share"), (kernels, "rows"), (kernels, "many"),
                        (kernels, "pool_many"), (kernels.Band, "keep")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    fused, one_thread = [run() for _ in threads()]
    assert {"tensor": "many", "global": "pool_many", "row": "many"}[silo] in calls  # the fused path ran
    calls.clear()
    held = run(held=True)
    assert {"tensor": "many", "global": "keep", "row": "many"}[silo] in calls  # the global silo: a band
    calls.clear()
    single = run(many=False)
    assert "many" not in calls and {"tensor": "top", "global": "share", "row": "rows"}[silo] in calls
    monkeypatch.setitem(kernels._state, "lib", None)  # as without a compiler
    plain = run()
    for other in (one_thread, held, single, plain):
        for a, b in zip(fused[:3], other[:3]):
            assert a.keys() == b.keys() and all(torch.equal(bits_view(a[n]), bits_view(b[n])) for n in a)
        assert fused[3] == other[3]
    assert all(s[0] for s in fused[3]) and any(s[1] for s in fused[3][1:]) and any(s[3] for s in fused[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silo", ["tensor", "global"])
def test_a_misleading_sample_in_a_bucket_takes_the_torch_path(monkeypatch, dtype, silo):
    """kernels.many (kernels.pool_many) declines a tensor whose sample misleads (kept -1): the
    engine ranks that one on the torch path, the bucket's other tensors stay as the kernel left
    them, and the result is what the kernels switched off give, bit for bit."""
    def run():
        x, x0 = pair(40_000, dtype, "fool", 3)
        b = torch.randn(300, 100, generator=torch.Generator().manual_seed(5)).to(dtype)
        params = {"a": torch.nn.Parameter(x0.clone()), "b": torch.nn.Parameter(b)}
        dst = DST(params.items(), epsilon=0.05, silo=silo, seed="none", batched=False)
        opt = torch.optim.SGD(list(params.values()), lr=1.0)
        params["a"].grad = (x0 - x).to(dtype)  # one step of SGD takes "a" to x exactly (lr 1)
        params["b"].grad = torch.randn(300, 100, generator=torch.Generator().manual_seed(4)).to(dtype)
        st = dst.step({"a": opt, "b": opt})
        return [p.detach().clone() for p in params.values()], [k.idx for k in dst.kept.values()], st.nonseed

    outs = []
    name = "many" if silo == "tensor" else "pool_many"
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: outs.append(real(*a, **k)) or outs[-1])
    fused = run()
    assert outs[0][2][0, 0] == -1  # "a" declined
    assert outs[0][2][1, 0] == {"tensor": 1500, "global": 3500}[silo]  # "b" kept its budget (its own top-K)
    monkeypatch.setitem(kernels._state, "lib", None)
    plain = run()
    assert all(torch.equal(bits_view(a), bits_view(b)) for a, b in zip(fused[0] + fused[1], plain[0] + plain[1]))
    assert fused[2] == plain[2] > 0


def test_without_a_compiler_dstcli_takes_the_torch_path(tmp_path):
    # a fresh process: a compiler that fails, then none at all, then switched off
    script = textwrap.dedent("""
        import torch
        from dstcli import kernels
        from dstcli.select import top_positions
        print(kernels.lib() is None, kernels.why())
        x = torch.randn(20000)
        print(top_positions(x, x + 1, 10))
    """)
    for env, says in (({"CC": "false"}, "false failed"), ({"CC": "no-such-cc"}, "no C compiler"),
                      ({"DSTCLI_KERNELS": "0"}, "DSTCLI_KERNELS=0")):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**os.environ, "DSTCLI_CACHE": str(tmp_path / "cache"), **env})
        assert r.returncode == 0, r.stderr
        first, second = r.stdout.splitlines()
        assert first.startswith("True") and says in first and second == "None"
    assert not list((tmp_path / "cache").glob("*.so")) if (tmp_path / "cache").exists() else True


def test_the_build_is_cached_per_source(tmp_path):
    script = "from dstcli import kernels; print(kernels.lib() is not None, kernels._state['path'])"
    env = {**os.environ, "DSTCLI_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stdout.split()
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stdout.split()
    assert first[0] == "True" and first == again  # the second process loads the first one's build
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first[1])]  # no temp files left


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DISTANCES)
def test_distance_kernel_is_torchs(dtype, kind):
    x, x0 = pair(30_000, dtype, "special", 4)
    kernels.lib()
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    x0w = x0.to(wide)
    want = (x.to(wide) - x0w).abs()
    if kind == "relative":
        want = want / (x0w.abs() + 1e-8)
    elif kind == "inverse-relative":
        want = want * x0w.abs()
    want = want.nan_to_num(nan=float("inf"), posinf=float("inf"))
    assert torch.equal(kernels.distance(x, x0, kind), want)
    assert torch.equal(distance(x, x0, kind), want)


def test_a_damaged_build_in_the_cache_falls_back(tmp_path):
    script = "from dstcli import kernels; print(kernels.lib() is None, kernels.why())"
    env = {**os.environ, "DSTCLI_CACHE": str(tmp_path)}
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stdout.startswith("False")
    (built,) = tmp_path.iterdir()
    built.write_bytes(b"not a shared library")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("True could not load") and "delete it" in out.stdout


def test_an_unwritable_cache_builds_in_a_temp_folder(tmp_path):
    # HOME under /proc cannot be made even by root; $TMPDIR (here tmp_path) takes the build
    script = "from dstcli import kernels; print(kernels.lib() is not None, kernels._state.get('path'))"
    env = {k: v for k, v in os.environ.items() if k not in ("DSTCLI_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME="/proc/no-such-home", TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    ok, path = out.stdout.split()
    assert ok == "True" and path.startswith(str(tmp_path / "dstcli-")), out.stderr


@pytest.mark.skipif(os.environ.get("DSTCLI_PORTABLE_RUN") == "1", reason="this is the portable build's run")
def test_the_portable_build_gives_the_same_bits(tmp_path):
    """A compiler that refuses -march=native (as for a CPU it does not know) and -fopenmp (as
    one without OpenMP) gets the portable build: no AVX-512, only the scalar loops, which the other
    tests here reach only in tails and ties on a CPU with AVX-512, and one thread. This file's
    tests, run again on that build, all pass."""
    log = tmp_path / "cc.log"
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n"
                  f'echo "$@" >> "{log}"\n'
                  'for a; do [ "$a" = "-march=native" ] || [ "$a" = "-fopenmp" ] && exit 1; done\n'
                  f'exec {os.environ.get("CC") or "cc"} "$@"\n')
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "DSTCLI_CACHE": str(tmp_path / "cache"), "DSTCLI_PORTABLE_RUN": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    builds = [ln for ln in log.read_text().splitlines() if "kernels.c" in ln]
    assert "-march=native" in builds[0] and "-fopenmp" in builds[0]  # refused, then portable
    assert "-march=native" not in builds[3] and "-fopenmp" not in builds[3]  # the fourth flag set: neither


def test_the_first_flag_set_builds_without_warnings(tmp_path):
    """Where the compiler takes -march=native and -fopenmp, kernels.c builds with them, warnings
    as errors: were that build to fail, dstcli would quietly load the next flag set's (no
    AVX-512 or one thread), and every other test here would pass on that slower build."""
    cc, first = os.environ.get("CC") or "cc", kernels.EXTRA_FLAGS[0]
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([cc, *first, str(probe), "-o", str(tmp_path / "probe")], capture_output=True).returncode != 0:
        pytest.skip(f"{cc} takes no {' '.join(first)} here")
    r = subprocess.run([cc, *kernels.FLAGS, *first, "-Wall", "-Wshadow", "-Werror",
                        str(kernels.SOURCE), "-o", str(tmp_path / "k.so"), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@given(st.lists(st.sampled_from([1, 7, 100, 5_000, 70_000, kernels.PARALLEL_MIN + 13]), min_size=1, max_size=4),
       st.sampled_from(DTYPES), st.sampled_from(DISTANCES), st.sampled_from(["rand", "ties", "special"]),
       st.floats(1e-4, 0.6), st.integers(-3, 3), st.integers(-3, 3), st.booleans(), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_band_is_the_top_k_of_all_tensors(sizes, dtype, kind, case, frac, lo_at, hi_at, small, seed):
    """kernels.Band over tensors added in two calls, on 2 threads and 1: where its bracket holds
    the K-th largest distance of all of them together (K or more at or above lo, fewer above hi)
    and the band fits, `cut` and `keep` keep what select.top_indices keeps of the distances laid
    end to end (ties to the lower position across tensors and runs, never a zero), reset the
    rest to the seed bit for bit, and count as `many` does (kept, differ, kept before, non-finite);
    else `cut` answers None and the tensors are as `add` found them. The bracket's ends lie a few
    ranks either side of the K-th largest (lo_at, hi_at: 0 is at it, negative misses), `small` a
    band too small to hold it."""
    pairs = [pair(m, dtype, case, seed + i) for i, m in enumerate(sizes)]
    d = torch.cat([distance(x, x0, kind).view(-1) for x, x0 in pairs])  # float32 (float64), NaN: inf
    K = max(1, int(frac * len(d)))
    want = top_indices(d, K)
    ranked = np.sort(d.numpy())[::-1]
    spread = max(1, K // 20)

    def at_rank(r):  # the distance at rank r (1: the largest), clamped to the ends
        return float(ranked[min(max(r, 1), len(d)) - 1])
    tau = ranked[K - 1]
    lo = at_rank(K + lo_at * spread) if lo_at >= 0 else float(np.nextafter(tau, tau.dtype.type(np.inf)))
    hi = at_rank(K - hi_at * spread) if hi_at >= 0 else float(np.nextafter(tau, tau.dtype.type(-np.inf)))
    hi = float("inf") if hi_at > 0 and K - hi_at * spread < 1 else hi
    above, inside = int((d > hi).sum()), int(((d >= lo) & (d <= hi)).sum())
    g = torch.Generator().manual_seed(seed)
    olds = [torch.sort(torch.randperm(x.numel(), generator=g)[:x.numel() // 10]).values for x, _ in pairs]
    for _ in threads():
        cap = 200 if small else len(d) + 64
        band = kernels.Band(dtype, cap)
        band.start(lo, hi, kind)
        xs, x0s = [x.clone() for x, _ in pairs], [x0.clone() for _, x0 in pairs]
        half = (len(xs) + 1) // 2
        band.add(xs[:half], x0s[:half])
        band.add(xs[half:], x0s[half:])
        assert all(torch.equal(bits_view(a), bits_view(x)) for a, (x, _) in zip(xs, pairs))  # only read
        got = band.cut(K, K + spread, K - spread)
        fits = band.ok
        if not (above < K <= above + inside) or not fits:
            assert got is None and (fits or small)
            continue
        assert got is not None
        res, budget, keep = got
        assert res[0] == tau and int(keep.sum()) == len(want)
        for j, r in ((1, K + spread), (2, K - spread)):  # the next bracket's ranks, where the band holds them
            assert res[j] == at_rank(r) if 1 <= r - above <= inside else np.isnan(res[j])
        pos, seed_vals, out = band.keep(float(res[0]), budget, keep, olds, {})
        start = 0
        for t, (x, x0) in enumerate(pairs):
            mine = want[(want >= start) & (want < start + x.numel())] - start
            assert torch.equal(pos[t], mine)
            assert torch.equal(bits_view(seed_vals[t]), bits_view(x0[mine]))
            expect = x0.clone()
            expect[mine] = x[mine]
            assert torch.equal(bits_view(xs[t]), bits_view(expect))
            both = int(np.isin(mine.numpy(), olds[t].numpy()).sum())
            differ = int((bits_view(x[mine]) != bits_view(x0[mine])).sum())
            assert out[t].tolist() == [len(mine), differ, both, int((~torch.isfinite(x[mine])).sum())]
            start += x.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["absolute", "relative"])
@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_the_global_band_is_the_pool_bit_for_bit(monkeypatch, dtype, kind, eps):
    """The global silo with a seed held (engine._step_band: a band, no pool) against the pool
    without one (_step_pool_many), step after step on 2 threads and 1: parameters, kept sets,
    seed values and step statistics bit for bit, ties across tensors and a NaN gradient. The
    steps take every way through it: the first step's sampled bracket, the last step's bracket
    holding, the last step's missing (the learning rate 30x for a step: the sampled one then),
    and both missing (made to: the pool takes the step and the next, then the band again)."""
    def run(held):
        g = torch.Generator().manual_seed(0)
        shapes = [(kernels.PARALLEL_MIN + 10,), (300, 200), (1000,), (7,), (70, 71)]
        params = {f"w{i}": torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for i, s in enumerate(shapes)}
        seed = {n: p.detach().clone() for n, p in params.items()} if held else "none"
        dst = DST(params.items(), epsilon=eps, silo="global", distance=kind, seed=seed, batched=False)
        opts = engine.bucket_optimizers(dst.buckets(), params, lambda ps: torch.optim.Adam(ps, lr=1e-2))
        stats = []
        for step in range(11):
            for i, p in enumerate(params.values()):
                grad = torch.randn(p.shape, generator=g)
                p.grad = (grad.round() if i % 2 else grad).to(dtype)
            if step == 4:
                params["w1"].grad.view(-1)[5] = float("nan")
            for o in set(opts.values()):
                o.param_groups[0]["lr"] = 0.3 if step == 6 else 1e-2
            if step == 8 and held:  # neither bracket holds: nothing at or above lo
                dst._bracket = (math.inf, math.inf)
            mislead[0] = step == 8
            ways.clear()
            st = dst.step(opts)
            paths.append(tuple(ways))
            stats.append((st.nonseed, st.entered, st.left, dst.nonfinite()))
        return ({n: p.detach().clone() for n, p in params.items()}, {n: k.idx for n, k in dst.kept.items()},
                {n: k.seed_vals for n, k in dst.kept.items()}, stats)

    paths, ways, mislead = [], [], [False]
    for name in ("_keep_band", "_sampled_bracket", "_step_pool_many"):
        real = getattr(DST, name)

        def call(self, *a, real=real, name=name, **k):
            ways.append(name)
            got = real(self, *a, **k)
            return (math.inf, math.inf) if name == "_sampled_bracket" and mislead[0] else got
        monkeypatch.setattr(DST, name, call)
    banded, one_thread = [run(True) for _ in threads()]
    steps = paths[:11]  # on 2 threads (on 1 a thread's buffer holds the whole band: it may not fit)
    assert steps[0][0] == "_sampled_bracket" and ("_keep_band",) in steps[1:6]  # the last step's bracket held
    assert steps[6] == ("_sampled_bracket", "_keep_band")  # 30x larger updates: it missed
    assert steps[8:] == [("_sampled_bracket", "_step_pool_many"), ("_step_pool_many",),
                         ("_sampled_bracket", "_keep_band")]
    paths.clear()
    pooled = run(False)
    assert all(p == ("_step_pool_many",) for p in paths)
    for other in (one_thread, pooled):
        for a, b in zip(banded[:3], other[:3]):
            assert a.keys() == b.keys() and all(torch.equal(bits_view(a[n]), bits_view(b[n])) for n in a)
        assert banded[3] == other[3]
    assert any(s[3] for s in banded[3]) and any(s[1] for s in banded[3][3:])


def test_the_band_backs_off_to_the_pool_after_misses(monkeypatch):
    """Where both brackets keep missing (made to: the band never gives a K-th largest), the pool
    takes every step and the band is tried again after 1, 2, 4 ... steps (DST._step_band); the
    parameters and kept sets are the pool's throughout."""
    def run(held):
        g = torch.Generator().manual_seed(3)
        params = {f"w{i}": torch.nn.Parameter(torch.randn(s, generator=g)) for i, s in enumerate([(5000,), (300, 40)])}
        seed = {n: p.detach().clone() for n, p in params.items()} if held else "none"
        dst = DST(params.items(), epsilon=0.05, silo="global", seed=seed, batched=False)
        opts = engine.bucket_optimizers(dst.buckets(), params, lambda ps: torch.optim.Adam(ps, lr=1e-2))
        for step in range(12):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            ways.append([])
            dst.step(opts)
        return {n: p.detach().clone() for n, p in params.items()}, {n: k.idx for n, k in dst.kept.items()}

    ways = []
    for name in ("_sampled_bracket", "_step_pool_many"):
        real = getattr(DST, name)
        monkeypatch.setattr(DST, name, lambda self, *a, real=real, name=name, **k: ways[-1].append(name) or real(self, *a, **k))
    monkeypatch.setattr(kernels.Band, "cut", lambda self, *a, **k: None)
    banded = run(True)
    tried = [i for i, w in enumerate(ways) if "_sampled_bracket" in w]
    assert tried == [0, 2, 5, 10] and all("_step_pool_many" in w for w in ways)  # waits of 1, 2, 4 steps
    ways.clear()
    pooled = run(False)
    for a, b in zip(banded, pooled):
        assert all(torch.equal(a[n], b[n]) for n in a)
