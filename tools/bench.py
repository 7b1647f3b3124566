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
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from goa_compiler.capture.sources import load_model  # noqa: E402
from goa_compiler.eval import perplexity_onnx, perplexity_torch  # noqa: E402
from goa_compiler.pipeline import CompileOptions, compile_loaded, evaluation_windows  # noqa: E402
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
    opts0 = CompileOptions(ratio=0.0, seq_len=args.seq_len, num_samples=args.num_samples,
                           eval_data="kjv", eval_tokens=args.eval_tokens, seed=args.seed)
    windows = evaluation_windows(loaded.tokenizer, opts0)
    if "dense" not in data:
        t = time.perf_counter()
        dense = perplexity_torch(loaded.model, windows)
        data["dense"] = {"ppl": dense["ppl"], "tokens": dense["tokens"], "backend": "torch",
                         "seconds": time.perf_counter() - t}
    data["setup"] = {
        "model": loaded.source, "calibration": f"KJV calibration split, {args.num_samples} random "
        f"windows of {args.seq_len} tokens, seed {args.seed}",
        "evaluation": f"KJV eval split (disjoint chapters), first {windows.numel()} tokens in "
        f"windows of {args.seq_len}, perplexity of the emitted ONNX in onnxruntime (CPU)",
        "allocation": "uniform", "machine": f"{platform.machine()}, {platform.processor() or ''}",
        "command": "python tools/bench.py quality" + (" --quick" if args.quick else ""),
    }
    _save(path, data)
    criteria = args.criteria.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    for cfg in _configs(criteria, ratios):
        key = _key(cfg)
        if key in data["runs"]:
            continue
        print(f"[bench] {key}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            opts = CompileOptions(ratio=cfg["ratio"], criterion=cfg["criterion"],
                                  reconstruct=cfg["reconstruct"], seq_len=args.seq_len,
                                  num_samples=args.num_samples, seed=args.seed)
            res = compile_loaded(copy.deepcopy(loaded.model), loaded.kind, opts, Path(tmp) / "out",
                                 Progress(not args.quiet), tokenizer=loaded.tokenizer,
                                 source=loaded.source, spec=args.model)
            compile_s = time.perf_counter() - t
            ppl = perplexity_onnx(Path(tmp) / "out" / "model.onnx", windows)
        data["runs"][key] = {**cfg, "ppl": ppl["ppl"], "ppl_ratio": ppl["ppl"] / data["dense"]["ppl"],
                             "ratio_achieved": res.report["ratio_achieved"],
                             "params_after": res.report["params"]["after"],
                             "compile_seconds": compile_s, "timings": res.report["timings"]}
        _save(path, data)
    md = markdown(data, ratios, criteria)
    (path.with_suffix(".md")).write_text(md)
    print(md)


def markdown(data, ratios, criteria) -> str:
    runs = data["runs"]
    dense = data["dense"]["ppl"]
    lines = [f"Dense SmolLM2-135M perplexity: **{dense:.2f}**. Cells: perplexity of the pruned "
             f"ONNX model (ratio to dense). {data['setup']['calibration']}; "
             f"{data['setup']['evaluation']}.", ""]
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
    args = p.parse_args()
    args.ratios = args.ratios or ("0.2,0.5" if args.quick else "0.1,0.2,0.3,0.4,0.5")
    args.num_samples = args.num_samples or (16 if args.quick else 32)
    args.eval_tokens = args.eval_tokens or (4096 if args.quick else 8192)
    quality(args)


if __name__ == "__main__":
    main()
