"""The `dstcli train` recipe: fine-tune a checkpoint with DST and write the result as a patch.

`TrainOptions` holds the recipe's settings; `train()` turns them into plain arguments for the
model, the data and the DST engine, runs the loop and returns a `TrainResult`. Progress is
reported through a callback so that this module never touches the terminal.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn import functional as F

from dstcli.checkpoint import Checkpoint, check_output
from dstcli.dtypes import bits_view, dtype_name
from dstcli.data import Example, collate, read_jsonl, read_rows
from dstcli.distributed import STRATEGIES, Dist
from dstcli.distributed import init as init_distributed
from dstcli.engine import DST, bucket_optimizers
from dstcli.errors import DstError
from dstcli.hf import is_hf_dir
from dstcli.model import GPT, encode, load_config
from dstcli.patchfile import Change, save_patch
from dstcli.resume import file_digest, load_optimizer_states, load_state, save_state, state_step
from dstcli.select import DISTANCES
from dstcli.silos import SILOS, check_budget, select_names

OPTIMIZERS = ("adamw", "adafactor", "sgd")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE = "tiny-gpt"
DEFAULT_STEPS = 600  # enough for the bundled task at epsilon 1e-3 (BENCHMARKS.md)


def samples_dir() -> Path:
    """Where the bundled samples live: inside the installed package, or samples/ in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "samples", here.parent / "samples"):
        if (cand / SAMPLE / "model.safetensors").is_file():
            return cand
    raise DstError("the bundled sample model is missing from this installation: reinstall dstcli")


@dataclass
class TrainOptions:
    base: str | None = None  # checkpoint dir, or the name of a bundled sample (default tiny-gpt)
    data: str | None = None  # JSONL; default: the bundled pytype task's train split
    output: str = "dstcli-patch.dst"
    epsilon: float | None = None
    params: int | None = None
    silo: str = "tensor"
    distance: str = "absolute"
    reselect_every: int | None = 1  # None: select once (static sparse tuning)
    include: list[str] | None = None
    exclude: list[str] | None = None
    optimizer: str = "adamw"
    lr: float = 1e-2
    weight_decay: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    warmup: int = 20
    clip: float = 1.0
    eval: str | None = None  # JSONL; default with the bundled task: its validation split
    eval_every: int = 0  # 0: only before and after training
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    metrics: str | None = None
    overwrite: bool = False
    gradient_checkpointing: bool = False  # Hugging Face models: recompute activations, less memory
    save_every: int = 0  # save a resumable state every N steps (0: only on Ctrl-C / SIGTERM)
    checkpoint_dir: str | None = None  # where the state goes; default OUTPUT.state
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    strategy: str = "none"  # ddp or fsdp under torchrun (dstcli.distributed)
    bucket: int | None = None  # largest tensors' worth of entries per optimizer call (DST.buckets); None: its default

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class TrainResult:
    output: Path | None  # None on the processes of a distributed run other than rank 0
    patch_bytes: int
    steps: int
    seconds: float
    base_metrics: dict[str, float]
    final_metrics: dict[str, float]
    budget: int
    changed: int
    trainable: int
    per_tensor: list[tuple[str, int, int]]  # (name, changed, budget)
    model: Any = None  # the trained model itself, for library callers


def _validate(o: TrainOptions) -> None:
    if o.epsilon is None and o.params is None:
        o.epsilon = 1e-3
    check_budget(o.epsilon, o.params)
    for value, allowed, flag in ((o.silo, SILOS, "--silo"), (o.distance, DISTANCES, "--distance"),
                                 (o.optimizer, OPTIMIZERS, "--optimizer"), (o.device, DEVICES, "--device"),
                                 (o.dtype, tuple(DTYPES), "--dtype"), (o.strategy, STRATEGIES, "--strategy")):
        if value not in allowed:
            raise DstError(f"unknown {flag} {value!r}: choose one of {', '.join(allowed)}")
    for value, flag in ((o.batch_size, "--batch-size"), (o.grad_accum, "--grad-accum"), (o.seq_len, "--seq-len")):
        if value < 1:
            raise DstError(f"{flag} must be at least 1, got {value}")
    if o.steps is not None and o.epochs is not None:
        raise DstError("give --steps or --epochs, not both")
    if (o.steps is not None and o.steps < 1) or (o.epochs is not None and o.epochs <= 0):
        raise DstError("--steps/--epochs must be positive")
    if o.save_every < 0 or o.max_bad_steps < 1:
        raise DstError("--save-every must be 0 or more and --max-bad-steps at least 1")
    if o.strategy != "none" and o.save_every:
        raise DstError(f"--save-every is not supported with --strategy {o.strategy} yet: drop it, or train "
                       "in one process to get resumable states")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise DstError(f"--lr {o.lr} must be a positive number")
    if o.bucket is not None and o.bucket < 1:
        raise DstError(f"--bucket must be at least 1 (largest tensors per bucket), got {o.bucket}")


def _resolve_base(base: str | None) -> Path:
    """The checkpoint to train: a model directory, a .safetensors file with config.json beside it,
    or a bundled sample's name."""
    if base is None or base == SAMPLE:
        return samples_dir() / SAMPLE
    path = Path(base)
    if not path.exists():
        raise DstError(f"base {base} does not exist: pass a checkpoint directory (config.json + "
                       f"model.safetensors), a .safetensors file with config.json beside it, or {SAMPLE!r}")
    return path


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DstError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return torch.device(name)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """The learning rate at `step` (1-based) of `steps`: linear warm-up, then cosine decay."""
    return peak * min(1.0, step / max(1, warmup)) * (0.5 * (1 + math.cos(math.pi * (step - 1) / steps)))


def _optimizers(name: str, named: dict[str, torch.nn.Parameter], buckets: list[list[str]], lr: float,
                wd: float) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per bucket of consecutive tensors (DST.buckets: at most the largest tensor's
    entries each), so the DST engine can project each bucket right after its own update without a
    copy of the seed. Every optimizer here updates each tensor independently, so this is the same
    arithmetic as one optimizer over all of them (tests/test_engine.py checks it)."""
    def make(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if name == "adamw":  # on a GPU the fused kernel: one launch per bucket, not one per op
            return torch.optim.AdamW(ps, lr=lr, weight_decay=wd, fused=True if ps[0].is_cuda else None)
        if name == "sgd":
            return torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=wd)
        return torch.optim.Adafactor(ps, lr=lr, weight_decay=wd)
    return bucket_optimizers(buckets, named, make)


@torch.no_grad()
def evaluate(model: GPT, examples: list[Example], device: torch.device, amp: torch.dtype | None,
             batch_size: int = 64) -> dict[str, float]:
    """Mean loss per target token, and exact-match accuracy of greedy answers on prompt rows."""
    was = model.training
    model.eval()
    tot, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        x, y = collate(examples[s:s + batch_size], device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        tot += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    metrics = {"loss": tot / max(count, 1)}
    qa = [e for e in examples if e.prompt is not None]
    if qa:
        by_len: dict[int, list[Example]] = defaultdict(list)  # same-length prompts decode as one batch
        for e in qa:
            by_len[len(encode(e.prompt))].append(e)
        correct = 0
        for group in by_len.values():
            for s in range(0, len(group), batch_size):
                chunk = group[s:s + batch_size]
                ids = torch.tensor([encode(e.prompt) for e in chunk], device=device)
                ids = ids[:, -model.config.block_size + 1:]
                n_new = max(len(encode(e.completion)) for e in chunk)
                for _ in range(n_new):
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        nxt = model(ids[:, -model.config.block_size:])[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, nxt], dim=1)
                for e, row in zip(chunk, ids[:, ids.shape[1] - n_new:].tolist()):
                    want = encode(e.completion)
                    correct += row[:len(want)] == want
        metrics["accuracy"] = correct / len(qa)
    model.train(was)
    return metrics


@dataclass
class _Setup:
    """What the loop needs from a model family: the model, its parameters by checkpoint key, the
    examples, and how to batch them, score a batch and evaluate."""
    model: torch.nn.Module
    named: dict[str, torch.nn.Parameter]
    train_rows: list
    eval_rows: list | None
    collate: Callable[[list, torch.device], tuple[dict[str, torch.Tensor], int]]
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    evaluate: Callable[..., dict[str, float]]
    targets: Callable[[dict[str, torch.Tensor]], int]  # how many tokens a batch's loss averages over


def _gpt_collate(batch: list[Example], device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    x, y = collate(batch, device)
    return {"x": x, "y": y}, x.numel()


def _gpt_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(inputs["x"])
    return F.cross_entropy(logits.float().flatten(0, 1), inputs["y"].flatten(), ignore_index=-100)


def _gpt_setup(base_dir: Path, ckpt: Checkpoint, o: TrainOptions, data_path: Path, eval_path: Path | None,
               device: torch.device) -> _Setup:
    """The bundled byte-level GPT architecture (config.json with model_type dstcli-gpt)."""
    if o.gradient_checkpointing:
        raise DstError("--gradient-checkpointing is for Hugging Face models; the bundled GPT is small enough without")
    cfg = load_config(base_dir if base_dir.is_dir() else base_dir.parent)
    model = GPT(cfg)
    state = {name: ckpt.read(name) for name in ckpt.tensors}
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise DstError(f"{base_dir} does not match its config.json: tensors {sorted(missing)[:5]} differ")
    for name, p in model.named_parameters():  # weights keep the checkpoint's dtype (bf16 stays bf16)
        p.data = p.data.to(state[name].dtype)
    model.load_state_dict(state, strict=True)
    model.to(device)
    o.seq_len = min(o.seq_len, cfg.block_size - 1)
    return _Setup(model, dict(model.named_parameters()), read_jsonl(data_path, o.seq_len),
                  read_jsonl(eval_path, o.seq_len) if eval_path else None, _gpt_collate, _gpt_loss, evaluate,
                  lambda inputs: int((inputs["y"] != -100).sum()))


def _hf_setup(base_dir: Path, ckpt: Checkpoint, o: TrainOptions, data_path: Path, eval_path: Path | None,
              device: torch.device) -> _Setup:
    """A Hugging Face model directory (see dstcli.hf): its own tokenizer, loss and safetensors keys."""
    from dstcli import hf

    hm = hf.load(base_dir, set(ckpt.tensors))
    for key, p in hm.named.items():  # the seed must be the file's bits, or the patch would not apply
        stored = ckpt.read(key)
        if stored.dtype != p.dtype or stored.shape != p.shape or not torch.equal(
                bits_view(stored), bits_view(p.detach().cpu().contiguous())):
            raise DstError(f"transformers loaded {key!r} as something other than what {base_dir} stores "
                           f"({dtype_name(p.dtype)}{list(p.shape)} vs {dtype_name(stored.dtype)}{list(stored.shape)}): "
                           "save the model with save_pretrained in the dtype you train in")
    if o.gradient_checkpointing:  # transformers 5 renamed it; 4.x has only the old name
        enable = getattr(hm.model, "activation_checkpointing_enable", None) or hm.model.gradient_checkpointing_enable
        enable()
    model = hm.model.to(device)
    model.train()
    pad = hm.tokenizer.pad_token_id

    def rows(path: Path) -> list:
        return hf.encode_rows(read_rows(path), hm, o.seq_len, path)

    def evaluate_hf(model, examples, device, amp, batch_size: int = 32) -> dict[str, float]:
        was = model.training
        model.eval()
        tot, count = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(examples), batch_size):
                inputs, _ = hf.collate(examples[s:s + batch_size], pad, device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    n = hf.label_count(inputs, hm.seq2seq)
                    tot += hf.loss(model, inputs).item() * n
                count += n
        model.train(was)
        return {"loss": tot / max(count, 1)}

    return _Setup(model, hm.named, rows(data_path), rows(eval_path) if eval_path else None,
                  lambda batch, dev: hf.collate(batch, pad, dev), hf.loss, evaluate_hf,
                  lambda inputs: hf.label_count(inputs, hm.seq2seq))


class Stopped(DstError):
    """The run was stopped by Ctrl-C or SIGTERM after saving its state (not a failure)."""


# options that change where things go or how fast, not what is trained: left out of the patch
# header so that a resumed run and an uninterrupted one write the same bytes
_NEUTRAL = {"output", "metrics", "overwrite", "save_every", "checkpoint_dir", "bucket"}


def _seed(ckpt: Checkpoint, names: list[str], device: torch.device, dd: Dist) -> dict[str, torch.Tensor] | str:
    """The engine's seed: on the CPU, the base's tensors memory-mapped (Checkpoint.mapped), which
    the kernels read in place of a snapshot of each bucket before its optimizer step (the same
    bits; on a 25M model at epsilon 1e-1, 3-7 ms a step less, see BENCHMARKS.md), the model's
    parameters holding exactly their bits, dtypes and shapes (both setups load them from it; DST
    checks it). Else, and with DSTCLI_MAP_SEED=0, "none": snapshots (FSDP holds slices; a GPU
    reads its own memory; Checkpoint.mapped says None where a tensor cannot be mapped)."""
    if device.type != "cpu" or dd.strategy == "fsdp" or os.environ.get("DSTCLI_MAP_SEED") == "0":
        return "none"
    seed = ckpt.mapped(names)
    return "none" if seed is None else seed


def _changes(dst: DST, ckpt: Checkpoint, names: list[str], dd: Dist | None = None) -> list[Change] | None:
    """The patch entries: the trained tensors' changes, and every other patchable tensor as
    unchanged. Under FSDP every process must call this; only rank 0 gets the list."""
    if dd is not None and dd.strategy == "fsdp":
        changes = _sharded_changes(dst, ckpt, names, dd)
    elif dd is None or dd.main:
        changes = dst.changes()
    else:
        return None
    if changes is None:
        return None
    for name in ckpt.tensors:  # tensors not trained are listed as unchanged
        if name not in names and ckpt.tensors[name].patchable:
            t = ckpt.read(name)
            changes.append(Change.between(name, t, t))
    return changes


def _sharded_changes(dst: DST, ckpt: Checkpoint, names: list[str], dd: Dist) -> list[Change] | None:
    """FSDP: each process sends its kept entries (global positions and value bits, O(k)); rank 0
    writes them into the base tensor read from the checkpoint, one tensor at a time."""
    out = []
    for name in names:
        kept = dst.kept[name]
        local = dst.params[name].detach().reshape(-1)
        bits = bits_view(local[kept.idx].contiguous()).to(torch.int64)  # bits travel as int64: any width
        pos, bits = dd.gather(kept.idx + dst.shards[name][1], bits)
        if dd.main:
            base = ckpt.read(name)
            new = base.clone()
            flat = bits_view(new).view(-1)
            flat[pos.cpu()] = bits.cpu().to(flat.dtype)
            out.append(Change.between(name, base, new, silo=dst.silo_info(name)))
    return out if dd.main else None


def checkpoint_dir(o: TrainOptions) -> Path:
    return Path(o.checkpoint_dir) if o.checkpoint_dir else Path(f"{o.output}.state")


def resume_options(state_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainOptions:
    """The options of a saved run; `overrides` may only repeat them or change where output goes."""
    st = load_state(state_dir)
    saved = TrainOptions(**{k: v for k, v in st.options.items() if k in TrainOptions.keys()})
    for k, v in (overrides or {}).items():
        if k in _NEUTRAL:
            setattr(saved, k, v)
        elif getattr(saved, k) != v:
            raise DstError(f"--{k.replace('_', '-')} {v!r} differs from the resumed run's {getattr(saved, k)!r}: "
                           "a resumed run keeps its options; drop the flag, or start a new run")
    saved.checkpoint_dir = str(state_dir)
    return saved


def train(o: TrainOptions, on_step: Callable[[dict[str, Any]], None] | None = None, *,
          resume: str | Path | None = None) -> TrainResult:
    """Run DST fine-tuning as configured and write the patch to o.output (atomically).

    With `resume`, continue the run saved in that state directory (see `resume_options`): the
    final patch is byte-identical to the one an uninterrupted run writes (on CPU). The state is
    saved every `o.save_every` steps, on Ctrl-C / SIGTERM (then `Stopped` is raised), and before
    stopping on `o.max_bad_steps` non-finite steps in a row; it is removed after a finished run.
    """
    _validate(o)
    if o.strategy != "none" and resume is not None:
        raise DstError(f"--resume is not supported with --strategy {o.strategy} yet: resume in one process")
    st = load_state(resume) if resume is not None else None
    base_dir = _resolve_base(o.base)
    default_task = o.data is None
    data_path = Path(o.data) if o.data else samples_dir() / "pytype" / "train.jsonl"
    eval_path = Path(o.eval) if o.eval else (samples_dir() / "pytype" / "valid.jsonl" if default_task else None)
    out = Path(o.output)
    check_output(out, o.overwrite, [base_dir, data_path])
    state_dir = checkpoint_dir(o)
    dd = init_distributed(o.strategy, o.device)
    if dd.active and o.batch_size % dd.world:
        raise DstError(f"--batch-size {o.batch_size} (the global batch) must split evenly over {dd.world} processes")
    device = dd.device if dd.active else _device(o.device)
    amp = DTYPES[o.dtype] if o.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else None)
    if amp == torch.float32:
        amp = None

    ckpt = Checkpoint(base_dir)
    setup = (_hf_setup if is_hf_dir(base_dir) else _gpt_setup)(base_dir, ckpt, o, data_path, eval_path, device)
    model, train_rows, eval_rows = setup.model, setup.train_rows, setup.eval_rows
    data_digest = file_digest(data_path)

    torch.manual_seed(o.seed)
    gen = torch.Generator().manual_seed(o.seed)
    named = setup.named  # checkpoint key -> parameter
    names = select_names(list(named), o.include, o.exclude)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        named[n].requires_grad_(True)
    run_model, named = dd.wrap(model, named)  # DDP wraps the model, FSDP shards its parameters in place
    trainable = [named[n] for n in names]
    budget_args = dict(epsilon=o.epsilon, params=o.params, silo=o.silo, distance=o.distance,
                       reselect_every=o.reselect_every, seed=_seed(ckpt, names, device, dd))
    if dd.strategy == "fsdp":  # the engine works on this process's slices
        local = {n: dd.shard(named[n]) for n in names}
        dst = DST([(n, local[n][0]) for n in names], **budget_args,
                  shards={n: (tuple(named[n].shape), local[n][1]) for n in names}, gather=dd.gather)
    else:
        dst = DST([(n, named[n]) for n in names], **budget_args)
    opts = _optimizers(o.optimizer, named, dst.buckets(tensors=o.bucket), o.lr, o.weight_decay)

    if o.steps is not None:
        steps = o.steps
    elif o.epochs is not None:
        steps = max(1, math.ceil(o.epochs * len(train_rows) / (o.batch_size * o.grad_accum)))
    else:
        steps = DEFAULT_STEPS
    order: list[int] = []
    first = 1
    if st is not None:
        if st.info.get("data") != data_digest:
            raise DstError(f"{data_path} is not the dataset the saved run trained on: resume with the same file")
        if set(st.kept) != set(names):
            raise DstError(f"the saved run trained other tensors than {base_dir} offers: resume on the same base")
        dst.restore(st.kept, st.step, st.values)
        load_optimizer_states(opts, st.optim)
        torch.set_rng_state(st.rng["torch"])
        gen.set_state(st.rng["data"])
        if "cuda" in st.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(st.rng["cuda"])
        order, first = st.order, st.step + 1
        base_metrics = st.info.get("base_metrics", {})
    else:
        base_metrics = setup.evaluate(model, eval_rows, device, amp) if eval_rows else {}
    last = st.info.get("metrics", base_metrics) if st else base_metrics

    def save(step: int) -> None:
        rng = {"torch": torch.get_rng_state(), "data": gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        save_state(state_dir, step=step, options=asdict(o), changes=_changes(dst, ckpt, names),
                   kept={n: (k.idx, named[n].detach().reshape(-1)[k.idx]) for n, k in dst.kept.items()},
                   optimizers=opts, rng=rng, order=order,
                   info={"data": data_digest, "base_metrics": base_metrics, "metrics": last},
                   base_params=ckpt.numel)

    stop: list[int] = []

    def on_signal(signum, frame) -> None:  # first signal: finish the step, save, stop; second: now
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread() and not dd.active:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)
    metrics_file = open(o.metrics, "a" if st else "w") if o.metrics and dd.main else None
    if not dd.main:
        on_step = None
    t0 = time.time()
    bad_run = 0
    try:
        for step in range(first, steps + 1):
            lr = lr_at(step, steps, o.lr, o.warmup)
            for opt in {id(x): x for x in opts.values()}.values():
                for g in opt.param_groups:
                    g["lr"] = lr
            tokens, loss_sum, bad = 0, 0.0, None
            for _ in range(o.grad_accum):
                if len(order) < o.batch_size:
                    order += torch.randperm(len(train_rows), generator=gen).tolist()
                batch = [train_rows[i] for i in order[:o.batch_size]]
                del order[:o.batch_size]
                if bad:
                    continue  # keep the data position as if the step had run
                inputs, n_tokens = setup.collate(dd.split(batch), device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = setup.loss(run_model, inputs)
                value, scale = loss.item(), 1.0
                if dd.active:  # every rank's share of the mean over the global batch's targets
                    mine = setup.targets(inputs)
                    total, summed = dd.sum([mine, value * mine if mine else 0.0])
                    value, scale = summed / max(total, 1), mine * dd.world / max(total, 1)
                    n_tokens *= dd.world
                if not math.isfinite(value):
                    bad = f"loss {value}"
                    continue
                (loss * (scale / o.grad_accum)).backward()
                loss_sum += value / o.grad_accum
                tokens += n_tokens
            if bad is None:
                norm = torch.nn.utils.clip_grad_norm_(trainable, o.clip if o.clip > 0 else math.inf)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
                if not torch.isfinite(norm):
                    bad = f"gradient norm {norm.item()}"
            if bad:
                model.zero_grad(set_to_none=True)
                bad_run += 1
                record = {"step": step, "steps": steps, "skipped": bad, "bad_in_a_row": bad_run}
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                if on_step:
                    on_step(record)
                if bad_run >= o.max_bad_steps:
                    if not dd.active:
                        save(step)
                    where = "" if dd.active else f" and its last good state is in {state_dir}"
                    raise DstError(f"{bad} at step {step}, {bad_run} steps in a row were skipped: the run "
                                   f"stopped{where}; lower --lr (now {o.lr}) or use --dtype float32 and train again")
                continue
            bad_run = 0
            stats = dst.step(opts)  # each bucket: its optimizer step, then its tensors' projection
            model.zero_grad(set_to_none=True)
            nonseed, entered, left, nonfinite = stats.nonseed, stats.entered, stats.left, dst.nonfinite()
            if dd.strategy == "fsdp":  # each process counted its own slices
                nonseed, entered, left, nonfinite = (int(v) for v in dd.sum([nonseed, entered, left, nonfinite]))
            elif stats.reselected:
                dd.check_same(f"the kept set at step {step}", [k.idx for k in dst.kept.values()])
            if nonfinite:
                raise DstError(f"parameters became NaN or infinite at step {step}: lower --lr (now {o.lr}) "
                               "or use --dtype float32" + (f"; the last saved state is in {state_dir}"
                                                           if state_dir.exists() else ""))
            record = {"step": step, "steps": steps, "loss": loss_sum, "lr": lr, "nonseed": nonseed,
                      "entered": entered, "left": left,
                      "tokens_per_s": tokens * (step - first + 1) / max(time.time() - t0, 1e-9)}
            if eval_rows and ((o.eval_every and step % o.eval_every == 0) or step == steps):
                last = setup.evaluate(model, eval_rows, device, amp)
                record.update({f"eval_{k}": v for k, v in last.items()})
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if on_step:
                on_step(record)
            if stop and step < steps:
                save(step)
                raise Stopped(f"stopped at step {step} of {steps}; the state is saved in {state_dir}: "
                              f"continue with `dstcli train --resume {state_dir}`")
            if o.save_every and step % o.save_every == 0 and step < steps:
                save(step)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        if metrics_file:
            metrics_file.close()
    seconds = time.time() - t0

    run = {"command": "train", "config": {k: v for k, v in asdict(o).items() if k not in _NEUTRAL},
           "base": str(base_dir), "data": str(data_path), "eval": str(eval_path) if eval_path else None,
           "steps": steps, "base_metrics": base_metrics, "metrics": last,
           "torch": torch.__version__, "python": sys.version.split()[0]}
    budget = {"epsilon": o.epsilon, "params": o.params, "silo": o.silo, "distance": o.distance,
              "total": dst.budget, "trainable_params": sum(p.numel() for p in trainable),
              "reselect_every": o.reselect_every}
    if dd.strategy == "ddp":
        dd.check_same("the trained values", [named[n].detach().reshape(-1)[k.idx] for n, k in dst.kept.items()])
    changes = _changes(dst, ckpt, names, dd)
    header = save_patch(out, changes, run=run, budget=budget, base_params=ckpt.numel) if dd.main else None
    dd.barrier()  # rank 0 has written the patch
    dd.close()
    if header is None:  # the other ranks of a distributed run
        return TrainResult(None, 0, steps, seconds, base_metrics, last, dst.budget, 0, budget["trainable_params"],
                           [], model)
    if state_step(state_dir) is not None:
        shutil.rmtree(state_dir, ignore_errors=True)  # finished: the patch is the result
    per_tensor = sorted(((n, e["changed"], e.get("silo", {}).get("budget", 0)) for n, e in header["tensors"].items()),
                        key=lambda r: -r[1])
    return TrainResult(out, out.stat().st_size, steps, seconds, base_metrics, last, dst.budget,
                       header["changed"], budget["trainable_params"], per_tensor, model)
