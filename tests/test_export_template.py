"""model.onnx by rewriting the dense ONNX template (export/template.py) against re-exporting.

The claim: for a PyTorch model, applying a compile's plan, reconstructed weights and
compensation biases to the dense ONNX (exported once, cached) gives what exporting the pruned
graph gives, in onnxruntime to 1e-4, with no more nodes; a model whose ONNX analysis differs
from its PyTorch one is re-exported with the reason in the report; the template is exported
once per model and never left half-written.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from goa_compiler.capture.sources import cache_root
from goa_compiler.driver.pipeline import CompileOptions, compile_loaded
from goa_compiler.export.onnx import run_onnx
from models import tiny


def _compile(family, tmp_path, export, **kw):
    model, vocab, kind = tiny.build(family, seed=0)
    base = dict(ratio=0.4, criterion="random", allocation="uniform", num_samples=4, seq_len=32, overwrite=True,
                reconstruct="refit" if kind == "causal-lm" else "none", export=export)
    out = tmp_path / export
    report = compile_loaded(model, kind, CompileOptions(**{**base, **kw}), out, tokenizer=tiny.byte_tokenizer()).report
    return report, out / "model.onnx", vocab


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2", "phi3", "bert"])
def test_rewriting_the_template_equals_re_exporting(family, tmp_path):
    rewritten, a, vocab = _compile(family, tmp_path, "rewrite")
    exported, b, _ = _compile(family, tmp_path, "reexport")
    assert rewritten["export"]["method"] == "rewrite" and exported["export"]["method"] == "re-export"
    assert [m["kept"] for m in rewritten["modules"]] == [m["kept"] for m in exported["modules"]]
    assert any(m["kept"] != list(range(m["total"])) for m in rewritten["modules"])
    ids = np.random.default_rng(0).integers(0, vocab, (2, 19))
    x, y = run_onnx(a, ids, np.ones_like(ids)), run_onnx(b, ids, np.ones_like(ids))
    assert np.abs(x - y).max() <= 1e-4 * np.abs(y).max()
    assert len(onnx.load(str(a)).graph.node) <= len(onnx.load(str(b)).graph.node)
    assert rewritten["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4


def test_the_template_is_exported_once_per_model(tmp_path, monkeypatch):
    # a cache of its own: other tests write templates into the shared one meanwhile
    monkeypatch.setenv("GOA_CACHE", str(tmp_path / "cache"))
    root = cache_root() / "onnx-templates"
    first, _, _ = _compile("qwen2", tmp_path / "a", "rewrite")
    assert first["export"]["decoder_graph"] == "torch.export"          # nothing cached yet
    before = sorted(p.name for p in root.iterdir())
    report, _, _ = _compile("qwen2", tmp_path / "b", "rewrite", ratio=0.2, seed=3)
    assert sorted(p.name for p in root.iterdir()) == before          # the same template, found by its hash
    assert report["export"]["method"] == "rewrite"
    assert all((root / n / "model.onnx").is_file() for n in before)


def test_a_cached_template_serves_as_the_decoder_graph(tmp_path, monkeypatch):
    """The second compile reads the decoder's structures from the cached template (no second
    torch.export) and emits what a compile that exports the pruned decoder emits: the same
    units, logits, cache geometry and onnxruntime-genai config."""
    import json

    from goa_compiler.driver import pipeline

    monkeypatch.setenv("GOA_CACHE", str(tmp_path / "cache"))
    _compile("llama-gqa", tmp_path / "warm", "rewrite")
    traced = []
    real = pipeline.capture_decoder
    monkeypatch.setattr(pipeline, "capture_decoder", lambda m, f=None: traced.append(m) or real(m, f))
    served, a, vocab = _compile("llama-gqa", tmp_path / "served", "rewrite", ratio=0.5, seed=5)
    assert served["export"] == {"method": "rewrite", "decoder_graph": "the cached dense template",
                                "note": served["export"]["note"]} and traced == []
    exported, b, _ = _compile("llama-gqa", tmp_path / "exported", "reexport", ratio=0.5, seed=5)
    assert exported["export"]["decoder_graph"] == "torch.export" and len(traced) == 1
    assert [m["kept"] for m in served["modules"]] == [m["kept"] for m in exported["modules"]]
    assert served["decoder"] == exported["decoder"]
    assert any(lc["kv_heads"]["pruned"] < lc["kv_heads"]["dense"] for lc in served["decoder"]["layers"])
    assert json.loads((a.parent / "genai_config.json").read_text()) == \
        json.loads((b.parent / "genai_config.json").read_text())
    ids = np.random.default_rng(1).integers(0, vocab, (2, 17))
    x, y = run_onnx(a, ids, np.ones_like(ids)), run_onnx(b, ids, np.ones_like(ids))
    assert np.abs(x - y).max() <= 1e-4 * np.abs(y).max()


def test_a_template_that_does_not_take_the_compile_falls_back_to_the_traced_decoder(tmp_path, monkeypatch):
    from goa_compiler.export import template

    monkeypatch.setenv("GOA_CACHE", str(tmp_path / "cache"))
    _compile("llama-gqa", tmp_path / "warm", "rewrite")
    monkeypatch.setattr(template, "rewrite_template", lambda *a, **k: template.TemplateResult(None, "refused here"))
    report, path, vocab = _compile("llama-gqa", tmp_path / "b", "rewrite")
    assert report["export"] == {"method": "re-export", "note": "refused here", "decoder_graph": "torch.export"}
    assert report["decoder"]["kv_cache"] and report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4


def test_a_model_whose_onnx_analysis_differs_is_re_exported(tmp_path):
    """Multi-query LLaMA: PyTorch analysis prunes query heads, the ONNX one finds one K/V group."""
    report, path, vocab = _compile("llama-mqa", tmp_path, "rewrite")
    assert report["export"]["method"] == "re-export"
    assert "other structures" in report["export"]["note"]
    assert report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4


def test_a_failed_template_export_leaves_nothing(tmp_path, monkeypatch):
    from goa_compiler.export import template

    root = tmp_path / "templates"

    def broken(path):
        path.write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        template.cached_template(root, "k", broken)
    assert list(root.iterdir()) == []
    made = template.cached_template(root, "k", _tiny_onnx)
    weight = onnx.load(str(made), load_external_data=False).graph.initializer[0]
    assert weight.data_location == onnx.TensorProto.EXTERNAL
    assert [p.name for p in root.iterdir()] == ["k"] and sorted(p.name for p in (root / "k").iterdir()) == \
        ["model.onnx", "model.onnx.data"]


def _tiny_onnx(path):
    """A one-node model with a weight, as an exporter writes it (the weight inside the file)."""
    import numpy as np
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 256), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])], [w])
    onnx.save(helper.make_model(graph), str(path))
