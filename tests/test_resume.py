"""Interrupted runs resume exactly; NaN steps are skipped, then stop the run with its state saved."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dstcli.train as train_mod
from dstcli.cli import app, main
from dstcli.errors import DstError
from dstcli.patchfile import Patch
from dstcli.resume import load_state, state_step
from dstcli.train import Stopped, TrainOptions, resume_options, train

QUICK = dict(steps=12, batch_size=4, lr=1e-2, epsilon=1e-2, warmup=3, seq_len=48, reselect_every=2)


def opts(tmp_path, name, **kw):
    return TrainOptions(output=str(tmp_path / f"{name}.dst"), **{**QUICK, **kw})


@pytest.mark.parametrize("silo", ["tensor", "global"])  # the bundled model's global silo runs batched
def test_ctrl_c_saves_and_resume_gives_the_same_bytes(tmp_path, silo):
    train(opts(tmp_path, "whole", silo=silo))

    def interrupt_at_5(r):
        if r.get("step") == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the run finishes step 5 first

    with pytest.raises(Stopped, match="stopped at step 5 of 12"):
        train(opts(tmp_path, "split", save_every=100, silo=silo), on_step=interrupt_at_5)
    state_dir = tmp_path / "split.dst.state"
    st = load_state(state_dir)
    assert st.step == 5 and not (tmp_path / "split.dst").exists()
    assert Patch(state_dir / "patch.dst").header["changed"] > 0  # the patch so far is a usable patch
    assert sorted(p.name for p in state_dir.iterdir()) == ["patch.dst", "state.safetensors"]  # no temp left
    train(resume_options(state_dir), resume=state_dir)
    assert (tmp_path / "split.dst").read_bytes() == (tmp_path / "whole.dst").read_bytes()
    assert not state_dir.exists()  # a finished run cleans up its state


def test_resume_refuses_other_options_data_or_a_broken_state(tmp_path):
    def interrupt_at_3(r):
        if r.get("step") == 3:
            os.kill(os.getpid(), signal.SIGINT)

    data = Path(_rows(tmp_path))
    with pytest.raises(Stopped):
        train(opts(tmp_path, "r", data=str(data)), on_step=interrupt_at_3)
    state_dir = tmp_path / "r.dst.state"
    with pytest.raises(DstError, match="--lr 0.5 differs from the resumed run's 0.01"):
        resume_options(state_dir, {"lr": 0.5})
    resume_options(state_dir, {"lr": 0.01, "output": str(tmp_path / "elsewhere.dst")})  # same value, new place: fine
    assert resume_options(state_dir, {"bucket": 64}).bucket == 64  # buckets change speed, not the patch
    data.write_text(data.read_text() + json.dumps({"text": "more"}) + "\n")
    with pytest.raises(DstError, match="not the dataset the saved run trained on"):
        train(resume_options(state_dir), resume=state_dir)
    (state_dir / "state.safetensors").write_bytes((state_dir / "state.safetensors").read_bytes()[:-7])
    with pytest.raises(DstError, match="unreadable"):
        load_state(state_dir)
    with pytest.raises(DstError, match="not a dstcli training state"):
        load_state(tmp_path)


def _rows(tmp_path):
    data = tmp_path / "rows.jsonl"  # no eval split: every cross_entropy call below is a training step
    data.write_text("".join(json.dumps({"prompt": f"{i} +", "completion": f" {i + 1}"}) + "\n" for i in range(40)))
    return str(data)


def _nan_on(calls):
    real = train_mod.F.cross_entropy
    count = {"n": 0}

    def fake(*a, **kw):
        count["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if count["n"] in calls else loss
    return fake


def test_nan_steps_are_skipped_and_never_reach_the_patch(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod.F, "cross_entropy", _nan_on({3, 4}))  # the losses of steps 3 and 4
    records = []
    res = train(opts(tmp_path, "n", data=_rows(tmp_path)), on_step=records.append)
    skipped = [r for r in records if "skipped" in r]
    assert [r["step"] for r in skipped] == [3, 4] and skipped[0]["skipped"] == "loss nan"
    p = Patch(res.output)
    for name, e in p.tensors.items():
        if e["changed"]:
            idx, xor = p.read_change(name)
            assert e["delta_max"] not in ("nan", "inf")


def test_too_many_nan_steps_stop_with_the_last_good_state(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod.F, "cross_entropy", _nan_on(set(range(4, 100))))
    with pytest.raises(DstError, match=r"loss nan at step 8, 5 steps in a row were skipped.*lower --lr"):
        train(opts(tmp_path, "s", data=_rows(tmp_path)))
    st = load_state(tmp_path / "s.dst.state")
    assert st.step == 8 and not (tmp_path / "s.dst").exists()


@pytest.mark.slow
def test_a_killed_process_resumes_to_identical_bytes(tmp_path):
    """SIGKILL a real `dstcli train` mid-run, resume it from the CLI, compare with an uninterrupted run."""
    args = ["--steps", "80", "--batch-size", "4", "--epsilon", "1e-2", "--seq-len", "48", "--warmup", "3",
            "--reselect-every", "3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runner = CliRunner()
    whole = runner.invoke(app, ["train", "-o", str(tmp_path / "whole.dst"), *args])
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "killed.dst"
    proc = subprocess.Popen([sys.executable, "-m", "dstcli", "train", "-o", str(out), "--save-every", "7", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed.dst.state"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (state_step(state) or 0) >= 14:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed: raise --steps"
    saved = state_step(state)
    assert saved % 7 == 0 and saved >= 14
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "killed.dst.state")])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == (tmp_path / "whole.dst").read_bytes()


def test_cli_resume_of_a_missing_state_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["dstcli", "train", "--resume", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("Error: ") and "not a dstcli training state" in err[0]


def test_engine_restore_checks_the_state_fits():
    from dstcli.engine import DST
    p = torch.nn.Parameter(torch.arange(10.0))
    dst = DST([("p", p)], epsilon=0.2, seed="none")
    for idx in ([3, 10], [5, 2], [-1, 3]):
        with pytest.raises(DstError, match="does not fit"):
            dst.restore({"p": torch.tensor(idx)}, 4, {"p": torch.tensor([1.0, 2.0])})
    dst.restore({"p": torch.tensor([3])}, 4, {"p": torch.tensor([4.0])})
    assert dst.nonseed() == 1 and dst.step_count == 4 and p[3] == 4.0 and dst.seed_tensor("p")[3] == 3.0


@pytest.mark.slow
def test_ctrl_c_on_the_real_cli_saves_and_exits_130(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "dstcli", "train", "-o", str(tmp_path / "p.dst"), "--steps", "400",
                             "--batch-size", "4", "--seq-len", "48", "--metrics", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("Stopped: stopped at step ") and "--resume" in line
    assert load_state(tmp_path / "p.dst.state").step >= 3 and not (tmp_path / "p.dst").exists()


def test_nan_gradients_are_skipped_like_nan_losses(tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def nan_norm_at_2(params, max_norm, *a, **kw):
        calls["n"] += 1
        norm = real(params, max_norm, *a, **kw)
        return norm * float("nan") if calls["n"] == 2 else norm

    monkeypatch.setattr(train_mod.torch.nn.utils, "clip_grad_norm_", nan_norm_at_2)
    records = []
    train(opts(tmp_path, "g", data=_rows(tmp_path), steps=4), on_step=records.append)
    assert [r.get("skipped") for r in records] == [None, "gradient norm nan", None, None]
