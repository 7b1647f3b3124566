#!/usr/bin/env python
"""Benchmarks (tools, not tests): quality, compile cost and inference speed of goa-compiler
against its baselines and Torch-Pruning, on SmolLM2-135M, side by side in one run.

    python tools/bench.py quality|cost|speed|all [--quick] [--ratios 0.1,0.3] [--fresh]
    python tools/bench.py quality --criteria goa --set skip_layers=auto --tag skip-auto

quality  every criterion (goa, flap, wanda-sp, magnitude, random) with and without
         reconstruction, plus Torch-Pruning (tools/peers/torch_pruning_peer.py), at each ratio:
         perplexity of each pruned model exported to ONNX and run in onnxruntime, and its
         ratio to the dense model's, on two sets never used for calibration: the KJV eval
         split (the calibration's own domain) and the named set pydoc (out of domain).
cost     one full `goa compile` (goa + refit): wall time and peak resident memory per phase,
         against the floor: one dense forward pass over the same calibration tokens.
speed    onnxruntime latency of the dense and pruned ONNX models: prefill (batch 1, 128
         tokens) and one decode step, medians over interleaved rounds, with the ideal speedup
         (dense FLOPs / pruned FLOPs of the same graph). On onnxruntime's CUDA provider too
         when a GPU is present (skipped with a message otherwise).

Results: bench/results/<what>[-quick][-TAG].json (`--set KEY=VALUE`: a compile option for
every quality run but FLAP's published row, with `--tag` to keep it off the published
matrix; each finished run is saved at once, so an
interrupted sweep resumes where it stopped; --fresh starts over), <what>[-quick].md and
PNG plots. `--quick` (one ratio, fewer tokens and configurations) is the smoke run that
must finish in 15 minutes on 2 cores: to that end models of equal parameter shapes share
one exported graph (rebind_weights), and the dense export and the peer run in a background
process while the criteria prune.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from goa_compiler.capture.sources import load_model  # noqa: E402
from goa_compiler.capture.torch_export import capture  # noqa: E402
from goa_compiler.measure.eval import perplexity_onnx  # noqa: E402
from goa_compiler.export.onnx import export_onnx, onnx_param_count, rebind_weights, verify  # noqa: E402
from goa_compiler.frontends.fx import from_fx  # noqa: E402
from goa_compiler.analysis import analyze_graph  # noqa: E402
from goa_compiler.prune.calibration import calibration_windows  # noqa: E402
from goa_compiler.prune.allocation import structure_params, unit_params  # noqa: E402
from goa_compiler.driver.pipeline import CompileOptions, compile_loaded, prune_captured  # noqa: E402
from goa_compiler.measure.eval import evaluation_windows  # noqa: E402
from goa_compiler.ui.progress import Progress  # noqa: E402
from goa_compiler.measure import speed as sp  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CRITERIA = ("goa", "flap", "wanda-sp", "magnitude", "random")
PEER = "torch-pruning"
PUBLISHED = "published"
QUICK_CONFIGS = [("goa", "none"), ("goa", "refit"), ("flap", "none"), ("flap", "refit"),
                 ("wanda-sp", "none"), ("wanda-sp", "refit"), ("magnitude", "none"),
                 ("random", "none"), (PEER, "taylor")]
COST_RATIO = 0.3


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ shared state

class Context:
    """The model, its captured graph and analysis, the token windows and a scratch directory
    for ONNX files, shared by the sections of one run."""

    def __init__(self, args):
        self.args = args
        t = time.perf_counter()
        self.loaded = load_model(args.model)
        self.captured = capture(self.loaded.model, self.loaded.kind)
        self.analysis = analyze_graph(from_fx(self.captured.gm))
        self.shapes = {k: tuple(v.shape) for k, v in self.captured.gm.state_dict().items()}
        self.vocab_size = int(self.loaded.model.config.vocab_size)
        self.opts0 = CompileOptions(ratio=0.0, seq_len=args.seq_len, num_samples=args.num_samples,
                                    eval_data="kjv", eval_tokens=args.eval_tokens, seed=args.seed)
        self.eval_windows = evaluation_windows(self.loaded.tokenizer, self.opts0)
        # the out-of-domain set: never calibrated on (named set pydoc, data.py)
        self.ood_windows = evaluation_windows(self.loaded.tokenizer, dataclasses.replace(self.opts0, eval_data=OOD))
        self.calib_windows = calibration_windows(self.loaded.tokenizer, self.opts0)
        self.tmp = Path(tempfile.mkdtemp(prefix="goa-bench-"))
        self.onnx: dict[str, Path] = {}     # "dense" or "criterion/recon/ratio" -> optimised export
        self.templates: dict[tuple, Path] = {}   # parameter names and shapes -> plain export
        self.compiled: dict[str, dict] = {}      # key -> report.json of a `goa compile` made here
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._dense_job: concurrent.futures.Future | None = None
        log(f"model ready in {time.perf_counter() - t:.0f}s: {self.loaded.source}")

    def opts(self, criterion, recon, ratio) -> CompileOptions:
        """``recon`` "published": FLAP as its paper runs it, global allocation of standardised
        scores and its bias compensation (no refit); else the compiler's defaults."""
        extra = {"allocation": "global", "reconstruct": "none"} if recon == PUBLISHED else \
            {**self.args.settings, "reconstruct": recon}
        return CompileOptions(ratio=ratio, criterion=criterion, seq_len=self.args.seq_len,
                              num_samples=self.args.num_samples, seed=self.args.seed, **extra)

    def export(self, gm, name: str, optimize: bool) -> Path:
        path = self.tmp / f"{name.replace('/', '_')}.onnx"
        export_onnx(gm, self.captured.example, path, self.captured.output_name, self.captured.max_seq,
                    optimize=optimize)
        return path

    def export_plain(self, gm, name: str) -> tuple[Path, str]:
        """A plain (unoptimised) ONNX file of ``gm`` for perplexity, and how it was made.
        Models with the parameter shapes of one exported before (every uniform-allocation
        criterion at one ratio) reuse that graph with their own weights (rebind_weights:
        seconds instead of a minute), checked against ``gm`` like every export."""
        sig = tuple((n, tuple(t.shape)) for n, t in gm.named_parameters(remove_duplicate=False))
        path = self.tmp / f"{name.replace('/', '_')}.onnx"
        if sig in self.templates:
            rebind_weights(self.templates[sig], gm, path)
            err = _max_rel_diff(path, gm, self.vocab_size)
            if err < 1e-4:
                return path, f"graph of {self.templates[sig].name} with its weights (max rel. diff {err:.1e})"
            log(f"{name}: rebound graph differs from the model by {err:.1e}; exporting instead")
        how = _export_plain_checked(gm, self.captured, path, self.vocab_size)
        self.templates.setdefault(sig, path)
        return path, how

    def worker(self) -> concurrent.futures.ProcessPoolExecutor:
        """One background process for self-contained jobs (the dense export, the peer): the
        ONNX exporter is single-threaded Python, so on 2 cores it overlaps with pruning here."""
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def start_dense_export(self):
        if "dense" not in self.onnx and self._dense_job is None:
            log("exporting the dense model (background process)")
            self._dense_job = self.worker().submit(_dense_job, self.args.model, str(self.tmp / "dense.onnx"))

    def dense_onnx(self) -> Path:
        if "dense" not in self.onnx:
            if self._dense_job is None:
                log("exporting the dense model")
                self.export(self.captured.gm, "dense", optimize=True)
            else:
                self._dense_job.result()
            self.onnx["dense"] = self.tmp / "dense.onnx"
        return self.onnx["dense"]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def removed(self, plan) -> int:
        return sum((s.units - len(plan.modules[s.name].kept)) * unit_params(s, self.shapes)
                   for s in self.analysis.structures if s.name in plan.modules)

    def total(self) -> int:
        return structure_params(self.analysis.structures, self.shapes)


def _max_rel_diff(path, gm, vocab_size: int) -> float:
    """onnxruntime against PyTorch on two fixed random 12-token sequences (as `goa compile`
    verifies its output)."""
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return verify(path, gm, ids)


def _export_plain_checked(gm, captured, path: Path, vocab_size: int) -> str:
    """Export ``gm`` without optimisation (captured: its example inputs and output name) and
    check the file against it; returns how it was made, for the results."""
    export_onnx(gm, captured.example, path, captured.output_name, captured.max_seq, optimize=False)
    return f"exported (max rel. diff {_max_rel_diff(path, gm, vocab_size):.1e})"


OOD = "pydoc"


def _perplexities(ctx: Context, path) -> dict:
    """ppl on the KJV held-out split and ppl_ood on the out-of-domain set, in onnxruntime."""
    kjv, ood = perplexity_onnx(path, ctx.eval_windows), perplexity_onnx(path, ctx.ood_windows)
    return {"ppl": kjv["ppl"], "ppl_ood": ood["ppl"], "eval_seconds": kjv["seconds"] + ood["seconds"]}


def _key(criterion, recon, ratio):
    return f"{criterion}/{recon}/{ratio}"


def _results_path(what, quick, tag=None):
    """bench/results/WHAT[-quick][-TAG].json (a tag keeps an experiment off the published file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / (f"{what}{'-quick' if quick else ''}{f'-{tag}' if tag else ''}.json")


def _load(path, fresh):
    return json.loads(path.read_text()) if path.exists() and not fresh else {}


def _save(path, data):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _publish(path, data, md):
    """Save the JSON, write its Markdown table beside it and print the table."""
    _save(path, data)
    path.with_suffix(".md").write_text(md)
    print(md)


def _machine():
    import onnxruntime as ort

    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "torch_threads": torch.get_num_threads()}


def _command():
    return " ".join(["python", "tools/bench.py"] + sys.argv[1:])


# ------------------------------------------------------------------------------ quality

def configs(args):
    if args.quick:
        base = QUICK_CONFIGS
    else:
        base = _rows()
    wanted = set(args.criteria.split(",")) if args.criteria else None
    return [(r, c, rec) for r in args.ratio_list for c, rec in base if wanted is None or c in wanted]


def quality(ctx: Context):
    args = ctx.args
    path = _results_path("quality", args.quick, args.tag)
    data = _load(path, args.fresh)
    data.setdefault("runs", {})
    data["setup"] = {
        "model": ctx.loaded.source,
        "calibration": f"KJV calibration split (odd chapters), {args.num_samples} random windows of "
                       f"{args.seq_len} tokens, seed {args.seed}",
        "evaluation": f"KJV eval split (even chapters, disjoint), first {ctx.eval_windows.numel()} tokens "
                      f"in windows of {args.seq_len}; every pruned model exported to ONNX and run in "
                      f"onnxruntime (CPU)",
        "evaluation_ood": f"named set {OOD} (the Python reference's help topics from the standard library's "
                          f"pydoc_data: text of another kind, never calibrated on), first "
                          f"{ctx.ood_windows.numel()} tokens in windows of {args.seq_len}",
        "allocation": "uniform (goa-compiler); FFN-only for Torch-Pruning (see the peer's notes)",
        "settings": args.settings or "the defaults",
        "command": _command(), **_machine(),
    }
    _save(path, data)
    todo = [(r, c, rec) for r, c, rec in configs(args) if _key(c, rec, r) not in data["runs"]]
    # background: the dense export, then the peer at each ratio; the criteria run here meanwhile
    if "dense" not in data:
        ctx.start_dense_export()
    peer_jobs = {r: _peer_submit(ctx, r) for r, c, _ in todo if c == PEER}
    for ratio, crit, recon in todo:
        key = _key(crit, recon, ratio)
        log(f"quality {key}")
        t = time.perf_counter()
        try:
            rec = _peer_run(ctx, *peer_jobs[ratio]) if crit == PEER else _goa_run(ctx, crit, recon, ratio)
        except Exception as e:  # a failing configuration is a result too
            rec = {"error": f"{type(e).__name__}: {e}"}
            log(f"quality {key} FAILED: {rec['error']}")
        rec.update(criterion=crit, reconstruct=recon, ratio=ratio, seconds=time.perf_counter() - t)
        if "ppl" in rec:
            log(f"quality {key}: ppl {rec['ppl']:.3f}")
        data["runs"][key] = rec
        _save(path, data)
    if "dense" not in data:
        ppl = _perplexities(ctx, ctx.dense_onnx())
        data["dense"] = {"ppl": ppl["ppl"], "ppl_ood": ppl["ppl_ood"], "tokens": int(ctx.eval_windows.numel()),
                         "tokens_ood": int(ctx.ood_windows.numel())}
    for rec in data["runs"].values():
        for k in ("ppl", "ppl_ood"):
            if k in rec and k in data["dense"]:
                rec[k + "_ratio"] = rec[k] / data["dense"][k]
    _publish(path, data, quality_markdown(data, sorted({v["ratio"] for v in data["runs"].values()})))
    plot_quality(data, path.with_suffix(".png"))
    return data


def _goa_run(ctx: Context, crit, recon, ratio) -> dict:
    key = _key(crit, recon, ratio)
    if key in ctx.compiled:   # the cost section's `goa compile` made this one: its emitted ONNX
        rep = ctx.compiled[key]
        ppl = _perplexities(ctx, ctx.onnx[key])
        return {**ppl, "ratio_achieved": rep["ratio_achieved"], "params_after": rep["params"]["after"],
                "prune_seconds": sum(v for k, v in rep["timings"].items() if k not in ("capture", "export", "verify")),
                "export_seconds": rep["timings"].get("export", 0.0), "export": "`goa compile` (cost section)"}
    gm = copy.deepcopy(ctx.captured.gm)
    progress = Progress(not ctx.args.quiet)
    t = time.perf_counter()
    st = prune_captured(dataclasses.replace(ctx.captured, gm=gm), ctx.analysis, ctx.opts(crit, recon, ratio),
                        ctx.loaded.tokenizer, progress)
    plan, result = st.plan, st.rewritten
    prune_s = time.perf_counter() - t
    t = time.perf_counter()
    path, how = ctx.export_plain(gm, key)
    export_s = time.perf_counter() - t
    ppl = _perplexities(ctx, path)
    if path not in ctx.templates.values():   # a sweep makes dozens; templates stay
        path.unlink()
    return {**ppl, "ratio_achieved": ctx.removed(plan) / ctx.total(),
            "params_after": result.params_after, "prune_seconds": prune_s, "export_seconds": export_s,
            "export": how}


# ------------------------------------------------------------------------------ background jobs
# They run in the worker process (ctx.worker()), which loads the model once for all of them.

_WORKER_MODELS: dict = {}


def _worker_model(name):
    if name not in _WORKER_MODELS:
        torch.set_num_threads(1)   # the main process prunes on the cores meanwhile
        _WORKER_MODELS[name] = load_model(name)
    return _WORKER_MODELS[name]


def _dense_job(model_name, path):
    loaded = _worker_model(model_name)
    cap = capture(loaded.model, loaded.kind)
    export_onnx(cap.gm, cap.example, path, cap.output_name, cap.max_seq, optimize=True)
    return path


def _peer_job(model_name, calib_windows, per_block, batch_size, path) -> dict:
    """Torch-Pruning on a copy of the model, then the pruned model captured and exported
    (plain) like every quality run, and checked against PyTorch."""
    from peers.torch_pruning_peer import prune_ffn

    loaded = _worker_model(model_name)
    model = copy.deepcopy(loaded.model)
    t = time.perf_counter()
    info = prune_ffn(model, calib_windows, per_block, importance="taylor", batch_size=batch_size)
    prune_s = time.perf_counter() - t
    cap = capture(model, loaded.kind)
    t = time.perf_counter()
    how = _export_plain_checked(cap.gm, cap, Path(path), int(model.config.vocab_size))
    return {"peer": info, "prune_seconds": prune_s, "export_seconds": time.perf_counter() - t,
            "export": how, "path": path}


def _peer_submit(ctx: Context, ratio) -> tuple[concurrent.futures.Future, int]:
    ffn = [s for s in ctx.analysis.structures if s.kind == "ffn"]
    per_neuron = unit_params(ffn[0], ctx.shapes)
    per_block = int(round(ratio * ctx.total() / (per_neuron * len(ffn))))
    per_block = min(per_block, ffn[0].units - 1)
    job = ctx.worker().submit(_peer_job, ctx.args.model, ctx.calib_windows, per_block, ctx.args.batch_size,
                              str(ctx.tmp / f"peer_{ratio}.onnx"))
    return job, per_block * per_neuron * len(ffn)


def _peer_run(ctx: Context, job, removed) -> dict:
    rec = job.result()
    path = Path(rec.pop("path"))
    rec.update(**_perplexities(ctx, path), ratio_achieved=removed / ctx.total(),
               params_after=onnx_param_count(path))
    path.unlink()
    return rec


def _rows():
    rows = [(c, rec) for c in CRITERIA for rec in ("none", "refit")] + [(PEER, "taylor")]
    return rows[:4] + [("flap", PUBLISHED)] + rows[4:]


def quality_markdown(data, ratios) -> str:
    s = data["setup"]
    lines = [f"Model: {s['model']}. Cells: perplexity of the pruned model in onnxruntime (ratio to "
             f"dense). Calibration: {s['calibration']}. Command: `{s['command']}`.", ""]
    sets = [("ppl", "Held-out KJV (the calibration's own domain)", s["evaluation"])]
    if "ppl_ood" in data["dense"]:
        sets.append(("ppl_ood", f"Out of domain ({OOD})", s.get("evaluation_ood", OOD)))
    for metric, title, how in sets:
        lines += [f"### {title}", "", f"Dense perplexity **{data['dense'][metric]:.2f}**. Evaluation: {how}.", ""]
        lines += _quality_table(data, ratios, metric)
    lines.append("`none`: each criterion's own selection without refit (FLAP with its bias compensation), "
                 "under the compiler's default allocation (block for goa and flap, uniform for the others); "
                 "FLAP as published (global allocation) has its own row; `refit`: goa-compiler's default "
                 "reconstruction (greedy least-squares refits of every pruned module against the dense "
                 "outputs). Bold: best at that ratio.")
    return "\n".join(lines) + "\n"


def _quality_table(data, ratios, metric) -> list[str]:
    runs = data["runs"]
    lines = ["| method | reconstruction | " + " | ".join(f"ratio {r}" for r in ratios) + " |",
             "|" + "---|" * (2 + len(ratios))]
    best = {}
    for r in ratios:
        cands = {k: v for k, v in runs.items() if v["ratio"] == r and metric in v}
        if cands:
            best[r] = min(cands, key=lambda k: cands[k][metric])
    for crit, recon in _rows():
        cells = []
        for r in ratios:
            v = runs.get(_key(crit, recon, r))
            if v is None:
                cells.append("-")
            elif metric not in v:
                cells.append("failed" if "error" in v else "-")
            else:
                cell = f"{v[metric]:.2f} ({v[metric + '_ratio']:.2f}x)"
                cells.append(f"**{cell}**" if best.get(r) == _key(crit, recon, r) else cell)
        if any(c != "-" for c in cells):
            label = "Torch-Pruning 1.6.1 (FFN only)" if crit == PEER else crit
            rlabel = ("none (Taylor importance)" if crit == PEER else
                      "none, global allocation (as published)" if recon == PUBLISHED else recon)
            lines.append(f"| {label} | {rlabel} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Winner per ratio: " + "; ".join(
        f"{r}: {best[r].rsplit('/', 1)[0]} ({runs[best[r]][metric]:.2f})" for r in ratios if r in best) + ".")
    goa = {r: runs.get(_key("goa", "refit", r)) for r in ratios}
    notes = []
    for r in ratios:
        g = goa[r]
        if g and metric in g and r in best and best[r] != _key("goa", "refit", r):
            b = runs[best[r]]
            notes.append(f"at {r} goa+refit is {g[metric] / b[metric]:.2f}x the winner's perplexity")
    if notes:
        lines.append("Where goa (with its default reconstruction) loses: " + "; ".join(notes) + ".")
    lines.append("")
    return lines


def plot_quality(data, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = _rows()
    colors = dict(zip(CRITERIA + (PEER,), ["C0", "C1", "C2", "C3", "C4", "C5"]))
    for crit, recon in rows:
        pts = sorted((v["ratio"], v["ppl_ratio"]) for v in runs.values()
                     if v["criterion"] == crit and v["reconstruct"] == recon and "ppl" in v)
        if not pts:
            continue
        style = "-" if recon == "refit" else (":" if crit == PEER else "--")
        label = f"{crit} + {recon}" if crit != PEER else "Torch-Pruning (Taylor, FFN only)"
        ax.plot(*zip(*pts), style, marker="o", color=colors[crit], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (fraction of attention + FFN parameters removed)")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_title(f"SmolLM2-135M, held-out KJV (dense ppl {data['dense']['ppl']:.2f})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ cost

class TimedProgress(Progress):
    """Progress that also records when each phase started and ended (for memory peaks)."""

    def __init__(self, enabled):
        super().__init__(enabled)
        self.spans: list[tuple[str, float, float]] = []

    def phase(self, name):
        parent = super().phase(name)
        spans = self.spans

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()
                return parent.__enter__()

            def __exit__(self, *exc):
                spans.append((name, self.t, time.perf_counter()))
                return parent.__exit__(*exc)

        return _Span()


class RssSampler(threading.Thread):
    """Resident memory of this process, sampled every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.proc.memory_info().rss))
            time.sleep(0.02)

    def peak(self, t0, t1) -> int:
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else 0


def floor_seconds(ctx: Context, reps: int = 3) -> float:
    """One dense forward pass over the calibration tokens (batches as the compile uses)."""
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            t = time.perf_counter()
            for batch in ctx.calib_windows.split(ctx.args.batch_size):
                ctx.loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def cost(ctx: Context):
    args = ctx.args
    path = _results_path("cost", args.quick)
    floor = floor_seconds(ctx)
    out = ctx.tmp / "cost-out"
    opts = ctx.opts("goa", "refit", COST_RATIO)
    sampler = RssSampler()
    sampler.start()
    progress = TimedProgress(not args.quiet)
    base = sampler.proc.memory_info().rss
    t0 = time.perf_counter()
    result = compile_loaded(ctx.loaded.model, ctx.loaded.kind, opts, out, progress,
                            tokenizer=ctx.loaded.tokenizer, source=ctx.loaded.source)
    total = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    ctx.onnx[_key("goa", "refit", COST_RATIO)] = out / "model.onnx"   # what `goa compile` emits
    ctx.compiled[_key("goa", "refit", COST_RATIO)] = result.report
    phases = []
    for name, a, b in progress.spans:
        phases.append({"phase": name, "seconds": b - a, "x_floor": (b - a) / floor,
                       "peak_rss_mib": sampler.peak(a, b) / 2**20})
    data = {"setup": {"model": ctx.loaded.source,
                      "compile": f"goa + refit, ratio {COST_RATIO}, {result.report.get('allocation')} allocation "
                                 f"(the defaults)",
                      "calibration_tokens": int(ctx.calib_windows.numel()),
                      "floor": f"one dense forward pass (PyTorch, batch {args.batch_size}) over the same "
                               f"{ctx.calib_windows.numel()} calibration tokens, median of 3",
                      "command": _command(), **_machine()},
            "floor_seconds": floor, "total_seconds": total, "total_x_floor": total / floor,
            "rss_before_mib": base / 2**20, "peak_rss_mib": max(r for _, r in sampler.samples) / 2**20,
            "phases": phases}
    _publish(path, data, cost_markdown(data))
    return data


def cost_markdown(d) -> str:
    s = d["setup"]
    lines = [f"Compile: {s['compile']} of {s['model']}; {s['calibration_tokens']} calibration tokens. "
             f"Floor: {s['floor']} = **{d['floor_seconds']:.2f} s**. Whole compile: "
             f"**{d['total_seconds']:.1f} s = {d['total_x_floor']:.0f}x the floor**, peak resident memory "
             f"{d['peak_rss_mib']:.0f} MiB (process held {d['rss_before_mib']:.0f} MiB before the compile, "
             f"with the model loaded). Command: `{s['command']}`.", "",
             "| phase | seconds | x floor | peak RSS (MiB) |", "|---|---|---|---|"]
    for p in d["phases"]:
        lines.append(f"| {p['phase']} | {p['seconds']:.1f} | {p['x_floor']:.1f} | {p['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ speed

def speed(ctx: Context, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    args = ctx.args
    gpu = provider != "CPUExecutionProvider"
    what = "speed-gpu" if gpu else "speed"
    path = _results_path(what, args.quick)
    if gpu and provider not in ort.get_available_providers():
        msg = (f"GPU section skipped: onnxruntime {ort.__version__} offers "
               f"{', '.join(ort.get_available_providers())}, no {provider} (no GPU or no onnxruntime-gpu)")
        log(msg)
        _publish(path, {"skipped": msg, "command": _command()}, msg + "\n")
        return None
    models = {"dense": ctx.dense_onnx()}
    flops = {"dense": (sp.graph_flops(ctx.captured.gm, 1, sp.PREFILL_SEQ), sp.graph_flops(ctx.captured.gm, 1, 1))}
    params = {"dense": onnx_param_count(models["dense"])}
    for ratio in args.ratio_list:
        key = _key("goa", "refit", ratio)
        gm = copy.deepcopy(ctx.captured.gm)
        # latency depends on shapes only; every uniform-allocation criterion gives the same ones
        prune_captured(dataclasses.replace(ctx.captured, gm=gm), ctx.analysis, ctx.opts("magnitude", "none", ratio),
                       None, Progress(False))
        if key in ctx.onnx:
            models[str(ratio)] = ctx.onnx[key]
        else:
            log(f"speed: exporting the ratio {ratio} model")
            models[str(ratio)] = ctx.export(gm, f"speed_{ratio}", optimize=True)
        flops[str(ratio)] = (sp.graph_flops(gm, 1, sp.PREFILL_SEQ), sp.graph_flops(gm, 1, 1))
        params[str(ratio)] = onnx_param_count(models[str(ratio)])
    providers = [provider]
    rounds, reps = (3, 5) if args.quick else (5, 10)
    log("speed: prefill latency")
    prefill = sp.interleaved_latency({k: str(v) for k, v in models.items()}, rounds=rounds, reps=reps,
                                     seq_len=sp.PREFILL_SEQ, vocab_size=ctx.vocab_size, providers=providers)
    log("speed: decode-step latency")
    decode = sp.interleaved_latency({k: str(v) for k, v in models.items()}, rounds=rounds, reps=reps * 4,
                                    seq_len=1, vocab_size=ctx.vocab_size, providers=providers)
    kv = sp.has_kv_cache(models["dense"])
    rows = []
    for k in models:
        rows.append({"model": k, "params": params[k],
                     "prefill_ms": prefill[k]["median_ms"], "decode_ms": decode[k]["median_ms"],
                     "prefill_speedup": prefill["dense"]["median_ms"] / prefill[k]["median_ms"],
                     "decode_speedup": decode["dense"]["median_ms"] / decode[k]["median_ms"],
                     "ideal_prefill_speedup": flops["dense"][0] / flops[k][0],
                     "ideal_decode_speedup": flops["dense"][1] / flops[k][1],
                     "prefill_gflops": flops[k][0] / 1e9, "decode_gflops": flops[k][1] / 1e9,
                     "prefill_round_medians_ms": prefill[k]["round_medians_ms"]})
    data = {"setup": {"model": ctx.loaded.source, "provider": provider,
                      "prefill": f"batch 1, {sp.PREFILL_SEQ} tokens",
                      "decode": ("one token with the KV cache" if kv else
                                 "one token, batch 1: the exported graph carries no KV cache yet, so this is "
                                 "a decode step's projections and FFN without attention over past tokens"),
                      "timing": f"median over {rounds} interleaved rounds (dense, pruned, ... in turn) of "
                                f"{reps} runs (decode {reps * 4}) after warm-up",
                      "ideal": "dense FLOPs / pruned FLOPs of the same graph at the same shape "
                               "(torch FlopCounterMode: matmuls and attention)",
                      "pruned_models": "uniform allocation (shapes are the same for every criterion)",
                      "command": _command(), **_machine()},
            "rows": rows}
    _publish(path, data, speed_markdown(data))
    plot_speed(data, path.with_suffix(".png"))
    return data


def speed_markdown(d) -> str:
    s = d["setup"]
    lines = [f"{s['model']}, onnxruntime {s['onnxruntime']} {s['provider']}, {s['machine']}. Prefill: "
             f"{s['prefill']}; decode: {s['decode']}. Latency: {s['timing']}. Ideal speedup: {s['ideal']}. "
             f"Command: `{s['command']}`.", "",
             "| model | params | prefill ms | speedup (ideal) | decode-step ms | speedup (ideal) |",
             "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        name = "dense" if r["model"] == "dense" else f"ratio {r['model']}"
        lines.append(f"| {name} | {r['params'] / 1e6:.1f} M | {r['prefill_ms']:.1f} | "
                     f"{r['prefill_speedup']:.2f}x ({r['ideal_prefill_speedup']:.2f}x) | {r['decode_ms']:.2f} | "
                     f"{r['decode_speedup']:.2f}x ({r['ideal_decode_speedup']:.2f}x) |")
    return "\n".join(lines) + "\n"


def plot_speed(d, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = d["rows"]
    x = [0.0 if r["model"] == "dense" else float(r["model"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, kind, label in ((axes[0], "prefill", "prefill (1 x 128 tokens)"),
                            (axes[1], "decode", "decode step (1 token)")):
        ax.plot(x, [r[f"{kind}_ms"] for r in rows], "-o", label="measured")
        ax.plot(x, [rows[0][f"{kind}_ms"] / r[f"ideal_{kind}_speedup"] for r in rows], "--", color="gray",
                label="ideal (dense / FLOP ratio)")
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("latency (ms)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"onnxruntime {d['setup']['provider']}, {d['setup']['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "cost", "speed", "all"])
    p.add_argument("--quick", action="store_true", help="ratio 0.3, 8 calibration windows, 2048 eval tokens, "
                   "nine configurations: the smoke run (under 15 minutes on 2 cores)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default=None, help="comma-separated (default 0.1,...,0.5; quick 0.3)")
    p.add_argument("--criteria", default=None, help="restrict quality to these comma-separated methods (criteria, or torch-pruning for the peer)")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu", choices=["auto", "off"], default="auto",
                   help="also run speed on onnxruntime's CUDA provider when present")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in the JSON")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a compile option (CompileOptions field, string value) for every quality run but the "
                        "published rows, e.g. skip_layers=auto")
    p.add_argument("--tag", default=None, help="write quality-TAG.json (and .md, .png) instead of quality.json")
    args = p.parse_args()
    args.settings = dict(item.partition("=")[::2] for item in args.set)
    args.ratio_list = [float(r) for r in (args.ratios or ("0.3" if args.quick else "0.1,0.2,0.3,0.4,0.5")).split(",")]
    args.num_samples = args.num_samples or (8 if args.quick else 32)
    args.eval_tokens = args.eval_tokens or (2048 if args.quick else 8192)
    start = time.perf_counter()
    ctx = Context(args)
    try:
        if args.what in ("cost", "all"):
            cost(ctx)
        if args.what in ("quality", "all"):
            quality(ctx)
        if args.what in ("speed", "all"):
            speed(ctx)
            if args.gpu == "auto":
                speed(ctx, "CUDAExecutionProvider")
    finally:
        ctx.close()
    log(f"done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
