#!/usr/bin/env python
"""Benchmarks (tools, not tests): quality of the pruned models against the baselines.

    python tools/bench.py quality [--quick] [--ratios 0.2,0.5] [--criteria goa,flap,...]

quality: SmolLM2-135M pruned at each ratio by each criterion, with and without
reconstruction; held-out perplexity (KJV eval split, never used for calibration) of each
emitted ONNX model in onnxruntime, and its ratio to the dense model's. Every finished run is
appended to the JSON file at once, so an interrupted sweep resumes where it stopped.
Writes bench/results/quality.json and bench/results/quality.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from goa_compiler.capture.sources import load_model  # noqa: E402
from goa_compiler.capture.torch_export import capture  # noqa: E402
from goa_compiler.eval import perplexity_onnx, perplexity_torch  # noqa: E402
from goa_compiler.export.onnx import export_onnx  # noqa: E402
from goa_compiler.graph import from_fx  # noqa: E402
from goa_compiler.passes.analysis import analyze_graph  # noqa: E402
from goa_compiler.passes.selection import structure_params, unit_params  # noqa: E402
from goa_compiler.pipeline import CompileOptions, evaluation_windows, prune_graph  # noqa: E402
from goa_compiler.progress import Progress  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_RECON = "refit"


def _configs(criteria, ratios):
    out = []
    for ratio in ratios:
        for crit in criteria:
            for recon in ("none", DEFAULT_RECON) + (("paper",) if crit == "goa" else ()):
                out.append(dict(criterion=crit, reconstruct=recon, ratio=ratio))
    return out


def _key(c):
    return f"{c['criterion']}/{c['reconstruct']}/{c['ratio']}"


def quality(args):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    data.setdefault("runs", {})
    loaded = load_model(args.model)
    captured = capture(loaded.model, loaded.kind)
    analysis = analyze_graph(from_fx(captured.gm))
    opts0 = CompileOptions(ratio=0.0, seq_len=args.seq_len, num_samples=args.num_samples,
                           eval_data="kjv", eval_tokens=args.eval_tokens, seed=args.seed)
    windows = evaluation_windows(loaded.tokenizer, opts0)
    if "dense" not in data:
        data["dense"] = {"ppl": perplexity_torch(captured.gm, windows)["ppl"], "tokens": int(windows.numel())}
    backend = "onnxruntime (CPU), on the emitted model.onnx" if args.onnx else \
        "PyTorch, on the rewritten graph that is exported (every export is verified against it)"
    data["setup"] = {
        "model": loaded.source, "calibration": f"KJV calibration split (odd chapters), "
        f"{args.num_samples} random windows of {args.seq_len} tokens, seed {args.seed}",
        "evaluation": f"KJV eval split (even chapters, disjoint), first {windows.numel()} tokens in "
        f"windows of {args.seq_len}; perplexity measured in {backend}",
        "allocation": "uniform", "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "command": " ".join(["python", "tools/bench.py"] + sys.argv[1:]),
    }
    _save(path, data)
    criteria = args.criteria.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    for cfg in _configs(criteria, ratios):
        key = _key(cfg)
        if key in data["runs"]:
            continue
        print(f"[bench] {key}", file=sys.stderr, flush=True)
        opts = CompileOptions(ratio=cfg["ratio"], criterion=cfg["criterion"],
                              reconstruct=cfg["reconstruct"], seq_len=args.seq_len,
                              num_samples=args.num_samples, seed=args.seed)
        gm = copy.deepcopy(captured.gm)
        t = time.perf_counter()
        progress = Progress(not args.quiet)
        plan, result, _, _ = prune_graph(gm, analysis, opts, loaded.tokenizer, progress)
        prune_s = time.perf_counter() - t
        if args.onnx:
            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = export_onnx(gm, captured.example, Path(tmp) / "model.onnx",
                                        captured.output_name, captured.max_seq)
                ppl = perplexity_onnx(onnx_path, windows)["ppl"]
        else:
            ppl = perplexity_torch(gm, windows)["ppl"]
        shapes = {k: tuple(v.shape) for k, v in captured.gm.state_dict().items()}
        removed = sum((s.units - len(plan.modules[s.name].kept)) * unit_params(s, shapes)
                      for s in analysis.structures if s.name in plan.modules)
        data["runs"][key] = {**cfg, "ppl": ppl, "ppl_ratio": ppl / data["dense"]["ppl"],
                             "ratio_achieved": removed / structure_params(analysis.structures, shapes),
                             "params_after": result.params_after, "prune_seconds": prune_s,
                             "timings": progress.timings}
        _save(path, data)
        print(f"[bench] {key}: ppl {ppl:.3f}", file=sys.stderr, flush=True)
    md = markdown(data, ratios, criteria)
    (path.with_suffix(".md")).write_text(md)
    print(md)


def markdown(data, ratios, criteria) -> str:
    runs = data["runs"]
    dense = data["dense"]["ppl"]
    lines = [f"Dense perplexity: **{dense:.2f}**. Cells: perplexity of the pruned model "
             f"(ratio to dense). Calibration: {data['setup']['calibration']}. Evaluation: "
             f"{data['setup']['evaluation']}. Command: `{data['setup']['command']}`.", ""]
    head = "| criterion | reconstruction | " + " | ".join(f"ratio {r}" for r in ratios) + " |"
    lines += [head, "|" + "---|" * (2 + len(ratios))]
    best = {}
    for r in ratios:
        cands = {k: v for k, v in runs.items() if v["ratio"] == r}
        if cands:
            best[r] = min(cands, key=lambda k: cands[k]["ppl"])
    for crit in criteria:
        for recon in ("none", DEFAULT_RECON, "paper"):
            cells = []
            for r in ratios:
                k = f"{crit}/{recon}/{r}"
                if k not in runs:
                    cells.append("" if recon == "paper" else "-")
                    continue
                v = runs[k]
                cell = f"{v['ppl']:.2f} ({v['ppl_ratio']:.2f}x)"
                cells.append(f"**{cell}**" if best.get(r) == k else cell)
            if any(cells):
                lines.append(f"| {crit} | {recon} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Bold: best at that ratio. `none` is each criterion in its published form (FLAP "
                 "with its own bias compensation); `refit` is the default two-step reconstruction "
                 "plus the post-selection refit; `paper` refits before pruning only.")
    return "\n".join(lines) + "\n"


def _save(path, data):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality"])
    p.add_argument("--quick", action="store_true", help="ratios 0.2,0.5 and fewer tokens")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default=None)
    p.add_argument("--criteria", default="goa,flap,wanda-sp,magnitude,random")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in the JSON")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--onnx", action="store_true",
                   help="export every pruned model and measure it in onnxruntime (slower)")
    args = p.parse_args()
    args.ratios = args.ratios or ("0.2,0.5" if args.quick else "0.1,0.2,0.3,0.4,0.5")
    args.num_samples = args.num_samples or (16 if args.quick else 32)
    args.eval_tokens = args.eval_tokens or (4096 if args.quick else 8192)
    quality(args)


if __name__ == "__main__":
    main()
