"""Mixture-of-experts: every expert's FFN neurons are pruned (capture/experts.py).

The oracle holds per expert: the emitted ONNX (onnxruntime) equals the DENSE model, in its
own routed form (transformers' experts with 3-D parameters), with the removed neurons'
columns of ``down_proj[expert]`` zeroed (tests/oracle_layout.py decides the columns from
the model alone). Selection that leaves the experts of one layer different widths is
checked too, and so is the checkpoint, which stacks the experts back into 3-D parameters
(each padded with zero neurons to the widest) and must reload to the pruned graph.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from goa_compiler.capture.experts import experts_as_ffns, fused_name
from goa_compiler.driver.pipeline import CompileOptions, analyze_model, compile_loaded
from goa_compiler.export.checkpoint import load_pruned
from goa_compiler.export.onnx import run_onnx
from models import tiny
import oracle_layout as ol

TOL = 1e-4


def _inputs(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 19), generator=g)
    return ids, torch.ones_like(ids)


def _experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def test_per_expert_form_computes_the_routed_layer():
    """Capture's form (every expert on every token, weighted by its routing weight) equals
    transformers' own routed experts, and the model is restored afterwards."""
    for family in tiny.EXPERTS:
        model, vocab, _ = tiny.build(family)
        ids, _ = _inputs(vocab)
        names = [n for n, _ in model.named_parameters()]
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            with experts_as_ffns(model) as pieces:
                got = model(input_ids=ids).logits
            again = model(input_ids=ids).logits
        fused = {}
        for piece, expert in pieces.items():
            fused.setdefault(fused_name(piece), set()).add(expert)
        # every layer's down projection (and gate/up, biases where there are) split per expert
        assert sum(name.endswith("down_proj") for name in fused) == ol.layers(model.config)
        assert all(experts == set(range(_experts(model.config))) for experts in fused.values())
        assert ol.relative_error(got.numpy(), ref.numpy()) < 1e-5
        assert torch.equal(again, ref)
        assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize("family", tiny.EXPERTS)
def test_every_expert_is_a_structure(family):
    model, _, _ = tiny.build(family)
    _, analysis = analyze_model(model, "causal-lm")
    cfg = model.config
    experts = [s for s in analysis.structures if s.expert is not None]
    assert sorted((s.layer, s.expert) for s in experts) == \
        [(layer, e) for layer in range(ol.layers(cfg)) for e in range(_experts(cfg))]
    assert all(s.name == f"layer{s.layer}.expert{s.expert}" and s.kind == "ffn" for s in experts)
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert {s.units for s in experts} == {width}
    # the router is refused with the reason (its logits go through a softmax or a top-k)
    routers = [r for r in analysis.refused if r.candidate and ".mlp." in r.param and "experts" not in r.param]
    assert any("softmax" in r.reason or "topk" in r.reason for r in routers), analysis.refused


@pytest.mark.parametrize("family,criterion,ratio,allocation", [
    ("mixtral", "magnitude", 0.5, "global"),
    ("qwen2-moe", "magnitude", 0.3, "global"),
    ("gpt-oss", "random", 0.35, "uniform"),
])
def test_pruned_experts_equal_zeroed_dense(tmp_path, family, criterion, ratio, allocation):
    model, vocab, kind = tiny.build(family)
    out = tmp_path / "out"
    compile_loaded(copy.deepcopy(model), kind, CompileOptions(
        ratio=ratio, criterion=criterion, reconstruct="none", allocation=allocation, seed=3,
        kv_cache=False), out)     # (cached decoding of experts: tests/test_decoder.py)
    report = json.loads((out / "report.json").read_text())
    experts = [r for r in report["modules"] if "expert" in r]
    assert len(experts) == ol.layers(model.config) * _experts(model.config)
    assert any(r["kept"] != list(range(r["total"])) for r in experts)
    for r in experts:
        assert r["total"] == ol.input_width(model, family, "ffn", r["layer"], r["expert"])
    if allocation == "global":
        # the experts of a layer keep different widths
        assert any(len({len(r["kept"]) for r in experts if r["layer"] == layer}) > 1
                   for layer in range(ol.layers(model.config)))
    # model.onnx is the dense ONNX (exported once) with the plan applied, per expert
    assert report["export"]["method"] == "rewrite", report["export"]
    ids, mask = _inputs(vocab)
    ref = ol.dense_output(ol.zeroed_dense(model, family, report["modules"]), kind, ids, mask)
    got = run_onnx(out / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < TOL

    # the checkpoint: experts stacked back into 3-D parameters, reloaded to the same logits
    assert report["checkpoint"]["written"], report["checkpoint"]
    reloaded = load_pruned(out / "hf")
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask).logits.numpy()
    assert ol.relative_error(again, ref) < TOL


def test_reconstruction_compiles_experts(tmp_path):
    """The default goa + refit and FLAP's bias compensation (an expert gains no bias: its
    output is scaled per token by the routing weight) both give finite, verified outputs."""
    model, vocab, kind = tiny.build("mixtral")
    small = dict(ratio=0.3, num_samples=4, seq_len=16, batch_size=4, seed=0, kv_cache=False)
    for name, opts in (("goa", CompileOptions(**small)),
                       ("flap", CompileOptions(**small, criterion="flap", reconstruct="none"))):
        out = tmp_path / name
        compile_loaded(copy.deepcopy(model), kind, opts, out, tokenizer=tiny.byte_tokenizer())
        report = json.loads((out / "report.json").read_text())
        assert report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4
        experts = [r for r in report["modules"] if "expert" in r]
        assert experts and all(r["kept"] != list(range(r["total"])) for r in experts), name
        assert not [b for b in json.dumps(report["new_biases"]).split('"') if ".experts." in b], report["new_biases"]
        if name == "goa":
            # each expert refit on the tokens routed to it: never worse than no reconstruction
            errors = [r["output_error"] for r in experts]
            assert all(e["final"] <= e["pruned_no_reconstruction"] * (1 + 1e-9) for e in errors), errors
        assert report["checkpoint"]["written"], report["checkpoint"]


def test_experts_computing_something_else_stay_routed():
    """An experts module whose own forward is not what the per-expert form computes (here:
    its output doubled) is left in the routed form, so analysis refuses it instead of the
    compile changing the model's function."""
    from goa_compiler.capture import experts as ex

    model, _, _ = tiny.build("mixtral")
    layer = model.model.layers[0].mlp.experts
    cls = type(layer)
    eager = cls.forward.__wrapped__

    class Doubled(cls):
        pass

    def doubled(self, *a):          # the function this module computes, in eager form
        return 2 * eager(self, *a)

    Doubled.forward = lambda self, *a: 2 * cls.forward(self, *a)   # (routed: it exports)
    Doubled.forward.__wrapped__ = doubled
    layer.__class__ = Doubled
    found = [name for name, _ in ex.experts_modules(model)]
    assert "model.layers.0.mlp.experts" not in found
    assert "model.layers.1.mlp.experts" in found
    # analysis refuses the routed experts with the reason, naming their 3-D parameters
    _, analysis = analyze_model(model, "causal-lm")
    routed = [r for r in analysis.refused if "mixture-of-experts" in r.reason]
    assert {r.param for r in routed} == {f"model.model.layers.0.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")}
    assert {s.layer for s in analysis.structures if s.expert is not None} == {1}
