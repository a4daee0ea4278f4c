"""Rebuild the bundled sample: pretrain samples/tiny-gpt and write the samples/pytype task.

    python samples/make_sample.py            # about 15 minutes on 2 CPU cores

Pretraining text is the running Python's own standard library (the top-level *.py modules under
sysconfig's stdlib path), so nothing is downloaded. Files are split by a hash of their name into
train (95%) and held-out (5%). Everything is seeded; the same Python and torch give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from dstcli.model import GPT, GPTConfig, save_model

HERE = Path(__file__).resolve().parent


def stdlib_corpus() -> tuple[bytes, bytes]:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        bucket = int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 20
        (held if bucket == 0 else train).append(data)
    return b"\n".join(train), b"\n".join(held)


def batches(data: torch.Tensor, batch: int, block: int, gen: torch.Generator):
    while True:
        ix = torch.randint(len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + block] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
        yield x.long(), y.long()


@torch.no_grad()
def held_out_loss(model: GPT, data: torch.Tensor, block: int, n: int = 64) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1)
    x, y = next(batches(data, n, block, gen))
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return loss


# --- the downstream task: name the type of a Python literal, REPL style ---------------------------
def _literal(rng: random.Random) -> tuple[str, str]:
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 6)))
    num = lambda: str(rng.randint(-99, 999))
    kind = rng.choice(["int", "float", "str", "bytes", "list", "tuple", "dict", "set", "bool",
                       "NoneType", "complex"])
    if kind == "int":
        text = rng.choice([num(), hex(rng.randint(0, 4095)), f"{rng.randint(1, 9)}_000", f"({num()})"])
    elif kind == "float":
        text = rng.choice([f"{rng.randint(0, 99)}.{rng.randint(0, 99)}", f"{rng.randint(1, 9)}e-{rng.randint(1, 9)}",
                           f".{rng.randint(1, 9)}", f"{rng.randint(1, 99)}."])
    elif kind == "str":
        text = rng.choice([f"'{word()}'", f'"{word()}"', "''"])
    elif kind == "bytes":
        text = rng.choice([f"b'{word()}'", f'b"{word()}"'])
    elif kind == "list":
        text = "[" + ", ".join(num() for _ in range(rng.randint(0, 3))) + "]"
    elif kind == "tuple":
        items = [num() for _ in range(rng.randint(0, 3))]
        text = "(" + (items[0] + "," if len(items) == 1 else ", ".join(items)) + ")"
    elif kind == "dict":
        text = "{" + ", ".join(f"'{word()}': {num()}" for _ in range(rng.randint(0, 2))) + "}"
    elif kind == "set":
        text = "{" + ", ".join(num() for _ in range(rng.randint(1, 3))) + "}"
    elif kind == "bool":
        text = rng.choice(["True", "False"])
    elif kind == "NoneType":
        text = "None"
    else:
        text = rng.choice([f"{rng.randint(1, 9)}j", f"({num()}+{rng.randint(1, 9)}j)"])
    assert type(eval(text)).__name__ == kind, text  # the label is what Python itself says
    return text, kind


def write_task(out: Path, n_train: int = 2000, n_valid: int = 300) -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows = []
        while len(rows) < n:
            text, kind = _literal(rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"prompt": f">>> type({text}).__name__\n", "completion": f"'{kind}'\n"})
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=HERE / "tiny-gpt")
    args = ap.parse_args()

    write_task(HERE / "pytype")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    train, held = stdlib_corpus()
    train_t = torch.frombuffer(bytearray(train), dtype=torch.uint8)
    held_t = torch.frombuffer(bytearray(held), dtype=torch.uint8)
    cfg = GPTConfig()
    model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    it = batches(train_t, args.batch, cfg.block_size, gen)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    held_loss = held_out_loss(model, held_t, cfg.block_size)
    save_model(model, args.out)
    stats = {"parameters": n_params, "train_bytes": len(train), "held_out_bytes": len(held),
             "steps": args.steps, "batch": args.batch, "tokens_seen": args.steps * args.batch * cfg.block_size,
             "held_out_loss_nats_per_byte": round(held_loss, 4),
             "uniform_baseline_nats_per_byte": round(math.log(256), 4),
             "seconds": round(time.time() - t0), "torch": torch.__version__,
             "python_stdlib": sysconfig.get_paths()["stdlib"]}
    (args.out / "pretrain.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
