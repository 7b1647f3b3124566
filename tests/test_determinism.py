"""Determinism: the same inputs and seed give a byte-identical model.onnx, and a report.json
that differs only in timings; the report records versions and input hashes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from goa_compiler.ui import cli
from models import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_same_inputs_same_bytes(tmp_path, capsys, monkeypatch):
    # a cache of its own, warmed by a first compile: whether the dense template was cached
    # decides which passes run (and so the timings' keys), not what is written
    monkeypatch.setenv("GOA_CACHE", str(tmp_path / "cache"))
    model = tiny.save("llama-gqa", tmp_path / "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("In the beginning God created the heaven and the earth. And the earth was without "
                     "form, and void; and darkness was upon the face of the deep. " * 30)
    args = [model, "--ratio", "0.3", "--criterion", "goa", "--reconstruct", "refit", "--num-samples", "2",
            "--seq-len", "16", "--calib", str(calib), "--seed", "7", "--quiet"]
    cold, a, b = tmp_path / "cold", tmp_path / "a", tmp_path / "b"
    assert cli.main(["compile", *args, "--out", str(cold)]) == 0
    assert cli.main(["compile", *args, "--out", str(a)]) == 0
    assert (cold / "model.onnx").read_bytes() == (a / "model.onnx").read_bytes()
    assert json.loads((a / "report.json").read_text())["export"]["decoder_graph"] == "the cached dense template"
    # the second run in a fresh interpreter with another hash seed (set/dict order of strings)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "goa_compiler", "compile", *args, "--out", str(b)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    capsys.readouterr()

    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert set(ra["timings"]) == set(rb["timings"])
    ra.pop("timings"), rb.pop("timings")
    assert ra == rb

    versions = ra["versions"]
    for name in ("python", "goa-compiler", "torch", "transformers", "onnx", "onnxruntime"):
        assert versions[name], name
    files = ra["inputs"]["model"]["files"]
    assert files["model.safetensors"] == hashlib.sha256((Path(model) / "model.safetensors").read_bytes()).hexdigest()
    assert {"config.json", "tokenizer.json"} <= set(files)
    assert ra["inputs"]["calibration"] == {"source": str(calib),
                                           "sha256": hashlib.sha256(calib.read_bytes()).hexdigest()}


def test_out_names_no_paths_of_this_machine_and_follows_the_umask(tmp_path):
    """model.onnx carries no stack traces or paths (the exporter writes the source checkout's
    and the virtual environment's into every node), so other install locations give the same
    bytes; OUT is readable as the umask allows (not the 0700 of a temporary directory)."""
    import stat

    import onnx

    model = tiny.save("gpt2", tmp_path / "gpt2")
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert cli.main(["compile", model, "--ratio", "0.3", "--criterion", "magnitude", "--reconstruct",
                         "none", "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    data = (out / "model.onnx").read_bytes()
    for needle in (str(ROOT), sys.prefix, "site-packages", "stack_trace"):
        assert needle.encode() not in data, needle
    m = onnx.load(str(out / "model.onnx"))
    assert not any(n.metadata_props or n.doc_string for n in m.graph.node)
