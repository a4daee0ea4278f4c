"""The `dstcli` command line: a thin layer over dstcli.ops and dstcli.train.

Each command checks its flags, calls one library function and prints the result. Library errors
(DstError) become one `Error: ...` line on stderr and exit code 1; usage errors exit with 2.
Machine-readable output goes to stdout, progress and hints to stderr. DSTCLI_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dstcli import __version__
from dstcli.errors import DstError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Dynamic Subset Tuning: train, diff, apply and inspect exact sparse patches.")
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"dstcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@contextmanager
def _bytes_progress(total: int, label: str, quiet: bool = False) -> Iterator:
    """A progress bar on stderr for inputs over 64 MB; yields the library's progress callback."""
    if quiet or total < (64 << 20):
        yield None
        return
    cols = [TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda name, n: bar.advance(task, n)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def diff(
    base: Path = typer.Argument(..., help="Base checkpoint: a .safetensors file or a model directory."),
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint of the same architecture."),
    output: Path = typer.Option(..., "-o", "--output", help="Patch file to write."),
    epsilon: Optional[float] = typer.Option(None, help="Keep only this fraction of each silo (1e-7..1); default: lossless."),
    params: Optional[int] = typer.Option(None, help="Keep this many entries in all, spread over silos by size."),
    silo: str = typer.Option("tensor", help="With a budget: groups of tensor (per tensor), row (per matrix row), global (one)."),
    distance: str = typer.Option("absolute", help="With a budget: rank entries by absolute, relative or inverse-relative change."),
    include: Optional[List[str]] = typer.Option(None, help="Only tensors matching this glob (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, help="Never tensors matching this glob (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Extract a patch from BASE to FINETUNED: lossless, or projected to a budget per silo."""
    from dstcli import ops
    from dstcli.checkpoint import Checkpoint

    with _bytes_progress(Checkpoint(base).nbytes, "diff", json_out) as progress:
        header = ops.diff(base, finetuned, output, epsilon=epsilon, params=params, silo=silo, dist=distance,
                          include=include, exclude=exclude, overwrite=overwrite, progress=progress)
    size = output.stat().st_size
    k = header["changed"]
    summary = {"output": str(output), "changed": k, "base_params": header["base_params"],
               "patch_bytes": size, "bytes_per_changed": size / k if k else None,
               "budget": header["budget"].get("total")}
    if json_out:
        print(json.dumps(summary))
        return
    per = f", {size / k:.2f} bytes per changed entry" if k else ""
    budget = f" (budget {summary['budget']:,})" if summary["budget"] is not None else " (lossless)"
    out.print(f"Wrote {output}: {k:,} of {header['base_params']:,} entries changed{budget}, "
              f"{_size(size)}{per}")


@app.command()
def apply(
    base: Path = typer.Argument(..., help="Base checkpoint the patches were made for."),
    patches: List[Path] = typer.Argument(..., help="One or more patches, applied in order."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint to write (same layout as BASE)."),
    revert: bool = typer.Option(False, help="Undo the patches (BASE is the patched checkpoint); bit-exact."),
    scale: float = typer.Option(1.0, help="Apply SCALE times each change (arithmetic: not bit-exact)."),
    force: bool = typer.Option(False, help="Apply even where a tensor is not the one the patch was made for."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Apply PATCHES to BASE bit-exactly, refusing a base they were not made for."""
    from dstcli import ops
    from dstcli.checkpoint import Checkpoint

    with _bytes_progress(Checkpoint(base).nbytes, "apply", json_out) as progress:
        summary = ops.apply(base, patches, output, force=force, scale=scale, revert=revert,
                            overwrite=overwrite, progress=progress)
    if json_out:
        print(json.dumps(summary))
        return
    verb = "Reverted" if revert else "Applied"
    out.print(f"{verb} {len(patches)} patch(es): {summary['entries_changed']:,} entries in "
              f"{summary['tensors_patched']} tensors; wrote {output}")


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    return f"{v:.3g}" if isinstance(v, float) else f"{v:,}"


@app.command()
def inspect(
    patch: Path = typer.Argument(..., help="Patch file."),
    sort: str = typer.Option("name", help="Order rows by name, changed, fraction, delta_l2, delta_max or numel."),
    top: Optional[int] = typer.Option(None, help="Show only the first N rows."),
    by: str = typer.Option("tensor", help="One row per tensor, or per layer (block number in the name)."),
    all_rows: bool = typer.Option(False, "--all", help="Also list tensors the patch leaves unchanged."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (schema: docs/FORMAT.md)."),
) -> None:
    """Show which tensors a patch changes, how many entries, and by how much (header only)."""
    from dstcli import ops

    if top is not None and top < 1:
        raise DstError(f"--top {top} must be at least 1")
    info = ops.inspect(patch, sort=sort, top=None, by=by)
    rows = info["rows"] if all_rows or json_out else [r for r in info["rows"] if r["changed"]]
    info["rows"] = rows[:top] if top else rows
    if json_out:
        print(json.dumps(info, indent=2))
        return
    out.print(f"[bold]{info['path']}[/]  format v{info['format_version']} ({info['producer']}), "
              f"{_size(info['patch_bytes'])}")
    out.print(f"base fingerprint {info['base_fingerprint']}")
    out.print(f"changed {info['changed']:,} of {info['base_params']:,} parameters "
              f"(effective epsilon {info['effective_epsilon']:.3g}) in {info['tensors_changed']} of "
              f"{info['tensors']} tensors")
    b = info["budget"]
    if b:
        given = f"epsilon {b.get('epsilon')}" if b.get("epsilon") is not None else f"params {b.get('params')}"
        out.print(f"budget {given}, silo {b.get('silo')}, distance {b.get('distance')}: total {b.get('total')}")
    metrics = info["run"].get("metrics")
    if metrics:
        out.print("metrics " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
    table = Table(box=None, header_style="bold")
    for col in ("name" if by == "tensor" else "layer", "changed", "budget", "numel", "fraction", "delta L2", "max |delta|"):
        first = col in ("name", "layer")  # names stay whole: they are what users copy into --include
        table.add_column(col, justify="left" if first else "right", no_wrap=first,
                         min_width=max((len(r["name"]) for r in info["rows"]), default=4) if first else None)
    for r in info["rows"]:
        table.add_row(r["name"], _fmt(r["changed"]), "-" if r["budget"] is None else _fmt(r["budget"]),
                      _fmt(r["numel"]), f"{r['fraction']:.2e}", _fmt(r["delta_l2"]), _fmt(r["delta_max"]))
    out.print(table)


def _load_config_file(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from dstcli.train import TrainOptions

    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DstError(f"cannot read config file {path}: {e}") from e
    conf = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(conf) - TrainOptions.keys())
    if unknown:
        raise DstError(f"{path}: unknown key(s) {', '.join(unknown)}; keys are the train options, "
                       "e.g. epsilon, lr, steps")
    return conf


@app.command()
def train(
    ctx: typer.Context,
    base: Optional[str] = typer.Argument(None, help="Model directory (dstcli-gpt or Hugging Face), or a bundled sample name (default: tiny-gpt)."),
    data: Optional[Path] = typer.Argument(None, help="JSONL of {text}, {prompt, completion} or {messages} rows (default: bundled pytype task)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A local Hugging Face model directory to train (needs dstcli[hf]); same as giving it as BASE."),
    output: Path = typer.Option(Path("dstcli-patch.dst"), "-o", "--output", help="Patch file to write."),
    epsilon: Optional[float] = typer.Option(None, help="Fraction of each silo that may differ from the seed (default 1e-3); larger adapts more, patch grows."),
    params: Optional[int] = typer.Option(None, help="Exact number of parameters that may differ, spread over silos by size (instead of --epsilon)."),
    silo: str = typer.Option("tensor", help="Budget groups: tensor (spreads change over modules), row (finer), global (lets a few tensors take all)."),
    distance: str = typer.Option("absolute", help="Which entries count as farthest: absolute, relative or inverse-relative change."),
    reselect_every: str = typer.Option("1", help="Re-choose the kept set every R steps; 'never' fixes it after step 1 (static sparse tuning)."),
    include: Optional[List[str]] = typer.Option(None, help="Train only tensors matching this glob (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, help="Never train tensors matching this glob (repeatable), e.g. '*wte*'."),
    optimizer: str = typer.Option("adamw", help="adamw (default), adafactor (less optimizer memory) or sgd (momentum 0.9)."),
    lr: float = typer.Option(1e-2, help="Peak learning rate; DST wants ~10x full fine-tuning's, as resets regularise."),
    weight_decay: float = typer.Option(0.0, help="Decoupled weight decay; pulls kept entries towards 0, not the seed."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 600 unless --epochs is given); more adapts further, costs time."),
    epochs: Optional[float] = typer.Option(None, help="Passes over DATA instead of --steps."),
    batch_size: int = typer.Option(16, help="Examples per micro-batch; larger is smoother but slower per step."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step: a larger batch at the same memory."),
    seq_len: int = typer.Option(128, help="Longest example in tokens; longer rows keep their end."),
    warmup: int = typer.Option(20, help="Linear warm-up steps before the cosine decay."),
    clip: float = typer.Option(1.0, help="Gradient-norm clipping (0 turns it off)."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help="Validation JSONL (default with the bundled task: its valid split)."),
    eval_every: int = typer.Option(0, help="Evaluate every N steps (0: only before and after); costs time."),
    seed: int = typer.Option(0, help="Random seed: the same seed on CPU gives the same patch bytes."),
    device: str = typer.Option("auto", help="auto (cuda if present), cpu or cuda."),
    dtype: str = typer.Option("auto", help="Compute precision (autocast): auto, float32, bfloat16, float16; weights keep the checkpoint's dtype."),
    metrics: Optional[Path] = typer.Option(None, help="Write one JSON line per step (loss, lr, changed, churn, eval) here."),
    config: Optional[Path] = typer.Option(None, help="TOML file whose keys are these options; flags given here win."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    gradient_checkpointing: bool = typer.Option(False, help="Hugging Face models: recompute activations in backward; less memory, ~30% slower."),
    save_every: int = typer.Option(0, help="Save a resumable state every N steps (a kill loses at most N); Ctrl-C always saves."),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="Where the resumable state goes (default OUTPUT.state); removed when the run finishes."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run saved in this state directory, with its options."),
    max_bad_steps: int = typer.Option(5, help="Skip steps with NaN/inf loss or gradients; stop after this many in a row."),
    strategy: str = typer.Option("none", help="Under torchrun: ddp (a full replica per process) or fsdp (parameters sharded over processes)."),
    bucket: Optional[int] = typer.Option(None, help="Entries per optimizer call and projection, in largest tensors (default 4 on a GPU; on the CPU 16 with the base memory-mapped, else 1): larger is faster, costs scratch on a GPU (~13 bytes an entry) or with snapshots; same patch."),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
) -> None:
    """Fine-tune BASE on DATA with Dynamic Subset Tuning; write the result as a sparse patch."""
    from dstcli.train import Stopped, TrainOptions, resume_options, train as run_train

    values = dict(ctx.params)
    values["eval"] = values.pop("eval_file")  # the --eval option is named eval_file in the signature
    if model is not None:  # `train --model DIR DATA`: the one positional given is DATA
        if data is not None:
            raise DstError("give the model either as BASE or with --model, not both")
        if not (model / "config.json").is_file():
            raise DstError(f"--model {model} is not a model directory (no config.json): pass a local Hugging "
                           "Face model directory saved with save_pretrained")
        from dstcli.hf import is_hf_dir
        if not is_hf_dir(model):
            raise DstError(f"--model {model} is not a Hugging Face model directory: pass it as BASE instead")
        values["data"], values["base"] = values["base"], str(model)
    given = {"eval" if k == "eval_file" else k for k in ctx.params
             if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}  # typed by the user
    if config is not None:
        values.update({k: v for k, v in _load_config_file(config).items() if k not in given})
    r = str(values["reselect_every"]).lower()
    if r in ("never", "inf", "none"):
        values["reselect_every"] = None
    elif r.isdigit() and int(r) >= 1:
        values["reselect_every"] = int(r)
    else:
        raise DstError(f"--reselect-every {r!r} must be a positive whole number or 'never'")
    for k in ("data", "output", "eval", "metrics", "checkpoint_dir"):
        values[k] = str(values[k]) if values[k] is not None else None
    for k in ("include", "exclude"):
        values[k] = list(values[k]) if values[k] else None
    if resume is not None:  # the saved run's options; flags given here may only repeat them
        opts = resume_options(resume, {k: values[k] for k in given if k in TrainOptions.keys()})
    else:
        opts = TrainOptions(**{k: v for k, v in values.items() if k in TrainOptions.keys()})

    cols = [TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    bar = Progress(*cols, console=err, transient=True, disable=json_out and not err.is_terminal)
    task = None

    def on_step(r: dict) -> None:  # the bar starts with the first step, so early errors print alone
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("train", total=r["steps"], info="")
        if "skipped" in r:
            err.print(f"Warning: step {r['step']} skipped: {r['skipped']} ({r['bad_in_a_row']} in a row)",
                      markup=False, highlight=False)
            bar.update(task, completed=r["step"])
            return
        info = (f"loss {r['loss']:.3f} lr {r['lr']:.1e} changed {r['nonseed']:,} "
                f"churn +{r['entered']}/-{r['left']} {r['tokens_per_s']:,.0f} tok/s")
        bar.update(task, completed=r["step"], info=info)

    try:
        result = run_train(opts, on_step=on_step, resume=resume)
    except Stopped as e:
        if task is not None:
            bar.stop()
        err.print(f"Stopped: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    finally:
        if task is not None:
            bar.stop()

    if result.output is None:  # another rank of a distributed run: rank 0 reports
        return
    summary = {"output": str(result.output), "patch_bytes": result.patch_bytes, "steps": result.steps,
               "seconds": round(result.seconds, 1), "budget": result.budget, "changed": result.changed,
               "trainable_params": result.trainable, "base": result.base_metrics, "tuned": result.final_metrics}
    if json_out:
        print(json.dumps(summary))
        return
    table = Table(title="validation", box=None, header_style="bold")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("DST-tuned", justify="right")
    for k in result.final_metrics:
        table.add_row(k, f"{result.base_metrics.get(k, float('nan')):.4f}", f"{result.final_metrics[k]:.4f}")
    out.print(table)
    silos = Table(title="changed entries, top tensors", box=None, header_style="bold")
    for col in ("tensor", "changed", "budget"):
        silos.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
    for name, changed, budget in result.per_tensor[:8]:
        silos.add_row(name, f"{changed:,}", f"{budget:,}" if budget else "-")
    out.print(silos)
    out.print(f"{result.changed:,} of {result.trainable:,} trainable parameters changed (budget {result.budget:,}) "
              f"in {result.steps} steps, {result.seconds:.0f} s; wrote {result.output} ({_size(result.patch_bytes)})")


def main() -> None:
    try:
        app()
    except DstError as e:
        if os.environ.get("DSTCLI_DEBUG"):
            raise
        err.print(f"Error: {e}", markup=False, highlight=False, soft_wrap=True)
        _exit(1)
    except KeyboardInterrupt:
        err.print("Error: interrupted; no output was written", markup=False)
        _exit(130)
    except SystemExit as e:  # typer ends every command this way
        _exit(e.code)


def _exit(code: int | str | None) -> None:
    """sys.exit, except in a process of a distributed run: the output is complete and flushed
    there, and interpreter shutdown can abort on the gloo threads torch leaves running
    (dstcli.distributed.joined), so such a process leaves at once."""
    dist = sys.modules.get("dstcli.distributed")
    if dist is None or not dist.joined():
        sys.exit(code)
    if isinstance(code, str):
        err.print(code, markup=False, highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if isinstance(code, str) else code or 0)


if __name__ == "__main__":
    main()
