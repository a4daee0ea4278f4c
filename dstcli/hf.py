"""Hugging Face model directories: load offline, name parameters by checkpoint key, batch rows.

Needs the optional extra `pip install 'dstcli[hf]'` (transformers). Nothing here ever downloads:
every load is `local_files_only=True`.

Parameters are named by the checkpoint's own safetensors keys, so a patch made here applies to the
model directory with `dstcli apply`. Tied weights (an output layer sharing the embedding matrix)
are one parameter, one silo, one patch tensor: the key the checkpoint stores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dstcli.data import plain_chat
from dstcli.errors import DstError

INSTALL_HINT = "pip install 'dstcli[hf]'"


def is_hf_dir(path: Path) -> bool:
    """A model directory whose config.json names a model type other than dstcli's own GPT."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return isinstance(model_type, str) and model_type != "dstcli-gpt"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise DstError(f"training a Hugging Face model directory needs transformers: {INSTALL_HINT}") from e
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # dstcli draws its own progress
    return transformers


@dataclass
class HFModel:
    model: torch.nn.Module
    tokenizer: Any
    seq2seq: bool
    named: dict[str, torch.nn.Parameter]  # checkpoint key -> parameter, tied weights once


def load(path: Path, checkpoint_keys: set[str]) -> HFModel:
    """Load a local model directory with its tokenizer, in the dtype its weights are stored in."""
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        auto = tf.AutoModelForSeq2SeqLM if seq2seq else tf.AutoModelForCausalLM
        model = auto.from_pretrained(path, local_files_only=True, dtype="auto")
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DstError(f"transformers cannot load {path} ({e}); it needs config.json, the weights and "
                       "tokenizer files, all local") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return HFModel(model, tokenizer, seq2seq, checkpoint_names(model, checkpoint_keys))


def checkpoint_names(model: torch.nn.Module, keys: set[str]) -> dict[str, torch.nn.Parameter]:
    """Each distinct parameter under the checkpoint key that stores it (tied ones share one key)."""
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    out, missing = {}, []
    for pid, names in aliases.items():
        stored = [n for n in names if n in keys]
        if not stored:
            missing.append(names[0])
            continue
        out[stored[0]] = params[pid]
    if missing:
        raise DstError(f"parameters {missing[:3]} are not stored in the checkpoint under any of their names: "
                       "save the model with save_pretrained (safetensors) first")
    return out


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]  # -100 where there is no loss
    decoder: bool = False  # labels feed a decoder (seq2seq) rather than shift over input_ids


def encode_rows(rows: list[tuple[int, dict]], hm: HFModel, seq_len: int, source: Path) -> list[Row]:
    """Tokenize checked JSONL rows: text, prompt/completion (loss on the completion), messages."""
    tok, out = hm.tokenizer, []
    for lineno, row in rows:
        if "messages" in row:
            prompt, completion = _render_chat(tok, row["messages"])
        elif "text" in row:
            prompt, completion = "", row["text"]
        else:
            prompt, completion = row["prompt"], row["completion"]
        if hm.seq2seq:
            if not prompt:
                raise DstError(f"{source}:{lineno}: an encoder-decoder model needs prompt/completion (or "
                               "messages) rows: the prompt goes to the encoder, the completion is learned")
            ids = tok(prompt, truncation=True, max_length=seq_len)["input_ids"]
            labels = tok(text_target=completion, truncation=True, max_length=seq_len)["input_ids"]
            out.append(Row(ids, labels, decoder=True))
            continue
        p = tok(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        full = tok(prompt + completion, add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None and (not full or full[-1] != tok.eos_token_id):
            full = full + [tok.eos_token_id]
        n_prompt = len(p) if full[:len(p)] == p else 0
        labels = [-100] * n_prompt + full[n_prompt:]
        out.append(Row(full[-seq_len:], labels[-seq_len:]))
    return out


def _render_chat(tok, messages: list[dict]) -> tuple[str, str]:
    """(everything before the last assistant turn, that turn) of a row `read_rows` checked: with
    the tokenizer's chat template when it has one. The loss is on the reply."""
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = tok.apply_chat_template(messages, tokenize=False)
        if whole.startswith(prompt):
            return prompt, whole[len(prompt):]
        return prompt, messages[-1]["content"]
    return plain_chat(messages)


def collate(batch: list[Row], pad_id: int, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Right-padded model inputs with labels; and the number of input tokens."""
    T = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    L = max(len(r.labels) for r in batch)
    labels = torch.full((len(batch), L if batch[0].decoder else T), -100, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, :len(r.input_ids)] = 1
        labels[i, :len(r.labels)] = torch.tensor(r.labels)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    return inputs, int(mask.sum())


def loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).loss.float()


def label_count(inputs: dict[str, torch.Tensor], seq2seq: bool) -> int:
    lab = inputs["labels"] if seq2seq else inputs["labels"][:, 1:]
    return int((lab != -100).sum())
