"""The KV-cache decoder a compile emits for a causal LM (capture/decoder.py).

The reference is the pruned model in PyTorch (CompileResult.module, the plain graph the
compile selected and reconstructed on, proven by the zeroing oracle elsewhere), generating
32 tokens greedily by re-running the whole sequence. The emitted model.onnx must give
exactly its tokens when decoding with its cache, in raw onnxruntime (serve/generate.py, the loop of
`goa generate`) and in onnxruntime-genai, with every layer's K/V heads static and, under
--allocation global, different from layer to layer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from goa_compiler.driver.options import CompileOptions
from goa_compiler.driver.pipeline import compile_loaded
from goa_compiler.serve import generate as gen
from goa_compiler.ui import cli
from models import tiny

import out_files  # tests/out_files.py

PROMPT = [3, 17, 42, 99, 5, 61, 7]
NEW = 32


def torch_greedy(module, prompt, n):
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            logits = module(seq, torch.ones_like(seq))
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt):].tolist()


def compile_tiny(family, out, **opts):
    model, _, kind = tiny.build(family, seed=0)
    options = CompileOptions(**{"ratio": 0.3, "num_samples": 4, "seq_len": 16, "batch_size": 4, **opts})
    res = compile_loaded(model, kind, options, out, tokenizer=tiny.byte_tokenizer())
    return model, res


# families beyond the first two: a cache in another layout would show here
FAMILIES = ["llama-gqa", "gpt2", "llama", "mistral", "phi3", "opt", "gpt-neox", "falcon", "falcon-mqa", "gptj", "gpt-bigcode",
            "llama-mqa", "mixtral", "qwen2-moe", "xglm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_gives_the_pruned_models_tokens(family, tmp_path):
    out = tmp_path / "out"
    _, res = compile_tiny(family, out, allocation="global")
    dec = res.report["decoder"]
    assert dec["kv_cache"] is True, dec
    # OUT/hf only where the architecture rebuilds at the pruned widths (not Phi-3)
    written = res.report["checkpoint"]["written"]
    assert sorted(p.name for p in out.iterdir()) == [f for f in out_files.DECODER if written or f != "hf"]
    want = torch_greedy(res.module, PROMPT, NEW)
    d = gen.load(out)
    # the graph's past inputs say each layer's pruned K/V heads, as the report does
    heads = {p.layer: p.heads for p in d.sig.past}
    assert heads == {row["layer"]: row["kv_heads"]["pruned"] for row in dec["layers"]}
    got = gen.generate(d, PROMPT, NEW)["tokens"]
    # an end-of-sequence token stops generation early; the byte tokenizer has none
    assert got == want
    assert genai_greedy(out, PROMPT, NEW) == want


def genai_greedy(out, prompt, n):
    import onnxruntime_genai as og     # a test dependency (pyproject [test]): missing is a failure
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(np.array([prompt], dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    return [int(t) for t in g.get_sequence(0)][len(prompt):]


def test_uneven_widths_load_and_match_in_onnxruntime_genai(tmp_path):
    out = tmp_path / "out"
    # global allocation on a model with 4 K/V heads per layer: the layers keep different counts
    _, res = compile_tiny("llama", out, allocation="global", ratio=0.4)
    kv = [row["kv_heads"]["pruned"] for row in res.report["decoder"]["layers"]]
    attn = [m for m in res.report["modules"] if m["kind"] == "attention"]
    assert len({len(m["kept"]) for m in attn}) > 1 or len(set(kv)) > 1, (kv, attn)
    want = torch_greedy(res.module, PROMPT, NEW)
    assert genai_greedy(out, PROMPT, NEW) == want
    assert gen.generate(gen.load(out), PROMPT, NEW)["tokens"] == want


def test_no_kv_cache_keeps_the_plain_graph(tmp_path):
    out = tmp_path / "out"
    _, res = compile_tiny("llama-gqa", out, kv_cache=False, criterion="magnitude", reconstruct="none")
    assert sorted(p.name for p in out.iterdir()) == out_files.expected(kv_cache=False)
    assert res.report["decoder"] == {"kv_cache": False, "reason": "--no-kv-cache"}
    assert cli.main(["generate", str(out), "--prompt", "ab"]) == 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "out"
    compile_tiny("llama-gqa", out, criterion="magnitude", reconstruct="none")
    return out


def test_generate_imports_no_torch(compiled):
    code = ("import sys; from goa_compiler.ui.cli import main; "
            f"rc = main(['generate', {str(compiled)!r}, '--prompt', 'hello', '--max-new-tokens', '4', '--json']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["tokens"]) == 4 and res["timings"]["decode_ms_per_token"] > 0


def test_generate_streams_text_and_samples_reproducibly(compiled, capsys):
    assert cli.main(["generate", str(compiled), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    assert text.endswith("\n")
    runs = []
    for _ in range(2):
        assert cli.main(["generate", str(compiled), "--prompt", "hi", "--max-new-tokens", "8", "--json",
                         "--temperature", "0.9", "--top-p", "0.8", "--seed", "3"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("args, message", [
    (lambda out, tmp: [str(tmp), "--prompt", "x"], "has no model.onnx"),
    (lambda out, tmp: [str(out), "--prompt", "x" * 600], "exceeds the model's"),
    (lambda out, tmp: [str(out), "--prompt", "x", "--provider", "cuda"], "CUDAExecutionProvider"),
    (lambda out, tmp: [str(out), "--prompt", "x", "--top-p", "0"], "--top-p"),
    (lambda out, tmp: [str(out)], "--prompt is required"),
])
def test_generate_refuses_bad_input_with_one_line(compiled, tmp_path, capsys, args, message):
    import onnxruntime as ort

    argv = args(compiled, tmp_path)
    if "cuda" in argv and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    assert cli.main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_unknown_provider_is_refused_by_the_parser(compiled, capsys):
    assert cli.main(["generate", str(compiled), "--prompt", "x", "--provider", "tpu"]) == 2


def test_choose_top_p_keeps_the_nucleus():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    seen = {gen.choose(logits, gen.Sampling(1.0, 0.7, 0), rng) for _ in range(200)}
    assert seen == {0, 1}
    assert gen.choose(logits, gen.Sampling(0.0), rng) == 0


# ---------------------------------------------------------------------------- OUT/hf

def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


@pytest.mark.parametrize("family, allocation, form", [
    ("llama-gqa", "uniform", "standard"),     # equal widths: a plain Hugging Face directory
    ("qwen2", "uniform", "standard"),
    ("llama-gqa", "global", "per-layer"),     # widths differ by layer: load_pruned
    ("gpt-neox", "global", "per-layer"),
    ("gpt2", "uniform", "per-layer"),         # widths in attributes (split_size, num_heads, Conv1D nf)
    ("opt", "global", "per-layer"),
])
def test_checkpoint_reloads_to_the_pruned_models_logits(family, allocation, form, tmp_path):
    from transformers import AutoModelForCausalLM

    from goa_compiler import load_pruned

    out = tmp_path / "out"
    _, res = compile_tiny(family, out, allocation=allocation)
    ck = res.report["checkpoint"]
    assert ck["written"] and ck["form"] == form, ck
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = res.module(ids, torch.ones_like(ids))
    for model in [load_pruned(out / "hf")] + ([AutoModelForCausalLM.from_pretrained(out / "hf")]
                                              if form == "standard" else []):
        got = _logits(model.eval(), ids)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    if form == "standard":
        cfg = json.loads((out / "hf" / "config.json").read_text())
        att = [m for m in res.report["modules"] if m["kind"] == "attention"]
        ffn = [m for m in res.report["modules"] if m["kind"] == "ffn"]
        assert cfg["num_attention_heads"] == len(att[0]["kept"])
        assert cfg["intermediate_size"] == len(ffn[0]["kept"])
    else:
        assert (out / "hf" / "goa_pruned.json").is_file()


def test_a_family_that_reads_widths_from_its_config_gets_no_checkpoint_and_a_reason(tmp_path):
    """Phi-3's attention sizes its fused QKV split from the shared config: built at the pruned
    shapes it cannot run, so nothing is written and the report says why (model.onnx serves it)."""
    out = tmp_path / "out"
    _, res = compile_tiny("phi3", out, criterion="magnitude", reconstruct="none", allocation="global")
    ck = res.report["checkpoint"]
    assert not ck["written"] and "does not rebuild" in ck["reason"], ck
    assert not (out / "hf").exists()


# ---------------------------------------------------------------------------- --dtype fp16

@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_fp16_decoder_is_within_fp16_tolerance_of_the_pruned_model(family, tmp_path):
    from goa_compiler.export.onnx import run_onnx

    out = tmp_path / "out"
    _, res = compile_tiny(family, out, dtype="fp16")
    assert res.report["decoder"]["dtype"] == "float16"
    d = gen.load(out)
    assert all(p.dtype == np.float16 for p in d.sig.past)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = res.module(ids, torch.ones_like(ids)).numpy()
    got = run_onnx(out / "model.onnx", ids.numpy())
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - ref).max() <= 1e-2 * np.abs(ref).max()
    # and it decodes with its float16 cache
    assert len(gen.generate(d, PROMPT, 8)["tokens"]) == 8


# ---------------------------------------------------------------------------- refused caches

def _sliding_mistral():
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_a_sliding_window_cache_falls_back_to_the_plain_graph_with_the_reason(tmp_path):
    """A cache that drops old positions is not the decoder signature (present = past + new):
    the compile emits the plain graph and says why, rather than a decoder that is wrong past
    the window."""
    out = tmp_path / "out"
    res = compile_loaded(_sliding_mistral(), "causal-lm", CompileOptions(ratio=0.3, criterion="magnitude",
                                                                        reconstruct="none"), out)
    dec = res.report["decoder"]
    assert dec["kv_cache"] is False and "sliding window of 8" in dec["reason"], dec
    assert not (out / "genai_config.json").exists()


def test_kv_cache_asked_for_and_refused_is_an_error(tmp_path):
    from goa_compiler.driver.pipeline import CompileError

    with pytest.raises(CompileError, match="--kv-cache: .*sliding window"):
        compile_loaded(_sliding_mistral(), "causal-lm", CompileOptions(ratio=0.3, criterion="magnitude",
                                                                      reconstruct="none", kv_cache=True),
                       tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_positions_count_the_real_tokens_before_each_one():
    """Left padding: positions start at the first real token, in the prefill and in a step."""
    from goa_compiler.serve.feeds import positions

    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(positions(mask, past=4), [[2], [4]])
