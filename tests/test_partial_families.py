"""Families whose graphs hold a structure analysis still refuses: the compile succeeds (never
an internal error), the refused kind is named with its reason, and what was pruned passes
the zeroing oracle in onnxruntime (tests/oracle_layout.py, independent of the analysis).

    olmo2        q and k normalised over every head at once (a reduction over the heads)
"""
from __future__ import annotations

import copy
import json

import pytest

from goa_compiler.driver.pipeline import CompileOptions, compile_loaded
from goa_compiler.export.onnx import run_onnx
from models import tiny
import oracle_layout as ol


@pytest.mark.parametrize("family", sorted(tiny.PARTIAL))
def test_refused_kind_is_named_and_the_rest_is_pruned_right(tmp_path, family):
    model, vocab, kind = tiny.build(family)
    refused_kind = tiny.PARTIAL[family]
    pruned_kind = ol.PARTIAL[family][0]
    out = tmp_path / "out"
    result = compile_loaded(copy.deepcopy(model), kind, CompileOptions(
        ratio=0.35, criterion="random", reconstruct="none", seed=3), out)
    report = json.loads((out / "report.json").read_text())
    kinds = {s.kind for s in result.analysis.structures}
    assert kinds == {pruned_kind}, kinds
    reasons = [r.reason for r in result.analysis.refused if r.candidate]
    assert reasons, f"{family}: the {refused_kind} refusal has no reason"
    records = report["modules"]
    assert {r["layer"] for r in records} == set(range(ol.layers(model.config)))
    assert any(r["kept"] != list(range(r["total"])) for r in records)

    import torch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    ref = ol.dense_output(ol.zeroed_dense(model, family, records), kind, ids, mask)
    got = run_onnx(out / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < 1e-4


def test_an_op_the_onnx_exporter_cannot_translate_is_refused_before_calibration(tmp_path, monkeypatch):
    """The default grouped expert product of experts left in the routed form (here: experts
    the per-expert form is taken not to reproduce) is a custom op with no ONNX translation:
    the compile stops after capture with the op's name, and OUT is not written."""
    import goa_compiler.capture.experts as ex
    import goa_compiler.capture.torch_export as te
    from goa_compiler.driver.pipeline import CompileError

    monkeypatch.setattr(ex, "_same_function", lambda m: False)
    model, _, kind = tiny.build("mixtral")
    model.set_experts_implementation("grouped_mm")
    monkeypatch.setattr(te, "exportable_experts", lambda m: None)
    with pytest.raises(CompileError, match=r"^export: the ONNX exporter has no translation for transformers\."):
        compile_loaded(model, kind, CompileOptions(ratio=0.3, criterion="random", reconstruct="none"),
                       tmp_path / "out")
    assert not (tmp_path / "out").exists()
