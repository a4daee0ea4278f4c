import pytest
import torch
from hypothesis import given, settings, strategies as st

from dstcli.select import GlobalTopK, distance, rows_indices, sample_bracket, segments_keep, top_indices, topk_mask
from dstcli.silos import allocate, budget_total
from reference import ref_distance, ref_keep


@st.composite
def silos(draw):
    R = draw(st.integers(1, 6))
    m = draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    d = torch.randint(0, 4, (R, m), generator=g).float()  # small integers: many ties and zeros
    k = torch.randint(0, m + 2, (R,), generator=g)
    return d, k


@given(silos())
@settings(max_examples=300, deadline=None)
def test_topk_mask_matches_sort_reference(case):
    d, k = case
    got = topk_mask(d, k)
    for r in range(d.shape[0]):
        assert torch.equal(got[r], ref_keep(d[r], int(k[r])))


@given(st.integers(2, 40), st.integers(1, 2500), st.sampled_from(["rand", "ties", "zeros", "inf"]),
       st.sampled_from(["one", "one", "two", "many", "edges"]), st.sampled_from([0, 0.004, 0.01, 0.04, 0.1, 0.3]), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 10_000))
@settings(max_examples=300, deadline=None)
def test_rows_indices_match_the_mask_on_every_path(R, m, kind, budgets, frac, dtype, seed):
    # continuous values take the fast paths (top k along rows up to 5% of a row, a partition
    # above), ties, zeros and infinities their fallback; budgets alike or differing by row
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(R, m, generator=g, dtype=dtype)
    if kind == "ties":
        d = torch.randint(0, 5, (R, m), generator=g).to(dtype)
    elif kind == "zeros":
        d[torch.rand(R, m, generator=g) < 0.7] = 0
    elif kind == "inf":
        d[torch.rand(R, m, generator=g) < 0.02] = float("inf")
    base = max(1, min(m - 1, int(frac * m)))
    k = {"one": torch.full((R,), base), "two": base + (torch.arange(R) % 2),
         "many": torch.randint(1, m + 1, (R,), generator=g), "edges": torch.randint(0, 2, (R,)) * m}[budgets]
    want = torch.nonzero(topk_mask(d, k).view(-1)).view(-1)
    assert torch.equal(rows_indices(d, k), want)
    ref = torch.cat([ref_keep(d[r], int(k[r])) for r in range(R)])
    assert torch.equal(want, torch.nonzero(ref).view(-1))


@given(st.lists(st.integers(1, 60), min_size=1, max_size=5), st.integers(0, 80), st.integers(0, 1000))
@settings(max_examples=200, deadline=None)
def test_global_topk_matches_one_big_sort(sizes, k, seed):
    g = torch.Generator().manual_seed(seed)
    ds = [torch.randint(0, 3, (n,), generator=g).float() for n in sizes]
    top = GlobalTopK(k)
    offsets = []
    for d in ds:
        offsets.append(top.offset)
        top.add(d)
    thr = top.threshold()
    got = torch.cat([top.mask(d, o, thr) for d, o in zip(ds, offsets)])
    assert torch.equal(got, ref_keep(torch.cat(ds), k))


def test_distances_match_formulas_and_leave_inputs_alone():
    x0 = torch.tensor([0.0, 1.0, -2.0, 4.0])
    x = torch.tensor([1.0, 1.5, -2.0, float("nan")])
    keep = x0.clone()
    for kind in ("absolute", "relative", "inverse-relative"):
        assert torch.equal(distance(x, x0, kind), ref_distance(x, x0, kind))
    assert torch.equal(x0, keep)
    assert distance(x, x0, "relative")[1] == 0.5 / (1 + 1e-8)


def test_budgets_epsilon_exact_decimal_and_params_total():
    shapes = {"a": (100, 10), "b": (7,), "c": (3, 3)}
    alloc = allocate(shapes, "tensor", epsilon=0.29)
    assert int(alloc["a"][0]) == 290  # not 289 from 0.29 * 1000 in floating point
    for strategy in ("tensor", "row"):
        for n in (1, 5, 17, 500, 1016, 10_000):
            a = allocate(shapes, strategy, params=n)
            assert budget_total(a) == min(n, 1016)
    assert allocate(shapes, "global", params=50) == 50
    assert allocate(shapes, "row", epsilon=0.1)["a"].tolist() == [1] * 100


@pytest.mark.parametrize("kind", ["normal", "ties", "sorted", "periodic", "zeros"])
@pytest.mark.parametrize("k", [1, 7, 1000, 40_000, "10%", "50%"])
def test_sampled_selection_is_exact_on_large_silos(kind, k):
    m = (1 << 20) + 12345
    k = {"10%": m // 10, "50%": m // 2}.get(k, k)
    g = torch.Generator().manual_seed(k)
    if kind == "normal":
        d = torch.randn(m, generator=g).abs()
    elif kind == "ties":
        d = torch.randint(0, 50, (m,), generator=g).float()
    elif kind == "sorted":
        d = torch.linspace(0, 1, m)
    elif kind == "periodic":  # big values exactly where a strided sample never looks
        d = torch.rand(m, generator=g) * 0.1
        d[7::16] += 1.0
    else:
        d = torch.zeros(m)
        d[torch.randint(0, m, (k // 2 + 1,), generator=g)] = 1.0
    mask = topk_mask(d.view(1, -1), k)[0]
    _, idx = torch.sort(d, descending=True, stable=True)  # stable: among ties the lower index first
    want = torch.zeros(m, dtype=torch.bool)
    want[idx[:k]] = True
    want &= d > 0
    assert torch.equal(mask, want)
    got = top_indices(d.double() if k == 7 else d, k)  # float64 distances take the same path
    assert torch.equal(got, torch.nonzero(want).reshape(-1))
    # the torch path GPUs take, here on the CPU
    assert torch.equal(top_indices(d, k, numpy=False), torch.nonzero(want).reshape(-1))


@given(st.integers(1 << 17, 1 << 18), st.floats(1e-6, 0.6), st.integers(0, 3), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_top_indices_on_the_sampled_path_matches_a_stable_sort(m, frac, levels, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, levels + 2, (m,), generator=g).float() if levels else torch.rand(m, generator=g)
    k = max(1, int(frac * m))
    _, idx = torch.sort(d, descending=True, stable=True)
    want = torch.sort(idx[:k][d[idx[:k]] > 0]).values
    assert torch.equal(top_indices(d, k), want)
    assert torch.equal(top_indices(d, k, numpy=False), want)


@given(st.integers(1, 9000), st.floats(0, 1), st.integers(0, 3), st.integers(0, 10_000), st.booleans())
@settings(max_examples=150, deadline=None)
def test_top_indices_on_both_paths_matches_a_stable_sort(m, frac, levels, seed, numpy):
    """Every size up to past the sampled path's threshold (8,192), with ties and zeros, on the
    NumPy path and on the torch path GPUs take."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, levels + 2, (m,), generator=g).float() if levels else torch.rand(m, generator=g)
    k = int(frac * m)
    _, idx = torch.sort(d, descending=True, stable=True)
    want = torch.sort(idx[:k][d[idx[:k]] > 0]).values
    assert torch.equal(top_indices(d, k, numpy=numpy), want)


def test_segments_keep_reports_a_misleading_sample():
    m = 50_000
    for fill, k in ((0.5, 5000), (2.0, m // 2)):  # too many above the bracket; too few candidates
        d = torch.ones(m)
        d[::sample_bracket(m, 1)[0]] = fill
        keep = torch.zeros(m, dtype=torch.bool)
        assert segments_keep(d, keep, [(0, m, k)]).tolist() == [False]


@given(st.lists(st.tuples(st.integers(8192, 40_000), st.floats(1e-5, 0.9), st.sampled_from(["rand", "ties", "periodic", "fool-low", "fool-high"])),
                min_size=1, max_size=4), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_segments_keep_matches_a_stable_sort_per_silo(segs, seed):
    """Several large silos side by side in one flat tensor (with a gap between them that must
    stay untouched): each silo's kept entries are its own top-k by (distance, lower position);
    a silo whose sample was fooled is reported, never silently wrong."""
    g = torch.Generator().manual_seed(seed)
    parts, spec, at = [], [], 0
    for m, frac, kind in segs:
        if kind == "rand":
            d = torch.rand(m, generator=g)
        elif kind == "ties":
            d = torch.randint(0, 4, (m,), generator=g).float()
        elif kind == "periodic":  # big values exactly where a strided sample never looks
            d = torch.rand(m, generator=g) * 0.1
            d[7::16] += 1.0
        else:  # the sample sees only small (or only large) values: it must be caught misleading
            d = torch.ones(m)
            d[::sample_bracket(m, 1)[0]] = 0.5 if kind == "fool-low" else 2.0
        gap = torch.rand(5, generator=g) + 10  # not a silo: large values nobody may select
        parts += [d, gap]
        spec.append((at, at + m, max(1, min(m - 1, int(frac * m)))))
        at += m + 5
    flat = torch.cat(parts)
    keep = torch.zeros(flat.shape, dtype=torch.bool)
    ok = segments_keep(flat, keep, spec)
    for (a, b, k), good, (_, _, kind) in zip(spec, ok.tolist(), segs):
        d = flat[a:b]
        _, idx = torch.sort(d, descending=True, stable=True)
        want = torch.zeros(b - a, dtype=torch.bool)
        want[idx[:k]] = True
        want &= d > 0
        if good:
            assert torch.equal(keep[a:b], want)
        else:
            assert kind.startswith("fool")  # only a fooling sample is refused
        assert torch.equal(torch.nonzero(keep[b:b + 5]).reshape(-1), torch.empty(0, dtype=torch.long))
