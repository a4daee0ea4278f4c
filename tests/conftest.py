import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))


def make_pair(tmp: Path, *, sharded: bool = False, dtype=torch.float32, frac: float = 0.05, seed: int = 0):
    """A base checkpoint and a fine-tune of it (a fraction of entries moved), as files."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "model.layers.0.attn.weight": torch.randn(48, 32, generator=g).to(dtype),
        "model.layers.1.attn.weight": torch.randn(48, 32, generator=g).to(dtype),
        "model.layers.1.norm.bias": torch.randn(32, generator=g).to(dtype),
        "model.embed.weight": torch.randn(100, 16, generator=g).to(dtype),
        "model.position_ids": torch.arange(10),
    }
    ft = {}
    for k, v in base.items():
        if v.is_floating_point():
            move = torch.rand(v.shape, generator=g) < frac
            ft[k] = torch.where(move, (v.float() + torch.randn(v.shape, generator=g) * 0.1).to(dtype), v)
        else:
            ft[k] = v.clone()
    paths = []
    for name, tensors in (("base", base), ("ft", ft)):
        if sharded:
            d = tmp / name
            d.mkdir()
            keys = sorted(tensors)
            shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
            for f, ks in shards.items():
                save_file({k: tensors[k] for k in ks}, str(d / f), metadata={"format": "pt"})
            import json
            (d / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
            (d / "config.json").write_text('{"model_type": "test"}')
            paths.append(d)
        else:
            p = tmp / f"{name}.safetensors"
            save_file(tensors, str(p))
            paths.append(p)
    return paths[0], paths[1], base, ft


@pytest.fixture
def pair(tmp_path):
    return make_pair(tmp_path)
