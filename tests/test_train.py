"""`dstcli train` end to end on the bundled sample (few steps), and its guards."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dstcli import ops
from dstcli.checkpoint import Checkpoint
from dstcli.cli import app
from dstcli.data import read_jsonl
from dstcli.errors import DstError
from dstcli.model import GPT, load_config
from dstcli.patchfile import Patch
from dstcli.train import TrainOptions, evaluate, samples_dir, train

SMALL = dict(steps=25, batch_size=8, lr=1e-2, epsilon=1e-2, warmup=5)


def bundled_base(directory, dtype):
    """The bundled model as a base directory with its weights in `dtype`."""
    from safetensors.torch import load_file, save_file
    src = samples_dir() / "tiny-gpt"
    directory.mkdir()
    (directory / "config.json").write_text((src / "config.json").read_text())
    save_file({k: v.to(dtype) for k, v in load_file(str(src / "model.safetensors")).items()},
              str(directory / "model.safetensors"))
    return directory


def load_model(directory):
    model = GPT(load_config(directory))
    ck = Checkpoint(directory if (directory / "model.safetensors").exists() else directory)
    model.load_state_dict({n: ck.read(n) for n in ck.tensors})
    return model


@pytest.mark.slow
def test_train_improves_and_applied_patch_reproduces_the_model(tmp_path):
    out = tmp_path / "p.dst"
    res = train(TrainOptions(output=str(out), metrics=str(tmp_path / "m.jsonl"), **SMALL))
    assert res.final_metrics["loss"] < res.base_metrics["loss"]
    assert 0 < res.changed <= res.budget
    lines = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert len(lines) == 25 and {"loss", "lr", "nonseed", "entered", "left", "tokens_per_s"} <= set(lines[0])
    header = Patch(out).header
    assert header["run"]["config"]["epsilon"] == 1e-2 and header["run"]["metrics"] == res.final_metrics
    # apply the patch with the CLI machinery: the model it gives has exactly the trained loss
    sample = samples_dir() / "tiny-gpt"
    applied = tmp_path / "tuned"
    ops.apply(sample, [out], applied)
    rows = read_jsonl(samples_dir() / "pytype" / "valid.jsonl", 128)
    got = evaluate(load_model(applied), rows, torch.device("cpu"), None)
    assert got == res.final_metrics
    for e in header["tensors"].values():
        assert e["changed"] <= e["silo"]["budget"]


def test_global_silo_batched_on_the_cpu_gives_the_default_patch(tmp_path, monkeypatch):
    """The bundled model's global silo batched on the CPU (the default without the CPU kernels)
    and by default (a kernel call a bucket where they serve): the patch is byte for byte the same
    (other buckets, same kept sets and values)."""
    import dstcli.train as T
    from dstcli import kernels
    from dstcli.engine import DST

    made = []

    class Spy(DST):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self.batched)
    monkeypatch.setattr(T, "DST", Spy)
    run = {**SMALL, "steps": 8, "reselect_every": 2}
    train(TrainOptions(output=str(tmp_path / "default.dst"), silo="global", **run))

    class Batched(Spy):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, batched=True)
    monkeypatch.setattr(T, "DST", Batched)
    monkeypatch.setenv("DSTCLI_MAP_SEED", "0")  # batched steps project against snapshots
    train(TrainOptions(output=str(tmp_path / "batched.dst"), silo="global", **run))
    assert made == [kernels.lib() is None, True]
    assert (tmp_path / "batched.dst").read_bytes() == (tmp_path / "default.dst").read_bytes()


@pytest.mark.parametrize("silo,weights", [("tensor", "bf16"), ("global", "fp32"), ("row", "fp32")])
def test_the_seed_is_mapped_from_the_base_and_gives_the_same_patch(tmp_path, monkeypatch, silo, weights):
    """On the CPU the engine reads the base's tensors memory-mapped as its seed (no snapshots):
    the patch is byte for byte the one DSTCLI_MAP_SEED=0 (snapshots) writes, and the base file
    is untouched."""
    import dstcli.train as T
    from dstcli import kernels
    from dstcli.engine import DST

    base = bundled_base(tmp_path / "base", torch.bfloat16 if weights == "bf16" else torch.float32)
    before = (base / "model.safetensors").read_bytes()
    held = []

    class Spy(DST):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            held.append((self.seed is not None, self._many))
    monkeypatch.setattr(T, "DST", Spy)
    run = dict(base=str(base), steps=6, batch_size=4, seq_len=48, epsilon=5e-2, silo=silo, reselect_every=2)
    train(TrainOptions(output=str(tmp_path / "mapped.dst"), **run))
    monkeypatch.setenv("DSTCLI_MAP_SEED", "0")
    train(TrainOptions(output=str(tmp_path / "snapshots.dst"), **run))
    assert held == [(True, kernels.lib() is not None), (False, kernels.lib() is not None)]
    assert (tmp_path / "mapped.dst").read_bytes() == (tmp_path / "snapshots.dst").read_bytes()
    assert (base / "model.safetensors").read_bytes() == before


def test_bucket_option_changes_the_buckets_not_the_patch(tmp_path, monkeypatch):
    """`dstcli train --bucket N` sets how many tensors an optimizer call takes and writes the same
    bytes; it is left out of the patch header. The bundled model: by default (its base mapped,
    DST.HELD_BUCKET) and at 64 one bucket, at 1 two (BUCKET_MIN entries each)."""
    import dstcli.train as T
    from dstcli.engine import DST

    sizes = []

    class Spy(DST):
        def buckets(self, *a, **kw):
            out = super().buckets(*a, **kw)
            sizes.append(len(out))
            return out
    monkeypatch.setattr(T, "DST", Spy)
    args = ["train", "--steps", "4", "--batch-size", "4", "--epsilon", "0.01", "--seq-len", "48"]
    for name, extra in (("default", []), ("one", ["--bucket", "64"]), ("small", ["--bucket", "1"])):
        r = CliRunner().invoke(app, [*args, *extra, "-o", str(tmp_path / f"{name}.dst")])
        assert r.exit_code == 0, r.output
    assert sizes == [1, 1, 2]
    assert (tmp_path / "default.dst").read_bytes() == (tmp_path / "one.dst").read_bytes()
    assert (tmp_path / "default.dst").read_bytes() == (tmp_path / "small.dst").read_bytes()
    r = CliRunner().invoke(app, [*args, "--bucket", "0", "-o", str(tmp_path / "zero.dst")])
    assert isinstance(r.exception, DstError) and "--bucket must be at least 1" in str(r.exception)
    assert not (tmp_path / "zero.dst").exists()


@pytest.mark.slow
def test_same_seed_same_patch_bytes(tmp_path):
    for name in ("a", "b"):
        train(TrainOptions(output=str(tmp_path / f"{name}.dst"), silo="row", reselect_every=None,
                           **{**SMALL, "steps": 6}))
    assert (tmp_path / "a.dst").read_bytes() == (tmp_path / "b.dst").read_bytes()  # no clock, no path inside
    a = Patch(tmp_path / "a.dst").header
    pa, pb = Patch(tmp_path / "a.dst"), Patch(tmp_path / "b.dst")
    for name in a["tensors"]:
        ia, xa = pa.read_change(name)
        ib, xb = pb.read_change(name)
        assert np.array_equal(ia, ib) and np.array_equal(xa, xb)


def test_bad_inputs_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    with pytest.raises(DstError, match=r"bad.jsonl:2: expected an object"):
        train(TrainOptions(data=str(bad), output=str(tmp_path / "p.dst"), steps=1))
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DstError, match=r"bad.jsonl:2: not valid JSON"):
        train(TrainOptions(data=str(bad), output=str(tmp_path / "p.dst"), steps=1))
    bad.write_text("\n")
    with pytest.raises(DstError, match="has no examples"):
        train(TrainOptions(data=str(bad), output=str(tmp_path / "p.dst"), steps=1))
    with pytest.raises(DstError, match="out of range"):
        train(TrainOptions(epsilon=3.0, output=str(tmp_path / "p.dst"), steps=1))
    with pytest.raises(DstError, match="rounds to zero"):
        train(TrainOptions(epsilon=1e-7, silo="row", output=str(tmp_path / "p.dst"), steps=1))
    with pytest.raises(DstError, match="unknown --optimizer 'adam'"):
        train(TrainOptions(optimizer="adam", output=str(tmp_path / "p.dst"), steps=1))
    with pytest.raises(DstError, match="does not exist"):
        train(TrainOptions(data=str(tmp_path / "nope.jsonl"), output=str(tmp_path / "p.dst"), steps=1))
    assert not (tmp_path / "p.dst").exists()


def test_diverging_run_stops_with_an_error_and_no_patch(tmp_path):
    with pytest.raises(DstError, match="5 steps in a row were skipped: the run stopped and its last good state"):
        train(TrainOptions(lr=1e30, clip=0, output=str(tmp_path / "p.dst"), steps=30, batch_size=4, epsilon=0.5))
    assert not (tmp_path / "p.dst").exists() and (tmp_path / "p.dst.state" / "state.safetensors").is_file()


def test_config_file_and_unknown_keys(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('steps = 2\nbatch-size = 4\nepsilon = 0.01\nbogus = 1\n')
    r = CliRunner().invoke(app, ["train", "--config", str(conf), "-o", str(tmp_path / "p.dst")])
    assert isinstance(r.exception, DstError) and "unknown key(s) bogus" in str(r.exception)
    conf.write_text('steps = 2\nbatch-size = 4\nepsilon = 0.01\n')
    r = CliRunner().invoke(app, ["train", "--config", str(conf), "-o", str(tmp_path / "p.dst"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and Patch(tmp_path / "p.dst").header["run"]["config"]["batch_size"] == 4


@pytest.mark.slow
def test_cli_main_command_as_a_user_runs_it(tmp_path):
    """`dstcli train` in a subprocess, as the README runs it (shortened with --steps)."""
    env = {**os.environ, "COLUMNS": "120"}
    r = subprocess.run([sys.executable, "-m", "dstcli", "train", "--steps", "10", "-o", "p.dst"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "DST-tuned" in r.stdout and "wrote p.dst" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dstcli", "train", "--steps", "10", "-o", "p.dst"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and r.stderr.startswith("Error: output p.dst already exists")


@pytest.mark.parametrize("optimizer", ["adafactor", "sgd"])
def test_other_optimizers_and_silos_run(tmp_path, optimizer):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(20)))
    r = train(TrainOptions(data=str(data), eval=str(data), optimizer=optimizer, silo="global", params=500,
                           steps=3, batch_size=4, output=str(tmp_path / "p.dst")))
    assert r.changed <= 500 and r.budget == 500 and "loss" in r.final_metrics


def test_base_as_a_file_and_exclude_patterns(tmp_path):
    import shutil
    src = samples_dir() / "tiny-gpt"
    for f in ("model.safetensors", "config.json"):
        shutil.copy(src / f, tmp_path / f)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2\n"}) + "\n")
    r = train(TrainOptions(base=str(tmp_path / "model.safetensors"), data=str(data), exclude=["wte.*", "wpe.*"],
                           epsilon=0.01, steps=2, batch_size=1, output=str(tmp_path / "p.dst")))
    tensors = Patch(tmp_path / "p.dst").header["tensors"]
    assert tensors["wte.weight"]["changed"] == 0 and "silo" not in tensors["wte.weight"]
    assert r.trainable == 1_360_320 - 2 * 256 * 160  # wte (256 x 160) and wpe (256 x 160) excluded
    with pytest.raises(DstError, match="--include pattern 'nothing.*' matches no tensor"):
        train(TrainOptions(include=["nothing.*"], steps=1, output=str(tmp_path / "q.dst")))


def test_a_bf16_checkpoint_trains_in_bf16_and_its_patch_applies(tmp_path):
    from safetensors.torch import load_file
    bundled_base(tmp_path / "bf16", torch.bfloat16)
    res = train(TrainOptions(base=str(tmp_path / "bf16"), output=str(tmp_path / "p.dst"), steps=5, batch_size=4,
                             seq_len=48, epsilon=1e-2))
    assert {e["dtype"] for e in Patch(res.output).tensors.values()} == {"bfloat16"}
    ops.apply(tmp_path / "bf16", [res.output], tmp_path / "tuned")
    tuned = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    for n, p in res.model.named_parameters():  # the applied file holds exactly the trained bf16 weights
        assert p.dtype == torch.bfloat16 and torch.equal(tuned[n], p.detach()), n
