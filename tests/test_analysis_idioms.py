"""Analysis rules for the idioms beyond plain linear + view + sdpa, on hand-built graph views
(the way frontends/fx.py builds them from torch.export): multi-query attention whose single
K/V head is picked from a fused projection by a constant index, interleaved rotary
(stack + flatten), a fused axis taken apart by select, and the refusals that guard them."""
from __future__ import annotations

import numpy as np

from goa_compiler.analysis import analyze_graph
from test_analysis_rules import B, D, S, View, _heads  # tests/ is on sys.path under pytest
from goa_compiler.ir.graph import Ref


def _index(g: View, x: Ref, axis: int, value: int) -> Ref:
    shape = list(g.shape(x))
    shape[axis] = 1
    idx = g._add("param", [], (1,), {"name": f"const{len(g.nodes)}"})
    return g._add("index", [x, idx], shape, {"axes": [axis], "values": [[value]]})


def _mqa(value_index=-1) -> View:
    """Falcon's multi-query layout: one projection [4 query heads | k | v] of head size 4,
    viewed [B, S, 6, 4]; queries are a slice, K and V constant indices from the end."""
    g = View()
    qkv = g.view(g.linear(g.x, "h.0.qkv.weight", 24, "qkv"), B, S, 6, 4, name="heads")
    q = g.permute(g._add("slice", [qkv], (B, S, 4, 4), {"dim": 2, "start": 0, "end": -2, "step": 1}), 0, 2, 1, 3)
    k = g.permute(_index(g, qkv, 2, -2), 0, 2, 1, 3)
    v = g.permute(_index(g, qkv, 2, value_index), 0, 2, 1, 3)
    att = g._add("sdpa", [q, k, v, None], (B, 4, S, 4), {"gqa": False}, "sdpa")
    merged = g.view(g.permute(att, 0, 2, 1, 3), B, S, D, name="merge")
    g.out = g.binary(g.x, g.linear(merged, "h.0.dense.weight", D, "dense"))
    return g


def test_multi_query_units_are_query_heads_and_the_kv_head_stays():
    g = _mqa()
    (s,) = analyze_graph(g.graph(g.out)).structures
    assert (s.kind, s.granularity, s.units, s.heads, s.kv_heads) == ("attention", "head", 4, 4, 1)
    # unit h owns rows 4h..4h+3 of the fused projection (its query head) and nothing of K/V
    (q,) = s.by_role("q")
    np.testing.assert_array_equal(q.index, np.arange(16).reshape(4, 4))
    assert not s.by_role("k") and not s.by_role("v")
    np.testing.assert_array_equal(s.by_role("o")[0].index, np.arange(16).reshape(4, 4))


def test_a_positive_constant_index_into_the_heads_is_refused():
    g = _mqa(value_index=5)
    a = analyze_graph(g.graph(g.out))
    assert a.structures == ()
    assert "one constant counted from its end" in a.refused[0].reason


def test_interleaved_rotary_keeps_the_heads():
    """GPT-J: x1 = x[..., ::2], x2 = x[..., 1::2]; stack((-x2, x1), -1).flatten(-2)."""
    g = View()
    q = _heads(g, g.linear(g.x, "h.0.q.weight", 16, "q"), 4, "qh")
    k = _heads(g, g.linear(g.x, "h.0.k.weight", 16, "k"), 4, "kh")
    v = _heads(g, g.linear(g.x, "h.0.v.weight", 16, "v"), 4, "vh")

    def rotate(x):
        even = g._add("slice", [x], (B, 4, S, 2), {"dim": 3, "start": 0, "end": None, "step": 2})
        odd = g._add("slice", [x], (B, 4, S, 2), {"dim": 3, "start": 1, "end": None, "step": 2})
        st = g._add("stack", [g.unary(odd), even], (B, 4, S, 2, 2), {"dim": 4})
        return g.binary(x, g._add("view", [st], (B, 4, S, 4), {"sizes": []}))

    att = g.sdpa(rotate(q), rotate(k), v, gqa=False)
    merged = g.view(g.permute(att, 0, 2, 1, 3), B, S, D, name="merge")
    out = g.binary(g.x, g.linear(merged, "h.0.o.weight", D, "o"))
    (s,) = analyze_graph(g.graph(out)).structures
    assert (s.kind, s.units, s.level1_nodes) == ("attention", 4, ["q", "k", "v"])


def test_select_on_a_fused_axis_and_on_the_heads():
    """Bloom-like [B, S, heads, 3, d] with select on the 3: followed; select of one head: refused."""
    g = View()
    fused = g.view(g.linear(g.x, "h.0.qkv.weight", 48, "qkv"), B, S, 4, 3, 4, name="fused")
    q, k, v = (g.permute(g._add("select", [fused], (B, S, 4, 4), {"dim": 3, "index": i}), 0, 2, 1, 3)
               for i in range(3))
    merged = g.view(g.permute(g.sdpa(q, k, v, gqa=False), 0, 2, 1, 3), B, S, D, name="merge")
    out = g.binary(g.x, g.linear(merged, "h.0.dense.weight", D, "dense"))
    (s,) = analyze_graph(g.graph(out)).structures
    assert (s.units, s.unit_channels) == (4, 4)
    # head h owns the 12 fused rows 12h..12h+11 (its q, k and v)
    np.testing.assert_array_equal(s.level1()[0].index, np.arange(48).reshape(4, 12))

    g = View()
    heads = g.view(g.linear(g.x, "h.0.up.weight", 16, "up"), B, S, 4, 4, name="heads")
    one = g._add("select", [heads], (B, S, 4), {"dim": 2, "index": 0})
    out = g.binary(g.x, g.linear(one, "h.0.down.weight", D, "down"))
    a = analyze_graph(g.graph(out))
    assert a.structures == () and "selects one entry of a channel axis" in a.refused[0].reason


def test_a_single_channel_entry_broadcast_is_refused():
    g = View()
    one = _index(g, g.view(g.linear(g.x, "h.0.up.weight", 16, "up"), B, S, 4, 4, name="heads"), 2, -1)
    wide = g.binary(one, g._add("input", [], (B, S, 3, 4), name="y"))
    out = g.binary(g.x, g.linear(g.view(wide, B, S, 12), "h.0.down.weight", D, "down"))
    a = analyze_graph(g.graph(out))
    assert a.structures == () and "broadcasts a channel axis of one entry" in a.refused[0].reason


def test_a_constant_index_from_the_end_before_the_units_is_refused():
    """[k | v | 4 query heads] with K/V picked as entries -6 and -5: removing a query head
    would move what those indices pick, so the structure is refused."""
    g = View()
    qkv = g.view(g.linear(g.x, "h.0.qkv.weight", 24, "qkv"), B, S, 6, 4, name="heads")
    q = g.permute(g._add("slice", [qkv], (B, S, 4, 4), {"dim": 2, "start": 2, "end": None, "step": 1}), 0, 2, 1, 3)
    k = g.permute(_index(g, qkv, 2, -6), 0, 2, 1, 3)
    v = g.permute(_index(g, qkv, 2, -5), 0, 2, 1, 3)
    att = g._add("sdpa", [q, k, v, None], (B, 4, S, 4), {"gqa": False}, "sdpa")
    merged = g.view(g.permute(att, 0, 2, 1, 3), B, S, D, name="merge")
    a = analyze_graph(g.graph(g.binary(g.x, g.linear(merged, "h.0.dense.weight", D, "dense"))))
    assert a.structures == ()
    assert "selects or follows channels of a unit" in a.refused[0].reason


def _eager_attention(g: View, q: Ref, k: Ref, v: Ref, mask: Ref | None = None) -> Ref:
    scores = g.matmul(q, g.permute(k, 0, 1, 3, 2))
    if mask is not None:
        scores = g._add("where", [mask, scores, scores], g.shape(scores))
    merged = g.view(g.permute(g.matmul(g.softmax(scores, 3), v), 0, 2, 1, 3), B, S, D, name="merge")
    return g.binary(g.x, g.linear(merged, "h.0.o.weight", D, "o"))


def test_a_mask_expanded_as_the_scores_follows_their_heads():
    """XLM: mask [B, 1, 1, S] expand_as(scores [B, 4, S, S]), then masked_fill of the
    scores: the expanded heads axis takes its size from the scores, so it carries their
    heads; a full-size tensor without channels expanded as them is refused."""
    g = View()
    q, k, v = (_heads(g, g.linear(g.x, f"h.0.{n}.weight", 16, n), 4, f"{n}h") for n in "qkv")
    mask = g._add("input", [], (B, 1, 1, S), {"integer": True}, name="mask")
    probe = g.matmul(q, g.permute(k, 0, 1, 3, 2))
    full = g._add("expand_as", [mask, probe], (B, 4, S, S), name="full_mask")
    (s,) = analyze_graph(g.graph(_eager_attention(g, q, k, v, full))).structures
    assert (s.kind, s.units) == ("attention", 4)

    g = View()
    q, k, v = (_heads(g, g.linear(g.x, f"h.0.{n}.weight", 16, n), 4, f"{n}h") for n in "qkv")
    per_head = g._add("input", [], (B, 4, S, S), {"integer": True}, name="per_head")
    probe = g.matmul(q, g.permute(k, 0, 1, 3, 2))
    full = g._add("expand_as", [per_head, probe], (B, 4, S, S), name="full_mask")
    a = analyze_graph(g.graph(_eager_attention(g, q, k, v, full)))
    assert a.structures == ()
    assert any("expands a tensor along channels it does not carry" in r.reason for r in a.refused)


def test_reshape_as_a_tensor_pruned_alike_keeps_the_heads():
    """RoFormer's rotary: stack((-x[..., 1::2], x[..., ::2]), -1).reshape_as(x): the sizes are
    x's, which carries the same heads; reshaped as a tensor pruned otherwise it is refused."""
    def graph(like_of):
        g = View()
        q, k, v = (_heads(g, g.linear(g.x, f"h.0.{n}.weight", 16, n), 4, f"{n}h") for n in "qkv")
        even = g._add("slice", [q], (B, 4, S, 2), {"dim": 3, "start": 0, "end": None, "step": 2})
        odd = g._add("slice", [q], (B, 4, S, 2), {"dim": 3, "start": 1, "end": None, "step": 2})
        st = g._add("stack", [g.unary(odd), even], (B, 4, S, 2, 2), {"dim": 4})
        like = like_of(g, q)
        rotated = g._add("view", [st, like], (B, 4, S, 4), {"sizes": [], "like": like})
        return g.graph(_eager_attention(g, g.binary(q, rotated), k, v))

    (s,) = analyze_graph(graph(lambda g, q: q)).structures
    assert (s.kind, s.units) == ("attention", 4)
    a = analyze_graph(graph(lambda g, q: g._add("input", [], (B, 4, S, 4), name="dense_shaped")))
    assert a.structures == ()
    assert any("reshapes channels to the shape of a tensor that does not carry them alike" in r.reason
               for r in a.refused)
