import os
import shutil
from unittest import mock

import pytest
import torch

from dstcli.dtypes import bits_view
from dstcli import engine, kernels
from dstcli.engine import DST, bucket_optimizers
from dstcli.errors import DstError
from dstcli.select import sample_bracket
from reference import ref_distance, ref_project


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(12, 10, generator=g).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(10, generator=g).to(dtype))
        self.c = torch.nn.Parameter(torch.randn(6, 5, 2, generator=g).to(dtype))

    def loss(self, x):
        h = torch.tanh(x @ self.a.float().T)  # (B, 12)
        return ((h[:, :10] * self.b.float()).sum(1) ** 2).mean() + self.c.float().pow(2).sum() * 0.1


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 10, generator=g) for _ in range(n)]


@pytest.mark.parametrize("silo", ["tensor", "row", "global"])
@pytest.mark.parametrize("dist", ["absolute", "relative", "inverse-relative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reselect", [1, 3, None])
@pytest.mark.parametrize("mode", ["lean", "bucketed", "batched", "one", "copy", "mapped", "held"])
def test_engine_matches_reference_bit_for_bit(silo, dist, dtype, reselect, mode):
    """The fast engine against the plain full-sort oracle, step after step. `lean` steps one
    AdamW per tensor and keeps no seed, `bucketed` one AdamW per DST.buckets() group ([a], [b, c]),
    `one` one AdamW over all three, `batched` as bucketed with each bucket projected in one batch
    (what GPUs run), `held` as bucketed with a seed mapping held (the kernels read it in place of
    a snapshot); `copy` and `mapped` call project() after plain steps; the reference steps one
    AdamW over all tensors."""
    eps = 0.1
    model = Tiny(dtype)
    names = ["a", "b", "c"]
    seeds = [getattr(model, n).detach().clone() for n in names]
    mapping = {n: s.clone() for n, s in zip(names, seeds)}
    seed = {"copy": "copy", "mapped": mapping, "held": mapping}.get(mode, "none")
    dst = DST([(n, getattr(model, n)) for n in names], epsilon=eps, silo=silo, distance=dist,
              reselect_every=reselect, seed=seed, batched=mode == "batched")
    assert dst.batched == (mode == "batched")
    ref_model = Tiny(dtype)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.05)
    opts = {n: torch.optim.AdamW([getattr(model, n)], lr=0.05) for n in names}
    if mode in ("bucketed", "batched", "one", "held"):
        # `bucketed` as a model whose largest tensor is past BUCKET_MIN would be; batched buckets
        # default to 4 largest tensors: all three here
        groups = dst.buckets(limit=10**9 if mode == "one" else None if dst.batched else 120)
        assert groups == ([names] if mode == "one" or dst.batched else [["a"], ["b", "c"]])
        opts = bucket_optimizers(groups, dict(model.named_parameters()), lambda ps: torch.optim.AdamW(ps, lr=0.05))
    ref_mask = None
    for step, x in enumerate(batches(7), 1):
        for o in (*opts.values(), ref_opt):
            o.zero_grad()
        lean = mode in ("lean", "bucketed", "batched", "one", "held")
        model.loss(x).backward()
        ref_model.loss(x).backward()
        ref_opt.step()
        cand = [getattr(ref_model, n).detach().clone() for n in names]
        stats = dst.step(opts) if lean else (opts["a"].step(), opts["b"].step(), opts["c"].step(), dst.project())[-1]
        due = step == 1 if reselect is None else (step - 1) % reselect == 0
        want, mask = ref_project(cand, seeds, epsilon=eps, silo=silo, distance=dist, mask=None if due else ref_mask)
        ref_mask = mask
        for n, w, s, m in zip(names, want, seeds, mask):
            getattr(ref_model, n).data.copy_(w)
            p = getattr(model, n).detach()
            assert torch.equal(bits_view(p), bits_view(w)), (n, step)
            # every reset entry equals the seed bit for bit
            assert torch.equal(bits_view(p)[~m.reshape(-1)], bits_view(s)[~m.reshape(-1)])
        assert stats.nonseed == sum(int((bits_view(getattr(model, n).detach()) != bits_view(s)).sum())
                                    for n, s in zip(names, seeds))
        assert stats.nonseed <= dst.budget


def test_kept_entries_are_the_top_by_distance_per_silo():
    model = Tiny()
    seeds = {n: p.detach().clone() for n, p in model.named_parameters()}
    dst = DST(model.named_parameters(), epsilon=0.05, silo="tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches(5):
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()
        cand = {n: p.detach().clone() for n, p in model.named_parameters()}
        dst.project()
        for n, p in model.named_parameters():
            k = int(0.05 * p.numel())
            changed = (p.detach() != seeds[n]).reshape(-1)
            assert int(changed.sum()) <= k
            d = ref_distance(cand[n], seeds[n], "absolute").reshape(-1)
            if changed.any() and (~changed).any():
                assert d[changed].min() >= d[~changed].max()


def test_reselect_every_r_holds_the_mask_fixed():
    model = Tiny()
    dst = DST(model.named_parameters(), epsilon=0.1, reselect_every=4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    masks = []
    for x in batches(8):
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()
        s = dst.project()
        masks.append({n: m.clone() for n, m in dst.masks.items()})
        if not s.reselected:
            assert s.entered == 0 and s.left == 0
    for i in (1, 2, 3, 5, 6, 7):
        assert all(torch.equal(masks[i][n], masks[i - 1][n]) for n in masks[i]) == (i % 4 != 0)


def test_epsilon_one_is_plain_fine_tuning():
    torch.manual_seed(0)
    m1, m2 = Tiny(), Tiny()
    dst = DST(m1.named_parameters(), epsilon=1.0)
    o1 = torch.optim.AdamW(m1.parameters(), lr=0.05)
    o2 = torch.optim.AdamW(m2.parameters(), lr=0.05)
    for x in batches(6):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m.loss(x).backward()
            o.step()
        dst.project()
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p1, p2)


def test_lean_engine_holds_no_seed_copy_and_skips_frozen_tensors():
    model = Tiny()
    dst = DST(model.named_parameters(), epsilon=0.05, seed="none")  # b (10 entries) has budget 0
    assert dst.seed is None and dst.frozen == {"b"}
    opts = {n: torch.optim.SGD([p], lr=0.1) for n, p in model.named_parameters() if n != "b"}
    b0 = model.b.detach().clone()
    for x in batches(3):
        model.zero_grad()
        model.loss(x).backward()
        stats = dst.step(opts)
        assert stats.nonseed == sum(len(k.idx) for k in dst.kept.values()) <= dst.budget
    assert torch.equal(model.b, b0)
    with pytest.raises(DstError, match="call step"):
        dst.project()
    with pytest.raises(DstError, match="no optimizer for 'a'"):
        dst.step({})


@pytest.mark.parametrize("silo", ["tensor", "global"])
def test_engine_follows_a_parameter_given_new_memory(silo):
    """The engine keeps its flat views of the parameters (and of its scratch) from step to step:
    a parameter given new memory between steps (`p.data = ...`) is followed, not the old memory
    (the same bits as a twin run whose parameter kept its memory)."""
    runs = []
    for move in (False, True):
        model = Tiny()
        dst = DST(model.named_parameters(), epsilon=0.2, silo=silo, seed="none")
        opts = bucket_optimizers(dst.buckets(limit=10**9), dict(model.named_parameters()),
                                 lambda ps: torch.optim.AdamW(ps, lr=0.05))
        for step, x in enumerate(batches(5)):
            if move and step == 2:
                old = model.a.data
                model.a.data = model.a.data.clone()
                assert model.a.data_ptr() != old.data_ptr()
            model.zero_grad()
            model.loss(x).backward()
            dst.step(opts)
        if move:
            assert not torch.equal(old, model.a.detach())  # the old memory was left behind
        runs.append([bits_view(p.detach()).clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_seed_mapping_must_match_the_parameters():
    model = Tiny()
    seeds = {n: p.detach().clone() for n, p in model.named_parameters()}
    seeds["a"][0, 0] += 1
    with pytest.raises(DstError, match="'a' does not start at its seed"):
        DST(model.named_parameters(), epsilon=0.1, seed=seeds)
    del seeds["a"]
    with pytest.raises(DstError, match="seed tensor 'a' is missing"):
        DST(model.named_parameters(), epsilon=0.1, seed=seeds)


def test_budget_that_rounds_to_zero_is_an_error():
    with pytest.raises(DstError, match="rounds to zero"):
        DST(Tiny().named_parameters(), epsilon=1e-4)
    with pytest.raises(DstError, match="out of range"):
        DST(Tiny().named_parameters(), epsilon=2.0)


@pytest.mark.parametrize("eps", [0.01, 0.2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_global_pool_with_many_tensors_matches_reference(eps, ties, batched):
    """Many tensors: the running pool is cut (and its floor used) several times in one step
    (batched: one optimizer per tensor makes each tensor a bucket)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(40, 30), (7,), (50,), (30, 30), (3, 4, 5), (200,), (16, 16), (90,), (25, 8), (1,), (300,), (12, 12)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    names = [f"t{i}" for i in range(len(params))]
    seeds = [p.detach().clone() for p in params]
    dst = DST(list(zip(names, params)), epsilon=eps, silo="global", seed="none", batched=batched)
    opts = {n: torch.optim.SGD([p], lr=0.1) for n, p in zip(names, params)}
    if batched:  # a few buckets of several tensors, the rest one tensor each
        opts.update(bucket_optimizers([names[:3], names[5:8]], dict(zip(names, params)),
                                      lambda ps: torch.optim.SGD(ps, lr=0.1)))
    for step in range(4):
        for p in params:
            grad = torch.randn(p.shape, generator=g)
            p.grad = grad.round() if ties else grad  # rounded: many equal distances across tensors
        cand = [p.detach().clone().add_(p.grad, alpha=-0.1) for p in params]  # what SGD will do
        dst.step(opts)
        want, _ = ref_project(cand, seeds, epsilon=eps, silo="global", distance="absolute")
        for n, p, w in zip(names, params, want):
            assert torch.equal(bits_view(p.detach()), bits_view(w)), (n, step)
        # the engine's starting point for the next step is its own projected state
        for p, w in zip(params, want):
            p.data.copy_(w)


def test_buckets_in_largest_tensors(monkeypatch):
    """`tensors=N`: buckets of up to N times the largest tensor's entries (what `dstcli train
    --bucket N` asks for), never below BUCKET_MIN; 0 is refused."""
    import dstcli.engine as engine
    m = torch.nn.Module()
    for i, n in enumerate([30, 10, 10, 25, 40, 5]):
        m.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(n)))
    dst = DST(m.named_parameters(), epsilon=0.5, seed="none")
    assert dst.buckets(tensors=1) == [[f"p{i}" for i in range(6)]]  # 40 entries < BUCKET_MIN: one bucket
    monkeypatch.setattr(engine, "BUCKET_MIN", 1)
    assert dst.buckets(tensors=1) == dst.buckets(limit=40) == dst.buckets() == [["p0", "p1"], ["p2", "p3"], ["p4"], ["p5"]]
    assert dst.buckets(tensors=2) == [["p0", "p1", "p2", "p3"], ["p4", "p5"]]  # up to 80 entries
    with pytest.raises(DstError, match="at least 1 tensor"):
        dst.buckets(tensors=0)


def test_buckets_and_shared_optimizers():
    """Buckets are consecutive, of one dtype, at most the limit (default: the largest tensor, at
    least BUCKET_MIN entries); an optimizer over parameters that are not consecutive, or of two
    dtypes, is refused."""
    m = torch.nn.Module()
    sizes = [(30,), (10,), (10,), (25,), (40,), (5,)]
    for i, sh in enumerate(sizes):
        m.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(sh, dtype=torch.bfloat16 if i == 3 else torch.float32)))
    dst = DST(m.named_parameters(), epsilon=0.5, seed="none")
    assert dst.buckets() == [["p0", "p1", "p2"], ["p3"], ["p4", "p5"]]  # small tensors: BUCKET_MIN; p3 is bf16
    assert dst.buckets(limit=40) == [["p0", "p1"], ["p2"], ["p3"], ["p4"], ["p5"]]  # greedy up to 40
    assert dst.buckets(limit=20) == [["p0"], ["p1", "p2"], ["p3"], ["p4"], ["p5"]]
    assert dst.buckets(limit=10) == [["p0"], ["p1"], ["p2"], ["p3"], ["p4"], ["p5"]]
    params = dict(m.named_parameters())
    apart = torch.optim.SGD([params["p0"], params["p2"]], lr=0.1)
    opts = {n: torch.optim.SGD([p], lr=0.1) for n, p in params.items()}
    with pytest.raises(DstError, match="consecutive parameters"):
        dst.step({**opts, "p0": apart, "p2": apart})
    mixed = torch.optim.SGD([params["p2"], params["p3"]], lr=0.1)
    with pytest.raises(DstError, match="one dtype"):
        dst.step({**opts, "p2": mixed, "p3": mixed})


class Nudge:
    """An optimizer stand-in: adds precomputed steps, so two engines see the same updates."""

    def __init__(self, params, steps):
        self.params, self.steps, self.i = params, steps, 0

    def step(self):
        for p, s in zip(self.params, self.steps):
            p.add_(s[self.i])
        self.i += 1


def _nudged_run(batched, silo, dist, dtype, reselect, eps, shapes, n_steps, restore_at=None):
    g = torch.Generator().manual_seed(7)
    params = {f"t{i}": torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for i, s in enumerate(shapes)}
    steps = {n: [(torch.randn(p.shape, generator=g) * 0.1).to(dtype) for _ in range(n_steps)] for n, p in params.items()}
    for n in steps:  # exact ties: a quarter of each step repeats one value, an eighth is zero
        for st in steps[n]:
            st.view(-1)[::4] = st.view(-1)[1]
            st.view(-1)[2::8] = 0
    steps["t0"][1].view(-1)[[5, 77]] = float("nan")  # a diverged entry: kept (distance inf), counted
    dst = DST(params.items(), epsilon=eps, silo=silo, distance=dist, reselect_every=reselect, seed="none",
              batched=batched)
    name_of = {id(p): n for n, p in params.items()}
    opts = bucket_optimizers(dst.buckets(), params, lambda ps: Nudge(ps, [steps[name_of[id(p)]] for p in ps]))
    out = []
    for step in range(n_steps):
        if step == restore_at:  # continue from the kept sets, as a resumed run does
            kept = {n: k.idx.clone() for n, k in dst.kept.items()}
            vals = {n: params[n].detach().reshape(-1)[k.idx].clone() for n, k in dst.kept.items()}
            seeds = {n: dst.seed_tensor(n) for n in params}
            dst = DST(params.items(), epsilon=eps, silo=silo, distance=dist, reselect_every=reselect,
                      seed="none", batched=batched)
            for n, p in params.items():
                p.data.copy_(seeds[n])
            dst.restore(kept, step, vals)
        stats = dst.step(opts)
        out.append(({n: bits_view(p.detach()).clone() for n, p in params.items()},
                    {n: (k.idx.clone(), bits_view(k.seed_vals).clone()) for n, k in dst.kept.items()},
                    (stats.nonseed, stats.entered, stats.left, stats.reselected, dst.nonfinite())))
    return out, dst


@pytest.mark.parametrize("silo", ["tensor", "row", "global"])
@pytest.mark.parametrize("dist", ["absolute", "relative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reselect", [1, 2, None])
@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.5, 1.0])
def test_batched_step_equals_tensor_by_tensor(silo, dist, dtype, reselect, eps):
    """Buckets with large tensor silos (sampled), small ones and rows, projected in one batch,
    give the per-tensor engine's parameters, kept sets and counts, step after step."""
    shapes = [(20_000,), (64,), (120, 90), (9000,), (7,), (300, 30), (50_000,)]
    want, _ = _nudged_run(False, silo, dist, dtype, reselect, eps, shapes, 5, restore_at=3)
    got, dst = _nudged_run(True, silo, dist, dtype, reselect, eps, shapes, 5, restore_at=3)
    assert dst.batched
    if reselect == 1:
        assert want[1][2][-1] == 2  # the two NaN entries of step 2, kept (distance inf) and counted
    for step, (w, g) in enumerate(zip(want, got), 1):
        for n in w[0]:
            assert torch.equal(w[0][n], g[0][n]), (n, step)
            assert torch.equal(w[1][n][0], g[1][n][0]) and torch.equal(w[1][n][1], g[1][n][1]), (n, step)
        assert w[2] == g[2], step


@pytest.mark.parametrize("seed", ["none", "copy"])
@pytest.mark.parametrize("cap", [None, 100])
def test_small_silos_of_several_dtypes_are_projected_exactly(seed, cap, monkeypatch):
    """Small silos are projected together, one batch per dtype (and every BUCKET_MIN entries:
    `cap` makes that every tensor or two): each keeps what the plain reference keeps (float64
    distances only for float64 tensors), over steps that re-select and steps that keep the set."""
    if cap:
        monkeypatch.setattr(engine, "BUCKET_MIN", cap)
    g = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.bfloat16]
    params = {f"p{i}": torch.nn.Parameter(torch.randn(40 + 13 * i, generator=g).to(dt)) for i, dt in enumerate(dtypes)}
    params["big"] = torch.nn.Parameter(torch.randn(9000, generator=g))  # not small: the per-tensor path
    seeds = {n: p.detach().clone() for n, p in params.items()}
    dst = DST(params.items(), epsilon=0.2, seed=seed, reselect_every=2)
    opts = {n: torch.optim.SGD([p], lr=1.0) for n, p in params.items()}
    mask = None
    for step in range(4):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) * 0.01
        if seed == "copy":
            for o in opts.values():
                o.step()
            want = {n: p.detach().clone() for n, p in params.items()}
            dst.project()
        else:
            want = {n: p.detach() - p.grad for n, p in params.items()}  # SGD, lr 1
            dst.step(opts)
        names = list(params)
        out, masks = ref_project([want[n] for n in names], [seeds[n] for n in names], epsilon=0.2, silo="tensor",
                                 distance="absolute", mask=mask if step % 2 else None)
        mask = masks
        for n, o in zip(names, out):
            assert bits_view(params[n].detach()).equal(bits_view(o)), (step, n)
            assert dst.kept[n].seed_vals.dtype == params[n].dtype


@pytest.mark.skipif(not shutil.which(os.environ.get("CC") or "cc") or os.environ.get("DSTCLI_KERNELS") == "0",
                    reason="no C compiler here, or the kernels are switched off")
def test_the_cpu_kernels_build_where_there_is_a_compiler():
    """tests/test_kernels.py is skipped where the kernels are not loaded: with a compiler at hand,
    a kernels.c that does not build must fail here, not pass as a skip."""
    assert kernels.lib() is not None, kernels.why()


def test_batched_default_on_the_cpu_is_the_global_silo_over_small_tensors():
    """Batched by default on the CPU: the global silo over small tensors, unless the CPU kernels
    serve every tensor and they have one dtype (a kernel call a bucket is faster then)."""
    small = [(f"s{i}", torch.nn.Parameter(torch.randn(64, 64))) for i in range(3)]
    large = [(f"l{i}", torch.nn.Parameter(torch.randn(256, 300))) for i in range(2)]  # 76,800 each
    mixed = small + [("h", torch.nn.Parameter(torch.randn(64, 64).to(torch.bfloat16)))]
    for eps in (1e-3, 0.01, 0.1):
        assert DST(small, epsilon=eps, silo="global", seed="none").batched == (kernels.lib() is None)
        assert DST(mixed, epsilon=eps, silo="global", seed="none").batched
        assert not DST(small, epsilon=eps, silo="tensor", seed="none").batched
        assert not DST(small, epsilon=eps, silo="global", seed="copy").batched  # project() has no buckets
        assert not DST(large, epsilon=eps, silo="global", seed="none").batched
        assert not DST(small, epsilon=eps, silo="global", seed="none", batched=False).batched
        with mock.patch.dict(kernels._state, {"lib": None}):
            assert DST(small, epsilon=eps, silo="global", seed="none").batched


def test_batched_selection_falls_back_when_the_sample_misleads():
    """A large silo whose strided sample sees only the small values: the batched selection
    notices and selects that silo alone, exactly."""
    m = 50_000
    params = {"big": torch.nn.Parameter(torch.zeros(m)), "small": torch.nn.Parameter(torch.zeros(100))}
    dst = DST(params.items(), epsilon=0.1, seed="none", batched=True)
    stride = sample_bracket(m, 1)[0]
    d = torch.ones(m + 101)  # the bucket's distances and the spare entry past them
    d[:m:stride] = 0.5
    d[m + 3] = 7.0
    d[-1] = -1.0
    idx, cuts = dst._select_flat(dst._plan(["big", "small"]), d)
    assert cuts == [0, 5000, 5010]  # all 1.0 above the sample's 0.5s: ties, the lowest 5,000 win
    assert torch.equal(idx, torch.cat([torch.nonzero(d[:m] == 1.0).reshape(-1)[:5000], torch.arange(m, m + 10)]))
