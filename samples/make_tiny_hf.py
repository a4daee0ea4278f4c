"""Make a small Hugging Face model directory offline, to try `dstcli train --model` without a download.

    python samples/make_tiny_hf.py tiny-hf/          # GPT-2 architecture, 0.9M parameters

It writes what `save_pretrained` writes for a real model (config.json, model.safetensors, tokenizer
files): a GPT-2 with random weights and a byte-level BPE tokenizer trained on the bundled pytype
task's text. Any local causal-LM or T5-style directory works the same way with dstcli.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(HERE / "pytype" / "train.jsonl")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((r["prompt"] + r["completion"] for r in rows), trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(fast), n_positions=128, n_embd=96, n_layer=4, n_head=4,
                                  bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(args.out)
    fast.save_pretrained(args.out)
    print(f"wrote {args.out}: GPT-2, {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(fast)}")


if __name__ == "__main__":
    main()
