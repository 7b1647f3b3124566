"""Fused contrib ops rewritten into standard ONNX ops before the ONNX frontend reads a graph.

onnxruntime's fused ops (the com.microsoft domain: what onnxruntime-genai's model builder and
onnxruntime's transformer optimiser emit) hide the head and channel structure that analysis
follows inside one node. Each rule here is a pattern (domain, op type), a check (the
attributes and inputs it implements; a failed check returns the reason, and the graph is
refused with it) and a rewrite into the standard ops torch.onnx emits for the same
computation (Split / Reshape / Transpose for heads, rotate-half rotary from the op's cos /
sin caches, Concat of the cache, Expand + Reshape for grouped K/V, MatMul / Softmax under a
causal and padding mask). The rewritten graph is what is calibrated, pruned and written:
its outputs keep their names, its cache inputs and outputs their layout.

    GroupQueryAttention             packed or separate Q/K/V, past / present K/V [b, kv, t, d],
                                    rotary (rotate-half) from cos_cache / sin_cache, no window
                                    or softcap; positions continue the past (unpadded rows),
                                    keys masked by attention_mask when the graph has one
    SkipSimplifiedLayerNormalization Add + SimplifiedLayerNormalization (its sum output kept)
    SkipLayerNormalization          Add + LayerNormalization (its sum output kept)

``lower(model)`` rewrites every such node in place and returns the count per op;
``LoweringRefused`` names the first node whose check fails (the frontend refuses the file
with it). The frontend then checks the rewritten graph against onnxruntime running
the original (frontends/onnx.py ``check_against_onnxruntime``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

MS = "com.microsoft"
NEG = -3.4028234663852886e38          # the most negative float32: a masked score


class LoweringRefused(Exception):
    """A fused op this module cannot rewrite as the graph uses it (names the node)."""


@dataclass(frozen=True)
class Rule:
    op_type: str
    check: Callable[[ir.Node], str | None]          # None, or why the node is not rewritten
    rewrite: Callable[["Builder", ir.Node], list]    # the new values of the node's outputs (None: unused)


class Builder:
    """New nodes for one graph: ``op`` appends a standard node, ``ints`` / ``floats`` add
    constant initializers; names are unique per graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.nodes: list[ir.Node] = []
        self._n = Counter()
        self.shared: dict[tuple, ir.Value] = {}

    def _name(self, stem: str) -> str:
        self._n[stem] += 1
        return f"goa_lower_{stem}_{self._n[stem]}"

    def op(self, op_type: str, inputs, num_outputs: int = 1, **attrs):
        node = ir.node(op_type, list(inputs), attributes=attrs or None, num_outputs=num_outputs,
                       name=self._name(op_type))
        for k, v in enumerate(node.outputs):
            v.name = f"{node.name}_out{k}"
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else list(node.outputs)

    def const(self, array: np.ndarray, stem: str) -> ir.Value:
        name = self._name(stem)
        dtype = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=dtype,
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def ints(self, values, stem: str = "ints") -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), stem)

    def scalar(self, value: float, stem: str = "scalar") -> ir.Value:
        return self.const(np.asarray(value, dtype=np.float32), stem)

    def dim(self, x: ir.Value, axis: int) -> ir.Value:
        """x.shape[axis] as a 1-element int64 tensor."""
        return self.op("Shape", [x], start=axis, end=axis + 1)


# ------------------------------------------------------------------------------ the rules

def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _input(node: ir.Node, k: int) -> ir.Value | None:
    return node.inputs[k] if k < len(node.inputs) else None


def _used(v: ir.Value | None) -> bool:
    return v is not None and (bool(list(v.uses())) or v.is_graph_output())


def _width(v: ir.Value) -> int | None:
    """The static last-axis width of ``v``: its shape, or a MatMul (+ Add) with a weight initializer."""
    if v.shape is not None and len(v.shape) and isinstance(v.shape[-1], int):
        return int(v.shape[-1])
    node = v.producer()
    if node is not None and node.op_type == "Add" and node.domain == "":
        node = next((i.producer() for i in node.inputs if i is not None and i.producer() is not None
                     and i.producer().op_type == "MatMul"), None)
    if node is not None and node.op_type == "MatMul" and node.inputs[1].const_value is not None:
        return int(node.inputs[1].const_value.shape[-1])
    return None


def _check_gqa(node: ir.Node) -> str | None:
    if _attr(node, "local_window_size", -1) != -1:
        return "a local attention window"
    if _attr(node, "softcap", 0.0):
        return "softcap"
    if _attr(node, "smooth_softmax", 0):
        return "smooth softmax"
    if _attr(node, "rotary_interleaved", 0):
        return "interleaved rotary"
    if any(_input(node, k) is not None for k in (9, 10, 11, 12)):
        return "position_ids / attention_bias / head_sink inputs"
    if _input(node, 3) is None or _input(node, 4) is None:
        return "no past key / value inputs"
    if len(node.outputs) > 3 and _used(node.outputs[3]):
        return "its attention-score output"
    q, k = node.inputs[0], _input(node, 1)
    heads, kv = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
    if not heads or not kv or heads % kv:
        return f"num_heads {heads} with kv_num_heads {kv}"
    width = _width(q)
    if width is None:
        return "a query input of unknown width"
    d = width // (heads + 2 * kv) if k is None else width // heads
    if d * (heads + 2 * kv if k is None else heads) != width:
        return f"a query width {width} that {heads} + 2 x {kv} heads do not divide"
    if _attr(node, "do_rotary", 0):
        cos = _input(node, 7)
        if cos is None or cos.const_value is None or _input(node, 8) is None:
            return "rotary without constant cos / sin caches"
        if 2 * int(cos.const_value.shape[-1]) != d:
            return f"partial rotary ({2 * int(cos.const_value.shape[-1])} of {d} features)"
    return None


def _head_dim(node: ir.Node) -> int:
    heads, kv = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
    width = _width(node.inputs[0])
    return width // (heads + 2 * kv) if _input(node, 1) is None else width // heads


def _rewrite_gqa(b: Builder, node: ir.Node) -> list:
    heads, kv = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
    d = _head_dim(node)
    scale = _attr(node, "scale", 0.0) or 1.0 / float(np.sqrt(d))
    query, past_k, past_v = node.inputs[0], node.inputs[3], node.inputs[4]
    for cache in (past_k, past_v, *node.outputs[1:3]):      # [batch, kv, length, d], d named symbolically
        _fix_cache_shape(cache, kv, d)
    if _input(node, 1) is None:
        q, k, v = b.op("Split", [query, b.ints([heads * d, kv * d, kv * d], "qkv_sizes")], num_outputs=3, axis=-1)
    else:
        q, k, v = query, node.inputs[1], node.inputs[2]
    batch, seq = b.dim(query, 0), b.dim(query, 1)
    split_heads = b.op("Concat", [batch, seq, b.ints([-1], "heads"), b.ints([d], "head_dim")], axis=0)
    qh, kh, vh = (b.op("Transpose", [b.op("Reshape", [t, split_heads])], perm=[0, 2, 1, 3]) for t in (q, k, v))
    past_len = b.dim(past_k, 2)
    if _attr(node, "do_rotary", 0):
        qh, kh = (_rotate(b, t, node.inputs[7], node.inputs[8], past_len, seq, d) for t in (qh, kh))
    present_k = b.op("Concat", [past_k, kh], axis=2)
    present_v = b.op("Concat", [past_v, vh], axis=2)
    keys, values = present_k, present_v
    if heads != kv:     # each K/V head read by its group of query heads
        group = b.ints([1, 1, heads // kv, 1, 1], "group")
        merge = b.op("Concat", [batch, b.ints([-1], "heads"), b.dim(present_k, 2), b.ints([d], "head_dim")], axis=0)
        keys, values = (b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [t, b.ints([2], "axis")]), group]), merge])
                        for t in (present_k, present_v))
    scores = b.op("Mul", [b.op("MatMul", [qh, b.op("Transpose", [keys], perm=[0, 1, 3, 2])]), b.scalar(scale, "scale")])
    probs = b.op("Softmax", [b.op("Add", [scores, _mask(b, past_len, seq, present_k)])], axis=-1)
    out = b.op("Transpose", [b.op("MatMul", [probs, values])], perm=[0, 2, 1, 3])
    out = b.op("Reshape", [out, b.op("Concat", [batch, seq, b.ints([-1], "merged")], axis=0)])
    return [out, present_k, present_v] + [None] * (len(node.outputs) - 3)


def _fix_cache_shape(v: ir.Value, kv: int, d: int) -> None:
    """A cache value's heads and features as the numbers they are (its batch and length stay symbols)."""
    dims = list(v.shape) if v.shape is not None and len(v.shape) == 4 else ["batch_size", kv, "length", d]
    v.shape = ir.Shape([dims[0], kv, dims[2], d])


def _positions(b: Builder, past_len: ir.Value, seq: ir.Value) -> ir.Value:
    """past + 0 .. past + seq - 1 (int64 [seq]): the rows continue the cache."""
    key = ("positions", past_len.name, seq.name)
    if key not in b.shared:
        start = b.op("Squeeze", [past_len])
        end = b.op("Add", [start, b.op("Squeeze", [seq])])
        b.shared[key] = b.op("Range", [start, end, b.ints(1, "one")])
    return b.shared[key]


def _rotate(b: Builder, x: ir.Value, cos_cache: ir.Value, sin_cache: ir.Value, past_len, seq, d: int) -> ir.Value:
    """Rotate-half rotary of x [b, h, s, d]: x cos + rotate_half(x) sin, cos / sin the caches'
    rows at the positions, each half repeated."""
    key = ("rotary", cos_cache.name, sin_cache.name, past_len.name, seq.name)
    if key not in b.shared:
        pos = _positions(b, past_len, seq)
        tables = []
        for cache in (cos_cache, sin_cache):
            rows = b.op("Gather", [cache, pos], axis=0)                       # [s, d/2]
            full = b.op("Concat", [rows, rows], axis=-1)                      # [s, d]
            tables.append(b.op("Unsqueeze", [full, b.ints([0, 1], "axes")]))  # [1, 1, s, d]
        b.shared[key] = tuple(tables)
    cos, sin = b.shared[key]
    half = d // 2
    x1 = b.op("Slice", [x, b.ints([0], "start"), b.ints([half], "end"), b.ints([-1], "axis")])
    x2 = b.op("Slice", [x, b.ints([half], "start"), b.ints([d], "end"), b.ints([-1], "axis")])
    rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rotated, sin])])


def _mask(b: Builder, past_len: ir.Value, seq: ir.Value, present: ir.Value) -> ir.Value:
    """[b or 1, 1, s, t] float: 0 where row i may read key j (j <= past + i, and the key is
    not padding by attention_mask when the graph has one), else the most negative float."""
    key = ("mask", past_len.name, seq.name)
    if key in b.shared:
        return b.shared[key]
    total = b.dim(present, 2)
    keys = b.op("Range", [b.ints(0, "zero"), b.op("Squeeze", [total]), b.ints(1, "one")])
    rows = _positions(b, past_len, seq)
    allowed = b.op("LessOrEqual", [b.op("Unsqueeze", [keys, b.ints([0], "axis")]),
                                   b.op("Unsqueeze", [rows, b.ints([1], "axis")])])              # [s, t]
    mask_input = next((v for v in b.graph.inputs if v.name == "attention_mask"), None)
    if mask_input is not None:
        real = b.op("Cast", [b.op("Unsqueeze", [mask_input, b.ints([1, 2], "axes")])], to=int(ir.DataType.BOOL))
        allowed = b.op("And", [allowed, real])                                              # [b, 1, s, t]
    b.shared[key] = b.op("Where", [allowed, b.scalar(0.0, "zero_f"), b.scalar(NEG, "masked")])
    return b.shared[key]


def _check_skip_norm(node: ir.Node) -> str | None:
    if any(_used(node.outputs[k]) for k in (1, 2) if k < len(node.outputs)):
        return "its mean / inverse-deviation outputs"
    return None


def _rewrite_skip_norm(simplified: bool):
    def rewrite(b: Builder, node: ir.Node) -> list:
        x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
        beta = None if simplified else _input(node, 3)
        bias = _input(node, 3 if simplified else 4)
        total = b.op("Add", [x, skip])
        if bias is not None:
            total = b.op("Add", [total, bias])
        eps = _attr(node, "epsilon", 1e-5)
        if simplified:
            out = b.op("SimplifiedLayerNormalization", [total, gamma], axis=-1, epsilon=eps)
        else:
            out = b.op("LayerNormalization", [total, gamma] + ([beta] if beta is not None else []), axis=-1,
                       epsilon=eps)
        news = [out, None, None, total]
        return news[:len(node.outputs)]
    return rewrite


RULES: dict[tuple[str, str], Rule] = {
    (MS, "GroupQueryAttention"): Rule("GroupQueryAttention", _check_gqa, _rewrite_gqa),
    (MS, "SkipSimplifiedLayerNormalization"): Rule("SkipSimplifiedLayerNormalization", _check_skip_norm,
                                                   _rewrite_skip_norm(True)),
    (MS, "SkipLayerNormalization"): Rule("SkipLayerNormalization", _check_skip_norm, _rewrite_skip_norm(False)),
}


def lower(model: ir.Model) -> Counter:
    """Rewrite every node a rule matches, in place; the count per op type. LoweringRefused
    names the first node whose check fails."""
    graph, done = model.graph, Counter()
    b = Builder(graph)
    for node in list(graph):
        rule = RULES.get((node.domain, node.op_type))
        if rule is None:
            continue
        why = rule.check(node)
        if why is not None:
            raise LoweringRefused(f"{node.op_type} node {node.name}: {why} is not supported")
        b.nodes = []
        news = rule.rewrite(b, node)
        old = [v for v, n in zip(node.outputs, news) if n is not None]
        new = [n for n in news if n is not None]
        for v, n in zip(node.outputs, news):
            if n is None and _used(v):
                raise LoweringRefused(f"{node.op_type} node {node.name}: output {v.name} has no rewrite")
        ir.convenience.replace_nodes_and_values(graph, node, [node], b.nodes, old, new)
        done[node.op_type] += 1
    if done and not any(imp == "" for imp in model.opset_imports):
        model.opset_imports[""] = 17
    return done
