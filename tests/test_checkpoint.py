"""Checkpoint.mapped: a base's tensors memory-mapped for the engine's seed, never written back."""

import hashlib
import json
import struct

import torch
from safetensors.torch import save_file

from dstcli.checkpoint import Checkpoint


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mapped_tensors_are_the_files_and_writes_stay_in_the_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(64, 33, generator=g), "h": torch.randn(7, generator=g).to(torch.bfloat16),
               "d": torch.randn(5, generator=g).double(), "e": torch.empty(0, 3)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    before = _digest(tmp_path / "m.safetensors")
    ck = Checkpoint(tmp_path / "m.safetensors")
    got = ck.mapped(["w", "h", "d", "e"])
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape and torch.equal(got[n], t), n
    got["w"][0, 0] = 1e9  # copy-on-write: this process's page, not the file's
    assert float(Checkpoint(tmp_path / "m.safetensors").mapped(["w"])["w"][0, 0]) == float(tensors["w"][0, 0])
    assert _digest(tmp_path / "m.safetensors") == before
    assert ck.mapped(["w", "nowhere"]) is None


def test_a_tensor_not_aligned_to_its_width_is_not_mapped(tmp_path):
    """safetensors does not require alignment: a float32 tensor 2 bytes into the data is read,
    not mapped (the kernels load whole entries)."""
    header = {"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = torch.tensor([1.5], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    data += torch.tensor([2.0, -3.0]).numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    ck = Checkpoint(path)
    assert ck.mapped(["b"]) is None and ck.mapped(["a", "b"]) is None
    assert torch.equal(ck.mapped(["a"])["a"], torch.tensor([1.5], dtype=torch.bfloat16))
    assert torch.equal(ck.read("b"), torch.tensor([2.0, -3.0]))


def test_a_file_that_cannot_be_mapped_is_not(tmp_path, monkeypatch):
    """Some file systems refuse mmap: `mapped` answers None (dstcli train then snapshots)."""
    import numpy as np

    save_file({"w": torch.ones(4)}, str(tmp_path / "m.safetensors"))
    ck = Checkpoint(tmp_path / "m.safetensors")

    def refuse(*a, **k):
        raise OSError(19, "No such device")
    monkeypatch.setattr(np, "memmap", refuse)
    assert ck.mapped(["w"]) is None
