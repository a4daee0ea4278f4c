"""Several processes (gloo, CPU): the collective selection is exact, and DDP / FSDP runs under
torchrun give the single-process patch.

The engine test feeds the same parameter trajectory to a DST over whole tensors and to a DST over
fully_shard-style slices on 2 processes: kept sets and values must agree bit for bit, ties
included. The end-to-end tests launch `torchrun -m dstcli train` like a user; gradients summed over
processes round differently from one process's, so there the kept sets must match and the values
agree to rounding (docs/DISTRIBUTED.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dstcli.checkpoint import Checkpoint
from dstcli.dtypes import bits_view
from dstcli.distributed import Dist
from dstcli.engine import DST
from dstcli.patchfile import open_patch
from dstcli.train import samples_dir

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 7), "c.weight": (64, 33), "d.bias": (1,)}


def _slice(t: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    rows = t.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return t[start:start + chunk], start * (t[0].numel() if t.dim() else 1)


def _worker(rank: int, world: int, init: str, cases: list, results: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    dd = Dist("fsdp", rank, world)
    failures = []
    for silo, dist_kind, reselect, lean in cases:
        g = torch.Generator().manual_seed(0)
        full = {n: torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for n, s in SHAPES.items()}
        parts = {n: _slice(p.detach(), rank, world) for n, p in full.items()}
        local = {n: torch.nn.Parameter(parts[n][0].clone()) for n in full}
        ref = DST(full.items(), epsilon=0.1, silo=silo, distance=dist_kind, reselect_every=reselect,
                  seed="none" if lean else "copy")
        mine = DST(local.items(), epsilon=0.1, silo=silo, distance=dist_kind, reselect_every=reselect,
                   seed="none" if lean else "copy", shards={n: (SHAPES[n], parts[n][1]) for n in full},
                   gather=dd.gather)
        opt_ref = {n: torch.optim.SGD([p], lr=1.0) for n, p in full.items()}
        opt_mine = {n: torch.optim.SGD([p], lr=1.0) for n, p in local.items()}
        for step in range(5):
            for n, p in full.items():  # the same update on every process; coarse values make ties
                upd = torch.round(torch.randn(p.shape, generator=g) * 4) / 1000
                p.grad = -upd
                local[n].grad = -_slice(upd, rank, world)[0].clone()
            if lean:
                ref.step(opt_ref)
                mine.step(opt_mine)
            else:
                with torch.no_grad():
                    for n, p in full.items():
                        p.add_(-p.grad)
                        local[n].add_(-local[n].grad)
                ref.project()
                mine.project()
            for n, p in full.items():
                want = _slice(p.detach(), rank, world)[0]
                off, k = parts[n][1], ref.kept[n].idx
                want_idx = k[(k >= off) & (k < off + want.numel())] - off
                if not (torch.equal(bits_view(want.contiguous()), bits_view(local[n].detach()))
                        and torch.equal(want_idx, mine.kept[n].idx)):
                    failures.append((silo, dist_kind, reselect, lean, step, n))
    results[rank] = failures
    dist.destroy_process_group()


def test_sharded_selection_is_exactly_the_single_process_one(tmp_path):
    cases = [(silo, d, r, lean) for silo in ("tensor", "row", "global")
             for d in ("absolute", "relative", "inverse-relative") for r in (1, None) for lean in (True, False)]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", cases, results), nprocs=2, join=True)
        assert dict(results) == {0: [], 1: []}


# ---- torchrun end to end ---------------------------------------------------------------------

def _train(tmp_path: Path, out: str, *extra: str, procs: int = 0, entry: str | None = None) -> subprocess.CompletedProcess:
    args = ["train", "-o", str(tmp_path / out), "--steps", "6", "--batch-size", "8", "--epsilon", "1e-3",
            "--optimizer", "sgd", "--lr", "0.5", "--seed", "3", *extra]
    if procs:  # through `-m dstcli`, or the installed entry point as a program (--no-python)
        program = ["--no-python", entry] if entry else ["-m", "dstcli"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               *program, *args]
    else:
        cmd = [sys.executable, "-m", "dstcli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _entries(path: Path, base_dir: Path | None = None) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    base = Checkpoint(base_dir or samples_dir() / "tiny-gpt")
    p = open_patch(path)
    out = {}
    for name in p.tensors:
        idx, xor = p.read_change(name)
        vals = base.read(name).reshape(-1)[idx].clone()
        bits_view(vals).bitwise_xor_(torch.from_numpy(xor))
        out[name] = (idx, vals)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    r = _train(tmp, "single.dst")
    assert r.returncode == 0, r.stderr
    return _entries(tmp / "single.dst")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_gives_the_single_process_patch(tmp_path, single, strategy):
    entry = shutil.which("dstcli") if strategy == "fsdp" else None  # ddp through -m dstcli
    r = _train(tmp_path, "multi.dst", "--strategy", strategy, procs=2, entry=entry)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 reports and writes
    assert sorted(os.listdir(tmp_path)) == ["multi.dst"]
    _same_patch(single, _entries(tmp_path / "multi.dst"), Checkpoint(samples_dir() / "tiny-gpt"))
    assert open_patch(tmp_path / "multi.dst").header["run"]["config"]["strategy"] == strategy


def _same_patch(single: dict, got: dict, base: Checkpoint) -> None:
    assert set(got) == set(single) and sum(len(idx) for idx, _ in single.values()) > 0
    for name, (idx, vals) in single.items():
        gidx, gvals = got[name]
        assert np.array_equal(idx, gidx), name  # the same kept set
        delta = (vals - base.read(name).reshape(-1)[idx]).abs()
        assert torch.all((gvals - vals).abs() <= 1e-3 * delta + 1e-9), name  # values: rounding only


@pytest.mark.slow
def test_fsdp_on_a_hugging_face_model_with_tied_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf import WORDS, rows, tokenizer

    torch.manual_seed(0)  # no dropout: each process would draw its own masks for its half of the batch
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(WORDS), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=2, eos_token_id=3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer().save_pretrained(tmp_path / "gpt2")
    args = ["--model", str(tmp_path / "gpt2"), str(rows(tmp_path / "rows.jsonl")), "--epsilon", "1e-2"]
    for out, procs in (("single.dst", 0), ("fsdp.dst", 2)):
        r = _train(tmp_path, out, *args, *(["--strategy", "fsdp"] if procs else []), procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
    single = _entries(tmp_path / "single.dst", tmp_path / "gpt2")
    assert "lm_head.weight" not in single and "transformer.wte.weight" in single  # tied: one silo
    _same_patch(single, _entries(tmp_path / "fsdp.dst", tmp_path / "gpt2"), Checkpoint(tmp_path / "gpt2"))


def test_strategy_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    cases = [(["--strategy", "ddp"], {}, "torchrun --nproc-per-node"),
             (["--strategy", "bogus"], {}, "unknown --strategy 'bogus'"),
             (["--strategy", "fsdp", "--save-every", "5"], {}, "--save-every is not supported"),
             ([], {"WORLD_SIZE": "2"}, "add --strategy ddp")]
    for extra, more_env, message in cases:
        r = subprocess.run([sys.executable, "-m", "dstcli", "train", "-o", str(tmp_path / "x.dst"), "--steps", "1", *extra],
                           capture_output=True, text=True, env={**env, **more_env}, timeout=300)
        assert r.returncode == 1, (extra, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("Error:") and message in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "x.dst").exists()
