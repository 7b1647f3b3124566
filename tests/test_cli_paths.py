"""`goa` paths not covered elsewhere: --overwrite, the --max-logit-error gate on calibration
windows, a user's .gguf file, `goa analyze --all`, `goa eval --max-tokens`, and
--skip-layers through the command line. Tiny models, calibration from a small text file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from goa_compiler.ui import cli
from models import tiny
import out_files  # tests/out_files.py

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and "
        "void; and darkness was upon the face of the deep. ") * 20     # ASCII: one byte, one token


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save("llama-gqa", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "calib.txt"
    p.write_text(TEXT)
    return str(p)


def cheap(calib):
    return ["--calib", calib, "--num-samples", "2", "--seq-len", "16", "--quiet"]


def run_json(capsys, argv):
    rc = cli.main(argv + ["--json"])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out), cap.err


def onnx_logits(path, ids: np.ndarray) -> np.ndarray:
    from goa_compiler.export.onnx import run_onnx   # a KV-cache decoder: the prefill

    return run_onnx(path, ids).astype(np.float64)


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


def hf_logits(model, ids) -> np.ndarray:
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits.double().numpy()


def unit_params(config) -> dict[str, int]:
    """Parameters one unit of the tiny GQA Llama removes (no biases): a K/V group (its rep
    query heads' q rows and o columns, its k and v rows), an FFN neuron (gate, up, down)."""
    assert not config.attention_bias and not config.mlp_bias
    hd = config.hidden_size // config.num_attention_heads
    rep = config.num_attention_heads // config.num_key_value_heads
    return {"attention": (2 * rep + 2) * hd * config.hidden_size, "ffn": 3 * config.hidden_size}


def units(m) -> tuple[int, int]:
    """(units, kept units) of a report module: K/V groups for GQA attention, else neurons."""
    if "kv_total" in m:
        return m["kv_total"], len(m["kv_kept"])
    return m["total"], len(m["kept"])


# ------------------------------------------------------------------------------ --overwrite

def test_overwrite_replaces_a_non_empty_out(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"not a model")
    (out / "stale.txt").write_text("from an earlier run")
    (out / "old" / "x.bin").write_bytes(b"\x00" * 10)
    rc, report, err = run_json(capsys, ["compile", llama_dir, "--ratio", "0.3", "--criterion", "magnitude",
                                        "--reconstruct", "none", "--out", str(out), "--overwrite", "--quiet"])
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == out_files.DECODER
    assert report == json.loads((out / "report.json").read_text())
    assert report["ratio_requested"] == 0.3 and report["params"]["after"] < report["params"]["before"]
    ids = np.arange(24).reshape(2, 12)
    assert onnx_logits(out / "model.onnx", ids).shape == (2, 12, 256)      # the new model, loadable
    assert list(tmp_path.iterdir()) == [out]       # no staging or backup directory left beside OUT


# ------------------------------------------------------------------------------ --max-logit-error

def test_max_logit_error_on_calibration_windows(llama_dir, calib, tmp_path, capsys):
    """No --eval: the logit error is measured on 4 random windows of the calibration data drawn
    with seed + 1 (not the calibration windows). Recomputed here from the emitted ONNX and the
    dense checkpoint on those windows; the calibration windows give a different value."""
    from goa_compiler.data import load_texts, token_windows

    out = tmp_path / "out"
    limit = 10.0
    rc, report, err = run_json(capsys, ["compile", llama_dir, "--ratio", "0.3", "--criterion", "magnitude",
                                        "--reconstruct", "none", "--seed", "5", "--max-logit-error", str(limit),
                                        "--out", str(out)] + cheap(calib))
    le = report["logit_error"]
    assert le["data"] == f"{calib} (calibration split), 4 random windows of 16 tokens, seed 6"
    assert le["windows"] == 4 and le["seq_len"] == 16
    assert "perplexity" not in report                     # no held-out evaluation was asked for
    # the data-free criterion reads no calibration data, but the gate did: it is hashed
    assert report["inputs"]["calibration"]["source"] == calib
    gate = report["gates"]["results"]
    assert [g["name"] for g in gate] == ["max-logit-error"] and gate[0]["measured"] == le["value"]
    assert gate[0]["passed"] is (le["value"] <= limit) and rc == (0 if gate[0]["passed"] else 3)

    tok = tiny.byte_tokenizer()
    texts = load_texts(calib, split="calib")
    dense = hf_model(llama_dir)

    def rel_error(ids):
        got, ref = onnx_logits(out / "model.onnx", ids.numpy()), hf_logits(dense, ids)
        return float(np.linalg.norm((got - ref).ravel()) / np.linalg.norm(ref.ravel()))

    w6 = token_windows(tok, texts, 16, 4, seed=6)
    w5 = token_windows(tok, texts, 16, 4, seed=5)
    assert not torch.equal(w5, w6)
    want = rel_error(w6)
    assert want > 0 and le["value"] == pytest.approx(want, rel=1e-6)
    assert abs(rel_error(w5) - want) > 1e-3 * want


# ------------------------------------------------------------------------------ a user's .gguf

def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which transformers undoes on load."""
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path) -> Path:
    """A float32 llama GGUF of a tiny HF Llama, with a 256-token byte-level vocabulary (GPT-2
    byte spelling; id b = byte b, except 255, which never occurs in UTF-8 text, is
    <|endoftext|>, so the tokenizer transformers builds has exactly 256 tokens)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    spell = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([spell[b] for b in range(255)] + ["<|endoftext|>"])
    w.add_token_scores([0.0] * 256)
    w.add_token_types([gguf.TokenType.NORMAL] * 256)
    w.add_bos_token_id(255)
    w.add_eos_token_id(255)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(c.num_hidden_layers):
        names.update({f"model.layers.{layer}.{a}.weight": f"blk.{layer}.{b}.weight" for a, b in hf.items()})
    assert set(sd) == set(names)
    for k, name in names.items():
        t = sd[k]
        if ".attn_q." in name:
            t = _permute(t, c.num_attention_heads, c.num_attention_heads)
        elif ".attn_k." in name:
            t = _permute(t, c.num_attention_heads, c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_user_gguf_compiles_like_the_same_checkpoint(llama_dir, calib, tmp_path, monkeypatch, capsys):
    """A .gguf file is dequantized into the cache once and compiles exactly like the Hugging
    Face checkpoint it was written from: the same units kept, the same ONNX outputs."""
    pytest.importorskip("gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("GOA_CACHE", str(cache))
    model, _, _ = tiny.build("llama-gqa")
    path = write_llama_gguf(model, tmp_path / "tiny.gguf")
    args = ["--ratio", "0.3"] + cheap(calib)

    rc, rep, err = run_json(capsys, ["compile", str(path), "--out", str(tmp_path / "g")] + args)
    assert rc == 0, err
    converted = [d for d in cache.iterdir() if d.name != "onnx-templates"]   # beside the export's template
    assert len(converted) == 1 and converted[0].name.startswith("gguf-tiny-")
    assert {"config.json", "model.safetensors"} <= {p.name for p in converted[0].iterdir()}
    assert rep["model"] == f"GGUF file {path}, dequantized to float32 (converted now: {converted[0]})"
    assert rep["model_spec"] == str(path)

    rc, ref, err = run_json(capsys, ["compile", llama_dir, "--out", str(tmp_path / "h")] + args)
    assert rc == 0, err
    keep = lambda r: [(m["name"], m["kept"]) for m in r["modules"]]  # noqa: E731
    assert keep(rep) == keep(ref)
    assert rep["params"] == ref["params"]
    ids = np.arange(3, 3 + 2 * 20).reshape(2, 20)
    a, b = onnx_logits(tmp_path / "g" / "model.onnx", ids), onnx_logits(tmp_path / "h" / "model.onnx", ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()

    # the second time, the cached conversion is used
    rc, again, err = run_json(capsys, ["analyze", str(path)])
    assert rc == 0, err
    assert again["model"] == f"GGUF file {path}, dequantized to float32 (cached: {converted[0]})"
    assert [d for d in cache.iterdir() if d.name != "onnx-templates"] == converted


# ------------------------------------------------------------------------------ analyze --all

def test_analyze_all_lists_the_projections_that_are_not_level_1(llama_dir, capsys):
    """The tiny Llama's linear layers that are not level 1 of a structure: each block's o_proj
    and down_proj (level 2: they write into the residual stream) and lm_head."""
    level1 = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    expected = {name + ".weight" for name, mod in hf_model(llama_dir).named_modules()
                if isinstance(mod, torch.nn.Linear) and not name.endswith(level1)}
    assert "lm_head.weight" in expected and len(expected) == 5

    assert cli.main(["analyze", llama_dir]) == 0
    plain = capsys.readouterr().out
    assert f"{len(expected)} other projections are not level-1 of any structure (--all lists them)" in plain
    assert "not prunable:" not in plain

    assert cli.main(["analyze", llama_dir, "--all"]) == 0
    out = capsys.readouterr().out
    assert f"{len(expected)} other projections are not level-1 of any structure\n" in out
    listed = {}
    for line in out.splitlines():
        if line.startswith("  not prunable: "):
            param, _, reason = line[len("  not prunable: "):].partition(": ")
            listed[param] = reason
    assert set(listed) == expected
    assert listed["lm_head.weight"] == "channels reach a model output"
    assert all("residual stream" in r for p, r in listed.items() if p != "lm_head.weight")
    # the same list as --json's non-candidate refusals
    assert cli.main(["analyze", llama_dir, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["param"]: r["reason"] for r in data["refused"] if not r["candidate"]} == listed


# ------------------------------------------------------------------------------ eval --max-tokens

@pytest.mark.parametrize("max_tokens, windows", [(40, 2), (16, 1), (5, 1), (10_000, 6)])
def test_eval_max_tokens_scores_exactly_that_many_windows(llama_dir, tmp_path, capsys, max_tokens, windows):
    """--max-tokens N keeps the first max(1, N // seq_len) consecutive windows (all of them when
    the text has fewer): with the byte tokenizer window k is bytes [16k, 16k + 16) of the
    text. The perplexity is recomputed from the dense model on exactly those windows."""
    text = tmp_path / "eval.txt"
    text.write_text(TEXT[:100])                            # 6 windows of 16 (and 4 bytes left)
    data = text.read_bytes()
    rc, res, err = run_json(capsys, ["eval", llama_dir, "--data", str(text), "--seq-len", "16",
                                     "--max-tokens", str(max_tokens)])
    assert rc == 0, err
    assert res["windows"] == windows and res["tokens"] == windows * 15 and res["seq_len"] == 16
    ids = np.frombuffer(data[:16 * windows], dtype=np.uint8).astype(np.int64).reshape(windows, 16)
    logits = torch.from_numpy(hf_logits(hf_model(llama_dir), ids))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            torch.from_numpy(ids[:, 1:]).reshape(-1), reduction="mean")
    assert res["nll"] == pytest.approx(float(nll), rel=1e-9)
    assert res["ppl"] == pytest.approx(float(torch.exp(nll)), rel=1e-9)


# ------------------------------------------------------------------------------ --skip-layers

@pytest.mark.parametrize("allocation", ["uniform", "block", "network"])
def test_skip_layers_first_through_the_cli(llama_dir, calib, tmp_path, capsys, allocation):
    """Block 0 keeps every unit; block 1 loses enough that the model loses the ratio, within
    one FFN neuron (uniform: the finest unit absorbs the rounding of the K/V groups; block:
    the FFN fills what a head would overshoot)."""
    from transformers import AutoConfig

    out = tmp_path / "out"
    rc, r, err = run_json(capsys, ["compile", llama_dir, "--ratio", "0.3", "--skip-layers", "first",
                                   "--allocation", allocation, "--out", str(out)] + cheap(calib))
    assert rc == 0, err
    assert r["skipped_layers"] == [0]
    per = unit_params(AutoConfig.from_pretrained(llama_dir))
    assert [(m["layer"], m["kind"]) for m in r["modules"]] == [(0, "attention"), (0, "ffn"),
                                                               (1, "attention"), (1, "ffn")]
    for m in r["modules"]:
        total, kept = units(m)
        if m["layer"] == 0:
            assert kept == total and m["kept"] == list(range(m["total"]))
            assert "output_error" not in m                 # not reconstructed either
        elif allocation == "uniform" or m["kind"] == "ffn":
            assert kept < total
    assert sum(units(m)[0] * per[m["kind"]] for m in r["modules"]) == r["params"]["structured_before"]
    removed = sum((units(m)[0] - units(m)[1]) * per[m["kind"]] for m in r["modules"])
    assert removed == r["params"]["structured_removed"]
    assert abs(removed - 0.3 * r["params"]["structured_before"]) <= per["ffn"]
    assert r["ratio_achieved"] == removed / r["params"]["structured_before"]


# ------------------------------------------------------------------------------ --calib A+B

def test_a_calibration_mixture_through_the_cli(llama_dir, calib, tmp_path, capsys):
    """--calib A+B: each part an equal share of the windows (data.mixture_windows); a part
    that does not exist is one line and exit 2, before anything is compiled."""
    other = tmp_path / "other.txt"
    other.write_text("Simple is better than complex. Flat is better than nested. " * 20)
    spec = f"{calib}+{other}"
    out = tmp_path / "out"
    rc, report, err = run_json(capsys, ["compile", llama_dir, "--ratio", "0.3", "--out", str(out),
                                        "--calib", spec, "--num-samples", "4", "--seq-len", "16", "--quiet"])
    assert rc == 0, err
    assert report["calibration"]["source"] == spec and report["calibration"]["samples"] == 4
    rc, res, err = run_json(capsys, ["eval", str(out), "--data", spec, "--max-tokens", "48", "--seq-len", "16"])
    assert rc == 0, err
    assert res["windows"] == 3 and res["data"] == spec                # a, b, a: each part's first windows
    rc = cli.main(["compile", llama_dir, "--ratio", "0.3", "--out", str(tmp_path / "never"),
                   "--calib", f"{calib}+{tmp_path / 'missing.txt'}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "missing.txt: no such file" in err and "\n" not in err
    assert not (tmp_path / "never").exists()
