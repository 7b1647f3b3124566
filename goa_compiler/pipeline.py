"""The compiler driver: capture -> analysis -> (calibration, scoring, reconstruction)
-> selection -> rewrite -> export and verify, with a report of what was done."""
from __future__ import annotations

import dataclasses
import math
import tempfile
from contextlib import ExitStack
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
    # quality gates (goa_compiler/gates.py); None = not set
    max_ppl_increase: float | None = None
    max_logit_error: float | None = None
    min_speedup: float | None = None
    measure_speed: bool = False     # measure the speedup without gating on it

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
        for name in ("max_ppl_increase", "max_logit_error", "min_speedup"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and (v > 0 if name == "min_speedup" else v >= 0)):
                raise CompileError(f"--{name.replace('_', '-')} must be a finite "
                                   f"{'positive' if name == 'min_speedup' else 'non-negative'} number, got {v}")

    @property
    def effective_eval_data(self) -> str | None:
        """--eval DATA; with --max-ppl-increase and no --eval, the KJV held-out split."""
        if self.eval_data is None and self.max_ppl_increase is not None:
            return "kjv"
        return self.eval_data

    @property
    def speed_wanted(self) -> bool:
        return self.measure_speed or self.min_speedup is not None


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
                   spec: str | None = None, model_path: str | None = None,
                   config_path: str | None = None) -> CompileResult:
    """Compile an already-loaded model into OUT (model.onnx, report.json, report.html).

    Measurements for the quality gates happen here: perplexity before/after (with --eval, or
    on the KJV held-out split for --max-ppl-increase), the relative logit error of the
    emitted ONNX against the dense model (--max-logit-error) and the onnxruntime speedup over
    the dense model exported the same way (--min-speedup, --measure-speed). A failing gate
    does not stop the compile: OUT is written and ``report["gates"]["passed"]`` is false.
    ``model_path`` (the directory the weights were read from) and ``config_path`` are hashed
    into ``report["inputs"]``."""
    opts.check()
    if opts.effective_eval_data != opts.eval_data:
        opts = dataclasses.replace(opts, eval_data=opts.effective_eval_data)
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
    vocab_size = int(model.config.vocab_size)
    eval_windows = None
    ppl: dict = {}
    if opts.eval_data:
        if tokenizer is None:
            raise CompileError("--eval needs the model's tokenizer")
        from .eval import perplexity_torch

        with progress.phase("eval dense"):
            eval_windows = evaluation_windows(tokenizer, opts)
            ppl["before"] = perplexity_torch(model, eval_windows)["ppl"]
    logit_ref = None
    if opts.max_logit_error is not None:
        with progress.phase("logit reference"):
            windows, what = logit_windows(tokenizer, opts, eval_windows, vocab_size)
            logit_ref = (windows, what, dense_outputs(model, kind, windows))

    with ExitStack() as stack:
        dense_onnx = None
        if opts.speed_wanted:
            with progress.phase("export dense"):
                dense_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="goa-dense-")))
                dense_onnx = export_onnx(gm, captured.example, dense_dir / "model.onnx",
                                         captured.output_name, captured.max_seq)

        plan, result, scores, extra = prune_graph(gm, analysis, opts, tokenizer, progress)
        with staged_output(out, opts.overwrite) as tmp:
            with progress.phase("export"):
                onnx_path = export_onnx(gm, captured.example, tmp / "model.onnx", captured.output_name,
                                        captured.max_seq)
            with progress.phase("verify"):
                ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(opts.seed))
                err = verify(onnx_path, gm, ids)
            measured: dict[str, float | None] = {}
            if eval_windows is not None:
                from .eval import perplexity_onnx

                with progress.phase("eval pruned"):
                    ppl["after"] = perplexity_onnx(onnx_path, eval_windows)["ppl"]
                ppl.update(data=opts.eval_data, tokens=int(eval_windows.numel()),
                           seq_len=int(eval_windows.shape[1]),
                           measured_on="torch (dense), onnxruntime (pruned)")
                ppl["increase"] = ppl["after"] / ppl["before"] - 1.0
                extra["perplexity"] = ppl
                measured["max-ppl-increase"] = ppl["increase"]
            if logit_ref is not None:
                with progress.phase("logit error"):
                    extra["logit_error"] = logit_error(onnx_path, *logit_ref)
                measured["max-logit-error"] = extra["logit_error"]["value"]
            if dense_onnx is not None:
                with progress.phase("latency"):
                    extra["latency"] = measure_latency(dense_onnx, onnx_path, vocab_size,
                                                       min(SPEED_SEQ, captured.max_seq))
                measured["min-speedup"] = extra["latency"]["speedup"]
            from .gates import evaluate, gates_from

            extra["gates"] = evaluate(gates_from(opts), measured).to_dict()
            extra["model_spec"] = spec
            extra["inputs"] = compile_inputs(opts, spec, model_path, model, config_path,
                                             logit_ref[1] if logit_ref else None)
            from .provenance import versions

            extra["versions"] = versions()
            report = build_report(analysis, plan, opts, shapes, before, result.params_after,
                                  onnx_param_count(onnx_path), err, scores, progress, source, extra)
            write_json(tmp / "report.json", report)
            from .html_report import render

            (tmp / "report.html").write_text(render(report), encoding="utf-8")
    return CompileResult(report, analysis, plan)


# ------------------------------------------------------------------------------ measurements

LOGIT_WINDOWS = 4    # windows of --seq-len tokens for --max-logit-error
SPEED_SEQ = 128      # prefill length of the latency measurement
SPEED_ROUNDS, SPEED_REPS, SPEED_WARMUP = 3, 10, 2


def logit_windows(tokenizer, opts: CompileOptions, eval_windows, vocab_size: int):
    """The windows of the logit error, and a description: the first LOGIT_WINDOWS held-out
    windows when perplexity is evaluated; else LOGIT_WINDOWS random windows of the
    calibration data (seed + 1, so not the calibration windows themselves); else (no
    tokenizer) random tokens."""
    if eval_windows is not None:
        w = eval_windows[:LOGIT_WINDOWS]
        return w, f"{opts.eval_data} (held-out), first {len(w)} windows of {w.shape[1]} tokens"
    if tokenizer is not None:
        from .data import load_texts, token_windows

        texts = load_texts(opts.calib, split="calib")
        w = token_windows(tokenizer, texts, opts.seq_len, LOGIT_WINDOWS, seed=opts.seed + 1)
        name = opts.calib or "kjv"
        return w, f"{name} (calibration split), {len(w)} random windows of {w.shape[1]} tokens, seed {opts.seed + 1}"
    w = torch.randint(0, vocab_size, (LOGIT_WINDOWS, opts.seq_len),
                      generator=torch.Generator().manual_seed(opts.seed))
    return w, f"random tokens (no tokenizer), {LOGIT_WINDOWS} windows of {opts.seq_len}, seed {opts.seed}"


def dense_outputs(model: torch.nn.Module, kind: str, windows: torch.Tensor) -> np.ndarray:
    """The dense model's logits (causal LM) or last hidden state (encoder), float32."""
    from transformers import PreTrainedModel

    mask = torch.ones_like(windows)
    with torch.inference_mode():
        if isinstance(model, PreTrainedModel):
            kw = {"use_cache": False} if kind == "causal-lm" else {}
            out = model(input_ids=windows, attention_mask=mask, **kw)
        else:
            out = model(windows, mask)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            out = getattr(out, attr)
            break
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().numpy()


def logit_error(onnx_path, windows: torch.Tensor, what: str, reference: np.ndarray) -> dict:
    """Relative Frobenius error ||Z_onnx - Z_dense||_F / ||Z_dense||_F over all windows,
    positions and output channels (float64 sums)."""
    from .export.onnx import run_onnx

    ids = windows.numpy()
    got = run_onnx(onnx_path, ids, np.ones_like(ids))
    if got.shape != reference.shape:
        raise CompileError(f"logit error: ONNX output {got.shape} != dense output {reference.shape}")
    diff = np.linalg.norm((got.astype(np.float64) - reference.astype(np.float64)).ravel())
    norm = np.linalg.norm(reference.astype(np.float64).ravel())
    return {"value": float(diff / norm) if norm > 0 else float("inf"),
            "definition": "||Z_pruned - Z_dense||_F / ||Z_dense||_F of the outputs (logits, or the "
                          "last hidden state of an encoder)",
            "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "data": what,
            "measured_on": "onnxruntime (pruned ONNX) vs torch (dense model)"}


def measure_latency(dense_path, pruned_path, vocab_size: int, seq_len: int) -> dict:
    """onnxruntime CPU prefill latency ([1, seq_len] tokens) of both models, in alternating
    rounds (dense, pruned, dense, ...); each model's latency is the median of its round
    medians, and the speedup is dense / pruned."""
    from .speed import interleaved_latency

    lat = interleaved_latency({"dense": str(dense_path), "pruned": str(pruned_path)}, rounds=SPEED_ROUNDS,
                              reps=SPEED_REPS, warmup=SPEED_WARMUP, batch=1, seq_len=seq_len,
                              vocab_size=vocab_size)
    rounds = {k: [float(x) for x in v["round_medians_ms"]] for k, v in lat.items()}
    dense_ms, pruned_ms = lat["dense"]["median_ms"], lat["pruned"]["median_ms"]
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms,
            "speedup": dense_ms / pruned_ms if pruned_ms > 0 else float("inf"),
            "batch": 1, "seq_len": seq_len, "rounds": SPEED_ROUNDS, "reps_per_round": SPEED_REPS,
            "dense_round_ms": rounds["dense"], "pruned_round_ms": rounds["pruned"],
            "measured_on": "onnxruntime CPUExecutionProvider, prefill; dense model exported the same way"}


def compile_inputs(opts: CompileOptions, spec, model_path, model, config_path, logit_data) -> dict:
    """sha256 of what the compile read (see provenance.py)."""
    from .provenance import config_input, data_inputs, model_inputs

    inputs: dict = {"model": model_inputs(spec, model_path or (spec if spec and Path(spec).is_dir() else None),
                                          model)}
    uses_calib = opts.criterion not in DATA_FREE or opts.reconstruct != "none"
    if uses_calib or (logit_data is not None and "calibration split" in logit_data):
        inputs["calibration"] = data_inputs(opts.calib, "calib")
    if opts.eval_data:
        inputs["eval"] = data_inputs(opts.eval_data, "eval")
    if config_path:
        inputs["config"] = config_input(config_path)
    return inputs


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
