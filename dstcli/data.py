"""JSONL datasets for the byte-level sample model: `{"text"}` or `{"prompt", "completion"}` rows.

Each example becomes (tokens, loss_mask): with prompt/completion rows the loss is on the
completion only; text rows are cut into windows of seq_len + 1 bytes with loss everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dstcli.errors import DstError
from dstcli.model import encode


@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]  # mask[i]: predict tokens[i] (i >= 1) with loss
    prompt: str | None = None
    completion: str | None = None


def read_jsonl(path: Path, seq_len: int) -> list[Example]:
    """Read and check a dataset; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DstError(f"dataset {path} does not exist: pass a JSONL file of {{\"text\"}} or "
                       "{\"prompt\", \"completion\"} rows")
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DstError(f"{path}:{lineno}: not valid JSON ({e}): fix or remove the line") from e
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                toks = encode(row["text"])
                for s in range(0, max(1, len(toks) - 1), seq_len):
                    w = toks[s:s + seq_len + 1]
                    if len(w) >= 2:
                        out.append(Example(w, [True] * len(w)))
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                p, c = encode(row["prompt"]), encode(row["completion"])
                if not c:
                    raise DstError(f"{path}:{lineno}: empty completion: every row needs something to learn")
                toks = (p + c)[-(seq_len + 1):]
                mask = ([False] * len(p) + [True] * len(c))[-(seq_len + 1):]
                out.append(Example(toks, mask, row["prompt"], row["completion"]))
            else:
                raise DstError(f"{path}:{lineno}: expected an object with \"text\" or with \"prompt\" and "
                               "\"completion\" strings")
    if not out:
        raise DstError(f"dataset {path} has no examples: add rows of {{\"text\": ...}} or "
                       "{\"prompt\": ..., \"completion\": ...}")
    return out


def collate(batch: list[Example], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs (B, T) and targets (B, T) with -100 where there is no loss."""
    T = max(len(e.tokens) for e in batch) - 1
    x = torch.zeros(len(batch), T, dtype=torch.long)
    y = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        t = torch.tensor(e.tokens)
        m = torch.tensor(e.mask[1:])
        x[i, :len(t) - 1] = t[:-1]
        y[i, :len(t) - 1] = torch.where(m, t[1:], torch.tensor(-100))
    return x.to(device), y.to(device)
