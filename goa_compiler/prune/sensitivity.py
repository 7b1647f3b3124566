"""Calibration (sensitivity): how much the model's loss feels an error in each module's output.

A unit's score under goa or flap is an output error of its own module: comparable between
the modules of one block, which write into the same residual stream, but not across
blocks, where the stream's scale and what the rest of the network makes of an error
change. Network allocation (allocation.network_counts) weighs each module's errors by

    s_m = (1 / T) * sum_t || dL / dy_{m,t} ||^2,

``y_m`` the module's level-2 output at token t, ``L`` the next-token cross-entropy of the
dense model summed over the calibration tokens (T of them). To second order, an output
error ``e_t`` raises the loss by about ``(g_t . e_t)^2 / 2`` on average over tokens (the
Fisher form; the constant does not change any order); with ``e_t`` spread evenly over the ``d`` output channels that is ``s_m * |e|^2 / d``,
so ``s_m`` times the module's output error is the loss it costs, in one unit for every
module of the network. One forward and one backward pass of the dense model over the
calibration windows; summed over ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from goa_compiler.ir.structure import Structure
from goa_compiler.prune.distributed import SINGLE, Ranks


class SensitivityError(Exception):
    """The sensitivities cannot be measured (one line)."""


def output_sensitivity(frontend, structures: list[Structure], feeds, progress=None,
                       ranks: Ranks = SINGLE) -> dict[str, float]:
    """``s_m`` (module docstring) for every structure, by name."""
    return sensitivity_and_energy(frontend, structures, feeds, None, progress, ranks)[0]


def sensitivity_and_energy(frontend, structures: list[Structure], feeds, weights=None, progress=None,
                           ranks: Ranks = SINGLE) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``s_m`` for every structure and, with ``weights``, each unit's output energy on the
    same forward pass: M_u = E_t |B_u h_{u,t}|^2, goa's empirical moment (criteria.
    output_energy, which reads only the unit's own block of the level-2 input's Gram), so
    that --skip-layers auto needs no statistics pass of its own."""
    sums = torch.zeros(len(structures), dtype=torch.float64)
    tokens = torch.zeros(1, dtype=torch.float64)
    energy = [torch.zeros(s.units, dtype=torch.float64) for s in structures] if weights is not None else []
    rows = torch.zeros(len(structures), dtype=torch.float64)
    for feed in progress.iter(feeds, "sensitivity pass") if progress is not None else feeds:
        sums += _batch_sums(frontend, structures, feed, weights, energy, rows)
        tokens += float(feed["input_ids"].numel())
    if ranks.active:
        ranks.sum([sums, tokens, *([rows, *energy] if energy else [])])
    sens = {s.name: float(v) for s, v in zip(structures, sums / tokens.clamp(min=1.0))}
    return sens, {s.name: (e / max(float(n), 1.0)).numpy() for s, e, n in zip(structures, energy, rows)}


def _unit_energy(s: Structure, h: torch.Tensor, weights) -> torch.Tensor:
    """sum_t |B_u h_{u,t}|^2 per unit over the rows of one batch's level-2 input ``h``."""
    from goa_compiler.prune.criteria import unit_blocks

    h = h.detach().reshape(-1, h.shape[-1]).double()
    total = torch.zeros(s.units, dtype=torch.float64)
    for sl in s.level2():
        blocks = unit_blocks(sl, weights)                               # [U, k, out]
        idx = torch.as_tensor(np.asarray(sl.index), dtype=torch.long)   # [U, k]
        if idx.shape[1] == 1:
            total += (blocks[:, 0, :] ** 2).sum(-1) * (h[:, idx[:, 0]] ** 2).sum(0)
        else:
            for u in range(idx.shape[0]):
                total[u] += (h[:, idx[u]] @ blocks[u]).pow(2).sum()
    return total


def _batch_sums(frontend, structures: list[Structure], feed, weights=None, energy=(), rows=None) -> torch.Tensor:
    """sum_t |dL/dy_m|^2 over one batch, for each structure; with ``weights``, each unit's
    output energy added into ``energy`` and the level-2 input's rows into ``rows``."""
    ids = feed["input_ids"]
    starts = {s.probes.level1_input for s in structures}
    outs: dict[str, torch.Tensor] = {}
    st = frontend.stream(feed, None, None, grad=True)
    if weights is not None:
        readers: dict[str, list[int]] = {}
        for i, s in enumerate(structures):
            readers.setdefault(s.probes.level2_input, []).append(i)
        for node, which in readers.items():
            st.hooks[node] = lambda args, kwargs, out, which=which: [
                _add_energy(i, structures[i], out, weights, energy, rows) for i in which]

    def track(out):        # the first probe is computed from no tracked tensor: a leaf
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad:
            out.requires_grad_()
        return out

    def keep(name):
        def fn(out):
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise SensitivityError(f"the output of {name} does not depend on the first module's input")
            outs[name] = out
            return out
        return fn

    for n in starts:
        st.post[n] = track
    for s in structures:
        st.post[s.level2_node] = keep(s.level2_node)
    logits = _logits(st.output())
    if logits.dim() != 3 or logits.shape[:2] != ids.shape or logits.shape[-1] <= int(ids.max()):
        raise SensitivityError(f"the model's output (shape {tuple(logits.shape)}) is not next-token logits over "
                               f"the vocabulary: it needs a causal language model")
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                             reduction="sum")
    nodes = list(dict.fromkeys(s.level2_node for s in structures))
    try:
        grads = torch.autograd.grad(loss, [outs[n] for n in nodes], allow_unused=True)
    except (RuntimeError, NotImplementedError) as e:      # an op of the model without a derivative
        raise SensitivityError(f"the backward pass failed: {str(e).splitlines()[0]}") from e
    per = {n: (0.0 if g is None else float(g.double().pow(2).sum())) for n, g in zip(nodes, grads)}
    return torch.tensor([per[s.level2_node] for s in structures], dtype=torch.float64)


def _add_energy(i, s, h, weights, energy, rows):
    energy[i] += _unit_energy(s, h, weights)
    rows[i] += float(h.numel() // h.shape[-1])


def _logits(out) -> torch.Tensor:
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out
