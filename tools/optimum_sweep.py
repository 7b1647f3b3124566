"""Optimum's ONNX exports of tiny models through goa, with the zeroing oracle; JSON out.

    .venv/bin/python tools/optimum_sweep.py --out bench/results/optimum-sweep.json [--families a,b]
        [--tasks text-generation,text-generation-with-past]

For each tiny family (models/tiny.py) and Optimum task: save the model, export it with
``optimum-cli export onnx`` (tools/optimum_export.py, its own virtual environment), check
that the export is the model (Optimum's older transformers may read a config differently:
then the oracle's reference is not the export's model, and the row says so), compile it
(random criterion, ratio 0.35, no reconstruction, 8 windows of 64 tokens) and compare the
pruned ONNX in onnxruntime with the dense PyTorch model whose removed units' level-2 input
columns are zeroed (tests/oracle_layout.py). A row: which kinds were pruned in which
layers, the oracle's relative error, the exit status and the first line of an error.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from goa_compiler.analysis import analyze_graph  # noqa: E402
from goa_compiler.driver.pipeline import CompileError, CompileOptions, compile_onnx  # noqa: E402
from goa_compiler.export.onnx import run_onnx  # noqa: E402
from goa_compiler.frontends.onnx import OnnxFrontend  # noqa: E402
from models import tiny  # noqa: E402
import oracle_layout as ol  # noqa: E402
from tools import optimum_export  # noqa: E402

TASKS = ("text-generation", "text-generation-with-past")


def one(family: str, task: str, work: Path) -> dict:
    row: dict = {"family": family, "task": task}
    model, vocab, _ = tiny.build(family, seed=0)
    try:
        path = optimum_export.export(tiny.save(family, work / "hf"), work / "onnx", task)
    except RuntimeError as e:
        return {**row, "status": "export failed", "error": str(e)[:300]}
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    row["export_vs_model"] = ol.relative_error(run_onnx(path, ids.numpy(), mask.numpy()),
                                               ol.dense_output(model, "causal-lm", ids, mask))
    opts = CompileOptions(ratio=0.35, criterion="random", reconstruct="none", overwrite=True,
                          num_samples=8, seq_len=64)
    try:
        report = compile_onnx(path, opts, work / "out", tokenizer=tiny.byte_tokenizer()).report
    except CompileError as e:
        return {**row, "status": "refused (exit 2)", "error": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - a sweep records what happened
        return {**row, "status": "internal error", "error": traceback.format_exception_only(e)[-1][:300]}
    modules = report["modules"]
    row["pruned"] = sorted({f"{m['layer']}:{m['kind']}" for m in modules})
    analysis = analyze_graph(OnnxFrontend.load(path).view())
    row["refused"] = sorted({r.reason[:120] for r in analysis.refused if r.candidate})[:4]
    row["kv_cache"] = report["decoder"]["kv_cache"]
    got = run_onnx(work / "out" / "model.onnx", ids.numpy(), mask.numpy())
    row["oracle"] = ol.relative_error(got, ol.dense_output(ol.zeroed_dense(model, family, modules), "causal-lm",
                                                           ids, mask))
    row["status"] = ("oracle holds" if row["oracle"] < 1e-4 else
                     "export is not the model" if row["export_vs_model"] > 1e-5 else "MISPRUNED")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--families", default=",".join(f for f in tiny.FAMILIES + tiny.EXPERTS + list(tiny.PARTIAL)
                                                  if f not in tiny.ENCODERS))
    p.add_argument("--tasks", default=",".join(TASKS))
    a = p.parse_args()
    rows = []
    for family in a.families.split(","):
        for task in a.tasks.split(","):
            with tempfile.TemporaryDirectory() as d:
                rows.append(one(family, task, Path(d)))
            r = rows[-1]
            print(f"{family:12s} {task:26s} {r['status']:22s} {r.get('pruned', '')} {r.get('error', '')[:100]}",
                  file=sys.stderr)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
