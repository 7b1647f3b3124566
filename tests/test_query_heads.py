"""Query heads as the units of grouped-K/V attention (``--attention-unit query-head``): a K/V
head stays while any query head of its group does, and groups left unequal read their K/V
through a gather. Proven by the zeroing oracle (tests/oracle_layout.py: removed query heads'
output columns zeroed in the dense model, nothing from the analysis), in onnxruntime, for
plain and cached graphs, and on a hand-built view for the analysis alone."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from goa_compiler.analysis import analyze_graph
from goa_compiler.driver.pipeline import CompileOptions, compile_loaded
from goa_compiler.export.onnx import run_onnx
from models import tiny
import oracle_layout as ol
from test_analysis_rules import _grouped_attention

CASES = [("llama-gqa", "random", 0.35), ("llama-gqa", "magnitude", 0.6), ("qwen2", "random", 0.5),
         ("phi3", "random", 0.5), ("mistral", "magnitude", 0.3)]


def _compile(family, out, **opts):
    model, vocab, kind = tiny.build(family)
    options = {"ratio": 0.35, "criterion": "random", "reconstruct": "none", "seed": 3, "allocation": "global",
               "attention_unit": "query-head", **opts}
    res = compile_loaded(copy.deepcopy(model), kind, CompileOptions(**options), out, tokenizer=tiny.byte_tokenizer())
    return model, vocab, kind, res


@pytest.mark.parametrize("family,criterion,ratio", CASES)
def test_query_head_units_equal_the_zeroed_dense_model(tmp_path, family, criterion, ratio):
    model, vocab, kind, res = _compile(family, tmp_path / "out", criterion=criterion, ratio=ratio)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    attn = [r for r in report["modules"] if r["kind"] == "attention"]
    rep = ol.heads(model.config) // ol.kv_heads(model.config)
    for rec in attn:
        assert rec["unit"] == "head" and rec["total"] == ol.heads(model.config), rec
        # a K/V head is kept exactly when one of the query heads that read it is
        assert rec["kv_kept"] == sorted({h // rep for h in rec["kept"]}), rec
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    ref = ol.dense_output(ol.zeroed_dense(model, family, report["modules"]), kind, ids, mask)
    got = run_onnx(tmp_path / "out" / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < 1e-4
    # the K/V projections and the cache keep exactly the K/V heads still read
    for rec, row in zip(attn, report["decoder"]["layers"]):
        assert row["kv_heads"]["pruned"] == len(rec["kv_kept"]), (rec, row)


def test_partly_kept_and_emptied_groups_occur(tmp_path):
    """What this feature is for: a group that keeps some of its query heads (K/V head kept,
    read through the gather), and a group whose every query head went (K/V head removed)."""
    _, _, _, res = _compile("llama-gqa", tmp_path / "out", ratio=0.7)
    attn = [r for r in res.report["modules"] if r["kind"] == "attention"]
    kept = [[sum(1 for h in r["kept"] if h // 3 == g) for g in range(2)] for r in attn]
    assert any(0 < k < 3 for ks in kept for k in ks), kept
    assert any(0 in ks for ks in kept), kept


def test_cached_decoding_with_unequal_groups(tmp_path):
    from test_decoder import PROMPT, NEW, genai_greedy, torch_greedy
    from goa_compiler.serve import generate as gen

    out = tmp_path / "out"
    _, _, _, res = _compile("llama-gqa", out, ratio=0.4)
    attn = [r for r in res.report["modules"] if r["kind"] == "attention"]
    assert any(len(r["kept"]) % 3 for r in attn), attn       # some group is partly kept
    want = torch_greedy(res.module, PROMPT, NEW)
    assert gen.generate(gen.load(out), PROMPT, NEW)["tokens"] == want
    assert genai_greedy(out, PROMPT, NEW) == want


def test_analysis_gives_each_query_head_its_group():
    a = analyze_graph(_grouped_attention(gqa=True), query_heads=True)
    (s,) = a.structures
    assert (s.units, s.granularity, s.heads, s.kv_heads) == (4, "head", 4, 2)
    np.testing.assert_array_equal(s.kv.group_of_unit, [0, 0, 1, 1])
    assert [(sl.param, sl.role) for sl in s.kv.slices] == [
        ("layers.0.attn.k_proj.weight", "k"), ("layers.0.attn.v_proj.weight", "v")]
    np.testing.assert_array_equal(s.kv.slices[0].index, np.arange(8).reshape(2, 4))
    # sdpa repeats K/V itself here (grouped attention): kept heads 0, 2, 3 read K/V heads 0, 1, 1
    assert s.kv.kept_groups([0, 2, 3]) == [0, 1] and s.kv.gather_index([0, 2, 3]) == [0, 1, 1]
    assert s.kv.gather_index([2, 3]) is None        # one whole group: the graph's own repeat is right
    assert s.kv.gather_index([1, 2, 3]) == [0, 1, 1]
    # the default keeps whole groups
    (g,) = analyze_graph(_grouped_attention(gqa=True)).structures
    assert (g.units, g.granularity, g.kv) == (2, "kv-group", None)
