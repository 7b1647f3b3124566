"""The torch.fx frontend: the graph view of a torch.export graph (``from_fx``), a resumable
executor for calibration (``Stream``), and the edits rewrite makes (parameters, integer
arguments, a new bias).
"""
from __future__ import annotations

from typing import Callable

import sympy
import torch
import torch.fx

from goa_compiler.frontends.base import StreamPositions
from goa_compiler.ir.graph import Graph, Node, Port, Ref


_aten = torch.ops.aten

_ACTIVATIONS = {
    "silu", "gelu", "relu", "tanh", "sigmoid", "gelu_", "relu_", "silu_", "hardtanh", "elu",
    "leaky_relu", "softplus", "mish", "hardswish", "hardsigmoid", "relu6", "selu", "celu",
}
_UNARY = _ACTIVATIONS | {
    "neg", "to", "_to_copy", "contiguous", "clone", "dropout", "alias", "detach", "type_as",
    "exp", "erf", "sqrt", "rsqrt", "abs", "pow", "square", "cos", "sin", "log", "reciprocal",
    "lift_fresh_copy", "_assert_tensor_metadata", "native_dropout", "clamp", "clamp_min",
    "clamp_max", "dropout_", "feature_dropout", "alpha_dropout", "float", "half", "bfloat16",
    # elementwise functions of one tensor (XIELU's expm1: Apertus's FFN activation)
    "expm1", "log1p", "exp2", "log2", "log10", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac",
    "tan", "atan", "sinh", "cosh", "asinh", "erfc", "logit", "nan_to_num",
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


def from_fx(gm: torch.fx.GraphModule, input_ports: dict[int, int] | None = None,
            output_ports: dict[int, int] | None = None, experts: dict[str, int] | None = None) -> Graph:
    """Build the common view from a torch.fx GraphModule (unlifted: parameters are get_attr).
    ``input_ports`` / ``output_ports`` map the position of a graph input / output to the
    axis along which it carries channels (a decoder's past and present keys and values);
    ``experts``: parameters that are one expert's share of a mixture-of-experts layer."""
    nodes: dict[str, Node] = {}
    ports: dict[str, Port] = {}
    placeholders = 0
    params: dict[str, str] = {}
    param_shapes: dict[str, tuple] = {}
    outputs: list[str] = []
    for n in gm.graph.nodes:
        shape = _shape(n.meta.get("val"))
        args = [_conv(a) for a in n.args]
        kw = {k: _conv(v) for k, v in n.kwargs.items()}
        if n.op == "placeholder":
            val = n.meta.get("val")
            integer = isinstance(val, torch.Tensor) and not (val.is_floating_point() or val.is_complex())
            nodes[n.name] = Node(n.name, "input", [], shape, {"integer": integer}, target=n.name)
            if placeholders in (input_ports or {}):
                ports[n.name] = Port(n.name, input_ports[placeholders])
            placeholders += 1
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
            for pos, axis in (output_ports or {}).items():
                ports[flat[pos].name] = Port(flat[pos].name, axis)
            continue
        if n.op == "call_module":
            nodes[n.name] = Node(n.name, "ignore", args, shape, target=str(n.target))
            continue
        try:
            nodes[n.name] = _normalise(n, args, kw, shape)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError):
            # an overload whose arguments the mapping does not expect: analysis refuses
            # channels through it rather than the compile failing
            nodes[n.name] = Node(n.name, "other", [a for a in args if isinstance(a, Ref)], shape,
                                 target=str(n.target))
        if nodes[n.name].op == "param":          # a transposed view of a parameter
            params[n.name] = nodes[n.name].attrs["name"]
    return Graph(nodes, params, param_shapes, outputs, ports, dict(experts or {}))


def _constant_ints(a) -> list[int] | None:
    """The values of a small 1-D integer tensor the graph holds as a constant (a lifted
    tensor, read through copies), else None (an index computed from the input)."""
    while isinstance(a, torch.fx.Node) and a.op == "call_function" and _op_name(a.target) in (
            "lift_fresh_copy", "clone", "to", "_to_copy", "alias", "detach"):
        a = a.args[0]
    if not (isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.graph.owning_module is not None):
        return None
    t = fetch_attr(a.graph.owning_module, str(a.target))
    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() <= 4096 and not t.is_floating_point():
        return [int(v) for v in t.tolist()]
    return None


_TRANSPOSES = ("t", "numpy_T", "transpose", "permute", "swapaxes", "mT", "adjoint")


def _weight_operand(a) -> tuple[str, bool] | None:
    """(parameter name, transposed) when ``a`` is a 2-D parameter or its transpose: the
    weight of a projection written as a matrix product (``x @ W``, ``x @ W.T``)."""
    if not isinstance(a, torch.fx.Node):
        return None
    val = a.meta.get("val")
    if a.op == "call_function" and _op_name(a.target) in _TRANSPOSES and isinstance(val, torch.Tensor) \
            and val.dim() == 2 and a.args and isinstance(a.args[0], torch.fx.Node):
        inner = _weight_operand(a.args[0])
        return (inner[0], not inner[1]) if inner else None
    if a.op == "get_attr":
        t = fetch_attr(a.graph.owning_module, str(a.target)) if a.graph.owning_module is not None else None
        if isinstance(t, torch.Tensor) and t.dim() == 2:
            return str(a.target), False
    return None


def _normalise(n: torch.fx.Node, args, kw, shape) -> Node:
    """The normalised view node of one aten call. Long on purpose: it is the one mapping
    from aten's argument conventions (positional or keyword, overload families such as
    split/chunk/split_with_sizes) to the view's ops and attributes, read top to bottom;
    split over one function per op it would hide which aten names map where."""
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
    if target is operator.mul:
        # a size computed from shapes (batch * heads): analysis reads its integer factor
        return mk("ignore", args, product=True)
    if name in _IGNORE or shape is None and name not in ("split", "split_with_sizes", "chunk",
                                                          "unbind"):
        return mk("ignore", args)
    if name == "linear":
        bias = args[2] if len(args) > 2 else kw.get("bias")
        return mk("linear", [args[0], args[1], bias], w_out_axis=0)
    weight = _weight_operand(n.args[1]) if len(n.args) > 1 else None
    alias = _weight_operand(n) if name in _TRANSPOSES else None
    if alias is not None:
        # a transposed parameter, read by the product it feeds: the view names it as the
        # parameter itself, so the product is one projection reading it once
        return mk("param", [], name=alias[0], transposed=alias[1])
    if name == "addmm":
        w = _weight_operand(n.args[2])
        return mk("linear", [args[1], args[2], args[0]], w_out_axis=0 if w and w[1] else 1)
    if name in ("mm", "matmul", "bmm") and weight is not None:
        # x @ W ([in, out]) or x @ W.T ([out, in], as nn.Linear stores it)
        return mk("linear", [args[0], args[1], None], w_out_axis=0 if weight[1] else 1)
    if name in ("mm", "matmul", "bmm"):
        return mk("matmul", [args[0], args[1]])
    if name == "baddbmm" and _weight_operand(n.args[2]) is None:
        # beta * input + alpha * batch1 @ batch2 (ALiBi's biases added to the scores)
        return mk("baddbmm", [args[0], args[1], args[2]])
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
    if name in ("expand", "broadcast_to"):
        return mk("expand", [args[0]], sizes=list(args[1]))
    if name == "expand_as":
        return mk("expand_as", [args[0], args[1]])
    if name in ("reshape_as", "view_as"):
        # a reshape to another tensor's shape: no sizes of its own to patch
        return mk("view", [args[0], args[1]], sizes=[], like=args[1])
    if name == "flatten":
        return mk("view", [args[0]], sizes=[])     # sizes follow from the input: nothing to patch
    if name == "select":
        return mk("select", [args[0]], dim=args[1] % in_rank(), index=args[2])
    if name == "stack":
        return mk("stack", list(args[0]), dim=(args[1] if len(args) > 1 else kw.get("dim", 0)) % len(shape))
    if name == "index" and len(n.args) > 1:
        picks = list(n.args[1])
        axes = [i for i, p in enumerate(picks) if p is not None]
        values = [_constant_ints(picks[i]) for i in axes]
        return mk("index", [args[0], *[_conv(picks[i]) for i in axes]], axes=axes, values=values)
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
            dim = (args[1] if len(args) > 1 else kw.get("dim", 0)) % r
            return mk("unbind", [args[0]], dim=dim)
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
    if name in _REDUCE and len(args) > 1 and isinstance(args[1], Ref):
        return mk("binary", [args[0], args[1]])      # max/min of two tensors: elementwise
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


# --------------------------------------------------------------------------- execution

class Stream(StreamPositions):
    """One batch executed through the GraphModule node by node, resumable: ``run_until(node)``
    continues from where it stopped. Parameters are read through an override table (the
    pruned stream's current weights) at each use; every value is freed after its last use
    unless it is pinned (a probe still needed). ``hooks`` observe an op's inputs and output;
    ``post`` changes a node's value (a bias the model did not have)."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: dict[str, torch.Tensor],
                 overrides: dict[str, torch.Tensor] | None = None, pinned: set[str] | None = None,
                 grad: bool = False):
        self.gm = gm
        self.grad = grad
        self.nodes = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.inputs = inputs
        self.overrides = overrides if overrides is not None else {}
        self.pinned = set(pinned or ())
        self.env: dict[str, object] = {}
        self.pos = 0
        self.post: dict[str, Callable] = {}      # node -> fn(out) -> out (e.g. a bias delta)
        self.hooks: dict[str, Callable] = {}     # node -> fn(args, kwargs, out)
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a.name] = i
        self.frees: dict[int, list[str]] = {}
        for name, i in last.items():
            self.frees.setdefault(i, []).append(name)

    def _last_use_passed(self, name: str) -> bool:
        users = self.nodes[self.index[name]].users
        return all(self.index[u.name] < self.pos for u in users)

    def run_until(self, name: str | None = None):
        """Execute nodes up to and including ``name`` (to the end when None)."""
        with torch.set_grad_enabled(self.grad):
            self._run(name)

    def _run(self, name: str | None):
        stop = len(self.nodes) - 1 if name is None else self.index[name]
        env = self.env
        while self.pos <= stop:
            n = self.nodes[self.pos]
            if n.op == "placeholder":
                out = self.inputs[n.target]
            elif n.op == "get_attr":
                out = None       # read where it is used: see _arg
            elif n.op == "call_function":
                args = torch.fx.node.map_arg(n.args, self._arg)
                kwargs = torch.fx.node.map_arg(n.kwargs, self._arg)
                out = n.target(*args, **kwargs)
                hook = self.hooks.get(n.name)
                if hook is not None:
                    hook(args, kwargs, out)
            elif n.op == "call_module":
                out = None       # export's input guards: inputs were built to satisfy them
            elif n.op == "output":
                out = torch.fx.node.map_arg(n.args, self._arg)[0]
            else:  # pragma: no cover - call_method does not occur in exported graphs
                raise RuntimeError(f"unexpected node {n.op}")
            fn = self.post.get(n.name)
            if fn is not None:
                out = fn(out)
            env[n.name] = out
            for dead in self.frees.get(self.pos, ()):
                if dead not in self.pinned:
                    env.pop(dead, None)
            self.pos += 1

    def _arg(self, a: torch.fx.Node):
        """A node's value for an op that reads it. Parameters are read at each use, through
        the override table: torch.export puts every get_attr at the top of the graph, so a
        value fetched there would miss the weights greedy installs between modules (the
        pruned stream would run on the dense weights)."""
        if a.op == "get_attr":
            out = self.overrides.get(a.target)
            return fetch_attr(self.gm, a.target) if out is None else out
        return self.env[a.name]

    def output(self):
        self.run_until(None)
        return self.env[self.nodes[-1].name]


# --------------------------------------------------------------------------- the frontend

_SPLITS = ("split", "split_with_sizes", "chunk")
_SLICE_ARG = {"start": 2, "end": 3}


class FxFrontend:
    """A torch.export GraphModule (unlifted: parameters are get_attr) behind the interface
    the passes use: the graph view, parameters by name, calibration streams, and the edits
    of rewrite (parameters, integer attributes, a new bias). Edits happen in place;
    ``finish`` recompiles the module. ``input_ports`` / ``output_ports`` / ``experts``: as in
    ``from_fx``."""

    def __init__(self, gm: torch.fx.GraphModule, input_ports: dict[int, int] | None = None,
                 output_ports: dict[int, int] | None = None, experts: dict[str, int] | None = None):
        self.gm = gm
        self.input_ports, self.output_ports = dict(input_ports or {}), dict(output_ports or {})
        self.experts = dict(experts or {})

    # -- reading
    def view(self) -> Graph:
        return from_fx(self.gm, self.input_ports, self.output_ports, self.experts)

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.gm.state_dict())

    def param_shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.gm.state_dict(keep_vars=True).items()}

    def param_count(self) -> int:
        return count_params(self.gm)

    def stream(self, inputs: dict[str, torch.Tensor], overrides=None, pinned=None, grad=False) -> "Stream":
        return Stream(self.gm, inputs, overrides, pinned, grad)

    # -- editing
    def set_param(self, name: str, value: torch.Tensor) -> None:
        """Replace parameter ``name`` (same shape), or add it when the module has none."""
        mod, _, leaf = name.rpartition(".")
        owner = self.gm.get_submodule(mod) if mod else self.gm
        if hasattr(owner, leaf):
            old = getattr(owner, leaf)
            if tuple(old.shape) != tuple(value.shape):
                raise ValueError(f"replacement for {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(old.shape)}")
            _set_param(self.gm, name, value.to(old.dtype))
        else:
            owner.register_parameter(leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=False))

    def slice_param(self, name: str, cuts: list[tuple[int, object]]) -> tuple[tuple, tuple]:
        """Keep indices ``keep`` along ``axis`` for each (axis, keep); returns (old, new) shape."""
        t = fetch_attr(self.gm, name)
        old_shape = tuple(t.shape)
        for axis, keep in cuts:
            if len(keep) != t.shape[axis]:
                t = t.index_select(axis, torch.as_tensor(keep, dtype=torch.long))
        if tuple(t.shape) != old_shape:
            _set_param(self.gm, name, t)
        return old_shape, tuple(t.shape)

    def set_ints(self, node_name: str, attr: str, values: dict[int | None, int]) -> None:
        """Set integer attribute ``attr`` of a node (elements ``pos`` of a list attribute).
        A split gets every piece and becomes split_with_sizes."""
        node = next(n for n in self.gm.graph.nodes if n.name == node_name)
        if _op_name(node.target) in _SPLITS:
            sizes = [values[k] for k in sorted(values)]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = torch.ops.aten.split_with_sizes.default
            node.args = (node.args[0], sizes, dim)
            node.kwargs = {}
            return
        arg = _SLICE_ARG.get(attr, 1)
        args = list(node.args)
        for pos, v in values.items():
            if pos is None:
                args[arg] = v
            else:
                seq = list(args[arg])
                seq[pos] = self._sized(node, seq[pos], v)
                args[arg] = seq
        node.args = tuple(args)

    def _sized(self, user: torch.fx.Node, old, value: int):
        """``value`` in place of the size ``old``; a size computed as (shape) * (integer), the
        batch times the heads merged into it, becomes a product of its own with ``value``
        for the integer (the old one may size other reshapes, of other layers)."""
        import operator

        if not (isinstance(old, torch.fx.Node) and old.target is operator.mul):
            return value
        with self.gm.graph.inserting_before(user):
            return self.gm.graph.call_function(operator.mul, tuple(
                value if isinstance(a, int) and not isinstance(a, bool) else a for a in old.args))

    def slice_port(self, name: str, axis: int, keep) -> None:
        """Keep entries ``keep`` along ``axis`` of port ``name``: nothing to edit in an fx
        graph. An input's size is not part of it (it comes with the example inputs at export,
        from rewrite's ``ports``); an output's follows from the ops that compute it."""

    def gather(self, node_name: str, pos: int, axis: int, index: list[int], period: int | None = None) -> None:
        """Operand ``pos`` of ``node_name`` read through index_select(axis, index): the K/V
        head each kept query head reads, when K/V groups are left unequal; the kept heads'
        entries of a per-head constant. ``period``: ``axis`` is a batch axis with ``period``
        heads merged into it, and ``index`` picks among the heads of each batch entry."""
        node = next(n for n in self.gm.graph.nodes if n.name == node_name)
        graph = self.gm.graph
        name = f"goa_gather_{node_name}_{pos}"
        self.gm.register_buffer(name, torch.as_tensor(index, dtype=torch.long))
        aten = torch.ops.aten
        with graph.inserting_before(node):
            idx = graph.get_attr(name)
            if period:
                heads = graph.call_function(aten.unflatten.int, (node.args[pos], axis, [-1, period]))
                picked = graph.call_function(aten.index_select.default, (heads, axis + 1, idx))
                picked = graph.call_function(aten.flatten.using_ints, (picked, axis, axis + 1))
            else:
                picked = graph.call_function(aten.index_select.default, (node.args[pos], axis, idx))
        args = list(node.args)
        args[pos] = picked
        node.args = tuple(args)

    def add_bias(self, node_name: str, param: str) -> None:
        """Give a bias-free linear projection the (already registered) bias ``param``."""
        node = next(n for n in self.gm.graph.nodes if n.name == node_name)
        if _op_name(node.target) == "linear":
            with self.gm.graph.inserting_before(node):
                b = self.gm.graph.get_attr(param)
            node.args = (node.args[0], node.args[1], b)
            return
        if _op_name(node.target) not in ("mm", "matmul", "bmm"):
            raise ValueError(f"cannot add a bias to {node.target}")
        # a projection written as a matrix product: its users read product + bias instead
        graph = self.gm.graph
        with graph.inserting_after(node):
            b = graph.get_attr(param)
        with graph.inserting_after(b):
            added = graph.call_function(torch.ops.aten.add.Tensor, (node, b))
        added.meta = dict(node.meta)
        node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)

    def finish(self) -> None:
        self.gm.recompile()


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
