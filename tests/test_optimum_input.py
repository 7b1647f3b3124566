"""ONNX input from Optimum's exporter (``optimum-cli export onnx``), where many users get
their ONNX files.

optimum-onnx pins transformers < 4.58, so it runs in a virtual environment of its own
(tools/optimum_export.py makes it on first use); where that environment cannot be made the
tests skip with the reason. Optimum's graphs differ from torch.onnx's dynamo export: sizes
are Shape / Gather arithmetic (GPT-2's Conv1D split, Phi-3's ``chunk`` of the fused gate/up
as Slice bounds computed from the shape), equal constants are merged into one initializer,
and the KV cache is ``past_key_values.N.key`` / ``present.N.key``.

- The zeroing oracle (tests/oracle_layout.py, from the model alone) on Optimum's ONNX of
  tiny models, with and without the KV cache: the compiled ONNX in onnxruntime equals the
  dense PyTorch model with the removed units' level-2 input columns zeroed; attention and
  FFN are pruned in every layer.
- The KV-cache decoder compiled from Optimum's ONNX generates in onnxruntime-genai.
- The same model compiled from Optimum's ONNX and from PyTorch (default criterion and
  reconstruction) keeps the same units, and the logits agree to 1e-3.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from goa_compiler.driver.pipeline import CompileOptions, compile_loaded, compile_onnx
from goa_compiler.export.onnx import run_onnx
from models import tiny
import oracle_layout as ol  # tests/oracle_layout.py
from tools import optimum_export


@pytest.fixture(scope="module")
def optimum_onnx(tmp_path_factory):
    try:
        optimum_export.ensure_venv()
    except optimum_export.Unavailable as e:
        pytest.skip(f"Optimum's exporter environment could not be made: {e}")
    cache = {}

    def get(family, task):
        if (family, task) not in cache:
            root = tmp_path_factory.mktemp(f"optimum-{family}")
            model_dir = tiny.save(family, root / "hf")
            path = optimum_export.export(model_dir, root / "onnx", task)
            model, vocab, _ = tiny.build(family, seed=0)
            # Optimum's transformers reads the saved config as the same model (the oracle's premise)
            ids, mask = _ids(vocab)
            assert ol.relative_error(run_onnx(path, ids.numpy(), mask.numpy()),
                                     ol.dense_output(model, "causal-lm", ids, mask)) < 1e-5
            cache[family, task] = model, vocab, path
        return cache[family, task]
    return get


def _ids(vocab):
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


# gpt2: fused QKV in a Conv1D taken apart by Split with computed sizes, biases; llama-gqa:
# grouped K/V; phi3: fused gate/up taken apart by chunk (Slice bounds from the shape);
# falcon-mqa: one K/V head broadcast over the query heads by eager MatMuls; gptj: the
# present keys a Cast of the Concat; gpt-bigcode: the one K/V head expanded over the query
# heads with sizes through Where(Equal(sizes, -1), ones, sizes), its cache carrying it on
# the features
@pytest.mark.parametrize("family,task", [("gpt2", "text-generation-with-past"),
                                         ("gpt-bigcode", "text-generation-with-past"),
                                         ("llama-gqa", "text-generation-with-past"),
                                         ("phi3", "text-generation"),
                                         ("falcon-mqa", "text-generation-with-past"),
                                         ("gptj", "text-generation-with-past")])
def test_oracle_holds_for_optimum_onnx(family, task, optimum_onnx, tmp_path):
    model, vocab, path = optimum_onnx(family, task)
    opts = CompileOptions(ratio=0.35, criterion="random", reconstruct="none", overwrite=True,
                          num_samples=8, seq_len=64)
    report = compile_onnx(path, opts, tmp_path / "out", tokenizer=tiny.byte_tokenizer()).report
    modules = report["modules"]
    assert {(m["layer"], m["kind"]) for m in modules} == {(i, k) for i in range(ol.layers(model.config))
                                                           for k in ("attention", "ffn")}
    assert all(m["kept"] != list(range(m["total"])) for m in modules)
    ids, mask = _ids(vocab)
    ref = ol.dense_output(ol.zeroed_dense(model, family, modules), "causal-lm", ids, mask)
    got = run_onnx(tmp_path / "out" / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < 1e-4
    assert ol.relative_error(got, ol.dense_output(model, "causal-lm", ids, mask)) > 1e-3
    assert report["params"]["after"] < report["params"]["before"]
    if task.endswith("with-past"):
        assert report["decoder"]["kv_cache"] is True
        assert report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4     # prefill + cached step
        assert len(ol.genai_sequence(tmp_path / "out", ids[0, :4].numpy(), 12)) == 12


def test_optimum_onnx_and_pytorch_agree(optimum_onnx, tmp_path):
    model, vocab, path = optimum_onnx("llama-gqa", "text-generation-with-past")
    tok = tiny.byte_tokenizer()
    opts = CompileOptions(ratio=0.3, num_samples=8, seq_len=64, overwrite=True)
    from_torch = compile_loaded(model, "causal-lm", opts, tmp_path / "pt", tokenizer=tok).report
    from_onnx = compile_onnx(path, opts, tmp_path / "onnx", tokenizer=tok).report
    assert [(m["name"], m["kept"]) for m in from_onnx["modules"]] == \
        [(m["name"], m["kept"]) for m in from_torch["modules"]]
    ids, mask = _ids(vocab)
    a = run_onnx(tmp_path / "pt" / "model.onnx", ids.numpy(), mask.numpy())
    b = run_onnx(tmp_path / "onnx" / "model.onnx", ids.numpy(), mask.numpy())
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3
