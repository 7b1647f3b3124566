"""Analysis: find the depth-2 prunable structures in a captured graph, with no per-model tables.

Every projection (a linear op with a parameter weight) opens a *root*: its output channels.
An abstract interpretation carries, for every tensor, which axes index root channels and how
(a ``Tag``), through reshapes, transposes, slices of fused outputs, rotary embeddings,
grouped-K/V expansion, attention and activations. Channels that meet in one op (q and k
heads in attention, gate and up neurons in a gated FFN, a K/V head and the query heads that
read it) are merged in a union-find; the merged sets that reach the input axis of another
projection (the level-2) are the *units*: heads, K/V groups or neurons. A channel that meets
anything analysis cannot follow (a reduction over channels, the residual stream, a graph
output, an unknown op) refuses its whole structure with a one-line reason.

Removing a unit is then provably the same as zeroing its level-2 input columns: the
channels of one unit never mix with another unit's or with anything outside the structure.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import sympy

from goa_compiler.ir.graph import Graph, Node, Ref, product_factor, quotient_factor, size_source
from goa_compiler.ir.structure import ConstantKind, IntHandle, ShapeConstant


@dataclass(frozen=True)
class Tag:
    """Axis index i of a tensor covers channels [start + (i // repeat) * block, ... + block)
    of the output of projection ``root``. ``period``: the axis is a batch axis with the
    channel axis merged inside it ([B, H, ..] viewed as [B * H, ..], heads on the batch axis
    of a batched product): entry i is entry ``i % period`` of the channel axis."""

    root: str
    start: int
    block: int
    repeat: int
    period: int | None = None

    def first_channel(self, i: np.ndarray) -> np.ndarray:
        if self.period:
            i = i % self.period
        return self.start + (i // self.repeat) * self.block

    def channels(self, length: int | None) -> tuple[int, int]:
        """The channel range covered by an axis of ``length`` (of one period of a batch axis)."""
        length = self.period or length
        return self.start, self.start + (length // self.repeat) * self.block


class _Reject(Exception):
    def __init__(self, msg: str, terminal: bool = False):
        super().__init__(msg)
        self.terminal = terminal


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


@dataclass
class _Proj:
    """A projection: a linear op with a parameter weight."""

    node: str
    x: str | None
    weight: str
    w_out_axis: int
    bias: str | None
    width: int


@dataclass
class _State:
    graph: Graph
    projs: dict[str, _Proj] = field(default_factory=dict)
    tags: dict[str, dict[int, Tag]] = field(default_factory=dict)   # value -> axis -> tag
    multi: dict[str, list[dict[int, Tag]]] = field(default_factory=dict)
    uf_chan: _UnionFind = field(default_factory=_UnionFind)         # (root, channel) / (l2, col)
    uf_mod: _UnionFind = field(default_factory=_UnionFind)          # ("root", n) / ("l2", n)
    refusals: dict[str, str] = field(default_factory=dict)          # module key -> reason
    level2: dict[str, Tag] = field(default_factory=dict)            # l2 node -> tag on its input
    level2_len: dict[str, int] = field(default_factory=dict)
    constants: list[ShapeConstant] = field(default_factory=list)
    roles: dict[tuple[str, int, int], set] = field(default_factory=dict)  # (root, a, b) -> roles
    activated: set[str] = field(default_factory=set)
    attention: dict[str, dict] = field(default_factory=dict)        # root -> attention facts
    attached: list[tuple[str, int, Tag, int]] = field(default_factory=list)
    gathered: list[tuple[str, int, int, Tag, int]] = field(default_factory=list)  # (node, operand, axis, tag, length)
    data_dependent: dict[str, bool] = field(default_factory=dict)
    # computed from the hidden states (_opens_stream), not from integer inputs (ids, a
    # mask), constants and small parameters alone
    stream_dependent: dict[str, bool] = field(default_factory=dict)
    terminal: set = field(default_factory=set)
    param_uses: dict[str, int] = field(default_factory=dict)   # parameter -> number of readers
    port_inputs: dict[str, int] = field(default_factory=dict)  # input port -> entries on its axis
    port_outputs: dict[str, tuple] = field(default_factory=dict)   # output port -> (tag, entries)
    pinned: list[tuple[str, int, int, str]] = field(default_factory=list)  # (root, a, b, where): no unit's
    experts: list[tuple[str, str]] = field(default_factory=list)   # (index node, 3-D parameter)
    port_features: list[tuple[Tag, int]] = field(default_factory=list)  # ports' feature axes: never sliced
    query_heads: bool = False       # grouped K/V: query heads are the units (not whole groups)
    kv_reads: list[dict] = field(default_factory=list)   # attention whose query heads read K/V groups

    @property
    def kv_ports(self) -> set[str]:
        """Ports whose entries are K/V heads read by query-head units (sliced by group)."""
        kv_roots = {t.root for r in self.kv_reads for t in (r["k"], r["v"])}
        kv_modules = {self.uf_mod.find(("root", k)) for k in kv_roots}
        return ({name for name in self.port_inputs if self.uf_mod.find(("root", name)) in kv_modules}
                | {name for name, (tag, _) in self.port_outputs.items() if tag.root in kv_roots})

    # -- helpers
    def refuse(self, tags, reason: str, terminal: bool = False):
        """Refuse the structures of these channels. ``terminal``: the channels simply end
        where a level-1 output cannot (the residual stream, a model output, a tied
        weight): the projection is no level 1, not a structure analysis failed to prove."""
        for t in tags:
            key = ("root", t.root)
            self.refusals.setdefault(key, reason)
            if terminal:
                self.terminal.add(key)

    def join(self, a: Tag, b: Tag, length: int):
        """Channels at the same index of two tagged axes belong to one unit."""
        if a == b:
            return
        i = np.arange(length)
        ca, cb = a.first_channel(i), b.first_channel(i)
        for x, y in zip(ca.tolist(), cb.tolist()):
            self.uf_chan.union((a.root, x), (b.root, y))
        self.uf_mod.union(("root", a.root), ("root", b.root))

    def fuse_block(self, root: str, start: int, stop: int, block: int):
        for s in range(start, stop, block):
            for c in range(s + 1, s + block):
                self.uf_chan.union((root, s), (root, c))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _static(d) -> int | None:
    if isinstance(d, (int, np.integer)):
        return int(d)
    if isinstance(d, sympy.Integer):
        return int(d)
    return None


def _prod(dims):
    p = sympy.Integer(1)
    for d in dims:
        p = p * sympy.sympify(d)
    return sympy.expand(p)


def _view_groups(src: tuple, dst: tuple, keep=frozenset()):
    """Group the dims of a reshape: a list of (src dims, dst dims) with equal products.
    Size-1 dims form their own groups, except next to a source dim in ``keep`` (a channel
    axis): a size-1 source dim in ``keep`` (one K/V head) merges with the dims after it, and
    a size-1 destination dim before a kept source dim leads its group ([.., D] -> [.., 1, D]
    is one head of D channels). Returns None when the shapes cannot be matched."""
    groups = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and j < len(dst) and _static(src[i]) == 1 and _static(dst[j]) == 1:
            groups.append(([i], [j]))        # a kept size-1 axis (one K/V head)
            i += 1
            j += 1
            continue
        if i < len(src) and _static(src[i]) == 1 and i not in keep:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and _static(dst[j]) == 1 and not (i < len(src) and i in keep):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        gi, gj = [i], [j]
        pi, pj = _prod([src[i]]), _prod([dst[j]])
        i += 1
        j += 1
        guard = 0
        while sympy.simplify(pi - pj) != 0:
            guard += 1
            if guard > 64:
                return None
            # grow the side whose product is "smaller" (divides the other)
            if i < len(src) and (j >= len(dst) or _divides(pi, pj)):
                gi.append(i)
                pi = _prod([pi, src[i]])
                i += 1
            elif j < len(dst):
                gj.append(j)
                pj = _prod([pj, dst[j]])
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _divides(a, b) -> bool:
    q = sympy.simplify(sympy.sympify(b) / sympy.sympify(a))
    return q != 1 and (q.is_integer or q.is_Integer or (q.free_symbols and sympy.fraction(q)[1] == 1))


# ------------------------------------------------------------------------------- the pass

def interpret(graph: Graph, query_heads: bool = False) -> _State:
    """Run the channel-following interpretation over every node, in order. ``query_heads``:
    in grouped-K/V attention each query head is a unit of its own, and a K/V head is kept
    while any query head of its group is (else whole groups are the units)."""
    st = _State(graph, query_heads=query_heads)
    param_uses = st.param_uses
    for node in graph.nodes.values():
        for r in node.refs():
            if r in graph.params:
                param_uses[graph.params[r]] = param_uses.get(graph.params[r], 0) + 1

    for node in graph.nodes.values():
        # a shape query's integer depends on the input's shape, not on its values
        deps = [st.data_dependent.get(r, False) for r in node.refs()] if node.op != "ignore" else []
        st.data_dependent[node.name] = node.op == "input" or any(deps)
        st.stream_dependent[node.name] = _opens_stream(st, node) or node.op != "ignore" and any(
            st.stream_dependent.get(r, False) for r in node.refs())
        try:
            _transfer(st, node)
        except _Reject as e:
            tags = _input_tags(st, node)
            st.refuse(tags, f"{node.target} ({node.name}): {e}", terminal=e.terminal)
            if not e.terminal:
                _carry_refused(st, node)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as e:
            # a rule meeting arguments it does not expect (a bug to fix, but the model is
            # refused where it reaches, not the compile)
            st.refuse(_input_tags(st, node), f"{node.target} ({node.name}): analysis cannot follow this "
                                             f"form of the op ({type(e).__name__}: {e})")
    return st


def _opens_stream(st: _State, node: Node) -> bool:
    """Where hidden states begin: a float input (hidden states, a cache), or a lookup or
    product that reads a weight (a parameter of two or more dimensions) with data: an
    embedding, a projection. Integer inputs (ids, a mask), constants, and elementwise ops
    with parameters (ALiBi's slopes times the positions) are not."""
    if node.op == "input":
        return not node.attrs.get("integer")
    return node.op in ("linear", "index", "other", "matmul") and st.data_dependent[node.name] and any(
        r in st.graph.params and len(st.graph.nodes[r].shape or ()) >= 2 for r in node.refs())


def _carry_refused(st: _State, node: Node):
    """After a refusal, let the (already refused) channels flow on through a shape-preserving
    op, so the report can tell a structure that was refused on its way to a level-2
    projection (a candidate: say why) from a projection that is simply no level 1."""
    first = next((r for r in node.inputs if isinstance(r, Ref) and _tags(st, r)), None)
    if first is not None and node.shape is not None and _shape(st, first) == node.shape \
            and node.name not in st.tags:
        st.tags[node.name] = dict(_tags(st, first))


def _value_tags(st: _State, name: str) -> list[Tag]:
    """Every tag of a value (of each output of a multi-output op)."""
    out = list(st.tags.get(name, {}).values())
    for m in st.multi.get(name, []):
        out.extend(m.values())
    return out


def _input_tags(st: _State, node: Node) -> list[Tag]:
    return [t for r in node.refs() for t in _value_tags(st, r)]


def _shape(st: _State, ref) -> tuple:
    return st.graph.nodes[ref.name].shape if isinstance(ref, Ref) else ()


def _tags(st: _State, ref) -> dict[int, Tag]:
    return st.tags.get(ref.name, {}) if isinstance(ref, Ref) else {}


def _record_size(st: _State, node: Node, attr: str, pos, value, tag: Tag, length: int):
    """Remember an integer attribute (element ``pos`` of a list attribute) that equals the
    size of a tagged axis."""
    if _is_int(value) and value >= 0:
        a, b = tag.channels(length)
        st.constants.append(ShapeConstant(IntHandle(node.name, attr, pos), ConstantKind.SIZE, tag.root, a, b,
                                          tag.block, tag.repeat, int(value)))


# ------------------------------------------------------------------------------- the rules
# One rule per normalised op (ir/graph.py): how the channel tags of its inputs become the
# tags of its output, which channels it joins into one unit, which integers it records,
# and when it refuses (raise _Reject with the reason). An op without a rule refuses any
# channels that reach it.

Rule = Callable[["_State", Node, dict], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return register


# ops whose rules follow channels merged into a batch axis (Tag.period)
MERGED_OPS = frozenset({"view", "permute", "unary", "binary", "where", "matmul", "baddbmm", "softmax", "reduce",
                        "ignore"})


def _transfer(st: _State, node: Node):
    ins = node.inputs
    in_tags = _tags(st, ins[0]) if ins and isinstance(ins[0], Ref) else {}
    if node.op not in MERGED_OPS and any(t.period for t in _input_tags(st, node)):
        raise _Reject("heads merged into a batch axis reach an op analysis cannot follow there")
    RULES.get(node.op, _other)(st, node, in_tags)


def _span(t: Tag | None, dim) -> int | None:
    """Entries of a tagged axis of size ``dim`` that index channels: one period of a batch
    axis the channels are merged into, else the axis's static size."""
    return t.period if t is not None and t.period else _static(dim)


@rule("param", "ignore")
def _no_channels(st, node, in_tags):
    return


@rule("input")
def _input(st, node, in_tags):
    """A port input (past keys/values) opens a root of its own along the port's axis."""
    port = st.graph.ports.get(node.name)
    if port is not None:
        st.tags[node.name] = {port.axis: Tag(node.name, 0, 1, 1)}
        st.port_inputs[node.name] = _static(node.shape[port.axis])


@rule("output")
def _output(st, node, in_tags):
    for r in node.refs():
        tags = st.tags.get(r, {})
        port = st.graph.ports.get(r)
        last = len(st.graph.nodes[r].shape or ()) - 1
        if port is not None and tags and set(tags) <= {port.axis, last}:
            if port.axis in tags:
                st.port_outputs[r] = (tags[port.axis], _static(st.graph.nodes[r].shape[port.axis]))
            # channels on the features only (one K/V head every query head reads): never sliced
            if last in tags and last != port.axis:
                st.port_features.append((tags[last], _static(st.graph.nodes[r].shape[last])))
        elif _value_tags(st, r):
            st.refuse(_value_tags(st, r), "channels reach a model output", terminal=True)


@rule("getitem")
def _getitem(st, node, in_tags):
    src = node.inputs[0].name
    if src in st.multi:
        st.tags[node.name] = st.multi[src][node.attrs["index"]]
    elif in_tags:
        raise _Reject("indexes a tagged tuple")


@rule("unary")
def _unary(st, node, in_tags):
    st.tags[node.name] = dict(in_tags)
    if node.attrs.get("activation"):
        st.activated.update(t.root for t in in_tags.values())


@rule("binary", "where")
def _elementwise(st, node, in_tags):
    _broadcast(st, node, [i for i in node.inputs if isinstance(i, Ref)])


@rule("permute")
def _permute(st, node, in_tags):
    st.tags[node.name] = {o: in_tags[i] for o, i in enumerate(node.attrs["dims"]) if i in in_tags}


@rule("unsqueeze")
def _unsqueeze(st, node, in_tags):
    d = node.attrs["dim"]
    st.tags[node.name] = {(a if a < d else a + 1): t for a, t in in_tags.items()}


@rule("squeeze")
def _squeeze(st, node, in_tags):
    src = _shape(st, node.inputs[0])
    dims = node.attrs["dims"] if node.attrs["dims"] is not None else [
        i for i, s in enumerate(src) if _static(s) == 1]
    dims = [d for d in dims if _static(src[d]) == 1]
    keep = [i for i in range(len(src)) if i not in dims]
    st.tags[node.name] = {o: in_tags[i] for o, i in enumerate(keep) if i in in_tags}


@rule("expand")
def _expand(st, node, in_tags):
    src = _shape(st, node.inputs[0])
    sizes = node.attrs["sizes"]
    off = len(sizes) - len(src)
    out = {}
    for a, t in in_tags.items():
        out[a + off] = t
        _record_size(st, node, "sizes", a + off, sizes[a + off], t, _static(src[a]))
    st.tags[node.name] = out


@rule("slice")
def _slice(st, node, in_tags):
    d = node.attrs["dim"]
    if d not in in_tags:
        st.tags[node.name] = dict(in_tags)
        return
    t = in_tags[d]
    length = _static(_shape(st, node.inputs[0])[d])
    start, end, step = node.attrs["start"], node.attrs["end"], node.attrs["step"]
    if _is_int(step) and step > 1 and _is_int(start):
        st.tags[node.name] = {**in_tags, d: _strided_tag(st, t, length, start, end, step)}
        return
    if not (_is_int(start) and (end is None or _is_int(end)) and step == 1):
        raise _Reject("slices a channel axis with a dynamic range or a step")
    start = start + length if start < 0 else min(start, length)
    end_v = length if end is None else (end + length if end < 0 else min(end, length))
    out = dict(in_tags)
    out[d] = _slice_tag(t, start, end_v)
    st.tags[node.name] = out
    if node.attrs.get("narrow"):
        raise _Reject("narrows a channel axis")
    if start > 0:
        _record_size(st, node, "start", None, node.attrs["start"], t, start)
    if end is not None and end_v < length:
        _record_size(st, node, "end", None, end, t, end_v)


@rule("split")
def _split(st, node, in_tags):
    d = node.attrs["dim"]
    outs, pos = [], 0
    if not all(_is_int(size) for size in node.attrs["sizes"]):
        if d in in_tags:
            raise _Reject("splits a channel axis into sizes computed at run time")
        st.multi[node.name] = [dict(in_tags) for _ in node.attrs["sizes"]]
        return
    for k, size in enumerate(node.attrs["sizes"]):
        o = dict(in_tags)
        if d in in_tags:
            o[d] = _slice_tag(in_tags[d], pos, pos + size)
            st.constants.append(ShapeConstant(IntHandle(node.name, "sizes", k), ConstantKind.SPLIT,
                                              o[d].root, *o[d].channels(size), o[d].block, o[d].repeat, size))
        outs.append(o)
        pos += size
    st.multi[node.name] = outs


@rule("select")
def _select(st, node, in_tags):
    d = node.attrs["dim"]
    if d in in_tags:
        raise _Reject("selects one entry of a channel axis")
    st.tags[node.name] = {(a if a < d else a - 1): t for a, t in in_tags.items()}


@rule("unbind")
def _unbind(st, node, in_tags):
    d = node.attrs["dim"]
    if d in in_tags:
        raise _Reject("unbinds a channel axis")
    n = _static(_shape(st, node.inputs[0])[d])
    if n is None:
        raise _Reject("unbinds a dynamic axis")
    st.multi[node.name] = [{(a if a < d else a - 1): t for a, t in in_tags.items()} for _ in range(n)]


@rule("stack")
def _stack(st, node, in_tags):
    """stack = unsqueeze every operand at ``dim``, then concatenate along it."""
    d = node.attrs["dim"]
    refs = [i for i in node.inputs if isinstance(i, Ref)]
    shifted = [{(a if a < d else a + 1): t for a, t in _tags(st, r).items()} for r in refs]
    out: dict[int, Tag] = {}
    for a in sorted({a for tags in shifted for a in tags}):
        tagged = [tags.get(a) for tags in shifted]
        if any(t is None for t in tagged) or len(refs) != len(node.inputs):
            raise _Reject("stacks channels with a tensor outside the structure")
        for t in tagged[1:]:
            st.join(tagged[0], t, _static(node.shape[a]))
        out[a] = tagged[0]
    st.tags[node.name] = out


@rule("index")
def _index(st, node, in_tags):
    """x[..., idx, ...]: a 1-D index on an axis without channels keeps every other axis's
    channels; on a channel axis, constant entries counted from the end (the K/V slots of a
    fused multi-query projection) select those channels, which no unit may then own."""
    x, *idx = node.inputs
    if any(_value_tags(st, r.name) for r in idx if isinstance(r, Ref)):
        raise _Reject("an index computed from channels")
    src = st.graph.nodes[x.name] if isinstance(x, Ref) else None
    if src is not None and src.op == "param" and len(src.shape) >= 3 and \
            any(st.data_dependent.get(r.name) for r in idx if isinstance(r, Ref)):
        st.experts.append((node.name, st.graph.params[x.name]))
    if not in_tags:
        return
    axes, values = node.attrs["axes"], node.attrs["values"]
    if len(axes) != 1 or len(_shape(st, idx[0])) != 1:
        raise _Reject("advanced indexing of a tensor with channels")
    a, vals = axes[0], values[0]
    out = dict(in_tags)
    if a in in_tags:
        t = in_tags[a]
        length = _static(_shape(st, x)[a])
        if vals is None or length is None or len(vals) != 1 or not -length <= vals[0] < 0 or t.repeat != 1:
            raise _Reject("indexes a channel axis other than by one constant counted from its end")
        out[a] = _slice_tag(t, length + vals[0], length + vals[0] + 1)
        # counted from the end: the entry and every one after it must stay where they are
        st.pinned.append((t.root, out[a].channels(1)[0], t.channels(length)[1], f"{node.target} ({node.name})"))
    st.tags[node.name] = out


@rule("cat")
def _cat(st, node, in_tags):
    d = node.attrs["dim"]
    refs = [i for i in node.inputs if isinstance(i, Ref)]
    if any(d in _tags(st, r) for r in refs):
        raise _Reject("concatenates along a channel axis")
    _broadcast(st, node, refs, skip_axis=d)


@rule("reduce")
def _reduce(st, node, in_tags):
    dims = node.attrs["dims"]
    if any(a in in_tags for a in dims):
        raise _Reject("reduces over a channel axis")
    if node.attrs["keepdim"]:
        out = dict(in_tags)
    else:
        out = {a - sum(1 for d in dims if d < a): t for a, t in in_tags.items()}
    if node.shape and isinstance(node.shape[0], tuple):
        st.multi[node.name] = [dict(out) for _ in node.shape]     # (values, indices) of max/min
    else:
        st.tags[node.name] = out


@rule("softmax")
def _softmax(st, node, in_tags):
    if node.attrs["dim"] in in_tags:
        raise _Reject("softmax over a channel axis")
    st.tags[node.name] = dict(in_tags)


@rule("norm")
def _norm(st, node, in_tags):
    rank = len(_shape(st, node.inputs[0]))
    if any(a >= rank - node.attrs["ndims"] for a in in_tags):
        raise _Reject("normalises over a channel axis")
    st.tags[node.name] = dict(in_tags)


def _other(st, node, in_tags):
    if _input_tags(st, node):
        raise _Reject("channels flow into an operation analysis cannot follow")


def _strided_tag(st: _State, t: Tag, length, start: int, end, step: int) -> Tag:
    """x[..., start::step] of an axis of single channels, ``0 <= start < step`` (gate and up
    rows interleaved in one weight, GPT-OSS): the channels of each period of ``step`` go
    together (one unit), so whatever is kept, every period is whole and the slice's start and
    step stay right. Entry i is the period's first channel (same unit as the one it reads),
    and covers the period."""
    if t.block != 1 or t.repeat != 1 or length is None or length % step or not 0 <= start < step \
            or (end is not None and not (_is_int(end) and end >= length)):
        raise _Reject("slices a channel axis with a step other than every channel of whole periods")
    st.fuse_block(t.root, t.start, t.start + length, step)
    return Tag(t.root, t.start, step, 1)


def _slice_tag(t: Tag, a: int, b: int) -> Tag:
    if a % t.repeat or b % t.repeat:
        raise _Reject("slices a channel axis inside a repeated head")
    return Tag(t.root, t.start + (a // t.repeat) * t.block, t.block, t.repeat)


@rule("linear")
def _linear(st: _State, node: Node, in_tags=None):
    param_uses = st.param_uses
    g = st.graph
    x, w, b = node.inputs
    if not (isinstance(w, Ref) and w.name in g.params):
        # a data x data product written as linear: treat like matmul over the last axes
        raise _Reject("linear with a computed weight")
    wname = g.params[w.name]
    wshape = g.param_shapes[wname]
    out_axis = node.attrs["w_out_axis"]
    width = int(wshape[out_axis])
    bname = g.params.get(b.name) if isinstance(b, Ref) else None
    proj = _Proj(node.name, x.name if isinstance(x, Ref) else None, wname, out_axis, bname, width)
    st.projs[node.name] = proj
    shared = param_uses.get(wname, 0) > 1
    xt = _tags(st, x)
    xrank = len(_shape(st, x))
    out: dict[int, Tag] = {}
    for a, t in xt.items():
        if a == xrank - 1:
            st.level2[node.name] = t
            st.level2_len[node.name] = _static(_shape(st, x)[a])
            st.uf_mod.union(("l2", node.name), ("root", t.root))
            if shared:
                st.refuse([t], f"level-2 weight {wname} is shared with another op")
        else:
            out[a] = t
    # its own output channels open a new root
    root = Tag(node.name, 0, 1, 1)
    out[len(node.shape) - 1] = root
    st.tags[node.name] = out
    if shared:
        st.refuse([root], f"weight {wname} is shared with another op (tied weights)", terminal=True)
    if bname is not None and param_uses.get(bname, 0) > 1:
        st.refuse([root], f"bias {bname} is shared with another op")


def _broadcast(st: _State, node: Node, refs: list[Ref], skip_axis: int | None = None):
    """Elementwise ops: tagged axes at the same output position are joined; an untagged
    full-size operand along a tagged axis must be a parameter (then it is sliced too)."""
    out_shape = node.shape
    rank = len(out_shape)
    out: dict[int, Tag] = {}
    for a in range(rank):
        if a == skip_axis:
            continue
        tagged, plain = [], []
        for r in refs:
            s = _shape(st, r) or ()          # a symbolic integer (a sequence length) is a scalar
            k = a - (rank - len(s))
            if k < 0:
                continue
            t = _tags(st, r).get(k)
            if _static(s[k]) == 1:
                if t is not None and _static(out_shape[a]) != 1:
                    # one channel scaling many entries (a gate of width 1): that projection
                    # is no level 1; the other operands' channels go on
                    st.refuse([t], f"{node.target} ({node.name}): broadcasts a channel axis of one entry")
                if t is None or _static(out_shape[a]) != 1:
                    continue
            (tagged if t is not None else plain).append((r, k, t))
        if not tagged:
            continue
        # the result carries a projection's tag rather than a port's (past K/V joined to new)
        tagged.sort(key=lambda e: e[2].root in st.port_inputs)
        first = tagged[0][2]
        if any(t.period != first.period for _, _, t in tagged):
            raise _Reject("heads merged into a batch axis meet channels that are not")
        length = _span(first, out_shape[a])
        for _, _, t in tagged[1:]:
            st.join(first, t, length)
        for r, k, _ in plain:
            src = st.graph.nodes[r.name]
            port = st.graph.ports.get(r.name)
            if port is not None and src.op == "input" and k == len(_shape(st, r)) - 1 != port.axis:
                # a cache port's features meet channels (a multi-query K/V head's): they are
                # never sliced, so no unit may own these channels (structures._units)
                st.port_features.append((first, length))
                continue
            source = _param_source(st, r, k, length)
            if source is not None:
                # a per-channel parameter, directly or reshaped / expanded on its way (attention
                # sinks, per-head scales): sliced with the channels; the sizes on the way follow
                pnode, paxis, sizes = source
                st.attached.append((st.graph.params[pnode], paxis, first, length))
                for n, pos in sizes:
                    _record_size(st, st.graph.nodes[n], "sizes", pos, st.graph.nodes[n].attrs["sizes"][pos],
                                 first, length)
            elif src.op == "param":
                raise _Reject("a parameter broadcast along channels with an unusual layout")
            elif r in node.inputs and not st.stream_dependent.get(r.name):
                # computed from constants, shapes and integer inputs alone, not from the hidden
                # states (ALiBi's per-head slopes times the positions, which Bloom counts in the
                # attention mask): it carries no channels, so the kept channels read its entries
                # through a gather
                st.gathered.append((node.name, node.inputs.index(r), k, first, length))
            else:
                # projection outputs (flat channels) added to the data stream: the residual
                residual = bool(st.data_dependent.get(r.name)) and all(
                    t.repeat == 1 and t.block == 1 for _, _, t in tagged)
                raise _Reject("channels meet a tensor that is not part of the structure"
                              + (" (the residual stream)" if residual else ""), terminal=residual)
        out[a] = first
    st.tags[node.name] = out


@rule("view")
def _view(st: _State, node: Node, in_tags: dict[int, Tag]):
    src = _shape(st, node.inputs[0])
    dst = node.shape
    sizes = node.attrs["sizes"]
    if not in_tags:
        if node.attrs.get("like") is not None and _tags(st, node.attrs["like"]):
            raise _Reject("reshapes a tensor to the shape of channels it does not carry")
        return
    groups = _view_groups(src, dst, frozenset(in_tags))
    if groups is None:
        raise _Reject("a reshape of a channel axis analysis cannot match")
    out: dict[int, Tag] = {}
    for gi, gj in groups:
        tagged = [i for i in gi if i in in_tags]
        if not tagged:
            continue
        if len(tagged) > 1:
            raise _Reject("a reshape merges two channel axes")
        i = tagged[0]
        t = in_tags[i]
        if t.period or any(_static(src[k]) != 1 for k in gi if k < i):
            axis, out[axis] = _merged_view(st, node, src, dst, gi, gj, i, t)
            continue
        if not gj:
            raise _Reject("a reshape drops a channel axis")
        length = _static(src[i])
        inner_src = [_static(src[k]) for k in gi if k > i]
        if None in inner_src:
            raise _Reject("a reshape merges a channel axis with a dynamic one")
        inner = int(np.prod(inner_src)) if inner_src else 1
        total = length * inner
        lead = gj[0]
        dst_inner = [_static(dst[k]) for k in gj[1:]]
        if None in dst_inner:
            raise _Reject("a reshape splits a channel axis into dynamic sizes")
        split = int(np.prod(dst_inner)) if dst_inner else 1
        out_len = total // split
        # index o of the lead output axis covers input flat indices [o*split, (o+1)*split)
        # of (channel axis i) x (inner) whose channel index is flat // inner.
        if split % inner == 0:
            b = split // inner        # input channel-axis entries per output entry
            if b % t.repeat == 0:
                new = Tag(t.root, t.start, t.block * (b // t.repeat), 1)
                a0, a1 = t.channels(length)
                if new.block > 1:
                    st.fuse_block(t.root, a0, a1, new.block)
            elif t.repeat % b == 0:
                new = Tag(t.root, t.start, t.block, t.repeat // b)
            else:
                raise _Reject("a reshape cuts a channel axis across its units")
        elif inner % split == 0:
            new = Tag(t.root, t.start, t.block, t.repeat * (inner // split))
        else:
            raise _Reject("a reshape cuts a channel axis across its units")
        out[lead] = new
        if lead < len(sizes):
            _record_size(st, node, "sizes", lead, sizes[lead], new, out_len)
    if node.attrs.get("like") is not None and _tags(st, node.attrs["like"]) != out:
        # reshape_as: the sizes are the other tensor's, right only where it is pruned alike
        raise _Reject("reshapes channels to the shape of a tensor that does not carry them alike")
    merged_splits = {k for gi, gj in groups for k in gj[:-1] if any(in_tags.get(i) and in_tags[i].period
                                                                     for i in gi)}
    for k in range(min(len(sizes), len(dst))):
        if k not in out and k not in merged_splits:
            _check_plain_size(st, node, k)
    st.tags[node.name] = out


def _check_plain_size(st: _State, node: Node, pos: int, split: bool = False) -> None:
    """A size of an axis without channels. Read off an axis with channels, it must follow
    the kept units: the batch computed as (batch * heads) / heads (an ONNX graph's form)
    has its divisor recorded; any other such size is refused. ``split``: the batch split back
    out of merged heads, where a value analysis cannot trace is refused too (it may count
    the dense heads); elsewhere such a value counts no channels."""
    value = node.attrs["sizes"][pos] if pos < len(node.attrs["sizes"]) else -1
    if value is None or _is_int(value):
        return
    divisor = quotient_factor(value)
    source = size_source(st.graph, value.as_coeff_Mul()[1] if divisor else value)
    t = st.tags.get(source[0], {}).get(source[1]) if source is not None else None
    if divisor and t is not None and t.period == divisor:
        _record_size(st, node, "sizes", pos, divisor, t, None)   # the quotient's divisor
    elif t is not None:
        raise _Reject("a reshape sizes an axis by the size of an axis with channels")
    elif split:
        traced = source is not None or (isinstance(value, Ref) and not st.graph.nodes[value.name].attrs.get("product"))
        if divisor or not traced:
            raise _Reject("a reshape takes the batch out of merged heads by a value analysis cannot follow")


@rule("expand_as")
def _expand_as(st: _State, node: Node, in_tags: dict[int, Tag]):
    """x.expand_as(y): x's entries repeated to y's shape. An axis expanded from one entry
    follows y's size, so it carries y's channels (each entry a copy of x's one value); an
    axis x fills keeps x's channels, joined with y's there."""
    x, like = node.inputs
    tl, sx = _tags(st, like), _shape(st, x)
    off = len(node.shape) - len(sx)
    out: dict[int, Tag] = {}
    for a in range(len(node.shape)):
        k = a - off
        tx, ty = (in_tags.get(k) if k >= 0 else None), tl.get(a)
        if k < 0 or (_static(sx[k]) == 1 and _static(node.shape[a]) != 1):
            if tx is not None:
                raise _Reject("broadcasts a channel axis of one entry")
            if ty is not None:
                out[a] = ty
            continue
        if ty is not None and tx is None:
            raise _Reject("expands a tensor along channels it does not carry")
        if tx is not None and ty is not None:
            st.join(tx, ty, _span(tx, node.shape[a]))
        if tx is not None:
            out[a] = tx
    st.tags[node.name] = out


def _merged_view(st: _State, node: Node, src, dst, gi, gj, i: int, t: Tag) -> tuple[int, Tag]:
    """A reshape that merges a channel axis into the batch axes before it ([B, H, ..] ->
    [B * H, ..], the heads on the batch axis of a batched product), keeps such an axis, or
    splits it back ([B * H, ..] -> [B, H, ..]): the output axis and its tag."""
    if any(k > i and _static(src[k]) != 1 for k in gi):
        raise _Reject("a reshape merges a channel axis with the axes inside it")
    if not t.period:
        length = _static(src[i])
        if len(gj) != 1 or length is None:
            raise _Reject("a reshape makes a channel axis the inner dimension")
        new = Tag(t.root, t.start, t.block, t.repeat, period=length)
        _record_merged_size(st, node, gj[0], new)
        return gj[0], new
    if len(gi) != 1:
        raise _Reject("a reshape merges heads on a batch axis with another axis")
    if len(gj) == 1:
        _record_merged_size(st, node, gj[0], t)
        return gj[0], t
    last = gj[-1]
    if _static(dst[last]) != t.period:
        raise _Reject("a reshape splits heads merged into a batch axis other than back into heads")
    new = replace(t, period=None)
    sizes = node.attrs["sizes"]
    if last < len(sizes):
        _record_size(st, node, "sizes", last, sizes[last], new, t.period)
    for k in gj[:-1]:
        _check_plain_size(st, node, k, split=True)
    return last, new


def _record_merged_size(st: _State, node: Node, pos: int, t: Tag) -> None:
    """The size of a batch axis with heads merged into it: -1, batch * heads as an integer
    (a static batch: it counts ``value // period`` repeats of the heads) or as a product of a
    shape and the head count (the frontend rewrites the product's factor). Any other size
    (read off a tensor that may keep every head) is refused."""
    sizes = node.attrs["sizes"]
    value = sizes[pos] if pos < len(sizes) else -1
    if _is_int(value):
        if value == -1:
            return
        if value % t.period:
            raise _Reject("a reshape sizes heads merged into a batch axis with another count")
        a, b = t.channels(None)
        st.constants.append(ShapeConstant(IntHandle(node.name, "sizes", pos), ConstantKind.SIZE, t.root, a, b,
                                          t.block, t.repeat * (value // t.period), int(value)))
        return
    factor = product_factor(st.graph, value)
    if factor is None:
        raise _Reject("a reshape sizes heads merged into a batch axis by a value analysis cannot follow")
    if factor != t.period:
        raise _Reject("a reshape sizes heads merged into a batch axis with another count")
    _record_size(st, node, "sizes", pos, factor, t, None)        # the product's factor


def _head_axis(st: _State, ref, name: str) -> tuple[Tag, int]:
    tags = _tags(st, ref)
    shape = _shape(st, ref)
    rank = len(shape)
    bad = [a for a in tags if a >= rank - 2]
    if bad:
        raise _Reject(f"{name} has channels on a sequence or feature axis of attention")
    if rank - 3 not in tags:
        raise _Reject(f"{name} heads do not come from a projection of this module")
    if any(a < rank - 3 for a in tags):
        raise _Reject(f"{name} has channels on a batch axis")
    return tags[rank - 3], _static(shape[rank - 3])


def _shared_kv(st: _State, ref, heads: int) -> bool:
    """Keys or values that every query head reads alike (multi-query attention): one head,
    or channels only on the feature axis of a tensor expanded over the heads. They belong
    to no unit: query heads are the units, and these channels stay."""
    tags, shape = _tags(st, ref), _shape(st, ref)
    rank = len(shape)
    if any(a < rank - 3 or a == rank - 2 for a in tags):
        return False
    head, features = tags.get(rank - 3), tags.get(rank - 1)
    if features is not None:
        # channels on the features: heads expanded from one, or a cache's own entries
        return head is None or head.root in st.port_inputs
    return head is not None and _static(shape[rank - 3]) == 1 and heads > 1


def _axis_back(st: _State, node: Node, axis: int, n: int):
    """One step back along axis ``axis`` (``n`` entries) of ``node``'s output, through the
    ops that carry an axis unchanged (casts, unsqueeze, permute, a reshape keeping it, an
    expand of other axes): (source ref, its axis, the (node, position) of an integer equal
    to ``n`` there, or None). None when the axis does not pass through unchanged."""
    src = node.inputs[0] if node.inputs and isinstance(node.inputs[0], Ref) else None
    if src is None:
        return None
    src_shape, handle = _shape(st, src), None
    if node.op == "unsqueeze":
        if axis == node.attrs["dim"]:
            return None
        axis -= axis > node.attrs["dim"]
    elif node.op == "permute":
        axis = node.attrs["dims"][axis]
    elif node.op == "expand":
        sizes = node.attrs["sizes"]
        off = len(sizes) - len(src_shape)
        if axis < off:
            return None
        handle = (node.name, axis) if sizes[axis] == n else None
        axis -= off
    elif node.op == "view":
        group = next((g for g in _view_groups(src_shape, node.shape) or () if axis in g[1]), None)
        inner = [k for k in (group[0] if group else ()) if _static(src_shape[k]) != 1]
        if group is None or [a for a in group[1] if _static(node.shape[a]) != 1] != [axis] or len(inner) != 1:
            return None
        handle = (node.name, axis) if axis < len(node.attrs["sizes"]) and node.attrs["sizes"][axis] == n else None
        axis = inner[0]
    elif node.op != "unary":
        return None
    if _static(src_shape[axis]) != n:
        return None
    return src, axis, handle


def _param_source(st: _State, ref, axis: int, length: int):
    """(parameter node, its axis, sizes to patch) when axis ``axis`` of ``ref`` is a
    parameter's axis of ``length`` entries, directly or carried through the ops of
    ``_axis_back`` (the sizes: the integers on the way that equal ``length``); None
    otherwise (a transposed parameter, a value computed from the input)."""
    sizes: list[tuple[str, int]] = []
    name = ref.name
    for _ in range(16):
        node = st.graph.nodes[name]
        if node.op == "param":
            ok = not node.attrs.get("transposed") and len(node.shape) > axis and _static(node.shape[axis]) == length
            return (node.name, axis, sizes) if ok else None
        step = None if st.data_dependent.get(name) else _axis_back(st, node, axis, length)
        if step is None:
            return None
        src, axis, handle = step
        sizes += [handle] if handle else []
        name = src.name
    return None


def _expansion_sizes(st: _State, ref, axis: int, n: int) -> list[tuple[str, int]] | None:
    """The integer arguments that make axis ``axis`` of ``ref`` ``n`` entries long, traced
    back (through elementwise ops and those of ``_axis_back``) to the expand that made it
    from one entry: (node, position in its sizes) of that expand and of every integer equal
    to ``n`` on the way. None when the trail is lost."""
    found: list[tuple[str, int]] = []
    name = ref.name
    for _ in range(32):
        node = st.graph.nodes[name]
        src = node.inputs[0] if node.inputs and isinstance(node.inputs[0], Ref) else None
        if node.op == "expand" and src is not None:
            sizes = node.attrs["sizes"]
            off = len(sizes) - len(_shape(st, src))
            if axis - off >= 0 and _static(_shape(st, src)[axis - off]) == 1 and sizes[axis] == n:
                return found + [(node.name, axis)]
        if node.op == "binary":
            # follow the operand that carries the n entries (the other broadcasts)
            src = next((r for r in node.inputs if isinstance(r, Ref) and len(_shape(st, r)) == len(node.shape)
                        and _static(_shape(st, r)[axis]) == n), None)
            if src is None:
                return None
            name = src.name
            continue
        step = _axis_back(st, node, axis, n)
        if step is None:
            return None
        src, axis, handle = step
        found += [handle] if handle else []
        name = src.name
    return None


@rule("sdpa")
def _sdpa(st: _State, node: Node, in_tags=None):
    q, k, v, mask = node.inputs
    qt, hq = _head_axis(st, q, "query")
    shared = [_shared_kv(st, r, hq) for r in (k, v)]
    if any(shared):
        if not all(shared):
            raise _Reject("keys and values are shared by the query heads differently")
        _mask_check(st, mask, hq)
        for ref in (k, v):
            shape = _shape(st, ref)
            if _static(shape[len(shape) - 3]) == hq > 1:
                # one K/V head repeated to the query heads by a constant: it follows the kept heads
                trail = _expansion_sizes(st, ref, len(shape) - 3, hq)
                if trail is None:
                    raise _Reject("keys and values repeated over the query heads in a way analysis "
                                  "cannot follow back to the expand")
                a, b = qt.channels(hq)
                for n, pos in trail:
                    st.constants.append(ShapeConstant(IntHandle(n, "sizes", pos), ConstantKind.SIZE, qt.root,
                                                      a, b, qt.block, qt.repeat, hq))
        _note_attention(st, node, q, qt, hq, None, None, None, None, _static(_shape(st, q)[-1]))
        for role, ref in (("k", k), ("v", v)):
            for a, t in _tags(st, ref).items():
                length = _static(_shape(st, ref)[a])
                st.roles.setdefault((t.root, *t.channels(length)), set()).add(role)
        st.tags[node.name] = {len(node.shape) - 3: qt}
        return
    kt, hk = _head_axis(st, k, "key")
    vt, hv = _head_axis(st, v, "value")
    if hk != hv or hq % hk:
        raise _Reject("query heads are not a multiple of key/value heads")
    rep = hq // hk
    if rep > 1:
        if not node.attrs.get("gqa"):
            raise _Reject("query and key head counts differ without grouped attention")
        kt_e = Tag(kt.root, kt.start, kt.block, kt.repeat * rep)
        vt_e = Tag(vt.root, vt.start, vt.block, vt.repeat * rep)
    else:
        kt_e, vt_e = kt, vt
    if (st.query_heads or _kv_heads_of(kt_e, hq) == 1) and kt_e.repeat > qt.repeat \
            and kt_e.repeat == vt_e.repeat and qt.repeat == 1:
        # grouped K/V: the query heads stay units of their own; each reads K/V head i // repeat
        st.uf_mod.union(("root", qt.root), ("root", kt.root))
        st.uf_mod.union(("root", qt.root), ("root", vt.root))
        st.kv_reads.append(dict(node=node.name, q=qt, k=kt_e, v=vt_e, heads=hq, expanded=rep == 1))
    else:
        st.join(qt, kt_e, hq)
        st.join(qt, vt_e, hq)
    _mask_check(st, mask, hq)
    qshape = _shape(st, q)
    _note_attention(st, node, q, qt, hq, k, kt, v, vt, _static(qshape[-1]))
    out_rank = len(node.shape)
    st.tags[node.name] = {out_rank - 3: qt}


def _kv_heads_of(t: Tag, length: int) -> int:
    """K/V heads behind an axis of ``length`` entries tagged ``t`` (repeated ``t.repeat`` times)."""
    return max(length // t.repeat, 1)


def _mask_check(st, mask, hq):
    if isinstance(mask, Ref):
        ms = _shape(st, mask)
        mrank = len(ms)
        if _tags(st, mask):
            raise _Reject("the attention mask carries channels")
        if mrank >= 3 and _static(ms[mrank - 3]) not in (1, None) and st.data_dependent.get(mask.name):
            if _static(ms[mrank - 3]) == hq:
                raise _Reject("a per-head attention mask computed from the input")


def _note_attention(st, node, q, qt, hq, k, kt, v, vt, head_dim):
    """Roles and head counts of one attention; ``k`` None: K/V shared by every query head
    (one K/V head that no unit owns)."""
    for role, ref, t in (("q", q, qt), ("k", k, kt), ("v", v, vt)):
        if ref is None:
            continue
        length = _static(_shape(st, ref)[len(_shape(st, ref)) - 3])
        a, b = t.channels(length)
        st.roles.setdefault((t.root, a, b), set()).add(role)
    if k is None:
        st.attention[qt.root] = dict(node=node.name, heads=hq, kv_heads=1, head_dim=head_dim)
        return
    kv_len = _static(_shape(st, k)[len(_shape(st, k)) - 3])
    kv_heads = kv_len // kt.repeat
    facts = dict(node=node.name, heads=hq, kv_heads=kv_heads, head_dim=head_dim)
    for t in (qt, kt, vt):
        st.attention[t.root] = facts


@rule("matmul")
def _matmul(st: _State, node: Node, in_tags=None):
    """Eager attention: scores = q @ k^T (contracting the head dim), out = probs @ v."""
    _product(st, node, *node.inputs)


@rule("baddbmm")
def _baddbmm(st: _State, node: Node, in_tags=None):
    """input + a @ b (scaled): the product as matmul; the added tensor (ALiBi's biases)
    broadcast against it like an elementwise operand."""
    addend, a, b = node.inputs
    _product(st, node, a, b)
    _broadcast(st, node, [Ref(node.name), *([addend] if isinstance(addend, Ref) else [])])


def _product(st: _State, node: Node, a, b):
    at, bt = _tags(st, a), _tags(st, b)
    sa, sb = _shape(st, a), _shape(st, b)
    ra, rb = len(sa), len(sb)
    shared = _shared_operand(st, node, bt, sb, at, ra)
    if shared:
        bt = {}
    if ra - 1 in at or rb - 2 in bt:
        raise _Reject("a matrix product contracts a channel axis")
    rank = len(node.shape)
    out: dict[int, Tag] = {}
    # batch dims broadcast like an elementwise op
    for o in range(rank - 2):
        ta = at.get(o - (rank - ra)) if o - (rank - ra) >= 0 else None
        tb = bt.get(o - (rank - rb)) if o - (rank - rb) >= 0 else None
        da = _static(sa[o - (rank - ra)]) if o - (rank - ra) >= 0 else 1
        db = _static(sb[o - (rank - rb)]) if o - (rank - rb) >= 0 else 1
        if (ta and ta.period) or (tb and tb.period):
            if not (ta and tb and ta.period == tb.period):
                raise _Reject("heads merged into a batch axis meet a tensor outside the structure")
            st.join(ta, tb, ta.period)
        elif ta and tb and 1 in (da, db) and da != db:
            pass        # one K/V head broadcast to every query head (multi-query): it belongs to no unit
        elif ta and tb:
            st.join(ta, tb, _static(node.shape[o]))
        elif shared and ta and db == da:
            _expanded_with_heads(st, b, o - (rank - rb), ta, da)
        elif (ta and db not in (1,)) or (tb and da not in (1,)):
            raise _Reject("a matrix product pairs heads with a tensor outside the structure")
        if ta or tb:
            out[o] = tb if ta is None or (tb is not None and da == 1) else ta
    if ra - 2 in at:
        out[rank - 2] = at[ra - 2]
    if rb - 1 in bt:
        out[rank - 1] = bt[rb - 1]
    if rank - 2 in out or rank - 1 in out:
        raise _Reject("a matrix product keeps channels on a feature axis")
    st.tags[node.name] = out
    # role bookkeeping for eager attention: the operand that went through softmax is the
    # probability map; the other operand of that product is v, those of the first are q, k
    for ref, tags in ((a, at), (b, bt)):
        t = tags.get(len(_shape(st, ref)) - 3)
        if t is None:
            continue
        length = _span(t, _shape(st, ref)[len(_shape(st, ref)) - 3])
        ch = t.channels(length)
        if _through_softmax(st, a):
            role = "v" if ref is b else None
        else:
            role = "q" if ref is a else "k"
        if role:
            st.roles.setdefault((t.root, *ch), set()).add(role)
            st.attention.setdefault(t.root, dict(node=node.name, heads=length if role == "q" else None,
                                                 kv_heads=None, head_dim=None))


def _shared_operand(st: _State, node: Node, tags: dict, shape: tuple, other: dict, other_rank: int) -> bool:
    """Multi-query attention written as matrix products: keys (transposed) or values of one
    head, expanded over the query heads, carry channels on their matrix axes only, while
    the other operand carries the query heads on a batch axis. Every query head reads them
    alike: they belong to no unit (pinned, so none may own them)."""
    rank = len(shape)
    if not tags or any(ax < rank - 2 for ax in tags) or not any(ax < other_rank - 2 for ax in other):
        return False
    for ax, t in tags.items():
        length = _static(shape[ax])
        if length is None:
            return False
    for ax, t in tags.items():
        st.pinned.append((t.root, *t.channels(_static(shape[ax])), f"{node.target} ({node.name})"))
    return True


def _expanded_with_heads(st: _State, ref, axis: int, qt: Tag, heads: int) -> None:
    """A shared operand expanded to ``heads`` entries on ``axis``: the sizes that make it so
    follow the number of kept query heads (as in sdpa's multi-query form)."""
    trail = _expansion_sizes(st, ref, axis, heads) if heads > 1 else []
    if trail is None:
        raise _Reject("keys and values repeated over the query heads in a way analysis "
                      "cannot follow back to the expand")
    a, b = qt.channels(heads)
    for n, pos in trail:
        st.constants.append(ShapeConstant(IntHandle(n, "sizes", pos), ConstantKind.SIZE, qt.root,
                                          a, b, qt.block, qt.repeat, heads))


def _through_softmax(st: _State, ref) -> bool:
    seen = 0
    name = ref.name
    while seen < 8:
        n = st.graph.nodes[name]
        if n.op == "softmax":
            return True
        refs = n.refs()
        if n.op not in ("unary", "binary", "where", "view", "permute") or not refs:
            return False
        name = refs[0]
        seen += 1
    return False
