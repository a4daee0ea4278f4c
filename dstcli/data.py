"""JSONL datasets: `{"text"}`, `{"prompt", "completion"}` or `{"messages": [...]}` rows.

`read_rows` checks a file (errors name the line). For the byte-level sample model each row becomes
(tokens, loss_mask): with prompt/completion and messages rows the loss is on the completion (the
last, assistant message) only; text rows are cut into windows of seq_len + 1 bytes with loss
everywhere. Hugging Face models tokenize the same rows in dstcli.hf.
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


Row = tuple[int, dict]  # (line number, a checked row)


def read_rows(path: Path) -> list[Row]:
    """Read and check a dataset of text, prompt/completion or messages rows; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DstError(f"dataset {path} does not exist: pass a JSONL file of {{\"text\"}}, "
                       "{\"prompt\", \"completion\"} or {\"messages\"} rows")
    rows: list[Row] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DstError(f"{path}:{lineno}: not valid JSON ({e}): fix or remove the line") from e
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                pass
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                if not row["completion"]:
                    raise DstError(f"{path}:{lineno}: empty completion: every row needs something to learn")
            elif isinstance(row, dict) and "messages" in row:
                _check_messages(row["messages"], f"{path}:{lineno}")
            else:
                raise DstError(f"{path}:{lineno}: expected an object with \"text\", with \"prompt\" and "
                               "\"completion\" strings, or with \"messages\"")
            rows.append((lineno, row))
    if not rows:
        raise DstError(f"dataset {path} has no examples: add rows of {{\"text\": ...}} or "
                       "{\"prompt\": ..., \"completion\": ...}")
    return rows


def _check_messages(messages, where: str) -> None:
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise DstError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} strings")
    if messages[-1]["role"] != "assistant":
        raise DstError(f"{where}: the last message must be the assistant's reply (that is what is learned)")


def plain_chat(messages: list[dict]) -> tuple[str, str]:
    """A checked chat row without a chat template: `role: content` lines, then `assistant: `,
    as (prompt, the reply that is learned)."""
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
    return prompt, messages[-1]["content"]


def byte_examples(rows: list[Row], seq_len: int, path: Path) -> list[Example]:
    """Rows as byte-level examples for the bundled GPT (messages as `role: content` lines)."""
    out: list[Example] = []
    for lineno, row in rows:
        if "text" in row:
            toks = encode(row["text"])
            for s in range(0, max(1, len(toks) - 1), seq_len):
                w = toks[s:s + seq_len + 1]
                if len(w) >= 2:
                    out.append(Example(w, [True] * len(w)))
            continue
        if "messages" in row:
            prompt, completion = plain_chat(row["messages"])
        else:
            prompt, completion = row["prompt"], row["completion"]
        p, c = encode(prompt), encode(completion)
        toks = (p + c)[-(seq_len + 1):]
        mask = ([False] * len(p) + [True] * len(c))[-(seq_len + 1):]
        out.append(Example(toks, mask, prompt, completion))
    if not out:
        raise DstError(f"dataset {path} has no examples long enough to learn from")
    return out


def read_jsonl(path: Path, seq_len: int) -> list[Example]:
    """Read, check and byte-encode a dataset for the bundled GPT."""
    return byte_examples(read_rows(path), seq_len, Path(path))


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
