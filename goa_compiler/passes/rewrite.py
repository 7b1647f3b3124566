"""Rewrite: a smaller graph, with sliced (and possibly reconstructed) weights.

For every structure and its kept units, the pass slices each parameter along the axes the
analysis recorded (level-1 rows, biases, level-2 columns, attached parameters), installs
any new level-2 weights and biases supplied by reconstruction, and patches the integers in
the graph that count heads or channels (reshape/expand sizes, slice bounds, split sizes).
It edits the unlifted GraphModule in place and returns what it changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..graph import fetch_attr
from ..structure import Analysis, Plan, Structure


@dataclass
class RewriteResult:
    modified: bool
    params_before: int
    params_after: int
    sliced: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)   # param -> (old, new)
    patched: list[tuple[str, int, int | None, int, int]] = field(default_factory=list)


def removed_indices(structure: Structure, kept: list[int]) -> dict[tuple[str, int], np.ndarray]:
    """(param, axis) -> indices removed along that axis for the given kept units."""
    drop = sorted(set(range(structure.units)) - set(kept))
    out: dict[tuple[str, int], list] = {}
    for s in structure.slices:
        if drop:
            out.setdefault((s.param, s.axis), []).append(s.index[drop].reshape(-1))
    return {k: np.unique(np.concatenate(v)) for k, v in out.items()}


def removed_root_channels(structure: Structure, kept: list[int]) -> dict[str, np.ndarray]:
    drop = sorted(set(range(structure.units)) - set(kept))
    return {r: np.sort(idx[drop].reshape(-1)) for r, idx in structure.root_index.items()}


def _set_param(gm: torch.nn.Module, name: str, value: torch.Tensor):
    mod, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(mod) if mod else gm
    old = getattr(owner, leaf)
    if isinstance(old, torch.nn.Parameter):
        value = torch.nn.Parameter(value.detach().contiguous(), requires_grad=False)
    if leaf in getattr(owner, "_buffers", {}):
        owner._buffers[leaf] = value.detach().contiguous()
    else:
        setattr(owner, leaf, value)


def count_params(gm: torch.fx.GraphModule) -> int:
    """Elements of the parameters the graph actually uses (tied weights counted once;
    parameters no node reads, such as an encoder's unused pooler, are not counted)."""
    seen = set()
    total = 0
    for n in gm.graph.nodes:
        if n.op != "get_attr" or not n.users:
            continue
        t = fetch_attr(gm, str(n.target))
        if not isinstance(t, torch.nn.Parameter) or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel()
    return total


def add_bias(gm: torch.fx.GraphModule, node_name: str, param: str) -> None:
    """Give a bias-free linear projection the (already registered) bias ``param``."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if name != "linear":
        raise ValueError(f"cannot add a bias to {node.target}")
    with gm.graph.inserting_before(node):
        b = gm.graph.get_attr(param)
    node.args = (node.args[0], node.args[1], b)


def rewrite(gm: torch.fx.GraphModule, analysis: Analysis, plan: Plan,
            new_weights: dict[str, torch.Tensor] | None = None,
            new_biases: dict[str, str] | None = None) -> RewriteResult:
    """Slice the GraphModule's parameters and patch its shape constants in place.

    ``new_weights`` maps parameter names to replacement tensors given at their ORIGINAL
    (unsliced) shape, e.g. reconstructed weights; a name not yet in the module is added as a
    new parameter (used for a level-2 bias created by compensation).
    """
    before = count_params(gm)
    result = RewriteResult(False, before, before)
    nodes = {n.name: n for n in gm.graph.nodes}
    removals: dict[tuple[str, int], np.ndarray] = {}
    root_removed: dict[str, np.ndarray] = {}
    by_name = {s.name: s for s in analysis.structures}
    for mp in plan.modules.values():
        s = by_name[mp.structure]
        for k, v in removed_indices(s, mp.kept).items():
            removals[k] = np.union1d(removals.get(k, np.array([], dtype=np.int64)), v)
        for r, v in removed_root_channels(s, mp.kept).items():
            root_removed[r] = np.union1d(root_removed.get(r, np.array([], dtype=np.int64)), v)

    for name, value in (new_weights or {}).items():
        _replace_or_add(gm, name, value)
        result.modified = True
    for node_name, param in (new_biases or {}).items():
        add_bias(gm, node_name, param)

    per_param: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (param, axis), idx in removals.items():
        per_param.setdefault(param, []).append((axis, idx))
    for param, cuts in per_param.items():
        t = fetch_attr(gm, param)
        old_shape = tuple(t.shape)
        for axis, idx in cuts:
            keep = np.setdiff1d(np.arange(t.shape[axis]), idx)
            if len(keep) == t.shape[axis]:
                continue
            t = t.index_select(axis, torch.as_tensor(keep, dtype=torch.long))
        if tuple(t.shape) != old_shape:
            _set_param(gm, param, t)
            result.sliced[param] = (old_shape, tuple(t.shape))
            result.modified = True

    # shape constants
    splits: dict[str, dict[int, int]] = {}
    for s in analysis.structures:
        if s.name not in {mp.structure for mp in plan.modules.values()}:
            continue
        for c in s.constants:
            gone = root_removed.get(c.root, np.array([], dtype=np.int64))
            kept_in = (c.stop - c.start) - int(((gone >= c.start) & (gone < c.stop)).sum())
            new = kept_in // c.block * c.repeat
            if c.kind == "split":       # analysis records every piece of a split channel axis
                splits.setdefault(c.node, {})[c.pos] = (c.original, new)
                continue
            if new == c.original:
                continue
            node = nodes[c.node]
            args = list(node.args)
            if c.pos is None:
                args[c.arg] = new
            else:
                seq = list(args[c.arg])
                seq[c.pos] = new
                args[c.arg] = seq
            node.args = tuple(args)
            result.patched.append((c.node, c.arg, c.pos, c.original, new))
            result.modified = True
    for name, pieces in splits.items():
        if all(old == new for old, new in pieces.values()):
            continue
        node = nodes[name]
        sizes = [pieces[k][1] for k in sorted(pieces)]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        node.target = torch.ops.aten.split_with_sizes.default
        node.args = (node.args[0], sizes, dim)
        node.kwargs = {}
        result.patched.append((name, 1, None, -1, -1))
        result.modified = True
    gm.recompile()
    result.params_after = count_params(gm)
    return result


def _replace_or_add(gm: torch.nn.Module, name: str, value: torch.Tensor):
    mod, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(mod) if mod else gm
    if hasattr(owner, leaf):
        old = getattr(owner, leaf)
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"replacement for {name} has shape {tuple(value.shape)}, "
                             f"expected {tuple(old.shape)}")
        _set_param(gm, name, value.to(old.dtype))
    else:
        owner.register_parameter(leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
