"""The data that flows between passes: what analysis finds and what selection decides.

Model -> Graph -> [Structure] (analysis) -> Stats (calibration) -> Scores (scoring)
      -> Plan (selection) -> smaller Graph (rewrite) -> model.onnx (export)

A Structure is one depth-2 module (an attention block or an FFN). Its prunable *units*
(heads, whole K/V groups, or FFN neurons) are the atoms that must be removed together:
for every parameter involved, ``ParamSlice.index[u]`` lists the indices along
``ParamSlice.axis`` that unit ``u`` owns. Fused projections (GPT-2's c_attn, Phi-3's
qkv_proj) simply appear as several slices of one parameter with different roles.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LEVEL1_ROLES = ("q", "k", "v", "up", "gate", "level1")
LEVEL2_ROLES = ("o", "down", "level2")


@dataclass
class ParamSlice:
    """One parameter's share of a structure.

    param: the parameter's name in the model's state_dict.
    axis:  the axis of the parameter indexed by channels (0 for an nn.Linear weight's
           output rows, 1 for its input columns; transposed for GPT-2's Conv1D).
    role:  q | k | v | up | gate | level1 (level 1), o | down | level2 (level 2),
           bias (a level-1 bias), attached (another parameter broadcast along the channels).
    index: int array [units, per_unit]: the indices along ``axis`` that each unit owns.
    """

    param: str
    axis: int
    role: str
    index: np.ndarray

    @property
    def per_unit(self) -> int:
        return int(self.index.shape[1])


@dataclass
class ShapeConstant:
    """An integer in the graph that counts channels or units of a structure.

    node/arg/pos locate it (``node.args[arg][pos]``, pos None for a scalar argument).
    ``root`` is the level-1 output the count refers to (a node name), ``start``/``stop``
    the channel range of that output it covers, and the constant equals
    ``kept_channels_in(start, stop) // block * repeat`` (kind "size") or the number of kept
    channels of ``root`` before ``start`` (kind "offset").
    """

    node: str
    arg: int
    pos: int | None
    kind: str
    root: str
    start: int
    stop: int
    block: int = 1
    repeat: int = 1
    original: int = 0


@dataclass
class Probes:
    """Where calibration observes a structure (node names in the captured graph)."""

    level1_input: str            # the tensor entering the level-1 projections
    level2_input: str            # the tensor entering the level-2 projection
    attention: str | None = None  # the attention op (its q, k, mask give the probabilities)


@dataclass
class Structure:
    name: str
    kind: str                    # "attention" | "ffn"
    layer: int
    units: int                   # prunable units (heads, K/V groups, or neurons)
    unit_channels: int           # level-2 input channels per unit
    slices: list[ParamSlice]
    probes: Probes
    heads: int | None = None     # query heads (attention)
    kv_heads: int | None = None  # key/value heads (attention)
    head_dim: int | None = None
    granularity: str = "neuron"  # "neuron" | "head" | "kv-group"
    level1_nodes: list[str] = field(default_factory=list)   # the level-1 projection nodes
    level2_node: str = ""                                   # the level-2 projection node
    roots: dict[str, int] = field(default_factory=dict)     # level-1 output node -> width
    root_index: dict[str, np.ndarray] = field(default_factory=dict)  # root -> [units, k] channels
    constants: list[ShapeConstant] = field(default_factory=list)
    # projection node -> (weight param, the weight's output-channel axis, bias param or None)
    projections: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)

    def level1(self) -> list[ParamSlice]:
        return [s for s in self.slices if s.role in LEVEL1_ROLES]

    def level2(self) -> list[ParamSlice]:
        return [s for s in self.slices if s.role in LEVEL2_ROLES]

    def by_role(self, *roles: str) -> list[ParamSlice]:
        return [s for s in self.slices if s.role in roles]


@dataclass
class Refusal:
    """A projection analysis could not prove prunable, and why (one line)."""

    node: str
    param: str | None
    reason: str
    candidate: bool = True       # False: a projection that is simply not a level 1 (lm_head...)


@dataclass
class Analysis:
    structures: list[Structure]
    refused: list[Refusal]


@dataclass
class ModulePlan:
    structure: str
    kept: list[int]              # kept unit indices, ascending


@dataclass
class Plan:
    modules: dict[str, ModulePlan]
