"""Resumable training state: everything `dstcli train` needs to continue a run bit for bit.

A state directory holds two files:

    state.safetensors   the state itself, self-contained: per trained tensor its kept positions
                        (``kept::NAME``) and current values there (``vals::NAME``; everything else
                        is the seed), optimizer state (``opt::NAME::KEY``), RNG states
                        (``rng::torch``, ``rng::data``, ``rng::cuda``), the rest of the current data
                        epoch (``order``); step, options and metrics as JSON in the metadata
    patch.dst           the trained tensors so far as an ordinary dstcli patch, for people (apply
                        or inspect it); resuming does not need it

Each file is written to a temporary name and renamed into place, so a process killed at any
moment leaves the previous state or the new one, never a partial file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dstcli.checkpoint import MAX_HEADER, atomic_path
from dstcli.errors import DstError
from dstcli.patchfile import Change, save_patch

STATE_VERSION = 1
STATE_FILE, STATE_PATCH, META_KEY = "state.safetensors", "patch.dst", "dstcli-train-state"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:32]


@dataclass
class State:
    path: Path
    step: int
    options: dict[str, Any]
    info: dict[str, Any]  # data fingerprint, metrics, anything else the trainer keeps
    kept: dict[str, torch.Tensor]  # name -> ascending positions
    values: dict[str, torch.Tensor]  # name -> current values at those positions
    optim: dict[str, dict[str, Any]]  # name -> the optimizer's per-parameter state
    rng: dict[str, torch.Tensor]
    order: list[int]


def save_state(directory: Path, *, step: int, options: dict, info: dict, changes: list[Change],
               kept: dict[str, tuple[torch.Tensor, torch.Tensor]], optimizers: dict[str, torch.optim.Optimizer],
               rng: dict[str, torch.Tensor], order: list[int], base_params: int) -> None:
    """Write (or replace) a state directory; `kept` maps name -> (positions, values there)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, (idx, vals) in kept.items():
        # copies: a batched DST's kept positions are views of one tensor per bucket (safetensors
        # refuses tensors that share memory)
        tensors[f"kept::{name}"] = idx.detach().to("cpu", copy=True).contiguous()
        tensors[f"vals::{name}"] = vals.detach().to("cpu", copy=True).contiguous()
    scalars: dict[str, Any] = {}
    for opt, names in _by_optimizer(optimizers):
        state = opt.state_dict()["state"]
        for i, name in enumerate(names):
            for key, value in state.get(i, {}).items():
                if torch.is_tensor(value):
                    tensors[f"opt::{name}::{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{name}::{key}"] = value
    tensors.update({f"rng::{k}": v.cpu().contiguous() for k, v in rng.items()})
    tensors["order"] = torch.tensor(order, dtype=torch.long)
    meta = {"version": STATE_VERSION, "step": step, "options": options, "info": info, "optimizer_scalars": scalars}
    save_patch(directory / STATE_PATCH, changes, run={"command": "train", "state_step": step}, base_params=base_params)
    with atomic_path(directory / STATE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})


def state_step(directory: str | Path) -> int | None:
    """The step a state directory holds, or None (cheap: reads the header only, through one open
    file, so a state being replaced meanwhile reads as the old or the new one, never a mix)."""
    try:
        with open(Path(directory) / STATE_FILE, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                return None
            header = json.loads(f.read(size))
        return int(json.loads(header["__metadata__"][META_KEY])["step"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def load_state(directory: str | Path) -> State:
    """Read a state directory; DstError if it is missing, damaged or from another version."""
    d = Path(directory)
    if not (d / STATE_FILE).is_file():
        raise DstError(f"{d} is not a dstcli training state (no {STATE_FILE}): pass the directory "
                       "that `dstcli train --save-every N` or Ctrl-C wrote")
    try:
        with safe_open(str(d / STATE_FILE), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            if meta.get("version") != STATE_VERSION:
                raise DstError(f"{d} was written by a dstcli with state version {meta.get('version')!r}; "
                               f"this one reads version {STATE_VERSION}: resume with the dstcli that wrote it")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        step, options = int(meta["step"]), dict(meta["options"])
    except DstError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise DstError(f"training state {d} is unreadable ({e}): start again, or resume from another state") from e
    kept = {k[len("kept::"):]: v for k, v in tensors.items() if k.startswith("kept::")}
    values = {k[len("vals::"):]: v for k, v in tensors.items() if k.startswith("vals::")}
    optim: dict[str, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt::"):
            name, _, field = key[len("opt::"):].rpartition("::")
            optim.setdefault(name, {})[field] = v
    for key, v in meta.get("optimizer_scalars", {}).items():
        name, _, field = key.rpartition("::")
        optim.setdefault(name, {})[field] = v
    rng = {k[len("rng::"):]: v for k, v in tensors.items() if k.startswith("rng::")}
    if "order" not in tensors or "torch" not in rng or "data" not in rng or set(kept) != set(values):
        raise DstError(f"training state {d} lacks part of its contents: it is incomplete")
    return State(d, step, options, dict(meta.get("info", {})), kept, values, optim, rng, tensors["order"].tolist())


def _by_optimizer(optimizers: dict[str, torch.optim.Optimizer]) -> list[tuple[torch.optim.Optimizer, list[str]]]:
    """Each distinct optimizer with the names it steps; a shared optimizer's names must come in the
    order of its parameters (as train's per-bucket optimizers do), which is its state's order."""
    groups: dict[int, tuple[torch.optim.Optimizer, list[str]]] = {}
    for name, opt in optimizers.items():
        groups.setdefault(id(opt), (opt, []))[1].append(name)
    return list(groups.values())


def load_optimizer_states(optimizers: dict[str, torch.optim.Optimizer], optim: dict[str, dict[str, Any]]) -> None:
    """Give each optimizer the per-parameter states a saved run left (State.optim), by name."""
    for opt, names in _by_optimizer(optimizers):
        state = {i: optim[n] for i, n in enumerate(names) if n in optim}
        if state:
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
