"""Greedy output approximation, module by module (docs/method.md, "Reconstruction").

Two streams of calibration batches advance through the graph in lockstep: the dense model,
and the model pruned so far. For each structure in graph order, named steps over one
``GreedyState``:

1. ``collect_level1``: the pruned stream runs to the level-1 input X^ (the dense stream has
   run past the level-2 output), paired with the dense level-1 outputs;
2. ``refit_level1``: level 1 is refit by ridge least squares against them (paper, refit);
3. ``collect_level2``: the pruned stream runs on to the level-2 input h^ (through the refit
   level 1), paired with the dense level-2 output;
4. ``refit_level2_all``: level 2 is refit on all channels (paper, refit);
5. the criterion scores the units on the current weights and the pruned-stream statistics;
   ``allocation.drop_lowest`` (the same rule as the data-free path) picks the units to drop;
6. ``refit_level2_kept``: ``refit`` refits level 2 on the kept channels (``paper`` only
   slices); FLAP's bias compensation where it applies; the guard keeps the pruned original
   when a refit is worse;
7. ``commit``: the removed level-2 columns are zeroed in the pruned stream (the same function
   as removing the units), which then continues into the next structure.

A compile therefore costs one forward pass of each stream (plus one dense pass for global
allocation), whatever the number of modules. When every statistic is the dense model's
(``reads_dense_only``: dense module inputs, no bias gained on the way, one fold), the
refit targets follow from the level-2 input's sums and level 1 keeps its weights:
``prune_dense`` runs steps 4-7 from the statistics of one dense pass, which the pipeline
also allocates from (docs/method.md §3).

Around the steps: under torchrun every statistic is summed over the ranks and rank 0's
result of each module is broadcast (``share_module``, prune/distributed.py); each module's
result goes to the journal as it finishes, and a resumed compile reads the finished ones back
(``resume_module``, prune/journal.py); statistics measured by an earlier compile replace the
collection steps (--load-stats, prune/stats_store.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from goa_compiler.ir.structure import Structure
from goa_compiler.prune.allocation import drop_lowest
from goa_compiler.prune.calibration import attention_probs, check_finite
from goa_compiler.prune.criteria import (REGISTRY, ModuleStats, ScoreSettings, flap_bias_compensation, gains_bias,
                                        score_units)
from goa_compiler.prune.distributed import SINGLE, Ranks, reduce_stats
from goa_compiler.prune.journal import Journal, ModuleResult
from goa_compiler.prune.stats_store import StatsStore
from goa_compiler.prune.lstsq import output_error, refit_linear, restrict, validated_ridge
from goa_compiler.prune.stats import FoldedCross, HeadSimilarity, Moments, linear_cross

F64 = torch.float64


@dataclass(frozen=True)
class GreedySettings:
    criterion: str
    reconstruct: str             # paper | refit | none
    ridge: float
    score: ScoreSettings
    module_inputs: str               # dense | pruned: what the second stream runs on
    refit_prior: str                 # original | zero: what the ridge pulls refit weights toward
    ridge_folds: int                 # >= 2: each refit's ridge chosen by K-fold validation; else ``ridge``
    refit_intercept: str             # biased | always: whether a bias-free level-2 projection's refit gains one
    # (no defaults here: they are declared once, in driver/options.py)

    def prior(self, W0: torch.Tensor) -> torch.Tensor | None:
        return W0 if self.refit_prior == "original" else None

    @property
    def folds(self) -> int:
        return self.ridge_folds if self.ridge_folds >= 2 else 1

    @property
    def needs_heads(self) -> bool:
        return REGISTRY[self.criterion].needs_head_similarity(self.score)


@dataclass
class GreedyState:
    """What the loop carries from one module to the next."""

    orig: dict[str, torch.Tensor]
    dense: list                                  # dense streams (empty without reconstruction)
    pruned: list                                 # pruned-so-far streams
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)   # new full-size weights
    diverged: bool = False                       # something upstream was pruned
    kept: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)
    new_biases: dict[str, str] = field(default_factory=dict)
    ranks: Ranks = SINGLE                        # statistics are summed over them (data parallel)
    stored: StatsStore | None = None             # every module's statistics, measured before (--load-stats)
    save: StatsStore | None = None               # where each module's statistics go (--save-stats)
    first_window: int = 0                        # the number of this rank's first window
    biases_reach_stream: bool = True             # a gained bias is added to the pruned stream

    def current(self, name: str) -> torch.Tensor:
        return self.overrides.get(name, self.orig[name])


@dataclass(frozen=True)
class Level1:
    x: Moments                   # of the level-1 input X^
    joint: FoldedCross | None    # (X^, dense level-1 outputs) when level 1 is refit


@dataclass(frozen=True)
class Level2:
    h: Moments                   # of the level-2 input h^
    cross: FoldedCross | None    # (h^, dense level-2 output) with a dense stream
    heads: HeadSimilarity | None
    own_targets: bool = False    # the targets are this projection's own outputs on h^ (dense statistics)


@dataclass(frozen=True)
class Level2Weights:
    W: torch.Tensor              # [out, in] float64, after the all-channel refit (or current)
    b: torch.Tensor | None
    W_orig: torch.Tensor         # the weights the module came with
    b_orig: torch.Tensor | None


# ------------------------------------------------------------------------------ the loop

def run(frontend, structures: list[Structure], counts: dict[str, int], feeds, settings: GreedySettings,
        rng: np.random.Generator, progress, ranks: Ranks = SINGLE, first_window: int = 0,
        journal: Journal | None = None, stored: StatsStore | None = None,
        save: StatsStore | None = None, dense: Iterator | None = None) -> GreedyState:
    """Every structure through steps 1-7; returns the final state (its ``overrides`` are
    the new full-size weights, ``kept`` the units kept where any were dropped). With
    several ``ranks``, ``feeds`` are this rank's batches (its first window is number
    ``first_window``), statistics are summed over the ranks and rank 0's result of each
    module is every rank's. With a ``journal`` (rank 0's), each module's result is written
    to it, and the modules it already holds are read back instead of computed. ``stored``
    (rank 0's): every module's statistics, measured by an earlier compile: no calibration
    pass runs. ``save``: where each module's statistics are written. ``dense`` (when
    ``reads_dense_only(settings)``): ``(structure, dense statistics, units to drop)`` for
    every structure in order (calibration.by_block); no stream runs here, and ``counts``
    is not read."""
    if dense is not None:
        return _run_dense(frontend, structures, dense, settings, rng, progress, ranks, journal)
    pins: set[str] = set()
    still_needed: list[set[str]] = []       # probes of the structures after each one
    for s in reversed(structures):
        still_needed.insert(0, set(pins))
        pins |= _pins(s)
    state = GreedyState(orig=frontend.weights(), dense=[], pruned=[], ranks=ranks, first_window=first_window,
                        stored=stored if ranks.lead else None, save=save,
                        biases_reach_stream=_biases_reach_stream(settings))
    measure = not ranks.share_object(stored is not None)
    # the dense stream gives the targets of the refits: not needed without reconstruction
    if measure and settings.reconstruct in ("paper", "refit"):
        state.dense = [frontend.stream(f, None, pins) for f in feeds]
    # module_inputs "pruned": the second stream reads the weights greedy installs (errors of
    # upstream modules reach the next ones); "dense": it never does, so every module is
    # scored and refit on the dense model's inputs (only a bias a module gains is applied)
    seen = state.overrides if settings.module_inputs == "pruned" else {}
    if measure and state.dense and _same_streams(settings):
        state.pruned = state.dense      # they would compute the same values: run the model once
    elif measure:
        state.pruned = [frontend.stream(f, seen, pins) for f in feeds]
    finished = ranks.share_object(journal.finished() if journal is not None else 0)
    for i, s in enumerate(progress.iter(structures, "modules")):
        if i < finished:
            resume_module(state, s, journal.read(i) if journal is not None else None, rng)
        elif not measure and not ranks.lead:      # rank 0 solves from the stored statistics
            share_module(state, s)
            _apply_new_bias(state, s)
        else:
            prune_module(state, s, counts.get(s.name, 0), settings, rng)
            share_module(state, s)
            if journal is not None:
                journal.write(i, module_result(state, s, rng))
        for st in (*state.dense, *state.pruned):
            st.unpin(_pins(s) - still_needed[i])
    return state


def reads_dense_only(settings: GreedySettings) -> bool:
    """Every statistic a module needs is one of the dense model's: the second stream would
    compute what the dense one does (``_same_streams``), and one fold. Then the targets of
    every refit are the dense model's own projections of the dense inputs, so (sums of
    prune/stats.linear_cross) the Moments of each module's two inputs are all it needs, and
    level 1 is left as it is: its refit against its own outputs returns the original."""
    return _same_streams(settings) and settings.folds == 1


def _run_dense(frontend, structures: list[Structure], dense: Iterator, settings: GreedySettings,
               rng: np.random.Generator, progress, ranks: Ranks, journal: Journal | None) -> GreedyState:
    state = GreedyState(orig=frontend.weights(), dense=[], pruned=[], ranks=ranks)
    finished = ranks.share_object(journal.finished() if journal is not None else 0)
    for i, (s, m, n_drop) in enumerate(progress.iter(dense, "modules", total=len(structures))):
        if s.name != structures[i].name:
            raise ValueError(f"dense statistics of {s.name} where {structures[i].name} was expected")
        if i < finished:
            resume_module(state, s, journal.read(i) if journal is not None else None, rng)
            continue
        prune_dense(state, s, m, n_drop, settings, rng)
        share_module(state, s)
        if journal is not None:
            journal.write(i, module_result(state, s, rng))
    return state


def prune_dense(state: GreedyState, s: Structure, m: ModuleStats, n_drop: int, settings: GreedySettings,
                rng: np.random.Generator) -> None:
    """Steps 4-7 of module ``s`` from the dense model's statistics ``m`` (``reads_dense_only``):
    the level-2 targets are the original level-2 projection of the level-2 input."""
    recon = settings.reconstruct if (state.diverged or n_drop > 0) else "none"
    cross = None
    if settings.reconstruct in ("paper", "refit"):
        p = s.projections[s.level2_node]
        cross = FoldedCross.of(linear_cross(m.h, _as_out_in(state.orig[p.weight], p.out_axis),
                                            _bias(state.orig, p.bias)))
    l2 = Level2(m.h, cross, m.heads, own_targets=True)
    _select_and_refit(state, s, Level1(m.x, None), l2, n_drop, recon, settings, rng, {})


def prune_module(state: GreedyState, s: Structure, n_drop: int, settings: GreedySettings,
                 rng: np.random.Generator) -> None:
    # until something upstream is pruned the two streams agree: a module that loses
    # nothing there needs no reconstruction (so ratio 0 compiles to the dense model)
    recon = settings.reconstruct if (state.diverged or n_drop > 0) else "none"
    rec: dict = {}
    stored = state.stored.read_module(s.name) if state.stored is not None else None
    if stored is not None:
        l1 = Level1(stored[0], stored[1])
    else:
        # the joint statistics are collected whether or not this module is refit, so that
        # they do not depend on the ratio (a --save-stats of one ratio serves another);
        # asked before the dense stream runs on (it may be the second stream too)
        joint_l1 = settings.reconstruct in ("paper", "refit") and \
            not any(state.pruned[0].done(n) for n in s.level1_nodes)
        for d in state.dense:
            d.run_until(s.level2_node)
        l1 = collect_level1(state, s, joint_l1, settings.folds)
    if l1.joint is not None and recon in ("paper", "refit"):
        rec["level1_error"] = refit_level1(state, s, l1.joint, settings)
    l2 = Level2(*stored[2:]) if stored is not None else collect_level2(state, s, settings.needs_heads, settings.folds)
    if state.save is not None and state.ranks.lead:
        state.save.write_module(s.name, l1.x, l1.joint, l2.h, l2.cross, l2.heads)
    _select_and_refit(state, s, l1, l2, n_drop, recon, settings, rng, rec)


def _select_and_refit(state: GreedyState, s: Structure, l1: Level1, l2: Level2, n_drop: int, recon: str,
                      settings: GreedySettings, rng: np.random.Generator, rec: dict) -> None:
    """Steps 4-7: the all-channel refit, scores, selection, the kept-channel refit, commit."""
    w = refit_level2_all(state, s, l2, recon, settings, rec)
    weights = {k: state.current(k) for k in {sl.param for sl in s.slices}}
    stats = ModuleStats(l1.x, l2.h, l2.heads)
    sc = score_units(settings.criterion, s, weights, stats, rng, settings.score)
    state.scores[s.name] = sc
    drop = drop_lowest(sc, n_drop)
    dropped = set(drop)
    kept = [u for u in range(s.units) if u not in dropped]
    W2f, b2f, errors = refit_level2_kept(s, w, l2.cross, drop, kept, recon, settings, stats)
    if errors:
        rec.update(errors)
    commit(state, s, W2f, b2f)
    if n_drop:
        state.kept[s.name] = kept
        state.diverged = True
    state.records[s.name] = rec


# ------------------------------------------------------------------------------ the steps

def collect_level1(state: GreedyState, s: Structure, refit: bool, folds: int = 1) -> Level1:
    """Statistics of the level-1 input (pruned stream); with ``refit``, paired with the
    dense level-1 outputs: one joint problem for all level-1 projections (they share X^),
    in ``folds`` folds of the windows."""
    for p in state.pruned:
        p.run_until(s.probes.level1_input)
    joint = FoldedCross(folds, state.first_window) if refit else None
    xm = Moments(full=True)
    for k, p in enumerate(state.pruned):
        x = p.value(s.probes.level1_input)
        check_finite(x, s, "level-1 input")
        if joint is not None:
            y = torch.cat([state.dense[k].value(n) for n in s.level1_nodes], dim=-1)
            check_finite(y, s, "level-1 output (dense model)")
            joint.update(x, y)
        else:
            xm.update(x)
    reduce_stats(state.ranks, joint if joint is not None else xm)
    if joint is not None:
        t = joint.total()
        xm.n, xm.s, xm.gram = t.n, t.sx, t.xtx
    return Level1(xm, joint)


def refit_level1(state: GreedyState, s: Structure, folded: FoldedCross, settings: GreedySettings) -> dict:
    """Refit the level-1 projections jointly; keep the originals when that is worse (the
    ridge can cost more than the refit gains on few tokens). Returns the error record."""
    l1 = s.level1_nodes
    W0, b0 = _joint_weights(s, l1, state.orig)
    joint = folded.total()
    rec = {"before": output_error(joint, W0, b0)}
    biased = {s.projections[n].bias is not None for n in l1}
    with_bias = biased == {True}     # a projection without a bias cannot gain one
    W, bb, ridge = solve(folded, with_bias, settings.prior(W0), settings)
    if settings.folds > 1:
        rec["ridge"] = ridge
    row = 0
    for n in l1:
        p = s.projections[n]
        state.overrides[p.weight] = _layout(W[row:row + p.width], p.out_axis).to(state.orig[p.weight].dtype)
        if p.bias is not None:
            bias = bb[row:row + p.width] if with_bias else torch.zeros(p.width, dtype=F64)
            state.overrides[p.bias] = bias.to(state.orig[p.bias].dtype)
        row += p.width
    rec["after"] = output_error(joint, *_joint_weights(s, l1, state.overrides))
    if rec["after"] > rec["before"]:
        for n in l1:
            state.overrides.pop(s.projections[n].weight, None)
            state.overrides.pop(s.projections[n].bias, None)
        rec["after"] = rec["before"]
        rec["kept_original"] = True
    return rec


def collect_level2(state: GreedyState, s: Structure, needs_heads: bool, folds: int = 1) -> Level2:
    """Statistics of the level-2 input through the (refit) level 1, paired with the dense
    level-2 output when there is a dense stream (in ``folds`` folds of the windows);
    attention-map similarity when asked."""
    heads = HeadSimilarity() if needs_heads and s.kind == "attention" else None
    cross = FoldedCross(folds, state.first_window) if state.dense else None
    hm = Moments(full=True)
    for k, p in enumerate(state.pruned):
        if heads is not None and s.probes.attention:
            p.hooks[s.probes.attention] = lambda a, kw, out: heads.update(attention_probs(a, kw))
        p.run_until(s.probes.level2_input)
        p.hooks.pop(s.probes.attention, None)
        h = p.value(s.probes.level2_input)
        check_finite(h, s, "level-2 input")
        if cross is not None:
            y = state.dense[k].value(s.level2_node)
            check_finite(y, s, "level-2 output (dense model)")
            cross.update(h, y)
        else:
            hm.update(h)
    reduce_stats(state.ranks, cross if cross is not None else hm, heads)
    if cross is not None:
        t = cross.total()
        hm.n, hm.s, hm.gram = t.n, t.sx, t.xtx
    return Level2(hm, cross, heads)


def refit_level2_all(state: GreedyState, s: Structure, l2: Level2, recon: str,
                     settings: GreedySettings, rec: dict) -> Level2Weights:
    """The level-2 weights before selection: refit on all channels (paper, refit), or as
    they are. The refit is installed, so the criterion scores the refit weights."""
    p = s.projections[s.level2_node]
    W_orig = _as_out_in(state.current(p.weight), p.out_axis)
    b_orig = _bias(state.overrides, p.bias) if p.bias in state.overrides else _bias(state.orig, p.bias)
    if recon not in ("paper", "refit") or (l2.own_targets and settings.refit_prior == "original"):
        return Level2Weights(W_orig, b_orig, W_orig, b_orig)     # (a refit toward W on W's own outputs is W)
    W, b, ridge = solve(l2.cross, p.bias is not None, settings.prior(W_orig), settings)
    if settings.folds > 1:
        rec["level2_ridge"] = ridge
    state.overrides[p.weight] = _layout(W, p.out_axis).to(state.orig[p.weight].dtype)
    if p.bias is not None:
        state.overrides[p.bias] = b.to(state.orig[p.bias].dtype)
    return Level2Weights(W, b, W_orig, b_orig)


def refit_level2_kept(s: Structure, w: Level2Weights, folded: FoldedCross | None, drop: list[int],
                      kept: list[int], recon: str, settings: GreedySettings, stats: ModuleStats):
    """The final level-2 weights for the kept units, [out, in] float64 with the dropped
    columns zero, and the error record. ``refit``: least squares on the kept channels (an
    intercept only where the projection has a bias: adding one to bias-free projections
    over-fitted SmolLM2 badly, docs/method.md); else the slice of ``w``. FLAP's bias
    compensation (flap without refit; ``mean``: every criterion) belongs to the unrefit weights (with the kept-channel refit it
    double-counts: measured ppl > 1e7 on SmolLM2). The guard: when the refit is worse than
    the pruned original, the pruned original."""
    p = s.projections[s.level2_node]
    cross = folded.total() if folded is not None else None
    drop_cols = np.sort(s.level2()[0].index[drop].reshape(-1)) if drop else np.array([], dtype=np.int64)
    keep_cols = np.setdiff1d(np.arange(w.W.shape[1]), drop_cols)
    dc = torch.as_tensor(drop_cols, dtype=torch.long)
    W2p = w.W_orig.clone()
    W2p[:, dc] = 0.0
    b_orig = w.b_orig.to(F64) if w.b_orig is not None else None
    err_none = output_error(cross, W2p, b_orig) if cross is not None else None
    if recon == "refit" and len(drop_cols):
        keep = torch.as_tensor(keep_cols)
        Wk, bk, ridge = solve(folded, _refit_has_intercept(s, settings), settings.prior(w.W_orig[:, keep]),
                              settings, keep_cols)
        W2f = torch.zeros_like(w.W, dtype=F64)
        W2f[:, torch.as_tensor(keep_cols)] = Wk
        b2f = bk
    else:
        W2f = w.W.to(F64).clone()
        W2f[:, dc] = 0.0
        b2f = w.b.to(F64) if w.b is not None else None
    # (an expert's output is scaled per token by its routing weight: no constant bias fits it)
    if len(drop_cols) and gains_bias(settings.criterion, recon) and s.expert is None:
        full = {p.weight: _layout(w.W.to(F64), p.out_axis)}
        delta = flap_bias_compensation(s, full, stats, kept)
        b2f = delta if b2f is None else b2f + delta
    err_after = output_error(cross, W2f, b2f) if cross is not None else None
    rec: dict = {"kept_ridge": ridge} if settings.folds > 1 and recon == "refit" and len(drop_cols) else {}
    if recon == "refit" and err_after is not None and err_after > err_none:
        W2f, b2f, err_after = W2p, b_orig, err_none
        rec["kept_original_level2"] = True
    if cross is not None:
        rec["output_error"] = {"pruned_no_reconstruction": err_none, "final": err_after}
    return W2f, b2f, rec


def _refit_has_intercept(s: Structure, settings: GreedySettings) -> bool:
    """Whether the kept-channel refit of ``s``'s level-2 projection fits an (unpenalised)
    intercept: where the projection has a bias, and with --refit-intercept always for a
    bias-free one too, but not for an expert (its output is scaled per token by its routing
    weight: no constant bias fits it)."""
    if s.projections[s.level2_node].bias is not None:
        return True
    return settings.refit_intercept == "always" and s.expert is None


def solve(folded: FoldedCross, bias: bool, prior: torch.Tensor | None, settings: GreedySettings,
          keep_cols=None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The ridge refit on all windows (on input channels ``keep_cols`` when given), its
    relative ridge chosen by validation over the folds with --ridge-folds, else --ridge.
    Returns (W, b, the relative ridge used)."""
    total, folds = folded.total(), folded.usable_folds()
    if keep_cols is not None:
        total = restrict(total, keep_cols)
        folds = [restrict(f, keep_cols) for f in folds] if len(folds) > 1 else folds
    lam = settings.ridge
    if settings.folds > 1 and len(folds) > 1:
        lam, _ = validated_ridge(folds, total, bias, prior)
    W, b = refit_linear(total, bias=bias, rel_lambda=lam, prior=prior)
    return W, b, lam


def commit(state: GreedyState, s: Structure, W2f: torch.Tensor, b2f: torch.Tensor | None) -> None:
    """Install the final level-2 weights (and a new bias where the projection had none) in
    the pruned stream, which continues with them into the next structure."""
    p = s.projections[s.level2_node]
    state.overrides[p.weight] = _layout(W2f, p.out_axis).to(state.orig[p.weight].dtype)
    if b2f is None:
        return
    if p.bias is not None:
        state.overrides[p.bias] = b2f.to(state.orig[p.bias].dtype)
        return
    name = _new_bias_name(p.weight)
    state.new_biases[s.level2_node] = name
    state.overrides[name] = b2f.to(state.orig[p.weight].dtype)
    _apply_new_bias(state, s)


def _biases_reach_stream(settings: GreedySettings) -> bool:
    """Whether the pruned stream adds the biases modules gain: when it reads the installed
    weights (pruned module inputs), and FLAP's compensation always (as before the option);
    a refit's intercept under dense module inputs is one more refit weight it does not read
    (and the stream may then be the dense one)."""
    return settings.module_inputs == "pruned" or gains_bias(settings.criterion, settings.reconstruct)


def _apply_new_bias(state: GreedyState, s: Structure) -> None:
    """The pruned stream adds the bias module ``s``'s level-2 projection gained."""
    name = state.new_biases.get(s.level2_node)
    if name is not None and state.biases_reach_stream:
        for st in state.pruned:
            st.post[s.level2_node] = (lambda bb: lambda out: out + bb)(state.overrides[name])


def module_result(state: GreedyState, s: Structure, rng: np.random.Generator) -> ModuleResult:
    """Module ``s``'s result in the state, for the journal."""
    names = _module_overrides(s, state)
    return ModuleResult(s.name, {n: state.overrides[n] for n in names}, state.kept.get(s.name),
                        state.scores[s.name], state.records[s.name], state.new_biases.get(s.level2_node),
                        state.diverged, rng.bit_generator.state)


def resume_module(state: GreedyState, s: Structure, result: ModuleResult | None, rng: np.random.Generator) -> None:
    """Module ``s`` as the journal holds it (rank 0 reads it; the others receive it), the
    random generator where it was after the module; the streams pass it unchanged."""
    if result is not None:
        if result.name != s.name:
            raise ValueError(f"journal: module {s.name} expected, found {result.name}")
        state.overrides.update(result.weights)
        if result.kept is not None:
            state.kept[s.name] = result.kept
        state.scores[s.name], state.records[s.name] = result.scores, result.record
        if result.new_bias is not None:
            state.new_biases[s.level2_node] = result.new_bias
        state.diverged = result.diverged
        rng.bit_generator.state = result.rng_state
    share_module(state, s)
    rng.bit_generator.state = state.ranks.share_object(rng.bit_generator.state)
    _apply_new_bias(state, s)


def _same_streams(settings: GreedySettings) -> bool:
    """The second stream computes what the dense one does: it reads no installed weights
    (dense module inputs) and gains no bias (FLAP's compensation without the kept-channel
    refit). Attention-map similarity is left out: its hook must see the attention op before
    the dense stream has run past it."""
    return settings.module_inputs == "dense" and not gains_bias(settings.criterion, settings.reconstruct) \
        and not settings.needs_heads


def share_module(state: GreedyState, s: Structure) -> None:
    """Rank 0's result of module ``s`` on every rank: its weights (in place), kept units,
    scores, records and new bias (identical sums give identical solutions; this makes sure)."""
    if not state.ranks.active:
        return
    names = _module_overrides(s, state)
    facts = state.ranks.share_object({
        "weights": {n: (tuple(state.overrides[n].shape), state.overrides[n].dtype) for n in names},
        "kept": state.kept.get(s.name), "scores": state.scores.get(s.name), "records": state.records.get(s.name),
        "new_bias": state.new_biases.get(s.level2_node), "diverged": state.diverged})
    for n in _module_params(s, state) - set(facts["weights"]):
        state.overrides.pop(n, None)
    for n, (shape, dtype) in sorted(facts["weights"].items()):
        t = state.overrides.get(n)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            t = state.overrides[n] = torch.empty(shape, dtype=dtype)
        state.ranks.share([t])
    for table, value in ((state.kept, facts["kept"]), (state.scores, facts["scores"]),
                         (state.records, facts["records"])):
        if value is None:
            table.pop(s.name, None)
        else:
            table[s.name] = value
    if facts["new_bias"] is not None:
        state.new_biases[s.level2_node] = facts["new_bias"]
    state.diverged = facts["diverged"]


# ------------------------------------------------------------------------------ helpers

def _module_overrides(s: Structure, state: GreedyState) -> list[str]:
    """The names of the weights module ``s`` has set in the overrides, sorted."""
    return sorted(_module_params(s, state) & set(state.overrides))


def _module_params(s: Structure, state: GreedyState) -> set[str]:
    """The parameters a module's steps may set: its projections' weights and biases, and a
    bias its level-2 projection gains."""
    names = {p.weight for p in s.projections.values()} | {p.bias for p in s.projections.values() if p.bias}
    names.add(_new_bias_name(s.projections[s.level2_node].weight))
    return names


def _pins(s: Structure) -> set[str]:
    names = {s.probes.level1_input, s.probes.level2_input, s.level2_node, *s.level1_nodes}
    if s.probes.attention:
        names.add(s.probes.attention)
    return names


def _joint_weights(s: Structure, nodes: list[str], table) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The level-1 projections stacked as one [sum of widths, in] problem (with biases,
    zeros where a projection has none, when any has one)."""
    Ws, bs, any_bias = [], [], False
    for n in nodes:
        p = s.projections[n]
        Ws.append(_as_out_in(table[p.weight], p.out_axis))
        any_bias |= p.bias is not None
        bs.append(table[p.bias].to(F64) if p.bias is not None else torch.zeros(p.width, dtype=F64))
    return torch.cat(Ws, 0), (torch.cat(bs) if any_bias else None)


def _layout(W: torch.Tensor, out_axis: int) -> torch.Tensor:
    """A [out, in] solution in the parameter's own layout ([in, out] for Conv1D)."""
    return W if out_axis == 0 else W.T


def _as_out_in(W: torch.Tensor, out_axis: int) -> torch.Tensor:
    return (W if out_axis == 0 else W.T).to(F64)


def _bias(table, name):
    return None if name is None else table[name].to(F64)


def _new_bias_name(weight: str) -> str:
    return weight[: -len("weight")] + "bias" if weight.endswith("weight") else weight + "_bias"
