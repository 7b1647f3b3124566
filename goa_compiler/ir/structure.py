"""The data that flows between passes: what analysis finds and what selection decides.

Model -> Graph -> [Structure] (analysis) -> Stats (calibration) -> Scores (scoring)
      -> Plan (selection) -> smaller Graph (rewrite) -> model.onnx (export)

A Structure is one depth-2 module (an attention block or an FFN). Its prunable *units*
(heads, whole K/V groups, or FFN neurons) are the atoms that must be removed together:
for every parameter involved, ``ParamSlice.index[u]`` lists the indices along
``ParamSlice.axis`` that unit ``u`` owns. Fused projections (GPT-2's c_attn, Phi-3's
qkv_proj) simply appear as several slices of one parameter with different roles.

Everything here is frozen and imports no torch: a frontend (frontends/fx.py, later ONNX)
turns node names, parameter names and ``IntHandle``s back into its own objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Kind(StrEnum):
    ATTENTION = "attention"
    FFN = "ffn"


class Unit(StrEnum):
    """What one prunable unit of a structure is."""

    NEURON = "neuron"          # one FFN intermediate channel
    HEAD = "head"              # one attention head (query, key and value)
    KV_GROUP = "kv-group"      # one K/V head with every query head that reads it


class Role(StrEnum):
    Q = "q"
    K = "k"
    V = "v"
    UP = "up"
    GATE = "gate"
    LEVEL1 = "level1"          # a level-1 slice without a more specific role (fused q/k/v)
    O = "o"
    DOWN = "down"
    LEVEL2 = "level2"
    BIAS = "bias"              # a level-1 bias
    ATTACHED = "attached"      # another parameter broadcast along the channels


LEVEL1_ROLES = frozenset({Role.Q, Role.K, Role.V, Role.UP, Role.GATE, Role.LEVEL1})
LEVEL2_ROLES = frozenset({Role.O, Role.DOWN, Role.LEVEL2})


class ConstantKind(StrEnum):
    SIZE = "size"              # a reshape/expand size or a slice bound
    SPLIT = "split"            # one piece of a split along a channel axis


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """One parameter's share of a structure.

    param: the parameter's name in the model's state_dict.
    axis:  the axis of the parameter indexed by channels (0 for an nn.Linear weight's
           output rows, 1 for its input columns; transposed for GPT-2's Conv1D).
    role:  see Role.
    index: int array [units, per_unit]: the indices along ``axis`` that each unit owns.
    """

    param: str
    axis: int
    role: Role
    index: np.ndarray

    @property
    def per_unit(self) -> int:
        return int(self.index.shape[1])


@dataclass(frozen=True, eq=False)
class PortSlice:
    """A graph port's share of a structure: ``index[u]`` lists the entries along ``axis``
    of port ``port`` (ir/graph.py Port) that unit ``u`` owns; ``shared`` entries stay."""

    port: str
    axis: int
    index: np.ndarray
    shared: tuple[int, ...] = ()      # entries no unit owns (a K/V head every query head reads)


@dataclass(frozen=True, eq=False)
class OperandSlice:
    """A tensor the graph computes from constants and shapes alone (ALiBi's per-head biases)
    that meets a structure's channels: along ``axis`` of input ``operand`` of node ``node``,
    unit ``u`` owns entries ``index[u]`` (``shared`` entries no unit owns: they stay). The
    rewrite reads the kept entries through a gather there, so the tensor is computed as
    before and never for a new head count. ``period``: the axis is a batch axis with the
    heads merged into it (``index`` counts entries of one period; ALiBi's [B * H, 1, S])."""

    node: str
    operand: int
    axis: int
    index: np.ndarray
    shared: tuple[int, ...] = ()
    period: int | None = None


@dataclass(frozen=True)
class IntHandle:
    """Where an integer lives in the graph view: attribute ``attr`` of node ``node`` (its
    element ``pos`` when the attribute is a list). The frontend resolves it to its own
    location (an fx argument, an ONNX initializer or Constant)."""

    node: str
    attr: str
    pos: int | None = None


@dataclass(frozen=True)
class ShapeConstant:
    """An integer in the graph that counts channels or units of a structure.

    ``root`` is the level-1 output the count refers to (a node name), ``start``/``stop``
    the channel range of that output it covers; after pruning the constant equals
    ``kept_channels_in(start, stop) // block * repeat``. A SPLIT constant is one piece of a
    split: analysis records every piece, so the frontend can rewrite the whole list.
    """

    handle: IntHandle
    kind: ConstantKind
    root: str
    start: int
    stop: int
    block: int = 1
    repeat: int = 1
    original: int = 0

    def pruned_value(self, removed_root_channels: np.ndarray) -> int:
        gone = removed_root_channels
        kept_in = (self.stop - self.start) - int(((gone >= self.start) & (gone < self.stop)).sum())
        return kept_in // self.block * self.repeat


@dataclass(frozen=True)
class Probes:
    """Where calibration observes a structure (node names in the graph view)."""

    level1_input: str            # the tensor entering the level-1 projections
    level2_input: str            # the tensor entering the level-2 projection
    attention: str | None = None  # the attention op (its q, k, mask give the probabilities)


@dataclass(frozen=True)
class Projection:
    """A linear op with a parameter weight: its node, weight, the weight's output-channel
    axis, its bias (or None) and its output width."""

    node: str
    weight: str
    out_axis: int
    bias: str | None
    width: int


@dataclass(frozen=True, eq=False)
class KVGroups:
    """The K/V heads that query-head units read (grouped attention analysed with query-head
    units): unit ``u`` reads group ``group_of_unit[u]``; a group's K/V slices and cache
    entries (index [groups, k]) go only when none of its units stays. ``roots`` are the
    K/V projections' channels per group (for the shape constants they patch). Unequal
    groups are served by a gather of the K/V heads each kept query head reads, inserted
    before the attention op ``attention`` on its operands ``operands`` along ``axis``;
    ``expanded``: the K/V there are already repeated ``repeat`` times (else the op's own
    grouped attention repeats them)."""

    group_of_unit: np.ndarray
    slices: tuple[ParamSlice, ...]
    ports: tuple[PortSlice, ...]
    roots: dict[str, np.ndarray]
    attention: str
    operands: tuple[int, ...]
    axis: int
    expanded: bool
    repeat: int

    @property
    def groups(self) -> int:
        return int(self.group_of_unit.max()) + 1 if self.group_of_unit.size else 0

    def kept_groups(self, kept_units) -> list[int]:
        return sorted({int(self.group_of_unit[u]) for u in kept_units})

    def gather_index(self, kept_units) -> list[int] | None:
        """Entries of the K/V operand each kept query head reads, after the groups without a
        kept unit are gone; None when every kept group keeps all its query heads (the
        graph's own repeat is right)."""
        kept = sorted(kept_units)
        groups = self.kept_groups(kept)
        if len(kept) == len(groups) * self.repeat:
            return None
        rank = {g: i for i, g in enumerate(groups)}
        slot = {u: k for g in groups for k, u in enumerate(np.flatnonzero(self.group_of_unit == g))}
        return [rank[int(self.group_of_unit[u])] * (self.repeat if self.expanded else 1)
                + (slot[u] if self.expanded else 0) for u in kept]


@dataclass(frozen=True, eq=False)
class Structure:
    name: str                    # layer{N}.{kind}, unique
    kind: Kind
    layer: int
    slices: tuple[ParamSlice, ...]
    probes: Probes
    level2_node: str             # the level-2 projection node
    projections: dict[str, Projection]      # level-1 projections (root order), then the level 2
    root_index: dict[str, np.ndarray]       # level-1 node -> [units, k] output channels per unit
    constants: tuple[ShapeConstant, ...] = ()
    ports: tuple[PortSlice, ...] = ()       # graph inputs/outputs carrying its channels
    heads: int | None = None     # query heads (attention)
    kv_heads: int | None = None  # key/value heads (attention)
    head_dim: int | None = None
    kv: KVGroups | None = None   # query-head units reading grouped K/V
    operands: tuple[OperandSlice, ...] = ()   # constant tensors gathered with the kept units
    # one expert of a mixture-of-experts layer (capture/experts.py): its output is scaled per
    # token by the routing weight, so a constant bias cannot be added to it
    expert: int | None = None

    @property
    def units(self) -> int:
        return int(self.level2()[0].index.shape[0])

    @property
    def unit_channels(self) -> int:
        """Level-2 input channels per unit."""
        return int(self.level2()[0].index.shape[1])

    @property
    def granularity(self) -> Unit:
        if self.kind == Kind.FFN:
            return Unit.NEURON
        grouped = self.kv_heads and self.heads and self.kv_heads < self.heads and self.units < self.heads
        return Unit.KV_GROUP if grouped else Unit.HEAD

    @property
    def level1_nodes(self) -> list[str]:
        return list(self.root_index)

    @property
    def roots(self) -> dict[str, int]:
        """Level-1 node -> its output width."""
        return {n: self.projections[n].width for n in self.root_index}

    @property
    def query_heads_per_unit(self) -> int:
        """Query heads in one unit (attention): 1 for a head, the group size for a K/V group."""
        return self.heads // self.units if self.heads and self.heads % self.units == 0 else 1

    def level1(self) -> list[ParamSlice]:
        return [s for s in self.slices if s.role in LEVEL1_ROLES]

    def level2(self) -> list[ParamSlice]:
        return [s for s in self.slices if s.role in LEVEL2_ROLES]

    def by_role(self, *roles: str) -> list[ParamSlice]:
        return [s for s in self.slices if s.role in roles]


@dataclass(frozen=True)
class Refusal:
    """A projection analysis could not prove prunable, and why (one line)."""

    node: str
    param: str | None
    reason: str
    candidate: bool = True       # False: a projection that is simply not a level 1 (lm_head...)


@dataclass(frozen=True)
class Analysis:
    structures: tuple[Structure, ...]
    refused: tuple[Refusal, ...]


@dataclass(frozen=True)
class ModulePlan:
    structure: str
    kept: tuple[int, ...]        # kept unit indices, ascending


@dataclass(frozen=True)
class Plan:
    modules: dict[str, ModulePlan]
