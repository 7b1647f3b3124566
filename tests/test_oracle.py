"""The oracle: removing units equals zeroing the same channels in the dense model.

For every tiny family, magnitude and random selection at several ratios, the emitted ONNX
(run in onnxruntime) must equal the DENSE model with the removed level-2 input columns
zeroed (W_O columns of removed heads, W_down columns of removed neurons), to 1e-4 relative.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from goa_compiler.export.onnx import onnx_param_count, run_onnx
from goa_compiler.pipeline import CompileOptions, compile_loaded
from goa_compiler.passes.selection import unit_params
from models import tiny

CASES = [(f, c, r) for f in tiny.FAMILIES for c, r in (("magnitude", 0.1), ("random", 0.35), ("magnitude", 0.6))]


def _zeroed_dense(model, analysis, report):
    """A copy of the dense model with the removed units' level-2 columns zeroed."""
    dense = copy.deepcopy(model)
    params = dict(dense.named_parameters())
    by_name = {s.name: s for s in analysis.structures}
    for rec in report["modules"]:
        s = by_name[rec["name"]]
        kept_units = _kept_units(s, rec)
        drop = [u for u in range(s.units) if u not in kept_units]
        for sl in s.level2():
            w = params[sl.param[len("model."):]]
            idx = torch.as_tensor(sl.index[drop].reshape(-1), dtype=torch.long)
            with torch.no_grad():
                w.index_fill_(sl.axis, idx, 0.0)
    return dense


def _kept_units(s, rec):
    if "kv_kept" in rec:
        return rec["kv_kept"]
    return rec["kept"]


@pytest.mark.parametrize("family,criterion,ratio", CASES)
def test_pruned_onnx_equals_zeroed_dense(tmp_path, family, criterion, ratio):
    model, vocab, kind = tiny.build(family)
    out = tmp_path / "out"
    result = compile_loaded(copy.deepcopy(model), kind, CompileOptions(
        ratio=ratio, criterion=criterion, reconstruct="none", seed=3), out)
    report, analysis = result.report, result.analysis
    assert analysis.structures, f"{family}: no structures found"
    assert not [r for r in analysis.refused if r.candidate], analysis.refused
    kinds = {s.kind for s in analysis.structures}
    assert kinds == {"attention", "ffn"}, kinds
    assert len(analysis.structures) == 2 * model.config.num_hidden_layers
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["modules"] == json.loads(json.dumps(report["modules"]))

    # something was actually removed, and every record is well-formed
    assert report["params"]["after"] < report["params"]["before"]
    for rec in report["modules"]:
        assert rec["kept"] == sorted(rec["kept"]) and len(rec["kept"]) >= 1
        assert all(0 <= k < rec["total"] for k in rec["kept"])

    oracle = _zeroed_dense(model, analysis, report)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = getattr(oracle(input_ids=ids, attention_mask=mask),
                      "logits" if kind == "causal-lm" else "last_hidden_state").numpy()
    got = run_onnx(out / "model.onnx", ids.numpy(), mask.numpy())
    assert got.shape == ref.shape
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"{family} {criterion} {ratio}: relative error {rel:.2e}"

    # the claimed ratio is the requested one within one unit per module
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    shapes = {"model." + k: v for k, v in shapes.items()}
    total = report["params"]["structured_before"]
    slack = sum(unit_params(s, shapes) for s in analysis.structures)
    assert abs(report["ratio_achieved"] - ratio) * total <= slack
    # the ONNX file holds the parameters the report claims (plus the float buffers)
    buffers = sum(b.numel() for n, b in model.named_buffers() if b.is_floating_point())
    n_onnx = onnx_param_count(out / "model.onnx")
    assert report["params"]["after"] <= n_onnx <= report["params"]["after"] + buffers


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_physically_smaller_weights(tmp_path, family):
    model, vocab, kind = tiny.build(family)
    compile_loaded(model, kind, CompileOptions(ratio=0.5, criterion="magnitude"), tmp_path / "o")
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    dims = [tuple(i.dims) for i in m.graph.initializer]
    # no initializer keeps the dense intermediate width of the FFN
    cfg = model.config
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.n_embd
    assert not any(inter in d for d in dims), dims
