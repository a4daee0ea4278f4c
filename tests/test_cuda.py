"""The engine and the selection on a CUDA GPU give exactly what they give on the CPU.

Skipped without a GPU (CI has none): run `python -m pytest tests/test_cuda.py` on a machine with
one. The CPU results are themselves checked against the full-sort oracle (test_engine,
test_select), so bit equality with them is the oracle check on the GPU.
"""

import pytest
import torch

from dstcli.dtypes import bits_view
from dstcli.engine import DST, bucket_optimizers
from dstcli.select import top_indices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {"emb": (300, 64), "w": (96, 200), "b": (200,), "ln": (64,), "big": (9000,)}


class Nudge:
    """A stand-in optimizer whose updates are the same bits on every device: one IEEE addition of
    precomputed random steps per call (a real AdamW's kernels differ between CPU and GPU)."""

    def __init__(self, params, steps):
        self.params, self.steps, self.i = params, steps, 0

    def step(self):
        for p, s in zip(self.params, self.steps):
            p.add_(s[self.i].to(p.device))
        self.i += 1


def _run(device, dtype, silo, dist, reselect, mode, n_steps=6, batched=None):
    g = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for n, s in SHAPES.items()}
    steps = {n: [(torch.randn(s, generator=g) * 0.1).to(dtype) for _ in range(n_steps)] for n, s in SHAPES.items()}
    for n in steps:  # many exact ties: a step of 0 or a repeated value in a quarter of the entries
        for st in steps[n]:
            st.view(-1)[::4] = st.view(-1)[1]
    dst = DST(params.items(), epsilon=0.05, silo=silo, distance=dist, reselect_every=reselect,
              seed="none" if mode == "lean" else "copy", batched=batched)
    name_of = {id(p): n for n, p in params.items()}
    opts = bucket_optimizers(dst.buckets(), params, lambda ps: Nudge(ps, [steps[name_of[id(p)]] for p in ps]))
    history = []
    for _ in range(n_steps):
        with torch.no_grad():
            if mode == "lean":
                stats = dst.step(opts)
            else:
                for o in {id(o): o for o in opts.values()}.values():
                    o.step()
                stats = dst.project()
        history.append(({n: bits_view(p.detach()).cpu().clone() for n, p in params.items()},
                        (stats.nonseed, stats.entered, stats.left), dst.nonfinite()))
    return history


@pytest.mark.parametrize("silo", ["tensor", "row", "global"])
@pytest.mark.parametrize("dist", ["absolute", "relative", "inverse-relative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reselect,mode", [(1, "lean"), (3, "lean"), (1, "copy")])
def test_engine_on_cuda_matches_cpu_bit_for_bit(silo, dist, dtype, reselect, mode):
    """The GPU's default (batched when seed="none") and tensor by tensor, against the CPU's."""
    cpu = _run("cpu", dtype, silo, dist, reselect, mode)
    for batched in (None, False):
        gpu = _run("cuda", dtype, silo, dist, reselect, mode, batched=batched)
        for step, ((pc, sc, fc), (pg, sg, fg)) in enumerate(zip(cpu, gpu), 1):
            for n in pc:
                assert torch.equal(pc[n], pg[n]), (n, step, batched)
            assert sc == sg and fc == fg == 0, (step, batched)


@pytest.mark.parametrize("m", [100, 8191, 8192, 1 << 20, (1 << 24) + 3])
@pytest.mark.parametrize("frac", [1e-6, 1e-3, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_top_indices_on_cuda_matches_cpu(m, frac, kind):
    g = torch.Generator().manual_seed(m)
    if kind == "normal":
        d = torch.randn(m, generator=g).abs()
    elif kind == "ties":
        d = torch.randint(0, 8, (m,), generator=g).float()
    else:
        d = torch.zeros(m)
        d[torch.randint(0, m, (max(1, m // 100),), generator=g)] = 1.0
    k = max(1, int(frac * m))
    want = top_indices(d, k)
    got = top_indices(d.cuda(), k)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), want)


def test_top_indices_on_cuda_past_2_to_the_31():
    """A silo of more than 2^31 entries (8.6 GB of float32): positions stay int64, ties at tau go
    to the lower positions, and the winners past 2^31 are found."""
    n = (1 << 31) + 4099
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    d = torch.zeros(n, device="cuda")
    d[::1000] = 1.0  # 2.1M ties at 1.0 spread over the whole silo
    far = torch.tensor([n - 1, n - 2, (1 << 31) + 5], device="cuda")
    d[far] = 2.0
    k = 1003
    got = top_indices(d, k)
    assert got.dtype == torch.long and len(got) == k
    assert torch.equal(got[:1000], torch.arange(0, 1000 * 1000, 1000, device="cuda"))  # lowest ties first
    assert torch.equal(got[1000:], torch.sort(far).values)
    del d
    torch.cuda.empty_cache()
