"""The graph view of an ONNX model (onnx-ir): ONNX ops normalised to ir/graph.py's ops.

What the ONNX form spreads over several nodes the view reads as one fact, as the fx
frontend does for aten:
- a weight is a 2-D initializer (or its Transpose) read by MatMul or Gemm: a ``linear``,
  [in, out] as MatMul reads it; a MatMul whose only reader adds a 1-D initializer is one
  linear with that bias (the view node takes the Add's output name);
- the integers an op takes as tensors (Reshape and Expand shapes, Split sizes, Slice
  bounds, Unsqueeze axes) are read back to the constants they come from: an element that
  traces to an initializer or a Constant (through Concat, Unsqueeze, Reshape, Squeeze, Cast)
  is an int the rewrite can patch (``Provenance``); one computed from a Shape is a symbol:
  it follows the pruned tensors at run time by itself;
- a scalar constant operand of an elementwise op is a Python number.

Shapes come from running the graph (frontends/onnx_ops.py) at two sizes of the dynamic
axes: an axis of the same size in both runs is static, one that follows the batch or the
sequence length is that symbol (or their product), any other a symbol of its own.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import sympy

from goa_compiler.ir.graph import Graph, Node, Ref

_INT_BIG = 2 ** 62
_ACTIVATIONS = {"Sigmoid", "Relu", "Tanh", "Gelu", "Softplus", "Elu", "LeakyRelu", "HardSigmoid", "Erf",
                "HardSwish", "Mish", "Selu", "Celu", "FastGelu", "QuickGelu", "BiasGelu"}
_UNARY = _ACTIVATIONS | {"Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Cast", "CastLike", "Identity",
                         "Cos", "Sin", "Clip", "IsNaN", "IsInf", "Not", "Floor", "Ceil", "Round", "Sign",
                         "Dropout", "Tan", "Atan", "Sinh", "Cosh", "Asinh"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
           "And", "Or", "Xor", "Mod", "BitwiseAnd", "BitwiseOr"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare",
           "ArgMax", "ArgMin"}
_PASS_INTS = {"Unsqueeze", "Reshape", "Squeeze", "Cast", "Identity", "Flatten"}   # keep flat order
_IGNORE = {"Shape", "Size"}


@dataclass(frozen=True)
class Hop:
    """One step from a consumer to the constant an integer comes from: input ``pos`` of
    the ONNX node ``node`` (its name), element ``index`` of that input (flattened)."""

    node: str
    pos: int
    index: int


@dataclass(frozen=True)
class Provenance:
    """Where an integer of the view lives in the ONNX graph: the hops from the consumer
    node down to an initializer (the last hop's input is the constant itself)."""

    hops: tuple[Hop, ...]


def attrs_of(node: ir.Node) -> dict[str, Any]:
    out = {}
    for k, a in node.attributes.items():
        v = a.value
        if isinstance(v, ir.TensorProtocol):
            import torch
            v = torch.from_numpy(v.numpy().copy())
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


class Constants:
    """Initializers and Constant-node outputs of a graph, by value name, as torch tensors."""

    def __init__(self, graph: ir.Graph):
        import torch

        self.values: dict[str, ir.Value] = {}
        for name, v in graph.initializers.items():
            if v.const_value is not None:
                self.values[name] = v
        self._const_nodes: dict[str, Any] = {}
        for node in graph:
            if node.op_type == "Constant" and node.domain == "":
                t = _constant_node_value(node)
                if t is not None:
                    self._const_nodes[node.outputs[0].name] = t
        self._torch = torch
        self._cache: dict[str, Any] = {}

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def has(self, name: str | None) -> bool:
        return name is not None and (name in self.values or name in self._const_nodes)

    def tensor(self, name: str):
        if name in self._const_nodes:
            return self._const_nodes[name]
        t = self._cache.get(name)
        if t is None:
            arr = self.values[name].const_value.numpy()
            with warnings.catch_warnings():            # memory-mapped external data is read-only
                warnings.simplefilter("ignore")
                t = self._cache[name] = self._torch.from_numpy(arr)
        return t

    def ints(self, name: str) -> list[int] | None:
        if not self.has(name):
            return None
        t = self.tensor(name)
        if t.is_floating_point() or t.numel() > 4096:
            return None
        return [int(x) for x in t.reshape(-1).tolist()]


def _constant_node_value(node: ir.Node):
    import torch

    a = attrs_of(node)
    if "value" in a and isinstance(a["value"], torch.Tensor):
        return a["value"]
    for key, dtype in (("value_int", torch.int64), ("value_ints", torch.int64), ("value_float", torch.float32),
                       ("value_floats", torch.float32)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    return None


# ------------------------------------------------------------------------ integers and where they live

class IntTracer:
    """The elements of small integer tensors: constant ones with their provenance, the rest
    (computed from shapes) as symbols."""

    def __init__(self, consts: Constants, runs: list[dict]):
        self.consts = consts
        self.runs = runs            # concrete values of every integer tensor, per run

    def elements(self, node: ir.Node, pos: int) -> list[tuple[Any, Provenance | None]] | None:
        """(int or symbol, provenance) per element of input ``pos`` of ``node``; None when the
        input is absent or its size is not fixed."""
        if pos >= len(node.inputs) or node.inputs[pos] is None:
            return None
        return self._trace(node, pos, node.inputs[pos])

    def _trace(self, node, pos, v: ir.Value):
        consts = self.consts.ints(v.name)
        if consts is not None:
            return [(c, Provenance((Hop(node.name, pos, i),))) for i, c in enumerate(consts)]
        p = v.producer()
        if p is not None and p.domain == "" and p.op_type == "Concat":
            out = []
            for j, piece in enumerate(p.inputs):
                sub = self._trace(p, j, piece)
                if sub is None:
                    return self._computed(v, node, pos)
                out += [(val, _prepend(Hop(node.name, pos, len(out) + k), prov)) for k, (val, prov) in
                        enumerate(sub)]
            return out
        if p is not None and p.domain == "" and p.op_type in _PASS_INTS and p.inputs and p.inputs[0] is not None:
            sub = self._trace(p, 0, p.inputs[0])
            if sub is not None:
                return [(val, _prepend(Hop(node.name, pos, k), prov)) for k, (val, prov) in enumerate(sub)]
        scaled = self._scaled(node, pos, p)
        if scaled is not None:
            return scaled
        if p is not None and self._keeps_sizes(p):
            sub = self._trace(p, 2, p.inputs[2])
            if sub is not None and all(val != -1 for val, _ in sub):
                return [(val, _prepend(Hop(node.name, pos, k), prov)) for k, (val, prov) in enumerate(sub)]
        return self._computed(v, node, pos)

    def _scaled(self, node: ir.Node, pos: int, p: ir.Node | None):
        """``Mul(sizes computed from shapes, integer constant)``, the batch times the heads
        merged into one axis, or ``Div(.., constant)``, the batch taken back out of it. Each
        element is its symbol times (divided by) the constant, with the constant's provenance
        (the rewrite sets the head count there)."""
        if p is None or p.domain != "" or p.op_type not in ("Mul", "Div") or len(p.inputs) != 2 \
                or None in p.inputs:
            return None
        for j in ((0, 1) if p.op_type == "Mul" else (1,)):
            c = self.consts.ints(p.inputs[j].name)
            if c is None or len(c) != 1 or c[0] < 2:
                continue
            sub = self._computed(p.inputs[1 - j], p, 1 - j)
            if sub is None or any(prov is not None for _, prov in sub):
                return None                       # not computed from the dynamic sizes
            scale = sympy.Integer(int(c[0])) if p.op_type == "Mul" else sympy.Rational(1, int(c[0]))
            return [(scale * val, Provenance((Hop(node.name, pos, k), Hop(p.name, j, 0))))
                    for k, (val, _) in enumerate(sub)]
        return None

    def _keeps_sizes(self, where: ir.Node) -> bool:
        """``Where(Equal(sizes, -1), ones, sizes)``: TorchScript torch.onnx's form of
        ``expand``'s sizes (-1 keeps a size). Where no element is -1 it is ``sizes`` itself,
        and stays so when an element is set to another size."""
        if where.op_type != "Where" or where.domain != "" or len(where.inputs) != 3:
            return False
        cond, sizes, out = where.inputs[0].producer(), where.inputs[2], where.outputs[0]
        if cond is None or cond.op_type != "Equal" or any(x is None for x in cond.inputs):
            return False

        def minus_ones(v):
            values = [self.consts.ints(v.name)] if self.consts.has(v.name) else [r.get(v.name) for r in self.runs]
            return all(x is not None and len(x) > 0 and all(e == -1 for e in x) for x in values)
        # compared with -1 (the comparison may read a copy made by an earlier patch), and
        # ``sizes`` itself in every run
        return any(minus_ones(v) for v in cond.inputs) and \
            all(r.get(out.name) is not None and r.get(out.name) == r.get(sizes.name) for r in self.runs)

    def _computed(self, v: ir.Value, node: ir.Node, pos: int):
        """Integers computed from shapes. The same in every run (they depend on no dynamic
        axis: ``chunk``'s half of a static width, a head count times a size-1 axis): those
        integers, with a provenance that ends where ``node`` reads them, so the rewrite
        puts a constant there when it changes one. Otherwise a symbol per element, which
        follows the pruned tensors at run time by itself."""
        values = [r.get(v.name) for r in self.runs]
        if any(x is None for x in values) or len({len(x) for x in values}) != 1:
            return None
        if all(list(x) == list(values[0]) for x in values):
            return [(int(c), Provenance((Hop(node.name, pos, k),))) for k, c in enumerate(values[0])]
        read = _shape_read(v, self.consts.ints) if len(values[0]) == 1 else None
        return [(sympy.Symbol(read or f"{v.name}[{k}]"), None) for k in range(len(values[0]))]


def _shape_read(v: ir.Value, ints) -> str | None:
    """``Gather(Shape(x), i)`` or a one-element ``Shape(x, start)``: one dimension of ``x``,
    named ``SHAPE_READ.format(x, axis)`` (ir/graph.py ``size_source`` reads it back).
    ``ints``: a value name -> its constant integers, or None."""
    from goa_compiler.ir.graph import SHAPE_READ

    p = v.producer()
    index = 0
    if p is not None and p.op_type == "Gather" and p.domain == "" and len(p.inputs) == 2 \
            and p.inputs[1] is not None:
        idx = ints(p.inputs[1].name)
        if idx is None or len(idx) != 1 or attrs_of(p).get("axis", 0) != 0:
            return None
        index, p = int(idx[0]), p.inputs[0].producer()
    if p is None or p.op_type != "Shape" or p.domain != "" or p.inputs[0] is None:
        return None
    start = attrs_of(p).get("start", 0)
    if start < 0:                        # counted from the end: the rank must be known
        if p.inputs[0].shape is None:
            return None
        start += len(p.inputs[0].shape)
    return SHAPE_READ.format(p.inputs[0].name, start + index) if start + index >= 0 else None


def _prepend(hop: Hop, prov: Provenance | None) -> Provenance | None:
    return None if prov is None else Provenance((hop, *prov.hops))


def _sole_reader(v: ir.Value) -> ir.Node | None:
    uses = list(v.uses())
    return uses[0].node if len(uses) == 1 and not v.is_graph_output() else None


# ------------------------------------------------------------------------ shapes

def dims_from_runs(shapes: list[tuple], sizes: list[dict[str, int]], name: str) -> tuple:
    """One view shape from the shapes of a value in runs at different sizes of the dynamic
    axes (``sizes``: symbol name -> its size in that run)."""
    if shapes and shapes[0] and isinstance(shapes[0][0], tuple):        # a sequence of tensors
        return tuple(dims_from_runs([s[k] for s in shapes], sizes, f"{name}[{k}]") for k in range(len(shapes[0])))
    out = []
    for axis, ds in enumerate(zip(*shapes)):
        if len(set(ds)) == 1:
            out.append(int(ds[0]))
            continue
        out.append(_fit(ds, sizes) or sympy.Symbol(f"{name}.{axis}"))
    return tuple(out)


def _fit(ds, sizes):
    """The first of: a size symbol, a product of two, a sum of two different ones, a constant
    multiple of one, whose value in every run is that run's dimension (None if none is)."""
    return _fit_runs(tuple(int(d) for d in ds), tuple(tuple(sorted(s.items())) for s in sizes))


@functools.lru_cache(maxsize=4096)
def _fit_runs(ds: tuple, sizes: tuple):
    names = [k for k, _ in sizes[0]]
    runs = [dict(s) for s in sizes]
    candidates = [((a,), "") for a in names]
    candidates += [((a, b), "*") for i, a in enumerate(names) for b in names[i:]]
    candidates += [((a, b), "+") for i, a in enumerate(names) for b in names[i + 1:]]
    for terms, op in candidates:        # checked on plain integers; the expression only for the match
        value = (lambda r: r[terms[0]]) if not op else \
            (lambda r: r[terms[0]] * r[terms[1]]) if op == "*" else (lambda r: r[terms[0]] + r[terms[1]])
        if all(value(r) == d for r, d in zip(runs, ds)):
            syms = [sympy.Symbol(t) for t in terms]
            return syms[0] if not op else syms[0] * syms[1] if op == "*" else syms[0] + syms[1]
    for a in names:                     # a constant multiple: batch * heads merged into one axis
        c = ds[0] // runs[0][a] if runs[0][a] else 0
        if c > 1 and all(c * r[a] == d for r, d in zip(runs, ds)):
            return c * sympy.Symbol(a)
    return None


# ------------------------------------------------------------------------ the normalisation

class ViewBuilder:
    """Builds the view of one graph. ``shapes``: value name -> view shape (a tuple; for a
    multi-output node, its outputs' are the getitem nodes'). The result's ``steps`` say
    which ONNX nodes each view node runs (a fused MatMul + Add is one view node)."""

    def __init__(self, graph: ir.Graph, consts: Constants, shapes: dict[str, tuple], tracer: IntTracer,
                 ports: dict | None = None):
        self.graph, self.consts, self.shapes, self.tracer = graph, consts, shapes, tracer
        self.ports = dict(ports or {})
        self.nodes: dict[str, Node] = {}
        self.params: dict[str, str] = {}
        self.steps: dict[str, list[ir.Node]] = {}        # view node -> the ONNX nodes it runs
        self.provenance: dict[tuple[str, str], list] = {}  # (view node, attr) -> provenance per element
        self.fused: dict[str, str] = {}                   # MatMul output -> the fused Add's output

    def build(self) -> Graph:
        for v in self.graph.inputs:
            integer = v.dtype is not None and not v.dtype.is_floating_point()
            self.nodes[v.name] = Node(v.name, "input", [], self.shapes.get(v.name), {"integer": integer},
                                      target=v.name)
        self._fusions()
        self._batched_transposes()
        for node in self.graph:
            self._add(node)
        outputs = [v.name for v in self.graph.outputs]
        self.nodes["output"] = Node("output", "output", [Ref(o) for o in outputs], None, target="output")
        shapes = {name: tuple(self.consts.tensor(name).shape) for name in self.consts.values}
        return Graph(self.nodes, self.params, shapes, outputs, self.ports)

    # -- operands
    def _param(self, name: str) -> Ref:
        if name not in self.nodes:
            self.nodes[name] = Node(name, "param", [], tuple(self.consts.tensor(name).shape), {"name": name}, name)
            self.params[name] = name
        return Ref(name)

    def _operand(self, v: ir.Value | None, scalars: bool = False):
        if v is None:
            return None
        if self.consts.has(v.name):
            t = self.consts.tensor(v.name)
            if scalars and t.numel() == 1 and t.dim() <= 1:
                return t.reshape(-1)[0].item()
            return self._param(v.name)
        return Ref(self.fused.get(v.name, v.name))

    def _weight(self, v: ir.Value | None) -> tuple[str, bool] | None:
        """(initializer, transposed) when ``v`` is a 2-D initializer or its Transpose."""
        if v is None:
            return None
        if self.consts.has(v.name):
            return (v.name, False) if self.consts.tensor(v.name).dim() == 2 else None
        p = v.producer()
        if p is not None and p.op_type == "Transpose" and p.domain == "" and self.consts.has(p.inputs[0].name) \
                and self.consts.tensor(p.inputs[0].name).dim() == 2:
            return p.inputs[0].name, True
        return None

    def _fusions(self):
        """MatMul (weight an initializer) whose one reader adds a 1-D initializer: a bias."""
        for node in self.graph:
            if node.op_type != "MatMul" or node.domain != "" or self._weight(node.inputs[1]) is None:
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            if len(uses) != 1 or out.is_graph_output():
                continue
            add = uses[0].node
            other = add.inputs[1 - uses[0].idx] if add.op_type == "Add" and len(add.inputs) == 2 else None
            if other is None or not self.consts.has(other.name) or self.consts.tensor(other.name).dim() != 1:
                continue
            self.fused[out.name] = add.outputs[0].name
            self.steps[add.outputs[0].name] = [node, add]

    def _batched_transposes(self):
        """Reshape to [-1, m, n] -> Transpose(0, 2, 1) -> Reshape back to [..., n, m]: how the
        exporter writes a transpose of the last two axes of a tensor of rank over 3 (the
        keys of an attention). The view reads the three as that transpose."""
        self.swaps: dict[str, tuple] = {}
        for r1 in self.graph:
            if r1.op_type != "Reshape" or r1.domain != "":
                continue
            src, mid = self.shapes.get(r1.inputs[0].name), self.shapes.get(r1.outputs[0].name)
            t = _sole_reader(r1.outputs[0])
            if src is None or mid is None or len(src) < 4 or len(mid) != 3 or tuple(mid[1:]) != tuple(src[-2:]) \
                    or t is None or t.op_type != "Transpose" or list(t.attributes["perm"].value) != [0, 2, 1]:
                continue
            r2 = _sole_reader(t.outputs[0])
            want = (*src[:-2], src[-1], src[-2])
            if r2 is None or r2.op_type != "Reshape" or self.shapes.get(r2.outputs[0].name) != want:
                continue
            rank = len(src)
            self.swaps[r1.outputs[0].name] = ("permute", [*range(rank - 2), rank - 1, rank - 2], want)
            self.swaps[t.outputs[0].name] = ("unary", None, want)
            self.swaps[r2.outputs[0].name] = ("unary", None, want)

    # -- nodes
    def _add(self, node: ir.Node):
        if node.op_type == "Constant" and node.domain == "":
            return                                    # read as a constant where used
        if node.outputs and node.outputs[0].name in self.fused:
            return                                    # runs with its bias Add
        out = node.outputs[0].name if len(node.outputs) == 1 else f"{node.name}:outputs"
        if out in self.steps and self.steps[out][-1] is node:   # the Add of a fused linear
            mm = self.steps[out][0]
            _, t = self._weight(mm.inputs[1])
            bias = next(i for i in node.inputs if i.name not in self.fused)
            self.nodes[out] = Node(out, "linear", [self._operand(mm.inputs[0]), self._operand(mm.inputs[1]),
                                                   self._param(bias.name)], self.shapes.get(out),
                                   {"w_out_axis": 0 if t else 1}, "MatMul+Add")
            return
        self.steps[out] = [node]
        if out in self.swaps:
            op, dims, shape = self.swaps[out]
            attrs = {"dims": dims} if dims else {"activation": False}
            self.nodes[out] = Node(out, op, [self._operand(node.inputs[0])], shape, attrs, node.op_type)
            return
        try:
            view = self._normalise(node, out)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
            view = None
        if view is None:
            view = self._mk(node, out, "other", [self._operand(i) for i in node.inputs if i is not None])
        self.nodes[out] = view
        if view.op == "param":
            self.params[out] = view.attrs["name"]
        if len(node.outputs) > 1:
            for k, v in enumerate(node.outputs):
                self.nodes[v.name] = Node(v.name, "getitem", [Ref(out)], self.shapes.get(v.name), {"index": k},
                                          "getitem")

    def _mk(self, node, out, op, inputs, **attrs) -> Node:
        shape = self.shapes.get(out)
        if len(node.outputs) > 1:
            shape = tuple(self.shapes.get(v.name) for v in node.outputs)
        return Node(out, op, inputs, shape, attrs, f"{node.domain + '.' if node.domain else ''}{node.op_type}")

    def _rank(self, v: ir.Value | None) -> int:
        s = self.shapes.get(v.name) if v is not None and not self.consts.has(v.name) else (
            tuple(self.consts.tensor(v.name).shape) if v is not None else None)
        return len(s) if s is not None else 0

    def _ints_attr(self, node, out, attr, pos, fix=None):
        """The elements of input ``pos`` as view integers, remembering their provenance."""
        els = self.tracer.elements(node, pos)
        if els is None:
            return None
        values = [fix(k, v) if fix else v for k, (v, _) in enumerate(els)]
        self.provenance[(out, attr)] = [p for _, p in els]
        return values

    def _normalise(self, node: ir.Node, out: str) -> Node | None:
        op, a, ins = node.op_type, attrs_of(node), node.inputs
        mk = lambda o, inputs, **kw: self._mk(node, out, o, inputs, **kw)  # noqa: E731
        x = self._operand(ins[0]) if ins else None
        if node.domain not in ("", "com.microsoft", "ai.onnx"):
            return None
        if op in _IGNORE:
            return mk("ignore", [x])
        if op == "MatMul":
            w = self._weight(ins[1])
            if w is not None:
                return mk("linear", [x, self._operand(ins[1]), None], w_out_axis=0 if w[1] else 1)
            return mk("matmul", [x, self._operand(ins[1])])
        if op == "Gemm":
            return self._gemm(node, a, mk)
        if op == "Transpose":
            perm = a.get("perm") or list(range(self._rank(ins[0])))[::-1]
            if self.consts.has(ins[0].name) and len(perm) == 2:
                return mk("param", [], name=ins[0].name, transposed=True)
            return mk("permute", [x], dims=[int(p) for p in perm])
        if op == "Reshape":
            zero = not a.get("allowzero", 0)
            src = self.shapes.get(ins[0].name) or ()
            sizes = self._ints_attr(node, out, "sizes", 1,
                                    lambda k, v: src[k] if zero and v == 0 and k < len(src) else v)
            return mk("view", [x], sizes=sizes) if sizes is not None else None
        if op == "Flatten":
            return mk("view", [x], sizes=[])
        if op in ("Unsqueeze", "Squeeze"):
            return self._squeezes(node, op, a, x, out, mk)
        if op == "Expand":
            return self._expand(node, x, out, mk)
        if op == "Slice":
            return self._slice(node, x, out, mk)
        if op == "Split":
            return self._split(node, a, x, out, mk)
        if op == "SplitToSequence":
            return self._split_to_sequence(node, a, x, out, mk)
        if op == "SequenceAt":
            index = self.consts.ints(ins[1].name) if self.consts.has(ins[1].name) else None
            parts = self.shapes.get(ins[0].name)
            if index is None or parts is None:
                return None
            return mk("getitem", [self._operand(ins[0])], index=index[0] % len(parts))
        if op == "Gather":
            return self._gather(node, a, x, mk)
        if op == "Concat":
            rank = len(self.shapes.get(out) or ())
            return mk("cat", [self._operand(i) for i in ins], dim=a["axis"] % rank)
        if op in ("Softmax", "LogSoftmax"):
            return mk("softmax", [x], dim=a.get("axis", -1) % self._rank(ins[0]))
        if op in _BINARY or (op in ("Max", "Min") and len(ins) == 2):
            return mk("binary", [self._operand(ins[0], True), self._operand(ins[1], True)])
        if op == "Where":
            return mk("where", [self._operand(i, True) for i in ins])
        if op in _REDUCE:
            return self._reduce(node, op, a, x, mk)
        if op in _UNARY:
            return mk("unary", [x], activation=op in _ACTIVATIONS)
        if op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            rank = self._rank(ins[0])
            bias = self._operand(ins[2]) if len(ins) > 2 and op == "LayerNormalization" else None
            return mk("norm", [x, self._operand(ins[1]), bias], ndims=rank - a.get("axis", -1) % rank)
        return None

    def _gemm(self, node, a, mk):
        ins = node.inputs
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return None
        w = self._weight(ins[1])
        if w is None:
            return None
        trans = bool(a.get("transB", 0)) != w[1]
        bias = self._operand(ins[2]) if len(ins) > 2 else None
        return mk("linear", [self._operand(ins[0]), self._operand(ins[1]), bias], w_out_axis=0 if trans else 1)

    def _squeezes(self, node, op, a, x, out, mk):
        axes = self.tracer.elements(node, 1)
        axes = [v for v, _ in axes] if axes is not None else a.get("axes")
        if axes is not None and not all(isinstance(v, int) for v in axes):
            return None
        if op == "Unsqueeze":
            rank = self._rank(node.inputs[0]) + len(axes)
            if len(axes) == 1:
                return mk("unsqueeze", [x], dim=axes[0] % rank)
            return mk("view", [x], sizes=list(self.shapes[out]))
        rank = self._rank(node.inputs[0])
        return mk("squeeze", [x], dims=sorted(d % rank for d in axes) if axes is not None else None)

    def _expand(self, node, x, out, mk):
        src = self.shapes.get(node.inputs[0].name) or (tuple(self.consts.tensor(node.inputs[0].name).shape)
                                                      if self.consts.has(node.inputs[0].name) else None)
        dst = self.shapes.get(out)
        els = self.tracer.elements(node, 1)
        if src is None or dst is None or els is None:
            return None
        off = len(dst) - len(els)
        sizes, prov = list(dst[:off]), [None] * off
        for k, (v, p) in enumerate(els):
            keep = v == 1 and dst[off + k] != 1         # numpy broadcasting: the input's size stays
            sizes.append(-1 if keep else v)
            prov.append(None if keep else p)
        self.provenance[(out, "sizes")] = prov
        return mk("expand", [x], sizes=sizes)

    def _slice(self, node, x, out, mk):
        ins = node.inputs
        starts, ends = self.tracer.elements(node, 1), self.tracer.elements(node, 2)
        axes = self.tracer.elements(node, 3) if len(ins) > 3 and ins[3] is not None else [(0, None)]
        steps = self.tracer.elements(node, 4) if len(ins) > 4 and ins[4] is not None else [(1, None)]
        if not starts or not ends or len(starts) != 1 or axes is None or steps is None:
            return None
        (start, sp), (end, ep), (axis, _), (step, _) = starts[0], ends[0], axes[0], steps[0]
        if not isinstance(axis, int) or not isinstance(step, int) or step < 1:
            return None
        if isinstance(end, int) and end >= _INT_BIG:
            end, ep = None, None
        self.provenance[(out, "start")] = [sp]
        self.provenance[(out, "end")] = [ep]
        return mk("slice", [x], dim=axis % self._rank(ins[0]), start=start, end=end, step=step)

    def _split(self, node, a, x, out, mk):
        dim = a.get("axis", 0) % self._rank(node.inputs[0])
        shapes = [self.shapes.get(v.name) for v in node.outputs]
        if any(s is None for s in shapes):
            return None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = self._ints_attr(node, out, "sizes", 1)
        else:
            sizes = [s[dim] for s in shapes]
            self.provenance[(out, "sizes")] = [("attr", k) for k in range(len(sizes))]
        return mk("split", [x], dim=dim, sizes=sizes, form="Split") if sizes is not None else None

    def _split_to_sequence(self, node, a, x, out, mk):
        parts = self.shapes.get(out)
        if parts is None:
            return None
        dim = a.get("axis", 0) % self._rank(node.inputs[0])
        has_sizes = len(node.inputs) > 1 and node.inputs[1] is not None
        if not has_sizes and not a.get("keepdims", 1):
            return mk("unbind", [x], dim=dim)
        els = self.tracer.elements(node, 1) if has_sizes else None
        if els is not None and len(els) == len(parts):
            sizes = self._ints_attr(node, out, "sizes", 1)
        else:                                   # one size for all, or none: pieces of the output shapes
            sizes = [p[dim] for p in parts]
            self.provenance[(out, "sizes")] = [("attr", k) for k in range(len(sizes))]
        return mk("split", [x], dim=dim, sizes=sizes, form="SplitToSequence")

    def _gather(self, node, a, x, mk):
        data, idx = node.inputs
        axis = a.get("axis", 0) % self._rank(data)
        if self.consts.has(data.name):
            return mk("other", [self._operand(i) for i in node.inputs])   # an embedding lookup
        if self.consts.has(idx.name):
            t = self.consts.tensor(idx.name)
            if t.dim() == 0:
                return mk("select", [x], dim=axis, index=int(t))
            if t.dim() == 1:
                return mk("index", [x, self._param(idx.name)], axes=[axis], values=[[int(v) for v in t.tolist()]])
            return None
        return mk("index", [x, self._operand(idx)], axes=[axis], values=[None])

    def _reduce(self, node, op, a, x, mk):
        rank = self._rank(node.inputs[0])
        if op in ("ArgMax", "ArgMin"):
            dims = [a.get("axis", 0) % rank]
        else:
            els = self.tracer.elements(node, 1)
            dims = [v for v, _ in els] if els is not None else a.get("axes")
            if dims is not None and not all(isinstance(v, int) for v in dims):
                return None
            dims = sorted(d % rank for d in dims) if dims else list(range(rank))
        return mk("reduce", [x], dims=dims, keepdim=bool(a.get("keepdims", 1)))
