"""The CLI driven as a user would: real files, real subcommands, exit codes and outputs."""

import json
import os

import pytest
from typer.testing import CliRunner

from dstcli.cli import app, main


def run(*args, expect=0):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    if expect == 1:  # DstError surfaces through main(); emulate it via the exception
        from dstcli.errors import DstError
        assert isinstance(result.exception, DstError), result.output
        return result
    assert result.exit_code == expect, (result.output, result.exception)
    return result


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["dstcli", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_diff_inspect_apply_revert(tmp_path, pair):
    base, ft, _, _ = pair
    r = run("diff", base, ft, "-o", tmp_path / "p.dst")
    assert "entries changed (lossless)" in r.output
    r = run("inspect", tmp_path / "p.dst")
    assert "model.layers.0.attn.weight" in r.output and "effective epsilon" in r.output
    info = json.loads(run("inspect", tmp_path / "p.dst", "--json").stdout)
    assert info["changed"] > 0 and info["format"] == "dstcli-patch"
    assert {"name", "changed", "numel", "fraction", "delta_l2", "delta_max", "budget"} <= set(info["rows"][0])
    run("apply", base, tmp_path / "p.dst", "-o", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == ft.read_bytes()
    run("apply", tmp_path / "out.safetensors", tmp_path / "p.dst", "--revert", "-o", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == base.read_bytes()


def test_budgeted_diff_and_layer_view(tmp_path, pair):
    base, ft, _, _ = pair
    r = run("diff", base, ft, "-o", tmp_path / "p.dst", "--epsilon", "0.1", "--silo", "row", "--json")
    summary = json.loads(r.stdout)
    assert summary["changed"] <= summary["budget"]
    r = run("inspect", tmp_path / "p.dst", "--by", "layer", "--sort", "changed", "--top", "2")
    assert "layer" in r.output


def test_errors_are_one_line_with_exit_code_1(tmp_path, pair, monkeypatch, capsys):
    base, ft, _, _ = pair
    code, out, err = run_main(monkeypatch, capsys, "diff", base, tmp_path / "missing.safetensors", "-o", tmp_path / "p.dst")
    assert code == 1 and err.startswith("Error: checkpoint") and "does not exist" in err and out == ""
    assert err.count("\n") == 1
    code, _, err = run_main(monkeypatch, capsys, "diff", base, ft, "-o", tmp_path / "p.dst", "--silo", "bogus")
    assert code == 1 and "unknown silo strategy 'bogus'" in err
    code, _, err = run_main(monkeypatch, capsys, "inspect", tmp_path / "nope.dst")
    assert code == 1 and "Error: patch" in err
    (tmp_path / "junk.dst").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run_main(monkeypatch, capsys, "inspect", tmp_path / "junk.dst")
    assert code == 1 and "not a readable dstcli patch" in err
    code, _, err = run_main(monkeypatch, capsys, "apply", base)  # usage error: no patch, no -o
    assert code == 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".dst") and f != "junk.dst"]


def test_apply_refuses_wrong_base_unless_forced(tmp_path, pair, monkeypatch, capsys):
    base, ft, _, _ = pair
    run("diff", base, ft, "-o", tmp_path / "p.dst")
    code, _, err = run_main(monkeypatch, capsys, "apply", ft, tmp_path / "p.dst", "-o", tmp_path / "o.safetensors")
    assert code == 1 and "was made for" in err and "--force" in err
    assert not (tmp_path / "o.safetensors").exists()
    run("apply", ft, tmp_path / "p.dst", "-o", tmp_path / "o.safetensors", "--force")
    assert (tmp_path / "o.safetensors").read_bytes() == base.read_bytes()  # XOR twice is the identity


def test_silo_and_distance_need_a_budget(tmp_path, pair, monkeypatch, capsys):
    base, ft, _, _ = pair
    for opt in (("--silo", "row"), ("--distance", "relative")):
        code, _, err = run_main(monkeypatch, capsys, "diff", base, ft, "-o", tmp_path / "p.dst", *opt)
        assert code == 1 and err.startswith("Error: --silo and --distance") and "--epsilon" in err, err
    code, _, err = run_main(monkeypatch, capsys, "diff", base, ft, "-o", tmp_path / "p.dst", "--epsilon", "0.1",
                            "--distance", "bogus")
    assert code == 1 and "unknown distance 'bogus'" in err
    assert not (tmp_path / "p.dst").exists()
