"""Analysis rules on hand-built graph views (no torch): a grouped-K/V attention, a fused QKV
taken apart by a split, a gated FFN, and refusals with their reasons. Each view is built
node by node the way ``frontends/fx.py`` would build it from a torch.export graph."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from goa_compiler.analysis import analyze_graph
from goa_compiler.ir.graph import Graph, Node, Port, Ref
from goa_compiler.ir.structure import ConstantKind, IntHandle, Refusal, ShapeConstant

B, S, D = 2, 5, 16      # batch, sequence, hidden


class View:
    """A tiny builder of graph views: the input ``x`` [B, S, D], then one normalised node per
    method call (each returns its Ref)."""

    def __init__(self):
        self.nodes: dict[str, Node] = {}
        self.params: dict[str, str] = {}
        self.param_shapes: dict[str, tuple] = {}
        self.x = self._add("input", [], (B, S, D), name="x")

    def _add(self, op, inputs, shape, attrs=None, name=None) -> Ref:
        name = name or f"{op}_{len(self.nodes)}"
        assert name not in self.nodes, name
        self.nodes[name] = Node(name, op, list(inputs), None if shape is None else tuple(shape),
                                dict(attrs or {}), target=op)
        return Ref(name)

    def shape(self, r: Ref) -> tuple:
        return self.nodes[r.name].shape

    def param(self, pname: str, shape: tuple) -> Ref:
        node = "p_" + pname.replace(".", "_")
        self.params[node] = pname
        self.param_shapes[pname] = tuple(shape)
        return self._add("param", [], shape, {"name": pname}, node)

    def linear(self, x: Ref, weight: str, out: int, name: str, bias: str | None = None) -> Ref:
        """nn.Linear: weight [out, in], inputs [x, weight, bias or None]."""
        w = self.param(weight, (out, self.shape(x)[-1]))
        b = self.param(bias, (out,)) if bias else None
        return self._add("linear", [x, w, b], self.shape(x)[:-1] + (out,), {"w_out_axis": 0}, name)

    def view(self, x: Ref, *sizes: int, name=None) -> Ref:
        return self._add("view", [x], sizes, {"sizes": list(sizes)}, name)

    def permute(self, x: Ref, *dims: int) -> Ref:
        return self._add("permute", [x], [self.shape(x)[d] for d in dims], {"dims": list(dims)})

    def unary(self, x: Ref, activation=False) -> Ref:
        return self._add("unary", [x], self.shape(x), {"activation": activation})

    def binary(self, a: Ref, b: Ref) -> Ref:
        return self._add("binary", [a, b], np.broadcast_shapes(self.shape(a), self.shape(b)))

    def split(self, x: Ref, dim: int, sizes: list[int], name: str) -> list[Ref]:
        pieces = [tuple(s if a == dim else d for a, d in enumerate(self.shape(x))) for s in sizes]
        node = self._add("split", [x], pieces, {"dim": dim, "sizes": list(sizes)}, name)
        return [self._add("getitem", [node], p, {"index": i}) for i, p in enumerate(pieces)]

    def sdpa(self, q: Ref, k: Ref, v: Ref, gqa: bool, name="sdpa") -> Ref:
        shape = self.shape(q)[:-1] + self.shape(v)[-1:]
        return self._add("sdpa", [q, k, v, None], shape, {"gqa": gqa}, name)

    def matmul(self, a: Ref, b: Ref) -> Ref:
        sa, sb = self.shape(a), self.shape(b)
        return self._add("matmul", [a, b], np.broadcast_shapes(sa[:-2], sb[:-2]) + (sa[-2], sb[-1]))

    def softmax(self, x: Ref, dim: int) -> Ref:
        return self._add("softmax", [x], self.shape(x), {"dim": dim})

    def mean(self, x: Ref, dims: list[int]) -> Ref:     # keepdim=True
        shape = [1 if a in dims else d for a, d in enumerate(self.shape(x))]
        return self._add("reduce", [x], shape, {"dims": dims, "keepdim": True})

    def graph(self, *outs: Ref) -> Graph:
        self._add("output", outs, None, name="output")
        return Graph(dict(self.nodes), dict(self.params), dict(self.param_shapes), [o.name for o in outs])


def _heads(g: View, t: Ref, n: int, name: str) -> Ref:
    """[B, S, n*4] -> [B, n, S, 4], like `x.view(b, s, n, d).transpose(1, 2)`."""
    return g.permute(g.view(t, B, S, n, 4, name=name), 0, 2, 1, 3)


def _attention_out(g: View, q: Ref, k: Ref, v: Ref, gqa: bool) -> Ref:
    """sdpa, back to [B, S, 16] (node "merge"), o_proj, residual add."""
    att = g.view(g.permute(g.sdpa(q, k, v, gqa), 0, 2, 1, 3), B, S, D, name="merge")
    return g.binary(g.x, g.linear(att, "layers.0.attn.o_proj.weight", D, "o_proj"))


def _slice(s, role):
    (sl,) = s.by_role(role)
    return sl


def _grouped_attention(gqa: bool) -> Graph:
    """4 query heads of 4 reading 2 K/V heads."""
    g = View()
    q = _heads(g, g.linear(g.x, "layers.0.attn.q_proj.weight", 16, "q_proj"), 4, "q_heads")
    k = _heads(g, g.linear(g.x, "layers.0.attn.k_proj.weight", 8, "k_proj"), 2, "k_heads")
    v = _heads(g, g.linear(g.x, "layers.0.attn.v_proj.weight", 8, "v_proj"), 2, "v_heads")
    return g.graph(_attention_out(g, q, k, v, gqa))


def test_grouped_kv_attention_units_are_kv_groups():
    a = analyze_graph(_grouped_attention(gqa=True))

    (s,) = a.structures
    assert (s.name, s.kind, s.granularity) == ("layer0.attention", "attention", "kv-group")
    assert (s.units, s.unit_channels, s.heads, s.kv_heads, s.head_dim) == (2, 8, 4, 2, 4)
    assert s.level1_nodes == ["q_proj", "k_proj", "v_proj"] and s.level2_node == "o_proj"
    assert (s.probes.level1_input, s.probes.level2_input, s.probes.attention) == ("x", "merge", "sdpa")
    assert [(sl.param, sl.axis, sl.role) for sl in s.slices] == [
        ("layers.0.attn.q_proj.weight", 0, "q"), ("layers.0.attn.k_proj.weight", 0, "k"),
        ("layers.0.attn.v_proj.weight", 0, "v"), ("layers.0.attn.o_proj.weight", 1, "o")]
    # group g: query heads 2g, 2g+1 (rows 8g..8g+7), K/V head g (rows 4g..4g+3), and the
    # o_proj columns those query heads produce
    np.testing.assert_array_equal(_slice(s, "q").index, np.arange(16).reshape(2, 8))
    np.testing.assert_array_equal(_slice(s, "k").index, np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(_slice(s, "v").index, np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(_slice(s, "o").index, [list(range(8)), list(range(8, 16))])
    # the head counts in the views, and the merged width, are recorded to be patched
    size = ConstantKind.SIZE
    assert s.constants == (
        ShapeConstant(IntHandle("q_heads", "sizes", 2), size, "q_proj", 0, 16, 4, 1, 4),
        ShapeConstant(IntHandle("k_heads", "sizes", 2), size, "k_proj", 0, 8, 4, 1, 2),
        ShapeConstant(IntHandle("v_heads", "sizes", 2), size, "v_proj", 0, 8, 4, 1, 2),
        ShapeConstant(IntHandle("merge", "sizes", 2), size, "q_proj", 0, 16, 4, 4, 16))
    # o_proj's own output joins the residual stream: no level 1, and not a candidate
    assert [(r.node, r.param, r.candidate) for r in a.refused] == [
        ("o_proj", "layers.0.attn.o_proj.weight", False)]
    assert "(the residual stream)" in a.refused[0].reason


def test_grouped_heads_without_the_gqa_flag_are_refused():
    a = analyze_graph(_grouped_attention(gqa=False))
    assert a.structures == ()
    assert [(r.node, r.candidate) for r in a.refused] == [
        ("q_proj", True), ("k_proj", True), ("v_proj", True), ("o_proj", False)]
    assert all(r.reason == "sdpa (sdpa): query and key head counts differ without grouped attention"
               for r in a.refused[:3])


def test_fused_qkv_taken_apart_by_a_split():
    g = View()
    qkv = g.linear(g.x, "layers.0.attn.qkv_proj.weight", 3 * D, "qkv_proj")
    q, k, v = (_heads(g, t, 4, f"{n}_heads") for t, n in zip(g.split(qkv, 2, [D] * 3, "split"), "qkv"))
    a = analyze_graph(g.graph(_attention_out(g, q, k, v, gqa=False)))

    (s,) = a.structures
    assert (s.kind, s.granularity, s.units, s.heads, s.kv_heads, s.head_dim) == (
        "attention", "head", 4, 4, 4, 4)
    assert s.level1_nodes == ["qkv_proj"] and s.roots == {"qkv_proj": 48}
    assert [(sl.param, sl.axis, sl.role) for sl in s.slices] == [
        ("layers.0.attn.qkv_proj.weight", 0, "q"), ("layers.0.attn.qkv_proj.weight", 0, "k"),
        ("layers.0.attn.qkv_proj.weight", 0, "v"), ("layers.0.attn.o_proj.weight", 1, "o")]
    head = np.arange(16).reshape(4, 4)           # head h owns rows 4h..4h+3 of each piece
    for role, offset in (("q", 0), ("k", 16), ("v", 32)):
        np.testing.assert_array_equal(_slice(s, role).index, head + offset)
    np.testing.assert_array_equal(_slice(s, "o").index, head)
    np.testing.assert_array_equal(s.root_index["qkv_proj"],
                                  np.concatenate([head, head + 16, head + 32], axis=1))
    splits = [c for c in s.constants if c.kind == "split"]
    assert splits == [ShapeConstant(IntHandle("split", "sizes", i), ConstantKind.SPLIT, "qkv_proj",
                                    16 * i, 16 * (i + 1), 1, 1, 16) for i in range(3)]
    assert [(c.handle.node, c.start, c.stop, c.original) for c in s.constants if c.kind == "size"] == [
        ("q_heads", 0, 16, 4), ("k_heads", 16, 32, 4), ("v_heads", 32, 48, 4), ("merge", 0, 16, 16)]


def test_one_kv_head_broadcast_by_eager_matmuls_belongs_to_no_unit():
    """Multi-query attention written as matmuls (Falcon as TorchScript torch.onnx, Optimum,
    writes it): q [B, 4, S, 4] @ k^T [B, 1, 4, S] broadcasts the one K/V head over the query
    heads. The query heads are the units; the K/V channels stay whole."""
    g = View()
    q = _heads(g, g.linear(g.x, "layers.0.attn.q_proj.weight", 16, "q_proj"), 4, "q_heads")
    k = _heads(g, g.linear(g.x, "layers.0.attn.k_proj.weight", 4, "k_proj"), 1, "k_heads")
    v = _heads(g, g.linear(g.x, "layers.0.attn.v_proj.weight", 4, "v_proj"), 1, "v_heads")
    probs = g.softmax(g.matmul(q, g.permute(k, 0, 1, 3, 2)), 3)
    att = g.view(g.permute(g.matmul(probs, v), 0, 2, 1, 3), B, S, D, name="merge")
    a = analyze_graph(g.graph(g.binary(g.x, g.linear(att, "layers.0.attn.o_proj.weight", D, "o_proj"))))

    (s,) = a.structures
    assert (s.kind, s.units, s.unit_channels) == ("attention", 4, 4)
    assert s.level1_nodes == ["q_proj"]                 # k_proj, v_proj: read by every head, kept
    np.testing.assert_array_equal(_slice(s, "o").index, np.arange(16).reshape(4, 4))


def _ffn(mix) -> Graph:
    """x -> up [24] -> mix -> down -> + x. ``mix(g, up) -> Ref`` may add a gate."""
    g = View()
    x = g.x
    h = mix(g, g.linear(x, "layers.1.mlp.up_proj.weight", 24, "up_proj"))
    return g.graph(g.binary(x, g.linear(h, "layers.1.mlp.down_proj.weight", D, "down_proj")))


def test_gated_ffn_units_are_neurons():
    def gate(g, up):
        act = g.unary(g.linear(g.x, "layers.1.mlp.gate_proj.weight", 24, "gate_proj"), True)
        return g.binary(act, up)

    a = analyze_graph(_ffn(gate))
    (s,) = a.structures
    assert (s.name, s.kind, s.granularity, s.units, s.unit_channels) == ("layer1.ffn", "ffn", "neuron", 24, 1)
    assert (s.heads, s.kv_heads, s.head_dim, s.constants) == (None, None, None, ())
    assert [(sl.param, sl.axis, sl.role) for sl in s.slices] == [
        ("layers.1.mlp.up_proj.weight", 0, "up"), ("layers.1.mlp.gate_proj.weight", 0, "gate"),
        ("layers.1.mlp.down_proj.weight", 1, "down")]
    for sl in s.slices:
        np.testing.assert_array_equal(sl.index, np.arange(24).reshape(24, 1))
    assert [(r.node, r.candidate) for r in a.refused] == [("down_proj", False)]


def _refused_candidates(a):
    assert a.structures == ()
    assert [(r.node, r.param, r.candidate) for r in a.refused] == [
        ("up_proj", "layers.1.mlp.up_proj.weight", True),
        ("down_proj", "layers.1.mlp.down_proj.weight", False)]
    return a.refused[0].reason


def test_softmax_over_channels_is_refused_with_its_reason():
    reason = _refused_candidates(analyze_graph(_ffn(lambda g, up: g.softmax(up, 2))))
    assert "softmax over a channel axis" in reason and "softmax_" in reason   # names the node


def test_reduce_over_channels_is_refused_with_its_reason():
    reason = _refused_candidates(analyze_graph(_ffn(lambda g, up: g.binary(up, g.mean(up, [2])))))
    assert "reduces over a channel axis" in reason


def test_reduce_over_another_axis_keeps_the_structure():
    (s,) = analyze_graph(_ffn(lambda g, up: g.binary(up, g.mean(up, [1])))).structures
    assert (s.kind, s.units) == ("ffn", 24)


def test_a_tensor_computed_from_constants_is_gathered_with_the_channels():
    """A full-size tensor computed without the input's values (ALiBi's per-head biases)
    meeting the channels is read through a gather of the kept entries; one computed from
    the input's values refuses the structure (the residual stream, for flat channels)."""
    def constant(g, up):
        table = g._add("other", [], (24,), name="table")        # e.g. arange / pow of constants
        return g.binary(up, g.unary(table))

    (s,) = analyze_graph(_ffn(constant)).structures
    (o,) = s.operands
    assert (o.node, o.operand, o.axis) == ("binary_5", 1, 0)
    np.testing.assert_array_equal(o.index, np.arange(24).reshape(24, 1))

    def from_the_stream(g, up):        # the hidden states: computed from the input and a parameter
        mixed = g._add("other", [g.x, g.param("layers.1.mix", (24,))], (B, S, 24), name="mixed")
        return g.binary(up, mixed)

    a = analyze_graph(_ffn(from_the_stream))
    assert a.structures == ()
    assert "channels meet a tensor that is not part of the structure" in a.refused[0].reason

    def from_the_input(g, up):        # from the float input (the hidden states) alone
        return g.binary(up, g._add("other", [g.x], (B, S, 24), name="mixed"))

    a = analyze_graph(_ffn(from_the_input))
    assert a.structures == ()
    assert "(the residual stream)" in a.refused[0].reason

    def from_the_mask(g, up):         # from an integer input (a mask) and constants: gathered
        mask = g._add("input", [], (B, S), {"integer": True}, name="mask")
        return g.binary(up, g._add("other", [mask], (B, S, 24), name="positions"))

    (s,) = analyze_graph(_ffn(from_the_mask)).structures
    assert [(o.node, o.operand, o.axis) for o in s.operands] == [("binary_5", 1, 2)]


def test_projection_into_the_graph_output_is_no_candidate():
    g = View()
    a = analyze_graph(g.graph(g.linear(g.x, "lm_head.weight", 32, "lm_head")))
    assert a.structures == ()
    assert a.refused == (Refusal("lm_head", "lm_head.weight", "channels reach a model output", False),)


def test_analysis_and_ir_import_no_torch():
    code = ("import sys, goa_compiler.analysis, goa_compiler.ir.graph, goa_compiler.ir.structure; "
            "assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _cached_attention(ports: bool) -> Graph:
    """The grouped attention of a KV-cache decoder step: past keys/values [B, 2, 3, 4] are
    graph inputs, concatenated with this step's along the sequence axis, and returned."""
    g = View()
    q = _heads(g, g.linear(g.x, "layers.0.attn.q_proj.weight", 16, "q_proj"), 4, "q_heads")
    k = _heads(g, g.linear(g.x, "layers.0.attn.k_proj.weight", 8, "k_proj"), 2, "k_heads")
    v = _heads(g, g.linear(g.x, "layers.0.attn.v_proj.weight", 8, "v_proj"), 2, "v_heads")
    past = {n: g._add("input", [], (B, 2, 3, 4), name=n) for n in ("past_k", "past_v")}
    present_k = g._add("cat", [past["past_k"], k], (B, 2, 3 + S, 4), {"dim": 2}, "present_k")
    present_v = g._add("cat", [past["past_v"], v], (B, 2, 3 + S, 4), {"dim": 2}, "present_v")
    graph = g.graph(_attention_out(g, q, present_k, present_v, gqa=True), present_k, present_v)
    if ports:
        graph.ports = {n: Port(n, 1) for n in ("past_k", "past_v", "present_k", "present_v")}
    return graph


def test_kv_cache_ports_are_sliced_with_their_kv_groups():
    a = analyze_graph(_cached_attention(ports=True))

    (s,) = a.structures
    assert (s.granularity, s.units, s.kv_heads) == ("kv-group", 2, 2)
    assert [(p.port, p.axis) for p in s.ports] == [
        ("past_k", 1), ("past_v", 1), ("present_k", 1), ("present_v", 1)]
    for p in s.ports:           # K/V head g of every port belongs to K/V group g
        np.testing.assert_array_equal(p.index, [[0], [1]])


def test_without_ports_the_cache_refuses_the_attention():
    """Undeclared, the past keys are a foreign tensor that the new keys are joined with."""
    a = analyze_graph(_cached_attention(ports=False))

    assert [s.kind for s in a.structures] == []
    reasons = {r.node: r.reason for r in a.refused if r.candidate}
    assert reasons["k_proj"] == "cat (present_k): channels meet a tensor that is not part of the structure"


def test_a_fused_qkv_with_its_cache_keeps_its_roles():
    """GPT-2's form: q, k, v split from one projection, k and v concatenated after the past
    ones. The concatenation must carry the projection's channels, not the port's, or the k
    and v pieces of the fused weight lose their attention role (seen on GPT-2: 'part of a
    fused projection has no attention role')."""
    g = View()
    qkv = g.linear(g.x, "layers.0.attn.qkv_proj.weight", 3 * D, "qkv_proj")
    q, k, v = (_heads(g, t, 4, f"{n}_heads") for t, n in zip(g.split(qkv, 2, [D] * 3, "split"), "qkv"))
    past = {n: g._add("input", [], (B, 4, 3, 4), name=n) for n in ("past_k", "past_v")}
    present_k = g._add("cat", [past["past_k"], k], (B, 4, 3 + S, 4), {"dim": 2}, "present_k")
    present_v = g._add("cat", [past["past_v"], v], (B, 4, 3 + S, 4), {"dim": 2}, "present_v")
    graph = g.graph(_attention_out(g, q, present_k, present_v, gqa=False), present_k, present_v)
    graph.ports = {n: Port(n, 1) for n in ("past_k", "past_v", "present_k", "present_v")}
    (s,) = analyze_graph(graph).structures
    assert (s.kind, s.units) == ("attention", 4)
    assert [sl.role for sl in s.slices] == ["q", "k", "v", "o"]
    for p in s.ports:           # head h of every port belongs to head h
        np.testing.assert_array_equal(p.index, [[0], [1], [2], [3]])


def _merged_heads(g: View, t: Ref, name: str, symbolic: bool) -> Ref:
    """[B, S, 16] -> [B * 4, S, 4]: the heads merged into the batch axis, as Bloom and the
    fairseq-style attentions (XGLM, BART's relatives) write ``x.reshape(b * heads, s, d)``;
    the merged size a product of the batch and the head count (``symbolic``) or a number."""
    heads = g.permute(g.view(t, B, S, 4, 4, name=f"{name}_split"), 0, 2, 1, 3)
    size = g._add("ignore", [Ref("batch"), 4], None, {"product": True}, f"{name}_size") if symbolic else B * 4
    return g._add("view", [heads], (B * 4, S, 4), {"sizes": [size, -1, 4]}, name)


def test_heads_merged_into_the_batch_axis_are_units():
    """q, k, v [B * 4, S, 4], scores by baddbmm with ALiBi biases [B * 4, 1, S] computed from
    the mask, viewed back to [B, 4, S, S] for the mask, merged again for the product with v,
    split back and merged into the hidden axis: entry i of the merged axis is head i % 4."""
    g = View()
    g._add("ignore", [], None, name="batch")
    q, k, v = (_merged_heads(g, g.linear(g.x, f"layers.0.attn.{n}_proj.weight", D, f"{n}_proj"), f"{n}_heads",
                             symbolic=n != "k") for n in "qkv")
    mask = g._add("input", [], (B, S), {"integer": True}, name="mask")
    alibi = g._add("other", [mask], (B * 4, 1, S), name="alibi")
    scores = g._add("baddbmm", [alibi, q, g.permute(k, 0, 2, 1)], (B * 4, S, S), name="scores")
    per_head = g.view(scores, B, 4, S, S, name="per_head")
    probs = g._add("view", [g.softmax(per_head, 3)], (B * 4, S, S),
                   {"sizes": [Ref("q_heads_size"), S, S]}, "probs")
    out = g.view(g.matmul(probs, v), B, 4, S, 4, name="out_heads")
    att = g.view(g.permute(out, 0, 2, 1, 3), B, S, D, name="merge")
    a = analyze_graph(g.graph(g.binary(g.x, g.linear(att, "layers.0.attn.o_proj.weight", D, "o_proj"))))

    (s,) = a.structures
    assert (s.kind, s.granularity, s.units, s.unit_channels, s.heads) == ("attention", "head", 4, 4, 4)
    head = np.arange(16).reshape(4, 4)
    for role in "qkvo":
        np.testing.assert_array_equal(_slice(s, role).index, head)
    (o,) = s.operands                    # ALiBi: head h of every batch entry, gathered per period
    assert (o.node, o.operand, o.axis, o.period, o.shared) == ("scores", 0, 0, 4, ())
    np.testing.assert_array_equal(o.index, np.arange(4).reshape(4, 1))
    by_node = {(c.handle.node, c.handle.pos): c for c in s.constants}
    # the product's head count (its factor 4), a static merged size (2 batch entries of 4
    # heads: repeat 2), and the head count of a split back
    assert (by_node["q_heads", 0].original, by_node["q_heads", 0].repeat) == (4, 1)
    assert (by_node["k_heads", 0].original, by_node["k_heads", 0].repeat) == (8, 2)
    assert by_node["k_heads", 0].pruned_value(np.arange(4)) == 6          # one head of 4 gone
    assert by_node["per_head", 1].original == 4 and by_node["probs", 0].original == 4
    assert by_node["out_heads", 1].pruned_value(np.arange(8)) == 2


def test_merged_heads_meeting_a_tensor_outside_the_structure_are_refused():
    g = View()
    g._add("ignore", [], None, name="batch")
    q = _merged_heads(g, g.linear(g.x, "layers.0.attn.q_proj.weight", D, "q_proj"), "q_heads", symbolic=True)
    other = g._add("other", [g.x, g.param("side", (4,))], (B * 4, 4, S), name="side")
    scores = g.matmul(q, other)
    a = analyze_graph(g.graph(g.linear(g.view(scores, B, 4, S, S, name="back"), "lm_head.weight", 8, "lm")))
    assert a.structures == ()
    reasons = {r.node: r.reason for r in a.refused if r.candidate}
    assert "heads merged into a batch axis meet a tensor outside the structure" in reasons["q_proj"]


def test_a_merged_size_read_off_another_tensor_is_refused():
    """`x.reshape(alibi.size(0), s, d)`: a size that does not count the heads (it may come
    from a tensor that keeps every head) cannot be rewritten, so the structure is refused."""
    g = View()
    g._add("ignore", [], None, name="other_size")          # sym_size of some other tensor
    heads = g.permute(g.view(g.linear(g.x, "layers.0.attn.q_proj.weight", D, "q_proj"), B, S, 4, 4), 0, 2, 1, 3)
    merged = g._add("view", [heads], (B * 4, S, 4), {"sizes": [Ref("other_size"), -1, 4]}, "q_heads")
    back = g.view(g.view(merged, B, 4, S, 4), B, S, D, name="merge")
    a = analyze_graph(g.graph(g.binary(g.x, g.linear(back, "layers.0.attn.o_proj.weight", D, "o_proj"))))
    assert a.structures == ()
    reasons = {r.node: r.reason for r in a.refused if r.candidate}
    assert "heads merged into a batch axis by a value analysis cannot follow" in reasons["q_proj"]


def test_a_batch_computed_from_merged_heads_follows_the_kept_heads():
    """TorchScript's Bloom in ONNX: `batch = (batch * heads) // heads`, read off the merged
    tensor's shape (the ONNX view's symbol `shape(T)[0]`) and divided by the head count, sizes
    the merge back to [B, S, hidden]: the divisor is recorded to follow the kept heads. The
    same size without the division (it counts heads) is refused."""
    import sympy

    def graph(divided: bool):
        g = View()
        g._add("ignore", [], None, name="batch")
        q, k, v = (_merged_heads(g, g.linear(g.x, f"layers.0.attn.{n}_proj.weight", D, f"{n}_proj"),
                                 f"{n}_heads", symbolic=True) for n in "qkv")
        out = g.matmul(g.softmax(g.matmul(q, g.permute(k, 0, 2, 1)), 2), v)
        read = sympy.Symbol("shape(q_heads)[0]")
        batch = read / 4 if divided else read
        heads = g._add("view", [out], (B, 4, S, 4), {"sizes": [batch, 4, S, 4]}, "out_heads")
        merge = g._add("view", [g.permute(heads, 0, 2, 1, 3)], (B, S, D), {"sizes": [batch, S, D]}, "merge")
        return g.graph(g.binary(g.x, g.linear(merge, "layers.0.attn.o_proj.weight", D, "o_proj")))

    (s,) = analyze_graph(graph(divided=True)).structures
    by_node = {(c.handle.node, c.handle.pos): c for c in s.constants}
    assert by_node["out_heads", 0].original == 4 and by_node["merge", 0].original == 4
    assert by_node["merge", 0].pruned_value(np.arange(4)) == 3            # one head of 4 gone
    a = analyze_graph(graph(divided=False))
    assert a.structures == ()
    assert any("a reshape sizes an axis by the size of an axis with channels" in r.reason for r in a.refused)
