"""The `goa` command line: analyze, compile, eval; exit statuses and OUT handling."""
from __future__ import annotations

import json

import pytest

from goa_compiler.ui import cli
from models import tiny
import out_files  # tests/out_files.py


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save("llama-gqa", tmp_path_factory.mktemp("m") / "llama")


def test_analyze_text_and_json(llama_dir, capsys):
    assert cli.main(["analyze", llama_dir]) == 0
    out = capsys.readouterr().out
    assert "4 prunable structures" in out and "kv-group" in out
    assert cli.main(["analyze", llama_dir, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kinds = [s["kind"] for s in data["structures"]]
    assert kinds == ["attention", "ffn", "attention", "ffn"]
    att = data["structures"][0]
    assert att["heads"] == 6 and att["kv_heads"] == 2 and att["units"] == 2


def test_analyze_broken_model_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert cli.main(["analyze", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_compile_writes_onnx_and_report(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["compile", llama_dir, "--ratio", "0.3", "--criterion", "magnitude",
                   "--reconstruct", "none", "--out", str(out), "--quiet", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == out_files.DECODER
    assert report == json.loads((out / "report.json").read_text())
    assert {"modules", "params", "ratio_requested", "ratio_achieved"} <= set(report)
    att = report["modules"][0]
    assert att["kind"] == "attention" and att["kv_total"] == 2 and "kv_kept" in att

    # OUT exists and is not empty: refused, untouched
    before = (out / "model.onnx").read_bytes()
    rc = cli.main(["compile", llama_dir, "--ratio", "0.5", "--criterion", "magnitude",
                   "--reconstruct", "none", "--out", str(out), "--quiet"])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == before


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_bad_ratio_exits_2_and_writes_nothing(llama_dir, tmp_path, ratio, capsys):
    out = tmp_path / "o"
    assert cli.main(["compile", llama_dir, "--ratio", ratio, "--out", str(out), "--quiet"]) == 2
    assert "--ratio" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("export", ["rewrite", "reexport"])
def test_failure_mid_compile_leaves_nothing(llama_dir, tmp_path, monkeypatch, capsys, export):
    import goa_compiler.driver.pipeline as pipeline
    import goa_compiler.export.template as template

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "export_onnx", boom)
    monkeypatch.setattr(pipeline, "export_decoder", boom)
    monkeypatch.setattr(template, "rewrite_template", boom)     # the template may be cached already
    out = tmp_path / "o"
    rc = cli.main(["compile", llama_dir, "--ratio", "0.3", "--criterion", "magnitude",
                   "--reconstruct", "none", "--out", str(out), "--quiet", "--export", export])
    assert rc == 1
    assert "disk full" in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []          # no temporary directory left behind


def test_eval_hf_and_onnx_agree(llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tmp_path / "o"
    assert cli.main(["compile", llama_dir, "--ratio", "0.0", "--criterion", "magnitude",
                     "--reconstruct", "none", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", llama_dir, "--data", str(text), "--seq-len", "64", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", str(out), "--tokenizer", llama_dir, "--data", str(text),
                     "--seq-len", "64", "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert dense["tokens"] == pruned["tokens"] > 0
    assert abs(dense["ppl"] - pruned["ppl"]) < 1e-3 * dense["ppl"]
