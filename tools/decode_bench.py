"""Decode benchmark (a tool, not a test): per-token latency of the KV-cache decoder.

For a dense and a pruned compile of one model, at each context length C (128, 512, 1024):

- cached: one step of one new token on a cache of C tokens, fed as numpy arrays;
- recompute: one forward over the whole C + 1 tokens with an empty cache (what a model
  without a cache has to run per token);
- genai: onnxruntime-genai generating 16 tokens after a prompt of C tokens, time per
  generated token (its own loop, buffers and sampling), beside our loop's (serve/generate.py,
  the cache kept in OrtValues) on the same prompt;

medians over interleaved rounds (dense, pruned, dense, ...), so that a slow phase of a
shared machine hits both alike; compare ratios within one run. Also the KV-cache bytes per
token of each. Output: JSON (bench/results/decode.json by default) and a markdown table.

    .venv/bin/python tools/decode_bench.py --model smollm2-135m --ratio 0.3
    .venv/bin/python tools/decode_bench.py --dense OUT_A --pruned OUT_B     # compiled already

The compiles it makes itself are data-free (magnitude, no reconstruction): the weights do
not change the time of a step, only the widths do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from goa_compiler.serve import generate as gen  # noqa: E402
from goa_compiler.serve.feeds import full_feeds, next_past, step_feeds  # noqa: E402


def compile_out(model: str, ratio: float, out: Path) -> Path:
    cmd = [sys.executable, "-m", "goa_compiler", "compile", model, "--ratio", str(ratio), "--criterion",
           "magnitude", "--reconstruct", "none", "--out", str(out), "--overwrite", "--quiet"]
    subprocess.run(cmd, check=True)
    return out


def _median_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def cached_step(dec, ctx: int):
    rng = np.random.default_rng(ctx)
    ids = rng.integers(0, 1000, (1, ctx))
    outs = dec.session.run(None, full_feeds(dec.sig, ids))
    past = next_past(dec.sig, dec.output_names, outs)
    feeds = step_feeds(np.array([[7]]), np.ones((1, ctx + 1), np.int64), past)
    return lambda: dec.session.run(None, feeds)


def recompute_step(dec, ctx: int):
    ids = np.random.default_rng(ctx).integers(0, 1000, (1, ctx + 1))
    feeds = full_feeds(dec.sig, ids)
    return lambda: dec.session.run(None, feeds)


def genai_per_token(out: Path, ctx: int, new: int) -> float | None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    model = og.Model(str(out))
    prompt = np.random.default_rng(ctx).integers(0, 1000, (1, ctx)).astype(np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ctx + new, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(prompt)            # the prefill
    steps = []
    while not g.is_done():
        t = time.perf_counter()
        g.generate_next_token()
        steps.append((time.perf_counter() - t) * 1e3)
    return statistics.median(steps[1:]) if len(steps) > 1 else None


def ours_per_token(dec, ctx: int, new: int) -> float:
    prompt = np.random.default_rng(ctx).integers(0, 1000, ctx).tolist()
    return gen.generate(dec, prompt, new)["timings"]["decode_ms_per_token"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--dense", default=None, help="a compile's OUT at ratio 0 (else compiled here)")
    p.add_argument("--pruned", default=None, help="a compile's OUT at --ratio (else compiled here)")
    p.add_argument("--contexts", default="128,512,1024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--provider", default="cpu", choices=sorted(gen.PROVIDERS))
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "decode.json"))
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory(prefix="goa-decode-") as tmp:
        outs = {"dense": Path(args.dense) if args.dense else compile_out(args.model, 0.0, Path(tmp) / "dense"),
                "pruned": Path(args.pruned) if args.pruned else compile_out(args.model, args.ratio,
                                                                            Path(tmp) / "pruned")}
        decs = {k: gen.load(v, args.provider) for k, v in outs.items()}
        rows = []
        for ctx in contexts:
            fns = {(k, what): make(decs[k], ctx) for k in decs
                   for what, make in (("cached", cached_step), ("recompute", recompute_step))}
            times = {key: [] for key in fns}
            loops = {(k, w): [] for k in decs for w in ("ours", "genai")}
            for _ in range(args.rounds):
                for key, fn in fns.items():
                    fn()                                   # warm-up of this shape
                    times[key] += _median_ms(fn, args.reps)
                for k in decs:                             # the two generation loops, interleaved too
                    loops[(k, "ours")].append(ours_per_token(decs[k], ctx, args.new_tokens))
                    if args.provider == "cpu":
                        loops[(k, "genai")].append(genai_per_token(outs[k], ctx, args.new_tokens))
            for k in decs:
                genai = [t for t in loops[(k, "genai")] if t is not None]
                row = {"model": k, "context": ctx,
                       "cached_ms": statistics.median(times[(k, "cached")]),
                       "recompute_ms": statistics.median(times[(k, "recompute")]),
                       "ours_loop_ms": statistics.median(loops[(k, "ours")]),
                       "genai_ms": statistics.median(genai) if genai else None}
                row["cache_speedup"] = row["recompute_ms"] / row["cached_ms"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        kv = {k: d.sig.kv_bytes_per_token() for k, d in decs.items()}
    res = {"setup": {"model": args.model, "ratio": args.ratio, "provider": args.provider,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "rounds": args.rounds,
                     "reps": args.reps, "new_tokens": args.new_tokens},
           "kv_cache_bytes_per_token": kv, "rows": rows}
    for ctx in contexts:
        d, q = (next(r for r in rows if r["model"] == m and r["context"] == ctx) for m in ("dense", "pruned"))
        res.setdefault("pruned_vs_dense", []).append(
            {"context": ctx, "cached_speedup": d["cached_ms"] / q["cached_ms"],
             "recompute_speedup": d["recompute_ms"] / q["recompute_ms"]})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    md = ["| model | context | cached ms/token | recompute ms/token | cache speedup | our loop ms/token | "
          "onnxruntime-genai ms/token |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = f"{r['genai_ms']:.2f}" if r["genai_ms"] is not None else "-"
        md.append(f"| {r['model']} | {r['context']} | {r['cached_ms']:.2f} | {r['recompute_ms']:.2f} | "
                  f"{r['cache_speedup']:.1f}x | {r['ours_loop_ms']:.2f} | {g} |")
    md.append("")
    md.append(f"KV cache bytes per token: dense {kv['dense']:,}, pruned {kv['pruned']:,}")
    Path(args.json).with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
