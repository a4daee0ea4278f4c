"""Outputs are atomic: a failed or killed write leaves no file or the previous one, never a part."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import dstcli.ops as ops_mod
import dstcli.patchfile as patchfile_mod
import dstcli.resume as resume_mod
from dstcli import ops
from dstcli.errors import DstError
from dstcli.patchfile import Patch
from dstcli.train import TrainOptions, train


class Disk:
    """A disk with `budget` bytes free, shared by every write through it: Python file writes and
    kernel copies (os.copy_file_range) alike; past the budget they fail as a full disk does."""

    def __init__(self, budget):
        self.budget = budget

    def take(self, n):
        ok = max(0, min(n, self.budget))
        self.budget -= ok
        return ok

    def open(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        return DiskFile(f, self) if any(c in mode for c in "wa+") else f

    def copy_file_range(self, src, dst, count, offset_src=None, offset_dst=None):
        ok = self.take(count)
        if ok:
            os.copy_file_range(src, dst, ok, offset_src, offset_dst)
        if ok < count:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return ok


class DiskFile:
    def __init__(self, f, disk):
        self.f, self.disk = f, disk

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        ok = self.disk.take(n)
        self.f.write(bytes(memoryview(data).cast("B")[:ok]))
        if ok < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fraction", [0, 0.5, 0.999])
def test_full_disk_while_writing_a_patch(tmp_path, pair, monkeypatch, fraction):
    base, ft, _, _ = pair
    ops.diff(base, ft, tmp_path / "sized.dst")
    budget = int(fraction * (tmp_path / "sized.dst").stat().st_size)  # the disk fills this far in
    (tmp_path / "p.dst").write_bytes(b"the previous patch")
    disk = Disk(budget)
    monkeypatch.setattr(patchfile_mod, "open", disk.open, raising=False)
    monkeypatch.setattr(patchfile_mod.os, "copy_file_range", disk.copy_file_range)
    with pytest.raises(DstError, match=r"cannot write .*p\.dst: No space left on device; check free space"):
        ops.diff(base, ft, tmp_path / "p.dst", overwrite=True)
    assert (tmp_path / "p.dst").read_bytes() == b"the previous patch"  # the old file is intact
    assert leftovers(tmp_path) == []


def test_full_disk_while_applying(tmp_path, pair, monkeypatch):
    base, ft, _, _ = pair
    ops.diff(base, ft, tmp_path / "p.dst")
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    real_pwrite = os.pwrite

    def full_disk_pwrite(fd, data, offset):  # apply writes tensors with os.pwrite from worker threads
        real_pwrite(fd, bytes(memoryview(data)[:len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ops_mod.os, "pwrite", full_disk_pwrite)
    with pytest.raises(DstError, match="No space left on device"):
        ops.apply(base, [tmp_path / "p.dst"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before  # inputs are never written


def test_full_disk_while_saving_training_state(tmp_path, monkeypatch):
    real = resume_mod.save_file

    def failing(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(resume_mod, "save_file", failing)
    with pytest.raises(DstError, match="No space left on device"):
        train(TrainOptions(output=str(tmp_path / "p.dst"), steps=4, save_every=2, batch_size=4, seq_len=32,
                           epsilon=1e-2))
    state = tmp_path / "p.dst.state"
    assert not (tmp_path / "p.dst").exists() and not (state / "state.safetensors").exists()
    assert leftovers(state) == []


def test_unwritable_targets_are_clear_errors(tmp_path, pair):
    base, ft, _, _ = pair
    with pytest.raises(DstError, match="does not exist: create it first"):
        ops.diff(base, ft, tmp_path / "no" / "such" / "dir" / "p.dst")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DstError):
        ops.diff(base, ft, tmp_path / "file" / "p.dst")
    with pytest.raises(DstError, match="would overwrite the input"):
        ops.diff(base, ft, base, overwrite=True)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["apply", "diff"])
def test_killing_a_write_leaves_no_partial_output(tmp_path, command):
    """SIGKILL a real dstcli at many moments while it writes ~200 MB: the output is absent or whole."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(1024, 4096, generator=g) for i in range(12)}  # 192 MiB
    ft = {k: v.clone() for k, v in base.items()}
    for v in ft.values():
        v.view(-1)[::997] += 1
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    ops.diff(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "p.dst")
    digest = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("base.safetensors", "ft.safetensors")}
    out = tmp_path / ("out.safetensors" if command == "apply" else "out.dst")
    args = {"apply": ["apply", "base.safetensors", "p.dst", "-o", out.name],
            "diff": ["diff", "base.safetensors", "ft.safetensors", "-o", out.name]}[command]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "dstcli", *args], cwd=tmp_path, check=True, capture_output=True)
    full = time.time() - t0
    out.unlink()
    outcomes = {"absent": 0, "whole": 0}
    for i in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "dstcli", *args], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * (i + 0.5) / 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            if command == "apply":
                got = load_file(str(out))
                assert all(torch.equal(got[k], ft[k]) for k in ft)
            else:  # the same patch (its run metadata names the inputs as given, so compare the tensors)
                assert Patch(out).tensors == Patch(tmp_path / "p.dst").tensors
            outcomes["whole"] += 1
            out.unlink()
        else:
            outcomes["absent"] += 1
    for n, h in digest.items():
        assert hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() == h
    print(f"\n{command}: {outcomes}")
    assert outcomes["absent"] >= 1, outcomes  # at least one kill landed mid-write


def test_apply_reports_a_full_disk_before_writing(tmp_path, pair, monkeypatch):
    """apply allocates each output shard up front: a disk without room fails there, with one
    clear error and no output left; where fallocate is missing the output is still right."""
    import dstcli.checkpoint as ck

    base, ft, _, _ = pair
    ops.diff(base, ft, tmp_path / "p.dst")
    assert ck._FALLOCATE is not None  # Linux: the real call is used (and works on this disk)
    monkeypatch.setattr(ck, "_FALLOCATE", lambda fd, size: errno.ENOSPC)
    with pytest.raises(DstError, match=r"cannot write .*out\.safetensors: No space left on device; check free space"):
        ops.apply(base, [tmp_path / "p.dst"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(ck, "_FALLOCATE", None)  # a system without fallocate
    ops.apply(base, [tmp_path / "p.dst"], tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == ft.read_bytes()
