"""Peak memory of loading, analysing and rewriting an ONNX model stored with external data.

    .venv/bin/python tools/onnx_memory.py --out bench/results/onnx-memory.json [--onnx FILE]
        [--model smollm2-135m] [--ratio 0.3]

Without --onnx, a child process first exports --model as a user would (tools/onnx_input.py's
export: torch.onnx, dynamo, weights in FILE.data). Then, in a fresh child process that has
imported the compiler and nothing else: load the file with the ONNX frontend (onnx-ir,
external data memory-mapped), build the view (two shape runs at batch 2-3, sequence 5-7),
analyse, score with magnitude (no calibration), rewrite and save. Recorded: the resident
memory after the imports (baseline), after load + view, after the rewrite and after the save
(above the baseline; memory-mapped weights count once they are read), the peak (ru_maxrss,
which includes the scoring's own copies), against the size of the model's initializers and
of its largest layer's weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np
t0 = time.perf_counter()
from goa_compiler.frontends.onnx import OnnxFrontend
from goa_compiler.analysis import analyze_graph
from goa_compiler.prune import allocation
from goa_compiler.prune.criteria import score_units
from goa_compiler.transform.rewrite import rewrite
from goa_compiler.driver.options import CompileOptions
import torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss()
path, out, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = time.perf_counter()
fe = OnnxFrontend.load(path)
an = analyze_graph(fe.view())
loaded = time.perf_counter() - t
after_view = rss() - base
weights = fe.weights()
rng = np.random.default_rng(0)
scores = {s.name: score_units("magnitude", s, weights, None, rng, None) for s in an.structures}
shapes = fe.param_shapes()
counts = allocation.uniform_counts(list(an.structures), ratio, shapes)
plan = allocation.choose(list(an.structures), scores, counts)
del weights, scores
t = time.perf_counter()
rewrite(fe, an, plan)
after_rewrite = rss() - base
fe.save(out)
after_save = rss() - base
rewritten = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sizes = {n: int(np.prod(s)) * 4 for n, s in shapes.items()}
per_layer = {}
for s in an.structures:
    per_layer.setdefault(s.layer, set()).update(sl.param for sl in s.slices)
layer = max(sum(sizes[p] for p in ps) for ps in per_layer.values())
print(json.dumps({"largest_layer_mib": layer / 2**20, "baseline_rss_mib": base,
                  "rss_above_baseline_mib": {"after_load_and_view": after_view, "after_rewrite": after_rewrite,
                                             "after_save": after_save}, "peak_rss_mib": peak, "peak_above_baseline_mib": peak - base,
                  "initializers_mib": sum(sizes.values()) / 2**20, "load_view_analysis_s": loaded,
                  "rewrite_save_s": rewritten, "structures": len(an.structures)}))
"""

EXPORT = r"""
import sys
sys.path.insert(0, sys.argv[3])
from tools.onnx_input import export_logits_onnx
from goa_compiler.capture.sources import load_model
m = load_model(sys.argv[1]).model
export_logits_onnx(m, __import__("pathlib").Path(sys.argv[2]), m.config.vocab_size)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--onnx", default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.3)
    a = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        src = Path(a.onnx) if a.onnx else Path(d) / "dense.onnx"
        if not a.onnx:
            subprocess.run([py, "-c", EXPORT, a.model, str(src), str(ROOT)], check=True, cwd=ROOT)
        data = list(src.parent.glob(src.name + ".data"))
        res = subprocess.run([py, "-c", CHILD, str(src), str(Path(d) / "pruned.onnx"), str(a.ratio)],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        rec.update(model=a.onnx or a.model, external_data=sorted({f.name for f in data}), ratio=a.ratio)
        rec["bound_mib"] = rec["initializers_mib"] + rec["largest_layer_mib"]
        rec["within_bound"] = rec["peak_above_baseline_mib"] <= rec["bound_mib"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
