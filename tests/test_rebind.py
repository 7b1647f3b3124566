"""rebind_weights: an ONNX graph reused with another model's weights of the same shapes must
compute exactly what a fresh export of that model computes."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from goa_compiler.capture.sources import load_model
from goa_compiler.capture.torch_export import capture
from goa_compiler.export.onnx import export_onnx, rebind_weights, run_onnx, verify
from goa_compiler.frontends.fx import from_fx
from goa_compiler.analysis import analyze_graph
from goa_compiler.driver.pipeline import CompileOptions, prune_captured
from goa_compiler.ui.progress import Progress
from models import tiny


def _pruned(cap, analysis, criterion, ratio, seed=0):
    gm = copy.deepcopy(cap.gm)
    prune_captured(dataclasses.replace(cap, gm=gm), analysis,
                   CompileOptions(ratio=ratio, criterion=criterion, reconstruct="none", seed=seed), None,
                   Progress(False))
    return gm


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_rebound_graph_equals_fresh_export(family, tmp_path):
    loaded = load_model(tiny.save(family, tmp_path / "m"))
    cap = capture(loaded.model, loaded.kind)
    analysis = analyze_graph(from_fx(cap.gm))
    a = _pruned(cap, analysis, "magnitude", 0.5)
    b = _pruned(cap, analysis, "random", 0.5, seed=3)
    g = torch.Generator().manual_seed(0)   # seeded: the same values every run
    with torch.no_grad():   # other values everywhere, as a refit would leave them
        for p in b.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    template = export_onnx(a, cap.example, tmp_path / "a.onnx", cap.output_name, cap.max_seq, optimize=False)
    fresh = export_onnx(b, cap.example, tmp_path / "b.onnx", cap.output_name, cap.max_seq, optimize=False)
    rebound = rebind_weights(template, b, tmp_path / "b-rebound.onnx")
    ids = torch.randint(0, 100, (2, 12), generator=g)
    assert verify(rebound, b, ids) < 1e-5
    np.testing.assert_allclose(run_onnx(rebound, ids.numpy()), run_onnx(fresh, ids.numpy()), rtol=0, atol=1e-5)
    # and the template itself still computes model a, not b
    assert verify(template, a, ids) < 1e-5 and verify(template, b, ids) > 1e-3


def test_other_shapes_are_refused(tmp_path):
    loaded = load_model(tiny.save("llama", tmp_path / "m"))
    cap = capture(loaded.model, loaded.kind)
    analysis = analyze_graph(from_fx(cap.gm))
    template = export_onnx(_pruned(cap, analysis, "magnitude", 0.5), cap.example, tmp_path / "a.onnx",
                           cap.output_name, cap.max_seq, optimize=False)
    out = tmp_path / "c.onnx"
    with pytest.raises(ValueError, match="in the model"):
        rebind_weights(template, _pruned(cap, analysis, "magnitude", 0.25), out)
    with pytest.raises(ValueError, match="no initializer"):
        rebind_weights(template, torch.nn.Linear(2, 2), out)
    # the optimiser folds weights into constants of its own: such a file cannot be rebound
    optimized = export_onnx(_pruned(cap, analysis, "magnitude", 0.5), cap.example, tmp_path / "o.onnx",
                            cap.output_name, cap.max_seq, optimize=True)
    with pytest.raises(ValueError, match="no initializer"):
        rebind_weights(optimized, _pruned(cap, analysis, "random", 0.5), out)
    assert not out.exists()
