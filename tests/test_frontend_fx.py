"""The torch.fx frontend's view of projections written as matrix products (``x @ W.T``,
``x @ W``, as Falcon's FalconLinear and hand-written models do) and the edits rewrite
makes on them (a bias where the product had none)."""
from __future__ import annotations

import json

import torch

from goa_compiler.driver.pipeline import CompileOptions, analyze_model, compile_loaded
from goa_compiler.frontends.fx import from_fx
from models import tiny


class MatmulFFN(torch.nn.Module):
    """A residual FFN block whose projections are products with parameters: up as x @ W.T
    ([out, in], nn.Linear's layout), down as h @ W ([in, out])."""

    def __init__(self, d=16, inner=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Parameter(torch.randn(inner, d, generator=g) / d ** 0.5)
        self.down = torch.nn.Parameter(torch.randn(inner, d, generator=g) / inner ** 0.5)

    def forward(self, x):
        return x + torch.relu(x @ self.up.T) @ self.down


def test_products_with_a_parameter_are_projections():
    ep = torch.export.export(MatmulFFN(), (torch.randn(2, 5, 16),), strict=False)
    g = from_fx(ep.module())
    linear = [n for n in g.nodes.values() if n.op == "linear"]
    assert [(g.params[n.inputs[1].name], n.attrs["w_out_axis"]) for n in linear] == [("up", 0), ("down", 1)]
    from goa_compiler.analysis import analyze_graph
    (s,) = analyze_graph(g).structures
    assert (s.kind, s.units) == ("ffn", 32)
    assert [(sl.param, sl.axis) for sl in s.slices] == [("up", 0), ("down", 0)]


def test_a_bias_added_to_a_matmul_projection(tmp_path):
    """Mean compensation gives Falcon's bias-free dense projections a bias: the product's
    users read product + bias, and the ONNX file computes what the pruned module does."""
    model, _, kind = tiny.build("falcon")
    res = compile_loaded(model, kind, CompileOptions(ratio=0.3, reconstruct="mean", num_samples=4, seq_len=16,
                                                     batch_size=4), tmp_path / "o", tokenizer=tiny.byte_tokenizer())
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4
    added = [n for n in res.module.graph.nodes if n.op == "get_attr" and "dense" in str(n.target)
             and str(n.target).endswith("bias")]
    assert added, "no level-2 bias was added"


def test_the_falcon_projections_are_matmuls():
    _, analysis = analyze_model(tiny.build("falcon")[0], "causal-lm")
    kinds = sorted(s.kind for s in analysis.structures)
    assert kinds == ["attention", "attention", "ffn", "ffn"]
    assert not [r for r in analysis.refused if r.candidate]
