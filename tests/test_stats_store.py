"""--save-stats / --load-stats (prune/stats_store.py): a compile at another ratio from the
statistics of an earlier one runs no calibration pass and writes the same bytes as one that
measures them; statistics that depend on the pruning are not reused; statistics of another
model or calibration are refused in one line (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from goa_compiler.frontends.fx import FxFrontend
from goa_compiler.ui import cli
from models import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    model = tiny.save("llama-gqa", d / "llama")
    calib = d / "calib.txt"
    calib.write_text("In the beginning God created the heaven and the earth. And the earth was without "
                     "form, and void; and darkness was upon the face of the deep. " * 30)
    return model, calib


def _compile(setup, out: Path, ratio: str, *extra) -> int:
    model, calib = setup
    return cli.main(["compile", str(model), "--ratio", ratio, "--num-samples", "4", "--seq-len", "16",
                     "--batch-size", "2", "--calib", str(calib), "--quiet", "--out", str(out), *extra])


@pytest.mark.parametrize("extra", [(), ("--reconstruct", "none"), ("--ridge-folds", "2", "--allocation", "global")])
def test_loaded_statistics_give_the_bytes_of_measured_ones_and_run_no_pass(setup, tmp_path, monkeypatch, extra):
    stats = tmp_path / "stats"
    assert _compile(setup, tmp_path / "a", "0.2", *extra, "--save-stats", str(stats)) == 0
    assert _compile(setup, tmp_path / "measured", "0.5", *extra) == 0

    def no_calibration(*a, **k):
        raise AssertionError("a calibration stream ran although the statistics were loaded")

    monkeypatch.setattr(FxFrontend, "stream", no_calibration)
    assert _compile(setup, tmp_path / "loaded", "0.5", *extra, "--load-stats", str(stats)) == 0
    assert (tmp_path / "loaded" / "model.onnx").read_bytes() == (tmp_path / "measured" / "model.onnx").read_bytes()
    report = json.loads((tmp_path / "loaded" / "report.json").read_text())
    assert report["calibration"]["statistics"]["modules"] == "loaded"


def test_statistics_that_depend_on_the_pruning_are_measured_again(setup, tmp_path, capsys):
    stats = tmp_path / "stats"
    args = ("--module-inputs", "pruned")
    assert _compile(setup, tmp_path / "a", "0.2", *args, "--save-stats", str(stats)) == 0
    assert not any((stats / "modules").iterdir()) and any((stats / "allocation").iterdir())
    assert _compile(setup, tmp_path / "measured", "0.5", *args) == 0
    capsys.readouterr()
    out = tmp_path / "loaded"
    model, calib = setup
    assert cli.main(["compile", str(model), "--ratio", "0.5", "--num-samples", "4", "--seq-len", "16",
                     "--batch-size", "2", "--calib", str(calib), "--out", str(out), *args,
                     "--load-stats", str(stats)]) == 0
    assert "--load-stats: measuring the module statistics" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == (tmp_path / "measured" / "model.onnx").read_bytes()


def test_statistics_of_another_calibration_are_refused(setup, tmp_path, capsys):
    stats = tmp_path / "stats"
    assert _compile(setup, tmp_path / "a", "0.2", "--save-stats", str(stats)) == 0
    capsys.readouterr()
    assert _compile(setup, tmp_path / "b", "0.5", "--seed", "9", "--load-stats", str(stats)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --load-stats:") and "another model or calibration" in err and "\n" not in err
    assert not (tmp_path / "b").exists()
    assert _compile(setup, tmp_path / "c", "0.5", "--load-stats", str(tmp_path)) == 2
    assert "holds no statistics" in capsys.readouterr().err
    assert _compile(setup, tmp_path / "d", "0.5", "--load-stats", str(stats), "--save-stats", str(stats)) == 2
    assert "same directory" in capsys.readouterr().err
