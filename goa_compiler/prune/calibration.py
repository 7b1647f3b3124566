"""Calibration: the windows of text the statistics are measured on, and what is observed.

The frontend runs the graph node by node (``frontend.stream``: frontends/fx.py has the
torch.fx one), pausing at the probe points analysis chose, so statistics can be gathered
and weights changed between modules without ever running the whole model once per module.
Two lists of streams, dense and pruned, advancing in lockstep over the same batches, give
the greedy reconstruction its inputs (pruned upstream) and targets (dense outputs) at a
cost of one forward pass each (prune/greedy.py).
"""
from __future__ import annotations

import math
from collections import Counter, deque
from typing import Callable, Iterable, Iterator

import torch

from goa_compiler.data import mixture_windows
from goa_compiler.ir.structure import Structure
from goa_compiler.prune.criteria import ModuleStats
from goa_compiler.prune.distributed import SINGLE, Ranks, reduce_stats
from goa_compiler.prune.stats import HeadSimilarity, Moments


class CalibrationError(Exception):
    """Calibration produced non-finite activations (names the module)."""


def check_finite(t: torch.Tensor, s: Structure, what: str) -> None:
    if not torch.isfinite(t).all():
        raise CalibrationError(f"non-finite activations at the {what} of {s.name} "
                               f"({module_path(s)}); the model or the calibration data is broken")


def module_path(s: Structure) -> str:
    """The model's own name for the structure's module (e.g. model.layers.1.mlp), from the
    level-2 weight's name; the graph node when that name has no module part."""
    weight = s.projections[s.level2_node].weight
    if weight.startswith("model."):      # capture wraps the model as "model"
        weight = weight[len("model."):]
    parts = weight.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else s.level2_node


def calibration_windows(tokenizer, opts) -> torch.Tensor:
    """``--num-samples`` random windows of ``--seq-len`` tokens of the calibration text (of a
    mixture, an equal share of each part's)."""
    return mixture_windows(tokenizer, opts.calib, "calib", opts.seq_len, opts.num_samples, opts.seed,
                           source=opts.calib or "kjv (calibration split)")


def batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


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


def dense_stats(frontend, structures: list[Structure], feeds, needs_heads: bool,
                progress, ranks: Ranks = SINGLE):
    """The dense model's statistics of each structure (for allocation), yielded as
    ``(structure, ModuleStats)`` in graph order, summed over the ranks. The batches advance
    through the graph in lockstep, one structure at a time, so only one structure's sums
    are alive at once (each is a full Gram of the level-1 and level-2 inputs: together
    they would grow with the depth of the model). ``progress`` None: no progress of its
    own (its reader reports it)."""
    pins = {n for s in structures for n in (s.probes.level1_input, s.probes.level2_input)}
    streams = [frontend.stream(f, None, pins) for f in feeds]
    for s in progress.iter(structures, "allocation pass") if progress is not None else structures:
        m = ModuleStats(Moments(True), Moments(True),
                        HeadSimilarity() if needs_heads and s.kind == "attention" else None)
        for st in streams:
            st.run_until(s.probes.level1_input)
            x = st.value(s.probes.level1_input)
            check_finite(x, s, "level-1 input")
            m.x.update(x)
            if m.heads is not None and s.probes.attention:
                st.hooks[s.probes.attention] = lambda a, k, out, m=m: m.heads.update(attention_probs(a, k))
            st.run_until(s.probes.level2_input)
            st.hooks.pop(s.probes.attention, None)
            h = st.value(s.probes.level2_input)
            check_finite(h, s, "level-2 input")
            m.h.update(h)
        reduce_stats(ranks, m.x, m.h, m.heads)
        yield s, m
        for st in streams:
            st.unpin((s.probes.level1_input, s.probes.level2_input))


Decide = Callable[[list[tuple[Structure, ModuleStats]]], dict[str, int]]


def by_block(source: Iterable[tuple[Structure, ModuleStats]], structures: list[Structure],
             counts: dict[str, int] | None = None, decide: Decide | None = None
             ) -> Iterator[tuple[Structure, ModuleStats, int]]:
    """``(structure, statistics, units to drop)`` in the order of ``source``. With known
    ``counts``, at once; with ``decide`` (a block's structures and statistics -> their
    counts), each structure waits until the statistics of its whole block (every structure
    of its layer) have been read, so only the blocks not yet decided are held."""
    if decide is None:
        for s, m in source:
            yield s, m, (counts or {}).get(s.name, 0)
        return
    left = Counter(s.layer for s in structures)
    open_blocks: dict[int, list] = {}
    waiting: deque = deque()
    decided: dict[str, int] = {}
    for s, m in source:
        waiting.append((s, m))
        open_blocks.setdefault(s.layer, []).append((s, m))
        left[s.layer] -= 1
        if left[s.layer] == 0:
            decided.update(decide(open_blocks.pop(s.layer)))
        while waiting and waiting[0][0].name in decided:
            s0, m0 = waiting.popleft()
            yield s0, m0, decided[s0.name]
