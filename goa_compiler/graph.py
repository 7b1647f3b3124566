"""A small common view of a captured graph, shared by the passes.

Analysis reads only this view: nodes in topological order, each with a normalised op name,
its inputs (references to other nodes or Python constants), the shape of its output, and
whether it is a parameter. ``from_fx`` builds it from a torch.export / torch.fx graph; an
ONNX (onnx-ir) adapter can build the same view later without touching the passes.

Normalised ops (``Node.op``) and their ``attrs``:
    param                                 a parameter or buffer (attrs: name)
    input, output
    linear      x, weight, bias           attrs: w_out_axis (0 for [out, in], 1 for [in, out])
    view        x                         attrs: sizes (the argument list, to patch)
    permute     x                         attrs: dims
    unsqueeze   x                         attrs: dim
    squeeze     x                         attrs: dims
    expand      x                         attrs: sizes
    slice       x                         attrs: dim, start, end, step
    split       x                         attrs: dim, sizes (multi-output, read by getitem)
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
    ignore                                no tensor output (asserts, shape queries)
    other                                 anything else (analysis refuses channels through it)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch


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


@dataclass
class Graph:
    nodes: dict[str, Node]              # topological order
    params: dict[str, str]              # node name -> parameter name
    param_shapes: dict[str, tuple]
    outputs: list[str]

    def users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for r in node.refs():
                out[r].append(node.name)
        return out


# --------------------------------------------------------------------------- torch.fx adapter

_aten = torch.ops.aten

_ACTIVATIONS = {
    "silu", "gelu", "relu", "tanh", "sigmoid", "gelu_", "relu_", "silu_", "hardtanh", "elu",
    "leaky_relu", "softplus", "mish", "hardswish", "hardsigmoid", "relu6",
}
_UNARY = _ACTIVATIONS | {
    "neg", "to", "_to_copy", "contiguous", "clone", "dropout", "alias", "detach", "type_as",
    "exp", "erf", "sqrt", "rsqrt", "abs", "pow", "square", "cos", "sin", "log", "reciprocal",
    "lift_fresh_copy", "_assert_tensor_metadata", "native_dropout", "clamp", "clamp_min",
    "clamp_max", "dropout_", "feature_dropout", "alpha_dropout", "float", "half", "bfloat16",
}
_BINARY = {"add", "sub", "mul", "div", "maximum", "minimum", "rsub", "floor_divide", "true_divide",
           "eq", "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or", "logical_and",
           "logical_or", "__and__", "__or__", "copysign", "fmod", "remainder", "atan2"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "norm",
           "linalg_vector_norm", "var_mean", "any", "all", "argmax", "argmin"}
_IGNORE = {"sym_size", "sym_numel", "sym_stride", "_assert_scalar", "sym_constrain_range",
           "sym_constrain_range_for_size", "_assert_async", "_assert_tensor_metadata"}


def fetch_attr(module: torch.nn.Module, target: str):
    """The attribute at a dotted path (a get_attr node's target, a parameter's name)."""
    owner, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _dim(d):
    if isinstance(d, torch.SymInt):
        return sympy.sympify(d.node.expr)
    return int(d)


def _shape(meta_val):
    if isinstance(meta_val, torch.Tensor):
        return tuple(_dim(d) for d in meta_val.shape)
    if isinstance(meta_val, (list, tuple)):
        return tuple(_shape(v) for v in meta_val)
    return None


def _conv(a):
    if isinstance(a, torch.fx.Node):
        return Ref(a.name)
    if isinstance(a, (list, tuple)):
        return type(a)(_conv(x) for x in a)
    return a


def _norm_dims(dims, rank):
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(d % rank for d in dims)


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    # aten overloads print as "view.default"; python functions as their name
    return name.split(".")[0]


def from_fx(gm: torch.fx.GraphModule) -> Graph:
    """Build the common view from a torch.fx GraphModule (unlifted: parameters are get_attr)."""
    nodes: dict[str, Node] = {}
    params: dict[str, str] = {}
    param_shapes: dict[str, tuple] = {}
    outputs: list[str] = []
    for n in gm.graph.nodes:
        shape = _shape(n.meta.get("val"))
        args = [_conv(a) for a in n.args]
        kw = {k: _conv(v) for k, v in n.kwargs.items()}
        if n.op == "placeholder":
            nodes[n.name] = Node(n.name, "input", [], shape, target=n.name)
            continue
        if n.op == "get_attr":
            t = fetch_attr(gm, str(n.target))
            if isinstance(t, torch.Tensor):
                shape = tuple(t.shape)
                params[n.name] = str(n.target)
                param_shapes[str(n.target)] = shape
            nodes[n.name] = Node(n.name, "param", [], shape, {"name": str(n.target)}, str(n.target))
            continue
        if n.op == "output":
            flat = torch.utils._pytree.tree_leaves(n.args[0])
            outputs = [a.name for a in flat if isinstance(a, torch.fx.Node)]
            nodes[n.name] = Node(n.name, "output", [Ref(o) for o in outputs], None, target="output")
            continue
        if n.op == "call_module":
            nodes[n.name] = Node(n.name, "ignore", args, shape, target=str(n.target))
            continue
        nodes[n.name] = _normalise(n, args, kw, shape)
    return Graph(nodes, params, param_shapes, outputs)


def _normalise(n: torch.fx.Node, args, kw, shape) -> Node:
    import operator

    target = n.target
    name = _op_name(target)
    tname = str(target)
    mk = lambda op, inputs, **attrs: Node(n.name, op, inputs, shape, attrs, tname)  # noqa: E731

    def in_rank(i=0):
        v = n.args[i]
        if isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.Tensor):
            return v.meta["val"].dim()
        return 0

    if target is operator.getitem:
        return mk("getitem", [args[0]], index=args[1])
    if name in _IGNORE or shape is None and name not in ("split", "split_with_sizes", "chunk",
                                                          "unbind"):
        return mk("ignore", args)
    if name == "linear":
        bias = args[2] if len(args) > 2 else kw.get("bias")
        return mk("linear", [args[0], args[1], bias], w_out_axis=0)
    if name == "addmm":
        return mk("linear", [args[1], args[2], args[0]], w_out_axis=1)
    if name in ("mm", "matmul", "bmm"):
        b = n.args[1]
        if isinstance(b, torch.fx.Node) and b.op == "get_attr" and in_rank(1) == 2:
            return mk("linear", [args[0], args[1], None], w_out_axis=1)
        return mk("matmul", [args[0], args[1]])
    if name in ("view", "reshape", "_unsafe_view"):
        return mk("view", [args[0]], sizes=list(args[1]))
    if name in ("transpose", "swapaxes"):
        r = in_rank()
        d0, d1 = args[1] % r, args[2] % r
        dims = list(range(r))
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return mk("permute", [args[0]], dims=dims)
    if name == "t":
        return mk("permute", [args[0]], dims=[1, 0] if in_rank() == 2 else [0])
    if name == "permute":
        r = in_rank()
        return mk("permute", [args[0]], dims=[d % r for d in args[1]])
    if name == "unsqueeze":
        return mk("unsqueeze", [args[0]], dim=args[1] % (in_rank() + 1))
    if name == "squeeze":
        r = in_rank()
        dims = args[1] if len(args) > 1 else None
        dims = _norm_dims(dims, r) if dims is not None else None
        return mk("squeeze", [args[0]], dims=dims)
    if name == "expand":
        return mk("expand", [args[0]], sizes=list(args[1]))
    if name == "slice":
        r = in_rank()
        dim = (args[1] if len(args) > 1 else kw.get("dim", 0)) % r
        start = args[2] if len(args) > 2 else kw.get("start", 0)
        end = args[3] if len(args) > 3 else kw.get("end", None)
        step = args[4] if len(args) > 4 else kw.get("step", 1)
        return mk("slice", [args[0]], dim=dim, start=start, end=end, step=step)
    if name == "narrow":
        r = in_rank()
        return mk("slice", [args[0]], dim=args[1] % r, start=args[2], end=args[2] + args[3], step=1,
                  narrow=True)
    if name in ("split", "split_with_sizes", "chunk", "unbind"):
        r = in_rank()
        dim = (args[2] if len(args) > 2 else kw.get("dim", 0)) % r
        if name == "unbind":
            return mk("other", [args[0]])
        size = n.args[0].meta["val"].shape[dim]
        size = int(size) if not isinstance(size, torch.SymInt) else None
        if name == "split_with_sizes":
            sizes = list(args[1])
        elif name == "chunk":
            if size is None:
                return mk("other", [args[0]])
            per = -(-size // args[1])
            sizes = [min(per, size - i) for i in range(0, size, per)]
        else:
            if size is None:
                return mk("other", [args[0]])
            sizes = [min(args[1], size - i) for i in range(0, size, args[1])]
        return mk("split", [args[0]], dim=dim, sizes=sizes, form=name)
    if name == "cat" or name == "concat" or name == "concatenate":
        r = len(shape) if shape else 0
        dim = (args[1] if len(args) > 1 else kw.get("dim", 0)) % r
        return mk("cat", list(args[0]), dim=dim)
    if name in ("scaled_dot_product_attention",):
        mask = args[3] if len(args) > 3 else kw.get("attn_mask")
        return mk("sdpa", [args[0], args[1], args[2], mask], gqa=bool(kw.get("enable_gqa", False)))
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        return mk("softmax", [args[0]], dim=args[1] % in_rank())
    if name in ("layer_norm", "rms_norm", "native_layer_norm", "group_norm"):
        if name == "group_norm":
            return mk("other", [args[0]])
        ns = args[1]
        w = args[2] if len(args) > 2 else kw.get("weight")
        b = args[3] if len(args) > 3 and name != "rms_norm" else kw.get("bias")
        return mk("norm", [args[0], w, b], ndims=len(ns))
    if name in _REDUCE:
        r = in_rank()
        dims = args[1] if len(args) > 1 else kw.get("dim")
        keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
        if name in ("var", "std", "var_mean") and isinstance(dims, bool):
            dims = None
        if name in ("max", "min", "argmax", "argmin") and isinstance(dims, int):
            dims = [dims]
        return mk("reduce", [args[0]], dims=_norm_dims(dims, r), keepdim=bool(keep))
    if name in ("where",):
        return mk("where", [args[0], args[1], args[2]])
    if name in ("masked_fill", "masked_fill_"):
        return mk("where", [args[1], args[2], args[0]])
    if name in _BINARY or name.rstrip("_") in _BINARY:
        return mk("binary", [args[0], args[1] if len(args) > 1 else kw.get("other")])
    if name in _UNARY or name.rstrip("_") in _UNARY:
        return mk("unary", [args[0]], activation=name.rstrip("_") in _ACTIVATIONS)
    return mk("other", [a for a in args if isinstance(a, Ref)])
