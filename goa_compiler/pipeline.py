"""The compiler driver: capture -> analysis -> (calibration, scoring, reconstruction)
-> selection -> rewrite -> export and verify, with a report of what was done."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .capture.torch_export import Captured, capture
from .export.onnx import export_onnx, onnx_param_count, verify
from .graph import from_fx
from .output import staged_output, write_json
from .passes import scoring
from .passes.analysis import analyze_graph
from .passes.rewrite import count_params, rewrite
from .passes.selection import (choose, structure_params, targets, uniform_counts,
                              unit_params)
from .progress import Progress
from .structure import Analysis, Plan, Structure

CRITERIA = ("goa", "magnitude", "random", "wanda-sp", "flap")
DATA_FREE = ("magnitude", "random")
RECONSTRUCTIONS = ("paper", "refit", "none")
WRAPPER_PREFIX = "model."


class CompileError(Exception):
    """Bad input or configuration: a one-line message for the user."""


@dataclass
class CompileOptions:
    ratio: float
    criterion: str = "magnitude"
    reconstruct: str = "none"
    seed: int = 0
    allocation: str = "uniform"
    calib: str | None = None
    num_samples: int = 16
    seq_len: int = 128
    skip_layers: str = "none"
    eval_data: str | None = None
    eval_tokens: int = 32768
    head_criterion: str = "moment"
    goa_score: str = "empirical"
    ridge: float = 1e-2
    batch_size: int = 8
    overwrite: bool = False

    def check(self):
        if not (0.0 <= self.ratio < 1.0):
            raise CompileError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.criterion not in CRITERIA:
            raise CompileError(f"unknown criterion {self.criterion!r} (choose from {', '.join(CRITERIA)})")
        if self.reconstruct not in RECONSTRUCTIONS:
            raise CompileError(f"unknown reconstruction {self.reconstruct!r}")
        if self.allocation not in ("uniform", "global"):
            raise CompileError(f"unknown allocation {self.allocation!r}")
        if self.goa_score not in ("empirical", "gaussian", "gaussian-uncentred"):
            raise CompileError(f"unknown goa score {self.goa_score!r}")
        if self.head_criterion not in ("moment", "similarity"):
            raise CompileError(f"unknown head criterion {self.head_criterion!r}")
        if not (self.ridge > 0):
            raise CompileError(f"--ridge must be positive, got {self.ridge}")
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise CompileError("--num-samples, --seq-len and --batch-size must be positive")


def display_name(param: str) -> str:
    return param[len(WRAPPER_PREFIX):] if param.startswith(WRAPPER_PREFIX) else param


# ------------------------------------------------------------------------------ analysis

def analyze_model(model: torch.nn.Module, kind: str) -> tuple[Captured, Analysis]:
    captured = capture(model, kind)
    return captured, analyze_graph(from_fx(captured.gm))


def analysis_summary(analysis: Analysis) -> dict:
    mods = []
    for s in analysis.structures:
        rec = {
            "name": s.name, "layer": s.layer, "kind": s.kind, "units": s.units,
            "unit": s.granularity, "unit_channels": s.unit_channels,
            "level1": [{"param": display_name(x.param), "role": x.role, "axis": x.axis,
                        "per_unit": x.per_unit} for x in s.slices if x.role not in ("o", "down", "level2")],
            "level2": [{"param": display_name(x.param), "role": x.role, "axis": x.axis,
                        "per_unit": x.per_unit} for x in s.level2()],
            "shape_constants": len(s.constants),
        }
        if s.kind == "attention":
            rec.update(heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim)
        mods.append(rec)
    refused = [{"node": r.node, "param": display_name(r.param) if r.param else None,
                "reason": r.reason, "candidate": r.candidate} for r in analysis.refused]
    return {"structures": mods, "refused": refused}


# ------------------------------------------------------------------------------ reporting

def module_record(s: Structure, kept: list[int]) -> dict:
    """One report record: original indices kept, in query heads / K/V heads for attention."""
    rec = {"name": s.name, "layer": s.layer, "kind": s.kind}
    if s.kind == "attention" and s.granularity == "kv-group" and s.heads and s.kv_heads:
        rep = s.heads // s.kv_heads
        rec.update(total=s.heads, kept=sorted(h for g in kept for h in range(g * rep, (g + 1) * rep)),
                   kv_total=s.kv_heads, kv_kept=sorted(kept))
    else:
        rec.update(total=s.units, kept=sorted(kept))
    rec["unit"] = s.granularity
    return rec


# ------------------------------------------------------------------------------ compile

def evaluation_windows(tokenizer, opts: "CompileOptions") -> torch.Tensor:
    """Held-out windows: the KJV eval split when DATA is 'kjv', else the user's text."""
    from .data import load_texts, token_windows

    spec = None if opts.eval_data in ("kjv", "default") else opts.eval_data
    texts = load_texts(spec, split="eval")
    # tokenize only a prefix large enough for eval_tokens (about 4 characters a token)
    budget, prefix = 8 * opts.eval_tokens, []
    for t in texts:
        prefix.append(t)
        budget -= len(t)
        if budget <= 0:
            break
    windows = token_windows(tokenizer, prefix, opts.seq_len, None, seed=0)
    return windows[: max(1, opts.eval_tokens // opts.seq_len)]


def param_shapes(gm: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in gm.state_dict(keep_vars=True).items()}


def data_free_scores(analysis: Analysis, weights: dict[str, torch.Tensor], criterion: str,
                     seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for s in analysis.structures:
        if criterion == "magnitude":
            out[s.name] = scoring.magnitude(s, weights)
        else:
            out[s.name] = scoring.random_scores(s, rng)
    return out


def prune_graph(gm: torch.fx.GraphModule, analysis: Analysis, opts: CompileOptions, tokenizer,
                progress: Progress):
    """Scoring, selection, reconstruction and rewrite on a captured graph (edited in place).
    Returns (plan, rewrite result, scores, report extras)."""
    shapes = param_shapes(gm)
    extra: dict = {}
    new_weights: dict[str, torch.Tensor] = {}
    if opts.criterion in DATA_FREE and opts.reconstruct == "none":
        with progress.phase("scoring"):
            scores = data_free_scores(analysis, dict(gm.state_dict()), opts.criterion, opts.seed)
        chosen, skip, ratio = targets(analysis.structures, opts.ratio, opts.skip_layers, shapes)
        counts = uniform_counts(chosen, ratio, shapes)
        plan = choose(chosen, scores, counts)
        extra["skipped_layers"] = sorted(skip)
    else:
        from .passes.greedy import greedy_compile

        if tokenizer is None:
            raise CompileError(f"criterion {opts.criterion!r} / reconstruction {opts.reconstruct!r} "
                               "needs calibration data and a tokenizer")
        plan, new_weights, scores, extra = greedy_compile(gm, analysis, opts, tokenizer, progress)
    with progress.phase("rewrite"):
        result = rewrite(gm, analysis, plan, new_weights, extra.get("new_biases"))
    return plan, result, scores, extra


@dataclass
class CompileResult:
    report: dict
    analysis: Analysis
    plan: Plan


def compile_loaded(model: torch.nn.Module, kind: str, opts: CompileOptions, out: str | Path,
                   progress: Progress | None = None, tokenizer=None, source: str = "",
                   spec: str | None = None) -> CompileResult:
    """Compile an already-loaded model into OUT (model.onnx + report.json)."""
    opts.check()
    progress = progress or Progress(False)
    torch.manual_seed(opts.seed)
    from .output import check_out

    check_out(out, opts.overwrite)
    with progress.phase("capture"):
        captured = capture(model, kind)
    gm = captured.gm
    with progress.phase("analysis"):
        analysis = analyze_graph(from_fx(gm))
    if not analysis.structures:
        raise CompileError("no prunable structure found: " + "; ".join(
            sorted({r.reason for r in analysis.refused if r.candidate})[:3] or ["no projections"]))
    shapes = param_shapes(gm)
    before = count_params(gm)
    eval_windows = None
    ppl: dict = {}
    if opts.eval_data:
        if tokenizer is None:
            raise CompileError("--eval needs the model's tokenizer")
        from .eval import perplexity_torch

        with progress.phase("eval dense"):
            eval_windows = evaluation_windows(tokenizer, opts)
            ppl["before"] = perplexity_torch(model, eval_windows)["ppl"]

    plan, result, scores, extra = prune_graph(gm, analysis, opts, tokenizer, progress)
    with staged_output(out, opts.overwrite) as tmp:
        with progress.phase("export"):
            onnx_path = export_onnx(gm, captured.example, tmp / "model.onnx", captured.output_name,
                                    captured.max_seq)
        with progress.phase("verify"):
            ids = torch.randint(0, int(model.config.vocab_size), (2, 12),
                                generator=torch.Generator().manual_seed(opts.seed))
            err = verify(onnx_path, gm, ids)
        if eval_windows is not None:
            from .eval import perplexity_onnx

            with progress.phase("eval pruned"):
                ppl["after"] = perplexity_onnx(onnx_path, eval_windows)["ppl"]
            ppl.update(data=opts.eval_data, tokens=int(eval_windows.numel()),
                       seq_len=int(eval_windows.shape[1]), measured_on="torch (dense), onnxruntime (pruned)")
            extra["perplexity"] = ppl
        extra["model_spec"] = spec
        report = build_report(analysis, plan, opts, shapes, before, result.params_after,
                              onnx_param_count(onnx_path), err, scores, progress, source, extra)
        write_json(tmp / "report.json", report)
    return CompileResult(report, analysis, plan)


def build_report(analysis: Analysis, plan: Plan, opts: CompileOptions, shapes, before: int,
                 after: int, onnx_params: int, verify_err: float, scores, progress: Progress,
                 source: str, extra: dict) -> dict:
    modules = []
    removed = 0
    for s in analysis.structures:
        mp = plan.modules.get(s.name)
        kept = mp.kept if mp else list(range(s.units))
        removed += (s.units - len(kept)) * unit_params(s, shapes)
        rec = module_record(s, kept)
        sc = np.asarray(scores.get(s.name, []), dtype=np.float64) if scores else np.array([])
        if sc.size:
            rec["scores"] = {"min": float(sc.min()), "median": float(np.median(sc)), "max": float(sc.max())}
        rec.update(extra.get("modules", {}).get(s.name, {}))
        modules.append(rec)
    total = structure_params(analysis.structures, shapes)
    gqa = [s for s in analysis.structures if s.granularity == "kv-group"]
    notes = []
    if gqa:
        s = gqa[0]
        notes.append(f"grouped-query attention: heads are pruned in whole K/V groups "
                     f"({s.heads // s.kv_heads} query heads with their K/V head); each module's "
                     f"count is rounded to whole groups")
    report = {
        "model": source,
        "ratio_requested": opts.ratio,
        "ratio_achieved": removed / total if total else 0.0,
        "criterion": opts.criterion,
        "reconstruction": opts.reconstruct,
        "allocation": opts.allocation,
        "seed": opts.seed,
        "params": {"before": before, "after": after, "structured_before": total,
                   "structured_removed": removed, "onnx_initializers": onnx_params},
        "modules": modules,
        "verify": {"max_rel_diff_onnx_vs_torch": verify_err},
        "timings": {k: round(v, 3) for k, v in progress.timings.items()},
        "notes": notes,
    }
    for k, v in extra.items():
        if k != "modules":
            report[k] = v
    return report
