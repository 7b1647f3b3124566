"""From the channel facts of ``channels.py`` to named, frozen Structures.

Roots (level-1 outputs) and level-2 projections that share channels form one module. A
module with exactly one level 2 and no refusal becomes a Structure: its units are the
union-find classes of the level-2 input columns, each unit's root channels and parameter
slices are listed, and the roles (q, k, v, gate, up, o, down) come from where the
channels went (attention operands, the activated branch of a gated FFN).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from goa_compiler.analysis.channels import Tag, _Reject, _State
from goa_compiler.ir.structure import (Analysis, Kind, KVGroups, OperandSlice, ParamSlice, PortSlice, Probes,
                                       Projection, Refusal, Role, Structure)


@dataclass(frozen=True)
class _Units:
    """The units of one module: level-2 columns and root channels per unit."""

    level2: str
    n: int
    col_index: np.ndarray                  # [units, columns per unit]
    root_index: dict[str, np.ndarray]      # root -> [units, channels per unit]
    unit_of_atom: dict


def collect(st: _State) -> Analysis:
    modules: dict = {}
    for name in st.projs:
        modules.setdefault(st.uf_mod.find(("root", name)), []).append(("root", name))
    for name in st.level2:
        modules.setdefault(st.uf_mod.find(("l2", name)), []).append(("l2", name))
    for name in st.port_inputs:
        modules.setdefault(st.uf_mod.find(("root", name)), []).append(("port", name))
    for name, (tag, _) in st.port_outputs.items():
        modules.setdefault(st.uf_mod.find(("root", tag.root)), []).append(("port", name))
    drafts: list[dict] = []
    refused: list[Refusal] = []
    for members in modules.values():
        roots = [n for k, n in members if k == "root"]
        l2s = [n for k, n in members if k == "l2"]
        ports = [n for k, n in members if k == "port"]
        if not roots:
            continue            # a port no projection's channels reach: nothing to prune
        refusal = _refusals(st, roots, l2s, ports)
        if refusal is not None:
            refused.extend(refusal)
            continue
        try:
            drafts.append(_draft(st, roots, l2s, ports))
        except _Reject as e:
            refused.extend(Refusal(r, st.projs[r].weight, str(e), candidate=True) for r in roots)
    # experts kept as 3-D parameters and picked per token (transformers' MoE): not pruned
    refused.extend(Refusal(node, param, f"{node}: mixture-of-experts weights picked per token; "
                                        "experts are not pruned (the router and each expert stay dense)")
                   for node, param in st.experts)
    order = {n: i for i, n in enumerate(st.graph.nodes)}
    drafts.sort(key=lambda d: order[d["level2_node"]])
    refused.sort(key=lambda r: order[r.node])
    structures = tuple(Structure(name=name, layer=layer, **d)
                       for (name, layer), d in zip(_names(drafts), drafts))
    return Analysis(structures, tuple(refused))


def _refusals(st: _State, roots: list[str], l2s: list[str], ports=()) -> list[Refusal] | None:
    """The refusals of a module that cannot be a structure, or None when it may be one (a
    refusal of channels that entered through an input port counts too)."""
    reasons = [st.refusals[("root", r)] for r in [*roots, *ports] if ("root", r) in st.refusals]
    if not l2s:
        # channels that end in the residual stream or a model output belong to no level 1
        ends = any(("root", r) in st.terminal for r in roots)
        return [Refusal(r, st.projs[r].weight, st.refusals.get(("root", r)) or (
                    reasons[0] if reasons else "its channels never reach another projection"),
                        candidate=bool(reasons) and not ends) for r in roots]
    if reasons:
        return [Refusal(r, st.projs[r].weight, reasons[0], candidate=True) for r in roots]
    return None


def _units(st: _State, roots: list[str], l2s: list[str]) -> _Units:
    if len(l2s) != 1:
        raise _Reject("channels reach several level-2 projections")
    l2 = l2s[0]
    tag = st.level2[l2]
    first = tag.first_channel(np.arange(st.level2_len[l2]))
    # the unit of each level-2 column
    atom_of_col = [st.uf_chan.find((tag.root, int(c))) for c in first]
    atoms = list(dict.fromkeys(atom_of_col))
    unit_of_atom = {a: u for u, a in enumerate(atoms)}
    n_units = len(atoms)
    root_index: dict[str, np.ndarray] = {}
    for r in roots:
        per_unit: list[list[int]] = [[] for _ in range(n_units)]
        for c in range(st.projs[r].width):
            u = unit_of_atom.get(st.uf_chan.find((r, c)))
            if u is not None:
                per_unit[u].append(c)
        sizes = {len(p) for p in per_unit}
        if len(sizes) != 1:
            raise _Reject("units of unequal size")
        if sizes != {0}:
            root_index[r] = np.array(per_unit, dtype=np.int64)
    if not root_index:
        raise _Reject("no projection channels reach the level-2 input")
    for t, length in st.port_features:
        owned = {unit_of_atom.get(st.uf_chan.find((t.root, int(c)))) for c in t.first_channel(np.arange(length))}
        if owned - {None}:
            raise _Reject("a cache port carries a unit's channels on its feature axis")
    for root, a, b, where in st.pinned:
        if root in root_index and np.isin(root_index[root], np.arange(a, b)).any():
            raise _Reject(f"{where}: a constant index counted from the end selects or follows channels of a unit")
    col_units: list[list[int]] = [[] for _ in range(n_units)]
    for c, a in enumerate(atom_of_col):
        col_units[unit_of_atom[a]].append(c)
    if len({len(c) for c in col_units}) != 1:
        raise _Reject("units of unequal size at the level-2 input")
    return _Units(l2, n_units, np.array(col_units, dtype=np.int64), root_index, unit_of_atom)


def _level1_slices(st: _State, u: _Units, is_attention: bool) -> list[ParamSlice]:
    """Weight (and bias) slices of the level-1 projections, with their roles."""
    out: list[tuple[str, int, Role, np.ndarray]] = []
    for r, idx in u.root_index.items():
        p = st.projs[r]
        ranges = sorted((a, b, Role(next(iter(roles))) if len(roles) == 1 else Role.LEVEL1)
                        for (root, a, b), roles in st.roles.items() if root == r)
        if _overlap(ranges):
            # q, k and v interleaved inside each head (GPT-NeoX): one fused level-1 slice
            ranges = [(0, p.width, Role.LEVEL1)]
        if not ranges:
            if is_attention:
                role = Role.LEVEL1
            elif len(u.root_index) > 1:
                role = Role.GATE if r in st.activated else Role.UP
            else:
                role = Role.UP
            ranges = [(0, p.width, role)]
        for a, b, role in ranges:
            sub = idx[(idx >= a) & (idx < b)].reshape(u.n, -1) if idx.size else idx
            if sub.size == 0:
                continue
            if sub.shape[0] != idx.shape[0]:
                raise _Reject("a fused projection splits unevenly across units")
            out.append((p.weight, p.w_out_axis, role, sub))
            if p.bias:
                out.append((p.bias, 0, Role.BIAS, sub))
        covered = sum(int(((idx >= a) & (idx < b)).sum()) for a, b, _ in ranges)
        if covered != idx.size:
            raise _Reject("part of a fused projection has no attention role")
    if not is_attention:
        roles = [r for _, _, r, _ in out if r in (Role.GATE, Role.UP)]
        if roles.count(Role.GATE) > 1 or roles.count(Role.UP) > 1:
            out = [(w, a, Role.LEVEL1 if r in (Role.GATE, Role.UP) else r, i) for w, a, r, i in out]
    return [ParamSlice(*x) for x in out]


def _entries_per_unit(st: _State, u: _Units, t, length: int, what: str,
                      with_shared: bool = False):
    """[units, k]: the entries 0..length-1 of an axis tagged ``t``, grouped by unit (and,
    ``with_shared``, the tuple of entries no unit owns)."""
    i = np.arange(length)
    per_unit: list[list[int]] = [[] for _ in range(u.n)]
    shared: list[int] = []
    for k, c in zip(i.tolist(), t.first_channel(i).tolist()):
        unit = u.unit_of_atom.get(st.uf_chan.find((t.root, c)))
        if unit is not None:
            per_unit[unit].append(k)
        else:
            shared.append(k)
    if len({len(p) for p in per_unit}) != 1:
        raise _Reject(f"{what} does not split evenly into units")
    index = np.array(per_unit, dtype=np.int64)
    return (index, tuple(shared)) if with_shared else index


def _attached_slices(st: _State, u: _Units) -> list[ParamSlice]:
    """Parameters broadcast along the channels (sliced with them)."""
    return [ParamSlice(pname, axis, Role.ATTACHED, _entries_per_unit(st, u, t, length, f"parameter {pname}"))
            for pname, axis, t, length in st.attached if t.root in u.root_index]


def _operand_slices(st: _State, u: _Units) -> tuple[OperandSlice, ...]:
    """Tensors computed from constants alone that meet the channels (gathered with them)."""
    return tuple(OperandSlice(node, pos, axis, *_entries_per_unit(st, u, t, length, f"the operand of {node}",
                                                                  with_shared=True), period=t.period)
                 for node, pos, axis, t, length in st.gathered if t.root in u.root_index)


def _port_slices(st: _State, u: _Units, ports: list[str]) -> tuple[PortSlice, ...]:
    out = []
    for name in ports:
        if name in st.kv_ports:
            continue                    # a grouped K/V cache: sliced by group (_kv_groups)
        axis = st.graph.ports[name].axis
        if name in st.port_inputs:
            t, length = Tag(name, 0, 1, 1), st.port_inputs[name]
        else:
            t, length = st.port_outputs[name]
        out.append(PortSlice(name, axis, *_entries_per_unit(st, u, t, length, f"port {name}", with_shared=True)))
    return tuple(out)


def _kv_groups(st: _State, u: _Units, ports: list[str]) -> KVGroups | None:
    """Query-head units reading grouped K/V (channels.interpret with query_heads): the group
    each unit reads, the K/V slices and cache entries of each group."""
    reads = [r for r in st.kv_reads if r["q"].root in u.root_index]
    if not reads:
        return None
    if len(reads) > 1:
        raise _Reject("query heads read K/V in several attention ops")
    r = reads[0]
    q, k, heads = r["q"], r["k"], r["heads"]
    if u.n != heads:
        raise _Reject("query-head units that are not one per query head")
    group_of_unit = np.full(u.n, -1, dtype=np.int64)
    for i in range(heads):
        unit = u.unit_of_atom[st.uf_chan.find((q.root, int(q.first_channel(np.array([i]))[0])))]
        group_of_unit[unit] = i // k.repeat
    groups = heads // k.repeat
    slices, roots = [], {}
    for role, t in ((Role.K, r["k"]), (Role.V, r["v"])):
        p = st.projs[t.root]
        index = t.start + np.arange(groups)[:, None] * t.block + np.arange(t.block)[None, :]
        roots[t.root] = np.concatenate([roots[t.root], index], axis=1) if t.root in roots else index
        slices.append(ParamSlice(p.weight, p.w_out_axis, role, index))
        if p.bias:
            slices.append(ParamSlice(p.bias, 0, Role.BIAS, index))
    atom_group = {st.uf_chan.find((root, int(c))): g for root, idx in roots.items()
                  for g in range(groups) for c in idx[g]}
    kv_ports = []
    for name in ports:
        if name not in st.kv_ports:
            continue
        axis, length = st.graph.ports[name].axis, st.port_inputs.get(name) or st.port_outputs[name][1]
        t = Tag(name, 0, 1, 1) if name in st.port_inputs else st.port_outputs[name][0]
        per: list[list[int]] = [[] for _ in range(groups)]
        for e in range(length):
            g = atom_group.get(st.uf_chan.find((t.root, int(t.first_channel(np.array([e]))[0]))))
            if g is None:
                raise _Reject(f"port {name} carries entries of no K/V group")
            per[g].append(e)
        kv_ports.append(PortSlice(name, axis, np.array(per, dtype=np.int64)))
    node = st.graph.nodes[r["node"]]
    operands = tuple(i for i, ref in enumerate(node.inputs[:3]) if i > 0)
    return KVGroups(group_of_unit, tuple(slices), tuple(kv_ports), roots, r["node"], operands,
                    len(node.shape) - 3, r["expanded"], k.repeat)


def _draft(st: _State, roots: list[str], l2s: list[str], ports: list[str]) -> dict:
    """Every field of a Structure but its name and layer (given once all are known)."""
    u = _units(st, roots, l2s)
    kv = _kv_groups(st, u, ports)
    is_attention = any(r in st.attention for r in u.root_index)
    lp = st.projs[u.level2]
    slices = [*_level1_slices(st, u, is_attention),
              ParamSlice(lp.weight, 1 - lp.w_out_axis, Role.O if is_attention else Role.DOWN, u.col_index),
              *_attached_slices(st, u)]
    facts = next((st.attention[r] for r in u.root_index if r in st.attention), {})
    heads, kv_heads = facts.get("heads"), facts.get("kv_heads")
    if is_attention and heads is None:
        heads = u.n          # eager attention whose query heads were not counted: one per unit
    if is_attention and kv_heads is None and heads and u.n < heads:
        kv_heads = u.n       # eager grouped attention (K/V repeated before the products)
    x_inputs = {st.projs[r].x for r in u.root_index}
    expert = None if is_attention else st.graph.experts.get(lp.weight)
    projections = {n: Projection(n, st.projs[n].weight, st.projs[n].w_out_axis, st.projs[n].bias,
                                 st.projs[n].width) for n in [*u.root_index, u.level2]}
    return dict(
        kind=Kind.ATTENTION if is_attention else Kind.FFN, slices=tuple(slices),
        probes=Probes(level1_input=sorted(x_inputs)[0],
                      level2_input=st.graph.nodes[u.level2].inputs[0].name, attention=facts.get("node")),
        level2_node=u.level2, projections=projections, root_index=u.root_index,
        constants=tuple(c for c in st.constants if c.root in u.root_index or (kv and c.root in kv.roots)),
        ports=_port_slices(st, u, ports), operands=_operand_slices(st, u),
        heads=heads, kv_heads=kv_heads, head_dim=facts.get("head_dim"), kv=kv, expert=expert)


def _overlap(ranges) -> bool:
    return any(b0 > a1 for (a0, b0, _), (a1, b1, _) in zip(ranges, ranges[1:]))


def _layer_of(name: str, fallback: int) -> int:
    m = re.search(r"(?:^|[._])(\d+)(?:[._]|$)", name)
    return int(m.group(1)) if m else fallback


def _names(drafts: list[dict]) -> list[tuple[str, int]]:
    """(name, layer) per draft, in graph order. Layers: the block index in the level-2
    parameter's name when every one has one and they read as block indices, else the order of the structures (attention and FFN
    of one block share a number). Names: layer{N}.{kind}, numbered when repeated among the
    block's structures of that kind; layer{N}.expert{e} for one expert of a
    mixture-of-experts layer."""
    layers = [_layer_of(d["projections"][d["level2_node"]].weight, -1) for d in drafts]
    # numbers that are not block indices (an ONNX file's "val_170") are not in graph order or
    # exceed what the structures can number
    if any(x < 0 for x in layers) or layers != sorted(layers) or max(layers, default=0) > 2 * len(drafts):
        layer, seen_kinds = -1, set()
        for i, d in enumerate(drafts):
            if d["kind"] in seen_kinds or layer < 0:
                layer += 1
                seen_kinds = set()
            seen_kinds.add(d["kind"])
            layers[i] = layer
    names = [f"layer{layer}.{d['kind']}" if d.get("expert") is None else f"layer{layer}.expert{d['expert']}"
             for layer, d in zip(layers, drafts)]
    counts = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if counts[n] > 1 and drafts[i].get("expert") is None:
            seen[n] = seen.get(n, -1) + 1
            names[i] = f"{n}{seen[n]}"
    return list(zip(names, layers))
