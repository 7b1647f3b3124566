"""The plan, applied to a second capture of the same model: the serving graph.

The compile selects and reconstructs on the plain graph (capture/torch_export.py); the
KV-cache decoder (capture/decoder.py) is a second graph of the same parameters with the
cache as ports. Analysis of the decoder must find the same structures, slicing the same
parameters the same way, so that the plan (kept units per structure) means the same in both;
``mismatch`` says where it does not. The reconstruction's new biases are keyed by the plain
graph's projection nodes: ``translate_biases`` finds the decoder's node of the same weight.
"""
from __future__ import annotations

import numpy as np

from goa_compiler.ir.graph import Graph, Ref
from goa_compiler.ir.structure import Analysis


def mismatch(plain: Analysis, serving: Analysis) -> str | None:
    """Why the plan of ``plain`` cannot be applied to ``serving``, or None."""
    by_name = {s.name: s for s in serving.structures}
    for s in plain.structures:
        t = by_name.get(s.name)
        if t is None:
            why = next((r.reason for r in serving.refused if r.candidate and r.param in
                        {sl.param for sl in s.slices}), "not found")
            return f"the cached decoder's analysis has no {s.name} ({why})"
        if (t.kind, t.units) != (s.kind, s.units):
            return f"{s.name} is {t.kind} x {t.units} in the cached decoder, {s.kind} x {s.units} in the plain graph"
        mine = {(sl.param, sl.axis): sl.index for sl in s.slices}
        theirs = {(sl.param, sl.axis): sl.index for sl in t.slices}
        if mine.keys() != theirs.keys() or any(not np.array_equal(mine[k], theirs[k]) for k in mine):
            return f"{s.name} slices other parameters in the cached decoder"
    return None


def weight_of(view: Graph, node: str) -> str:
    """The weight parameter a projection node reads (its second input)."""
    w = view.nodes[node].inputs[1]
    if not (isinstance(w, Ref) and w.name in view.params):
        raise ValueError(f"{node} has no parameter weight")
    return view.params[w.name]


def translate_biases(plain: Graph, serving: Graph, new_biases: dict[str, str]) -> dict[str, str]:
    """``new_biases`` (plain projection node -> bias parameter) for the serving graph."""
    node_of = {}
    for n in serving.nodes.values():
        if n.op == "linear" and len(n.inputs) > 1 and isinstance(n.inputs[1], Ref) and n.inputs[1].name in serving.params:
            node_of[serving.params[n.inputs[1].name]] = n.name
    return {node_of[weight_of(plain, node)]: bias for node, bias in new_biases.items()}


def share_parameters(serving, plain) -> int:
    """Let every parameter of the ``serving`` module that equals the ``plain`` module's of
    the same name (same shape, bit for bit) be that very tensor: both graphs are rewritten
    alike, each slicing its own copy, and one copy of the pruned weights is enough. Returns
    the number of parameters shared."""
    import torch

    mine = dict(plain.named_parameters(remove_duplicate=False))
    shared = 0
    for name, t in list(serving.named_parameters(remove_duplicate=False)):
        p = mine.get(name)
        if p is None or p is t or p.shape != t.shape or p.dtype != t.dtype or not torch.equal(p, t):
            continue
        mod, _, leaf = name.rpartition(".")
        setattr(serving.get_submodule(mod) if mod else serving, leaf, p)
        shared += 1
    return shared
