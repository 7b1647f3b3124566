"""Rewrite: a smaller graph, with sliced (and possibly reconstructed) weights.

For every structure and its kept units, the pass slices each parameter along the axes the
analysis recorded (level-1 rows, biases, level-2 columns, attached parameters), installs
any new weights and biases supplied by reconstruction, and sets the integers in the graph
that count heads or channels (reshape/expand sizes, slice bounds, split sizes) through the
frontend, which knows where each ``IntHandle`` lives, and resizes the graph ports (a
decoder's past and present K/V) to the kept units. No torch here: tensors pass through.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from goa_compiler.ir.structure import Analysis, ConstantKind, Plan, Structure


@dataclass(frozen=True)
class RewriteResult:
    params_before: int
    params_after: int
    sliced: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)   # param -> (old, new)
    patched: tuple[tuple[str, str, int | None, int, int], ...] = ()        # node, attr, pos, old, new
    ports: dict[str, int] = field(default_factory=dict)                    # port -> new size

    @property
    def modified(self) -> bool:
        return bool(self.sliced or self.patched) or self.params_after != self.params_before


def dropped_units(structure: Structure, kept) -> list[int]:
    return sorted(set(range(structure.units)) - set(kept))


def dropped_groups(structure: Structure, kept) -> list[int]:
    """K/V groups none of whose query-head units is kept (structures with ``kv``)."""
    kv = structure.kv
    return [] if kv is None else sorted(set(range(kv.groups)) - set(kv.kept_groups(kept)))


def removed_indices(structure: Structure, kept) -> dict[tuple[str, int], np.ndarray]:
    """(param, axis) -> indices removed along that axis for the given kept units (and the
    K/V slices of the groups no kept unit reads)."""
    drop, groups = dropped_units(structure, kept), dropped_groups(structure, kept)
    out: dict[tuple[str, int], list] = {}
    for s in structure.slices:
        if drop:
            out.setdefault((s.param, s.axis), []).append(s.index[drop].reshape(-1))
    for s in structure.kv.slices if groups else ():
        out.setdefault((s.param, s.axis), []).append(s.index[groups].reshape(-1))
    return {k: np.unique(np.concatenate(v)) for k, v in out.items()}


def removed_root_channels(structure: Structure, kept) -> dict[str, np.ndarray]:
    drop, groups = dropped_units(structure, kept), dropped_groups(structure, kept)
    out = {r: np.sort(idx[drop].reshape(-1)) for r, idx in structure.root_index.items()}
    for r, idx in structure.kv.roots.items() if structure.kv is not None else ():
        out[r] = np.union1d(out.get(r, np.array([], dtype=np.int64)), idx[groups].reshape(-1))
    return out


def rewrite(frontend, analysis: Analysis, plan: Plan, new_weights: dict | None = None,
            new_biases: dict[str, str] | None = None) -> RewriteResult:
    """Slice the parameters and set the shape constants, in place, through ``frontend``.

    ``new_weights`` maps parameter names to replacement tensors given at their ORIGINAL
    (unsliced) shape, e.g. reconstructed weights; a name not yet in the model is added as a
    new parameter (a level-2 bias created by compensation); ``new_biases`` maps a
    projection node to the bias parameter it gains.
    """
    before = frontend.param_count()
    by_name = {s.name: s for s in analysis.structures}
    removals: dict[tuple[str, int], np.ndarray] = {}
    root_removed: dict[str, np.ndarray] = {}
    for mp in plan.modules.values():
        s = by_name[mp.structure]
        for k, v in removed_indices(s, mp.kept).items():
            removals[k] = np.union1d(removals.get(k, np.array([], dtype=np.int64)), v)
        for r, v in removed_root_channels(s, mp.kept).items():
            root_removed[r] = np.union1d(root_removed.get(r, np.array([], dtype=np.int64)), v)

    for name, value in (new_weights or {}).items():
        frontend.set_param(name, value)
    for node_name, param in (new_biases or {}).items():
        frontend.add_bias(node_name, param)
    sliced = _slice_params(frontend, removals)
    pruned = [s for s in analysis.structures if s.name in plan.modules]
    patched = _set_constants(frontend, pruned, root_removed)
    ports = _slice_ports(frontend, pruned, plan)
    _gather_kv(frontend, pruned, plan)
    _gather_operands(frontend, pruned, plan)
    frontend.finish()
    return RewriteResult(before, frontend.param_count(), sliced, tuple(patched), ports)


def _gather_kv(frontend, structures: list[Structure], plan: Plan) -> None:
    """Query-head units that leave K/V groups of unequal size: each kept query head reads
    its K/V head through a gather before the attention op."""
    for s in structures:
        if s.kv is None:
            continue
        index = s.kv.gather_index(plan.modules[s.name].kept)
        if index is not None:
            for pos in s.kv.operands:
                frontend.gather(s.kv.attention, pos, s.kv.axis, index)


def _gather_operands(frontend, structures: list[Structure], plan: Plan) -> None:
    """Tensors computed from constants that meet a structure's channels (ALiBi's per-head
    biases) are read through a gather of the kept units' entries."""
    for s in structures:
        kept = list(plan.modules[s.name].kept)
        if len(kept) == s.units:
            continue
        for o in s.operands:
            keep = np.concatenate([o.index[kept].reshape(-1), np.asarray(o.shared, dtype=np.int64)])
            frontend.gather(o.node, o.operand, o.axis, np.sort(keep).tolist(), period=o.period)


def _slice_ports(frontend, structures: list[Structure], plan: Plan) -> dict[str, int]:
    """Each port of a pruned structure keeps the entries of the kept units (of the K/V
    groups they read); returns the new size of every port. A frontend without
    ``slice_port`` cannot resize its graph's ports."""
    sizes: dict[str, int] = {}
    for s in structures:
        if s.kv is not None and s.kv.ports:
            groups = s.kv.kept_groups(plan.modules[s.name].kept)
            for p in s.kv.ports:
                keep = np.sort(p.index[groups].reshape(-1))
                frontend.slice_port(p.port, p.axis, keep)
                sizes[p.port] = len(keep)
        if not s.ports:
            continue
        if not hasattr(frontend, "slice_port"):
            raise ValueError(f"{type(frontend).__name__} cannot resize the graph ports of {s.name}")
        kept = sorted(plan.modules[s.name].kept)
        for p in s.ports:
            owned = p.index[kept].reshape(-1) if kept else np.array([], dtype=np.int64)
            keep = np.sort(np.concatenate([owned, np.asarray(p.shared, dtype=np.int64)]))
            frontend.slice_port(p.port, p.axis, keep)
            sizes[p.port] = len(keep)
    return sizes


def _slice_params(frontend, removals: dict[tuple[str, int], np.ndarray]) -> dict[str, tuple]:
    shapes = frontend.param_shapes()
    per_param: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (param, axis), idx in removals.items():
        keep = np.setdiff1d(np.arange(shapes[param][axis]), idx)
        per_param.setdefault(param, []).append((axis, keep))
    sliced = {}
    for param, cuts in per_param.items():
        old, new = frontend.slice_param(param, cuts)
        if old != new:
            sliced[param] = (old, new)
    return sliced


def _set_constants(frontend, structures: list[Structure], root_removed: dict[str, np.ndarray]) -> list:
    """Every recorded constant at its pruned value; a split's pieces are set together when
    any of them changes."""
    empty = np.array([], dtype=np.int64)
    groups: dict[tuple[str, str], dict] = {}
    split_nodes: set[tuple[str, str]] = set()
    for s in structures:
        for c in s.constants:
            key = (c.handle.node, c.handle.attr)
            new = c.pruned_value(root_removed.get(c.root, empty))
            groups.setdefault(key, {})[c.handle.pos] = (c.original, new)
            if c.kind == ConstantKind.SPLIT:
                split_nodes.add(key)
    patched = []
    for (node, attr), pieces in groups.items():
        changed = {pos: new for pos, (old, new) in pieces.items() if new != old}
        if not changed:
            continue
        values = {pos: new for pos, (_, new) in pieces.items()} if (node, attr) in split_nodes else changed
        frontend.set_ints(node, attr, values)
        patched.extend((node, attr, pos, pieces[pos][0], v) for pos, v in values.items())
    return patched
