"""Structure discovery on captured graphs: what is found, and what is refused and why."""
from __future__ import annotations

import torch
import pytest

from goa_compiler.capture.torch_export import capture
from goa_compiler.frontends.fx import from_fx
from goa_compiler.analysis import analyze_graph
from models import tiny


class _Out:
    def __init__(self, logits):
        self.logits = logits


class ToyLM(torch.nn.Module):
    """A residual LM whose FFN is up -> mix -> down, with a configurable mixing op."""

    def __init__(self, mix: str, vocab=32, d=16, inner=24):
        super().__init__()
        self.config = type("C", (), {"vocab_size": vocab})()
        self.emb = torch.nn.Embedding(vocab, d)
        self.up = torch.nn.Linear(d, inner)
        self.down = torch.nn.Linear(inner, d)
        self.head = torch.nn.Linear(d, vocab)
        self.norm = torch.nn.LayerNorm(inner)
        self.mix = mix

    def forward(self, input_ids=None, attention_mask=None, use_cache=False):
        x = self.emb(input_ids)
        h = self.up(x)
        if self.mix == "relu":
            h = torch.relu(h)
        elif self.mix == "layernorm":
            h = self.norm(h)
        elif self.mix == "softmax":
            h = torch.softmax(h, dim=-1)
        elif self.mix == "flip":
            h = h.flip(-1)
        return _Out(self.head(x + self.down(h)))


def _analyze(model, kind="causal-lm"):
    return analyze_graph(from_fx(capture(model, kind).gm))


def test_plain_ffn_is_found():
    a = _analyze(ToyLM("relu").eval())
    assert [s.kind for s in a.structures] == ["ffn"]
    s = a.structures[0]
    assert s.units == 24 and s.unit_channels == 1
    roles = {sl.role for sl in s.slices}
    assert roles == {"up", "bias", "down"}


@pytest.mark.parametrize("mix,reason", [
    ("layernorm", "normalises over a channel axis"),
    ("softmax", "softmax over a channel axis"),
    ("flip", "cannot follow"),
])
def test_mixing_across_channels_is_refused_with_a_reason(mix, reason):
    a = _analyze(ToyLM(mix).eval())
    assert a.structures == ()
    refused = [r for r in a.refused if r.candidate]
    assert refused, a.refused
    assert any(reason in r.reason for r in refused), [r.reason for r in refused]
    assert all("\n" not in r.reason for r in a.refused)


def test_gqa_units_are_whole_groups():
    model, _, kind = tiny.build("llama-gqa")
    a = _analyze(model, kind)
    att = [s for s in a.structures if s.kind == "attention"]
    cfg = model.config
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    for s in att:
        assert s.granularity == "kv-group"
        assert (s.heads, s.kv_heads, s.head_dim) == (cfg.num_attention_heads, cfg.num_key_value_heads, d)
        assert s.units == cfg.num_key_value_heads
        q, = s.by_role("q")
        k, = s.by_role("k")
        o, = s.by_role("o")
        # unit g owns query heads g*rep .. g*rep+rep-1 and K/V head g
        for g in range(s.units):
            heads = sorted(set((q.index[g] // d).tolist()))
            assert heads == list(range(g * rep, (g + 1) * rep))
            assert sorted(set((k.index[g] // d).tolist())) == [g]
            assert sorted(set((o.index[g] // d).tolist())) == heads
        # the repeat_kv expand/reshape sizes are recorded to be patched
        assert {c.original for c in s.constants} >= {cfg.num_key_value_heads, cfg.num_attention_heads}


def test_gpt2_fused_qkv_offsets():
    model, _, kind = tiny.build("gpt2")
    a = _analyze(model, kind)
    s = next(s for s in a.structures if s.kind == "attention")
    E = model.config.n_embd
    d = E // model.config.n_head
    q, k, v = (s.by_role(r)[0] for r in "qkv")
    assert q.param == k.param == v.param and q.axis == 1   # Conv1D weight is [in, out]
    assert q.index[1].min() == d and k.index[0].min() == E and v.index[0].min() == 2 * E
    # the split sizes of c_attn are constants to patch
    assert sum(1 for c in s.constants if c.kind == "split") == 3


def test_tied_lm_head_is_not_prunable_but_does_not_block_the_rest():
    model, _, kind = tiny.build("opt")
    a = _analyze(model, kind)
    assert len(a.structures) == 2 * model.config.num_hidden_layers
    head = [r for r in a.refused if "lm_head" in (r.param or "")]
    assert head and not head[0].candidate
