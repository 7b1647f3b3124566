"""Record the outputs of a fixed set of compiles, and compare two records.

A redesign is proven by identical outputs: record at the commit before it, record after,
compare. Each case runs `goa compile` in a fresh interpreter (the same entry point a user
runs), hashes OUT/model.onnx (without its metadata and doc strings, which carry the source
checkout's paths: ``canonical_sha256``; the raw file's hash is kept too) and keeps
OUT/report.json with its run-to-run fields removed (timings; whether a GGUF was converted
now or read from the cache).

    python tools/golden.py record golden-before.json [--cases tiny|smollm2|all] [--jobs 2]
    python tools/golden.py compare golden-before.json golden-after.json

Cases: every tiny family of models/tiny.py with magnitude, random (no reconstruction) and
goa + refit, at ratio 0.3; goa + refit with --allocation global on two families; and
SmolLM2-135M at ratio 0.2 with the defaults. `compare` prints one line per case
(identical / report differs / model differs) and the report keys that differ; it exits 1
when any model.onnx differs or any report differs outside keys given with --allow.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_ARGS = ["--num-samples", "8", "--seq-len", "64", "--seed", "3"]
CRITERIA = [("magnitude", "none"), ("random", "none"), ("goa", "refit")]
GLOBAL_FAMILIES = ["llama-gqa", "gpt2"]
VOLATILE = ("timings",)
# `goa compile` in a fresh interpreter, whichever module holds the CLI at this commit
# (decided by the package's own folder: an editable install may resolve a missing submodule
# from another checkout)
ENTRY = ("import os, sys, goa_compiler\n"
         "ui = os.path.isdir(os.path.join(goa_compiler.__path__[0], 'ui'))\n"
         "name = 'goa_compiler.ui.cli' if ui else 'goa_compiler.cli'\n"
         "sys.exit(__import__(name, fromlist=['main']).main(sys.argv[1:]))")


def cases(which: str) -> list[dict]:
    from models import tiny

    out = []
    if which in ("tiny", "all"):
        for fam in tiny.FAMILIES:
            for crit, recon in CRITERIA:
                out.append({"name": f"{fam}/{crit}+{recon}", "family": fam,
                            "args": ["--ratio", "0.3", "--criterion", crit, "--reconstruct", recon,
                                     *TINY_ARGS]})
        for fam in GLOBAL_FAMILIES:
            out.append({"name": f"{fam}/goa+refit/global", "family": fam,
                        "args": ["--ratio", "0.3", "--criterion", "goa", "--reconstruct", "refit",
                                 "--allocation", "global", *TINY_ARGS]})
    if which in ("smollm2", "all"):
        out.append({"name": "smollm2-135m/defaults/0.2", "model": "smollm2-135m", "args": ["--ratio", "0.2"]})
    return out


def canonical_sha256(path: Path) -> str:
    """sha256 of the model without its metadata and doc strings: the exporter stores Python
    stack traces with the absolute paths of the source files in every node, so two checkouts
    at different paths never give the same bytes. The graph, its attributes and every
    initializer's bytes are all hashed. (export.onnx.strip_metadata does the same to what the
    compiler writes; this tool keeps its own copy so that it hashes files of any commit,
    including those from before that function.)"""
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    m.doc_string = ""
    graphs = [m.graph]
    while graphs:
        g = graphs.pop()
        g.doc_string = ""
        del g.metadata_props[:]
        for n in g.node:
            del n.metadata_props[:]
            n.doc_string = ""
            graphs.extend(a.g for a in n.attribute if a.HasField("g"))
            for a in n.attribute:
                graphs.extend(a.graphs)
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


def normalise(report: dict) -> dict:
    rep = {k: v for k, v in report.items() if k not in VOLATILE}
    if isinstance(rep.get("model"), str):
        rep["model"] = rep["model"].split(" (")[0]     # "... (converted now)" / "(cached)"
    return rep


def _strip_case_dir(value, d: str):
    """The tiny model directory is written anew in every run: its path is not an input."""
    if isinstance(value, str):
        return value.replace(d, "<case>")
    if isinstance(value, dict):
        return {k: _strip_case_dir(v, d) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_case_dir(v, d) for v in value]
    return value


def run_case(case: dict, work: Path, model: str) -> dict:
    d = work / case["name"].replace("/", "_")
    d.mkdir(parents=True)
    out = d / "out"
    # a fixed hash seed: model code that iterates a Python set (transformers' Gemma-3 over its
    # layer types) traces its ops in an order that follows PYTHONHASHSEED
    env = {"PYTHONHASHSEED": "0", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", ENTRY, "compile", model, "--out", str(out), "--quiet",
                        *case["args"]], cwd=d, env=env, capture_output=True, text=True)
    rec = {"name": case["name"], "args": case["args"], "exit": r.returncode,
           "seconds": round(time.time() - t0, 1)}
    if r.returncode != 0:
        rec["stderr"] = _strip_case_dir(r.stderr[-2000:], str(work))
        return rec
    rec["model_sha256"] = canonical_sha256(out / "model.onnx")
    rec["file_sha256"] = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    report = json.loads((out / "report.json").read_text())
    rec["report"] = normalise(_strip_case_dir(report, str(work)))
    return rec


def _models(todo: list[dict], work: Path) -> dict[str, str]:
    """One model directory per tiny family, written before any compile starts (the random
    initialisation uses torch's global generator, so it must not run in parallel)."""
    from models import tiny

    out = {}
    for c in todo:
        if "family" in c and c["family"] not in out:
            out[c["family"]] = tiny.save(c["family"], work / "models" / c["family"])
    return out


def record(path: str, which: str, jobs: int, match: str | None = None, keep: str | None = None):
    todo = [c for c in cases(which) if match is None or match in c["name"]]
    results = []
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="goa-golden-")) as work, \
            cf.ThreadPoolExecutor(jobs) as pool:
        models = _models(todo, Path(work))
        futures = {pool.submit(run_case, c, Path(work), c.get("model") or models[c["family"]]): c for c in todo}
        for f in cf.as_completed(futures):
            rec = f.result()
            results.append(rec)
            status = rec.get("model_sha256", "")[:12] or f"exit {rec['exit']}"
            print(f"{len(results):3d}/{len(todo)} {rec['name']:<40} {status} ({rec['seconds']} s)",
                  file=sys.stderr)
    results.sort(key=lambda r: r["name"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    Path(path).write_text(json.dumps({"commit": head, "cases": results}, indent=1, sort_keys=True))
    print(f"wrote {path} ({len(results)} cases at {head[:10]})", file=sys.stderr)


def _diff_keys(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(prefix + k)
            else:
                out.extend(_diff_keys(a[k], b[k], prefix + k + "."))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(_diff_keys(x, y, f"{prefix}{i}."))
        return out
    return [] if a == b else [prefix.rstrip(".")]


def compare(before: str, after: str, allow: list[str]) -> int:
    a = {c["name"]: c for c in json.loads(Path(before).read_text())["cases"]}
    b = {c["name"]: c for c in json.loads(Path(after).read_text())["cases"]}
    bad = 0
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            print(f"{name:<40} only in {'after' if x is None else 'before'}")
            bad += 1
            continue
        if x["exit"] != y["exit"]:
            print(f"{name:<40} exit {x['exit']} -> {y['exit']}")
            bad += 1
            continue
        model_same = x.get("model_sha256") == y.get("model_sha256")
        keys = _diff_keys(x.get("report"), y.get("report"))
        unexplained = [k for k in keys if not any(k == p or k.startswith(p + ".") for p in allow)]
        verdict = "identical" if model_same and not keys else (
            "model differs" if not model_same else "report differs")
        print(f"{name:<40} {verdict}" + (f" ({', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''})"
                                        if keys else ""))
        bad += (not model_same) or bool(unexplained)
    print(f"{len(set(a) & set(b))} cases compared, {bad} with unexplained differences")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("path")
    r.add_argument("--cases", choices=["tiny", "smollm2", "all"], default="all")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--match", default=None, help="only the cases whose name contains this")
    r.add_argument("--keep", default=None, metavar="DIR", help="compile in DIR (kept) instead of a temporary one")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--allow", action="append", default=[],
                   help="a report key (dotted) allowed to differ, e.g. versions.goa_compiler")
    args = p.parse_args(argv)
    if args.cmd == "record":
        record(args.path, args.cases, args.jobs, args.match, args.keep)
        return 0
    return compare(args.before, args.after, args.allow)


if __name__ == "__main__":
    sys.exit(main())
