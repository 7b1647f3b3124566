"""ONNX files as compiler input: what torch.onnx (dynamo) writes for tiny transformers models.

- The zeroing oracle (tests/oracle_layout.py, from the model alone): the ONNX compiled from
  an ONNX file, run in onnxruntime, equals the dense PyTorch model with the removed units'
  level-2 input columns zeroed.
- The two frontends agree: the same model compiled from its ONNX file and from PyTorch,
  with the same criterion, ratio, calibration and seed, keeps the same units, and the two
  outputs agree to 1e-3 relative on the logits.
- `goa analyze` / `goa compile` take the file; what the frontend refuses is one line, exit 2.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from goa_compiler.driver.pipeline import CompileOptions, compile_loaded, compile_onnx
from goa_compiler.export.onnx import run_onnx
from goa_compiler.ui import cli
from models import tiny
import oracle_layout as ol  # tests/oracle_layout.py
from tools.onnx_input import export_logits_onnx  # the export a user runs (the repository root is on sys.path)

# the exporter's forms of: fused QKV + Conv1D (gpt2), grouped K/V (llama-gqa), fused gate/up
# (phi3), partial rotary + parallel attention (gptj), Q/K norms (gemma3), heads merged into the batch
# axis with ALiBi from the mask (bloom)
FAMILIES = ["gpt2", "llama-gqa", "phi3", "gptj", "gemma3", "bloom"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(family, optimize=True):
        key = (family, optimize)
        if key not in cache:
            model, vocab, kind = tiny.build(family, seed=0)
            path = tmp_path_factory.mktemp("onnx") / f"{family}.onnx"
            cache[key] = (model, vocab, export_logits_onnx(model, path, vocab, max_seq=256, optimize=optimize))
        return cache[key]
    return get


def _opts(**kw):
    base = dict(ratio=0.35, criterion="magnitude", reconstruct="none", overwrite=True, num_samples=8, seq_len=64)
    return CompileOptions(**{**base, **kw})


def _ids(vocab):
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_holds_for_onnx_input(family, exported, tmp_path):
    model, vocab, path = exported(family)
    report = compile_onnx(path, _opts(criterion="random"), tmp_path / "out").report
    modules = report["modules"]
    assert {(m["layer"], m["kind"]) for m in modules} == {(i, k) for i in range(ol.layers(model.config))
                                                           for k in ("attention", "ffn")}
    assert any(m["kept"] != list(range(m["total"])) for m in modules if m["kind"] == "attention")
    ids, mask = _ids(vocab)
    ref = ol.dense_output(ol.zeroed_dense(model, family, modules), "causal-lm", ids, mask)
    got = run_onnx(tmp_path / "out" / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < 1e-4
    # the dense output differs: the oracle is not comparing the model with itself
    assert ol.relative_error(got, ol.dense_output(model, "causal-lm", ids, mask)) > 1e-3
    assert report["params"]["after"] < report["params"]["before"]


def test_oracle_holds_for_an_unoptimized_export(exported, tmp_path):
    """torch.onnx without its optimizer: Constant nodes, Transpose of every weight, CastLike."""
    model, vocab, path = exported("llama-gqa", optimize=False)
    report = compile_onnx(path, _opts(), tmp_path / "out").report
    ids, mask = _ids(vocab)
    ref = ol.dense_output(ol.zeroed_dense(model, "llama-gqa", report["modules"]), "causal-lm", ids, mask)
    got = run_onnx(tmp_path / "out" / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < 1e-4


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_onnx_and_pytorch_frontends_agree(family, exported, tmp_path):
    """Default criterion and reconstruction (goa, refit with compensation) on calibration text."""
    model, vocab, path = exported(family)
    tok = tiny.byte_tokenizer()
    opts = CompileOptions(ratio=0.3, num_samples=8, seq_len=64, overwrite=True, kv_cache=False)
    from_torch = compile_loaded(model, "causal-lm", opts, tmp_path / "pt", tokenizer=tok).report
    from_onnx = compile_onnx(path, opts, tmp_path / "onnx", tokenizer=tok).report
    assert [(m["name"], m["kept"]) for m in from_onnx["modules"]] == \
        [(m["name"], m["kept"]) for m in from_torch["modules"]]
    ids, mask = _ids(vocab)
    a = run_onnx(tmp_path / "pt" / "model.onnx", ids.numpy(), mask.numpy())
    b = run_onnx(tmp_path / "onnx" / "model.onnx", ids.numpy(), mask.numpy())
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3
    assert from_onnx["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4


def test_the_sensitivity_pass_is_the_same_from_onnx(exported):
    """The sensitivity pass (--allocation network, --skip-layers auto) differentiates the
    ONNX graph's ops as it does the torch.fx graph: the same s_m per module."""
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.capture.torch_export import capture
    from goa_compiler.frontends.fx import FxFrontend
    from goa_compiler.frontends.onnx import OnnxFrontend
    from goa_compiler.prune.sensitivity import output_sensitivity

    model, vocab, path = exported("llama-gqa")
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(4))
    feeds = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    fx = FxFrontend(capture(model, "causal-lm").gm)
    ox = OnnxFrontend.load(path)
    a = output_sensitivity(fx, list(analyze_graph(fx.view()).structures), feeds)
    b = output_sensitivity(ox, list(analyze_graph(ox.view()).structures), feeds)
    assert set(a) == set(b) and len(a) == 4
    for name in a:
        assert a[name] > 0 and abs(a[name] - b[name]) <= 1e-4 * a[name], (name, a[name], b[name])


# ----------------------------------------------------------------- the command line

def test_cli_analyze_and_compile_an_onnx_file(exported, tmp_path, capsys):
    model, vocab, path = exported("llama-gqa")
    assert cli.main(["analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in data["structures"]] == ["attention", "ffn", "attention", "ffn"]
    assert data["structures"][0]["kv_heads"] == 2
    tok_dir = tiny.save("llama-gqa", tmp_path / "tok")
    out = tmp_path / "out"
    rc = cli.main(["compile", str(path), "--tokenizer", tok_dir, "--ratio", "0.3", "--num-samples", "4",
                   "--seq-len", "32", "--out", str(out), "--quiet", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decoder"]["kv_cache"] is False and "ONNX input" in report["decoder"]["reason"]
    assert {"model.onnx", "report.json", "report.html"} <= {p.name for p in out.iterdir()}
    assert report["inputs"]["model"]["onnx_sha256"]
    # torch.onnx kept the weights beside the file: so does OUT (the external-data layout is kept)
    assert path.with_name(path.name + ".data").is_file() and (out / "model.onnx.data").is_file()


def test_cli_onnx_without_tokenizer_is_one_line(exported, tmp_path, capsys):
    _, _, path = exported("llama-gqa")
    rc = cli.main(["compile", str(path), "--ratio", "0.3", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--tokenizer" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_refused_onnx_is_one_line(tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper
    import onnx

    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("Hardmax", ["h"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])],
                              initializer=[numpy_helper.from_array(np.ones((4, 4), np.float32), "emb")])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    rc = cli.main(["analyze", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Hardmax" in err[0]


# ----------------------------------------------------------------- a KV-cache decoder as input

@pytest.fixture(scope="module")
def decoder_onnx(tmp_path_factory):
    """The KV-cache decoder torch.onnx (dynamo) writes for tiny llama-gqa: inputs input_ids,
    attention_mask, position_ids, past_key_values.N.key/value [batch, 2, past, 16]."""
    from goa_compiler.capture.decoder import capture_decoder
    from goa_compiler.export.onnx import export_decoder

    model, vocab, _ = tiny.build("llama-gqa", seed=0)
    dec = capture_decoder(model)
    path = tmp_path_factory.mktemp("dec") / "decoder.onnx"
    export_decoder(dec.gm, dec.example(dec.layers), path, dec.input_names, dec.output_names, len(dec.layers))
    return model, vocab, path


def test_a_kv_cache_decoder_input_is_pruned_with_its_cache(decoder_onnx, tmp_path):
    """Cache inputs are ports: pruned K/V groups leave the cache; the oracle holds on the
    prefill and onnxruntime-genai generates from OUT."""
    model, vocab, path = decoder_onnx
    tok = tiny.byte_tokenizer()
    report = compile_onnx(path, _opts(ratio=0.5, allocation="uniform"), tmp_path / "out", tokenizer=tok).report
    layers = report["decoder"]["layers"]
    assert [lc["kv_heads"] for lc in layers] == [{"dense": 2, "pruned": 1}] * 2
    assert report["decoder"]["kv_cache_bytes_per_token"]["pruned"] * 2 == \
        report["decoder"]["kv_cache_bytes_per_token"]["dense"]
    assert report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4     # prefill + cached step in onnxruntime
    ids, mask = _ids(vocab)
    ref = ol.dense_output(ol.zeroed_dense(model, "llama-gqa", report["modules"]), "causal-lm", ids, mask)
    got = run_onnx(tmp_path / "out" / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < 1e-4
    assert len(ol.genai_sequence(tmp_path / "out", ids[0, :4].numpy(), 12)) == 12
