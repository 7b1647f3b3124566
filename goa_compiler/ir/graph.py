"""A small common view of a captured graph, shared by the passes.

Analysis reads only this view: nodes in topological order, each with a normalised op name,
its inputs (references to other nodes or Python constants), the shape of its output, and
whether it is a parameter. It imports no torch: a frontend builds it (``frontends/fx.py``
from a torch.export graph; an ONNX frontend can build the same view) and the passes that
read it never see the backend.

Normalised ops (``Node.op``) and their ``attrs``:
    param                                 a parameter or buffer (attrs: name; transposed:
                                          the 2-D transpose of one, as ``x @ W.T`` reads it)
    input, output                         attrs (input): integer (token ids, a mask: no channels)
    linear      x, weight, bias           attrs: w_out_axis (0 for [out, in], 1 for [in, out]);
                                          a matmul with a parameter operand is one too
    view        x                         attrs: sizes (the argument list, to patch); like:
                [, like]                  the tensor whose shape it takes (reshape_as: no sizes)
    expand_as   x, like                   x expanded to the shape of ``like``
    permute     x                         attrs: dims
    unsqueeze   x                         attrs: dim
    squeeze     x                         attrs: dims
    expand      x                         attrs: sizes
    slice       x                         attrs: dim, start, end, step
    split       x                         attrs: dim, sizes (multi-output, read by getitem)
    unbind      x                         attrs: dim (multi-output: one per entry of dim)
    select      x                         attrs: dim, index (the axis is dropped)
    index       x, idx...                 attrs: axes (indexed by idx...), values (each
                                          index's constant ints, or None when computed)
    stack       xs...                     attrs: dim (the new axis)
    getitem     x                         attrs: index
    cat         xs...                     attrs: dim
    unary       x                         attrs: activation (bool)
    binary      a, b  (a constant may be a Python number)
    where       cond, a, b
    reduce      x                         attrs: dims (over which it reduces), keepdim
    softmax     x                         attrs: dim
    norm        x, weight, bias           attrs: ndims (normalised trailing dims)
    sdpa        q, k, v, mask             attrs: gqa (bool)
    matmul      a, b                      (both data)
    baddbmm     input, a, b               input + a @ b, each scaled by a constant (both data)
    ignore                                no tensor output (asserts, shape queries; attrs:
                                          product, for a size that multiplies others)
    other                                 anything else (analysis refuses channels through it)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any



@dataclass(frozen=True)
class Ref:
    """A reference to another node's output."""

    name: str


@dataclass
class Node:
    name: str
    op: str
    inputs: list[Any]
    shape: tuple | None = None          # output shape: ints and sympy expressions
    attrs: dict[str, Any] = field(default_factory=dict)
    target: str = ""                    # the backend's own op name, for messages

    def refs(self) -> list[str]:
        return [i.name for i in self.inputs if isinstance(i, Ref)]


@dataclass(frozen=True)
class Port:
    """A graph input or output that carries a structure's channels along ``axis``: the past
    keys and values a KV-cache decoder reads, and the present ones it returns. Analysis
    joins a port's entries to the units whose channels they carry (and records them in
    ``Structure.ports``) instead of refusing channels that reach a graph boundary."""

    name: str                           # the input node, or the value node of an output
    axis: int                           # the axis indexed by heads or channels


@dataclass
class Graph:
    nodes: dict[str, Node]              # topological order
    params: dict[str, str]              # node name -> parameter name
    param_shapes: dict[str, tuple]
    outputs: list[str]
    ports: dict[str, Port] = field(default_factory=dict)
    # parameters that are one expert's share of a mixture-of-experts layer -> that expert
    experts: dict[str, int] = field(default_factory=dict)

    def users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for r in node.refs():
                out[r].append(node.name)
        return out


def product_factor(graph: Graph, value) -> int | None:
    """The integer factor of a size computed as (shape) * (integer) (an ``ignore`` node with
    attrs product, or a symbolic expression ``c * s``), or the integer itself; None for any
    other size."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if hasattr(value, "as_coeff_Mul"):          # a sympy expression (the ONNX view's sizes)
        coeff, rest = value.as_coeff_Mul()
        return int(coeff) if coeff.is_Integer and coeff > 1 and rest.is_Symbol else None
    node = graph.nodes.get(value.name) if isinstance(value, Ref) else None
    if node is None or not node.attrs.get("product") or len(node.inputs) != 2:
        return None
    ints = [x for x in node.inputs if isinstance(x, int) and not isinstance(x, bool)]
    return ints[0] if len(ints) == 1 else None


def quotient_factor(value) -> int | None:
    """The integer divisor of a size computed as (shape) / (integer) (a sympy expression of the
    ONNX view: the batch taken back out of batch * heads), else None."""
    if not hasattr(value, "as_coeff_Mul"):
        return None
    coeff, rest = value.as_coeff_Mul()
    return int(coeff.q) if coeff.is_Rational and coeff.p == 1 and coeff.q > 1 and rest.is_Symbol else None


SHAPE_READ = "shape({})[{}]"        # the ONNX view's name of a size read off a tensor


def size_source(graph: Graph, value) -> tuple[str, int] | None:
    """(tensor, axis) when the size ``value`` is read off that tensor's shape: a shape query
    (``sym_size``) in a torch.export graph, a ``Gather(Shape(x), i)`` symbol in an ONNX one."""
    if isinstance(value, Ref):
        node = graph.nodes.get(value.name)
        if node is not None and node.op == "ignore" and "sym_size" in node.target and len(node.inputs) == 2 \
                and isinstance(node.inputs[0], Ref) and isinstance(node.inputs[1], int):
            return node.inputs[0].name, node.inputs[1]
        return None
    name = getattr(value, "name", None) if getattr(value, "is_Symbol", False) else None
    if name and name.startswith("shape(") and name.endswith("]") and ")[" in name:
        tensor, _, axis = name[len("shape("):-1].rpartition(")[")
        if axis.isdigit() and tensor in graph.nodes:
            return tensor, int(axis)
    return None
