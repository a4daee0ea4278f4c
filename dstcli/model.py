"""The bundled sample model: a small byte-level GPT (nanoGPT-style), its config and its tokenizer.

The model exists so that `dstcli train` runs out of the box with no downloads. A checkpoint is a
directory holding `config.json` (the fields of `GPTConfig`) and `model.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from dstcli.errors import DstError


@dataclass
class GPTConfig:
    block_size: int = 256  # longest context in bytes
    vocab_size: int = 256  # byte-level: one token per byte, no tokenizer files needed
    n_layer: int = 4
    n_head: int = 5
    n_embd: int = 160
    model_type: str = "dstcli-gpt"


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.mlp_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for byte ids idx (B, T)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise DstError(f"sequence of {T} tokens is longer than the model's block_size "
                           f"{self.config.block_size}: pass a smaller --seq-len")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new: int, stop: int | None = None) -> list[int]:
        """Greedy continuation of one prompt, stopping after `stop` (a byte) or max_new bytes."""
        out: list[int] = []
        ids = torch.tensor([prompt], dtype=torch.long, device=self.wte.weight.device)
        for _ in range(max_new):
            logits = self(ids[:, -self.config.block_size:])[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            if nxt == stop:
                break
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
        return out


def encode(text: str) -> list[int]:
    """Byte-level tokenizer: UTF-8 bytes are the token ids."""
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def save_model(model: GPT, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))


def load_config(directory: Path) -> GPTConfig:
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DstError(f"cannot read model config {path}: {e}; a dstcli checkpoint directory "
                       "needs config.json next to model.safetensors") from e
    if raw.get("model_type") != "dstcli-gpt":
        raise DstError(f"{path} describes a {raw.get('model_type')!r} model, not a dstcli-gpt: "
                       "`dstcli train` trains the bundled GPT architecture")
    fields = GPTConfig.__dataclass_fields__
    return GPTConfig(**{k: v for k, v in raw.items() if k in fields})
