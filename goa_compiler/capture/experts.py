"""Capture: a mixture-of-experts layer as one FFN per expert.

transformers 5 keeps a layer's experts as 3-D parameters (``gate_up_proj`` [E, 2I, H] or
``up_proj``, ``down_proj`` [E, H, I]; transposed in some families) and picks each token's
experts at run time (a gather of weights, or a grouped product): no projection there has
a parameter of its own for its weight, so analysis has nothing to follow. For capture,
each such module's 3-D parameters are split into E 2-D parameters (views of the same
storage, named ``<parameter>.<e>``), and its forward runs the experts as E ordinary FFNs
on every token, expert e's intermediate activations multiplied by the routing weight each
token gives it (zero where e is not among the token's top-k):

    out = sum_e  down_e( act(gate_e x) * up_e x * w_e(x) )

That is the routed layer's function (the routing weight is a per-token scalar, and the down
projection is linear), and each expert is then a depth-2 structure of its own whose level-2
input statistics are sums over the tokens routed to it, weighted by the squared routing
weight: its share of the layer's output error. Expert biases (GPT-OSS) stay: the level-2
bias is added as ``w_e * b_e`` after the product. The model is restored when capture ends.

Cost: every expert runs on every token (E / top-k times the expert products of the routed
form), in calibration and in the emitted ONNX.

Left in the routed form (and refused by analysis with its reason): modules with a norm
after each expert (it does not commute with the routing weight), and experts modules that
do not use transformers' experts interface (``has_gate``, ``num_experts``) or compute
something else than the per-expert form.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def piece_name(fused: str, expert: int) -> str:
    """The name of expert ``expert``'s share of the 3-D parameter ``fused``."""
    return f"{fused}.{expert}"


def fused_name(piece: str) -> str:
    """The 3-D parameter an expert's share (``piece_name``) belongs to."""
    return piece.rsplit(".", 1)[0]


def _up_name(m: torch.nn.Module) -> str:
    """The experts' level-1 parameter: gate and up fused, or up alone."""
    return "gate_up_proj" if getattr(m, "has_gate", None) else "up_proj"


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules that hold experts as 3-D parameters behind transformers' experts interface,
    whose per-expert form computes what their own (eager) forward does on a few tokens."""
    return [(name, m) for name, m in model.named_modules() if _splittable(m) and _same_function(m)]


def _splittable(m: torch.nn.Module) -> bool:
    up = _up_name(m)
    params = m._parameters
    return (isinstance(getattr(m, "num_experts", None), int) and hasattr(m, "has_gate")
            and not getattr(m, "has_post_expert_norm", False)
            and all(isinstance(params.get(p), torch.Tensor) and params[p].dim() == 3 for p in (up, "down_proj")))


def _same_function(m: torch.nn.Module, tokens: int = 4) -> bool:
    """Whether ``per_expert_forward`` equals the module's own eager forward (the function
    transformers' experts interface wraps) on a few random tokens routed to two experts."""
    eager = getattr(type(m).forward, "__wrapped__", None)
    if eager is None:
        return False
    up = m._parameters[_up_name(m)]
    hidden = m._parameters["down_proj"].shape[2 if m.is_transposed else 1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(up.dtype)
    k = min(2, m.num_experts)
    index = torch.stack([torch.randperm(m.num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1).to(up.dtype)
    try:
        with torch.no_grad():
            want = eager(m, x, index, weights)
            got = _split_call(m, x, index, weights)
    except Exception:  # noqa: BLE001 - a module whose forward takes other arguments stays as it is
        return False
    scale = float(want.abs().max().clamp_min(1e-12))
    return bool(want.shape == got.shape and float((want - got).abs().max()) <= 1e-4 * scale)


def _split_call(m: torch.nn.Module, x, index, weights) -> torch.Tensor:
    """``per_expert_forward`` on the module's own 3-D parameters (indexed per expert)."""
    view = types.SimpleNamespace(**{n: getattr(m, n) for n in ("has_gate", "is_transposed", "num_experts")},
                                 has_bias=getattr(m, "has_bias", False), act_fn=getattr(m, "act_fn", None),
                                 _apply_gate=getattr(m, "_apply_gate", None), **dict(m._parameters))
    return per_expert_forward(view, x, index, weights)


def _names(m: torch.nn.Module) -> list[str]:
    up = _up_name(m)
    names = [up, "down_proj"]
    if getattr(m, "has_bias", False):
        names += [f"{up}_bias", "down_proj_bias"]
    return [n for n in names if isinstance(m._parameters.get(n), torch.Tensor)]


@contextmanager
def experts_as_ffns(model: torch.nn.Module, prefix: str = ""):
    """Within the block, every experts module runs as one FFN per expert (module docstring).
    Yields {piece parameter name: its expert}, the names under the model's own with
    ``prefix`` before them (a wrapper's)."""
    pieces: dict[str, int] = {}
    saved = []
    for mod_name, m in experts_modules(model):
        originals = {n: m._parameters[n] for n in _names(m)}
        order = dict(m._parameters)         # restored in this order (state_dict order)
        for n, p in originals.items():
            del m._parameters[n]
            setattr(m, n, torch.nn.ParameterList(
                [torch.nn.Parameter(p[e], requires_grad=p.requires_grad) for e in range(m.num_experts)]))
            fused = prefix + (f"{mod_name}.{n}" if mod_name else n)
            pieces.update({piece_name(fused, e): e for e in range(m.num_experts)})
        m.forward = types.MethodType(per_expert_forward, m)
        saved.append((m, originals, order))
    try:
        yield pieces
    finally:
        for m, originals, order in saved:
            del m.forward
            for n in originals:
                delattr(m, n)
            m._parameters.clear()
            m._parameters.update(order)


def per_expert_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts interface's forward, one FFN per expert on every token (module docstring)."""
    up = getattr(self, _up_name(self))
    biased = getattr(self, "has_bias", False)
    up_bias = getattr(self, f"{_up_name(self)}_bias") if biased else None
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        w = (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(dim=-1, keepdim=True)
        h = _linear(hidden_states, up[e], up_bias[e] if biased else None, self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _linear(h * w.to(h.dtype), self.down_proj[e], None, self.is_transposed)
        if biased:
            y = y + w.to(y.dtype) * self.down_proj_bias[e]
        out = out + y.to(out.dtype)
    return out


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x times one expert's weight: [out, in] as nn.Linear keeps it, or [in, out] (transposed)."""
    if transposed:
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)
