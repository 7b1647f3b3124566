"""Torch-Pruning (PyPI ``torch-pruning``, DepGraph) as the external peer of the benchmarks.

What it does, and what it cannot:
* The model is the same Hugging Face model goa-compiler compiles; calibration is the same
  token windows; importance is Torch-Pruning's own GroupTaylorImportance (|w * dL/dw| summed
  over each dependency group, from one backward pass of the LM loss on the calibration
  windows) or its activation-free GroupMagnitudeImportance.
* Its dependency tracing is known to stall on transformers' rotary embedding (Torch-Pruning
  issue #527, "no progress for a long time", Qwen3): as its users do, a simpler elementwise
  rotary function is swapped in only while the dependency graph is built, and the real one is
  put back before the model is used. (With torch-pruning 1.6.1 and transformers 5 on SmolLM2
  the tracing also finished without the swap here; the swap is kept so the peer runs the way
  its users run it.)
* Heads: Torch-Pruning 1.6.1 cannot prune the heads of grouped-query attention. With
  ``num_heads`` set for q/k/v as in its LLM example, ``MetaPruner._prune`` stops with
  "shape '[6, -1]' is invalid for input of size 32" on a tiny LLaMA with 6 query heads over
  2 K/V heads (the K/V group and the query heads disagree on the channel grouping); setting
  ``num_heads`` on q alone would silently re-pair query heads with K/V heads. So the peer
  prunes FFN neurons only, with the whole budget: the same number of parameters inside the
  same depth-2 structures as goa-compiler removes at that ratio, all from the FFNs (hidden
  size, embeddings and the LM head untouched, as for goa-compiler).
"""
from __future__ import annotations

import contextlib
import importlib

import torch


@contextlib.contextmanager
def simple_rotary(model):
    """Swap the modeling module's apply_rotary_pos_emb for an elementwise stand-in while
    Torch-Pruning traces the model (it only needs the channel dependencies, and the stand-in
    keeps q and k channel-aligned like the real rotation does)."""
    mod = importlib.import_module(type(model).__module__)
    orig = getattr(mod, "apply_rotary_pos_emb", None)

    def stand_in(q, k, cos, sin, *args, **kwargs):
        return q * cos.unsqueeze(1), k * cos.unsqueeze(1)

    if orig is not None:
        mod.apply_rotary_pos_emb = stand_in
    try:
        yield
    finally:
        if orig is not None:
            mod.apply_rotary_pos_emb = orig


def ffn_modules(model):
    """(gate_or_up, down) Linear pairs of every decoder block, found by attribute names of the
    Hugging Face LLaMA-style MLP (what Torch-Pruning's own LLM example relies on too)."""
    pairs = []
    for name, m in model.named_modules():
        if name.endswith("mlp") and hasattr(m, "down_proj"):
            pairs.append((name, m))
    return pairs


def prune_ffn(model, calib: torch.Tensor, neurons_to_remove: int, importance: str = "taylor",
              batch_size: int = 8) -> dict:
    """Remove ``neurons_to_remove`` FFN neurons from every block (same count per block),
    chosen by Torch-Pruning's importance on its dependency groups. Edits ``model`` in place."""
    import torch_pruning as tp

    mlps = ffn_modules(model)
    if not mlps:
        raise ValueError("no LLaMA-style MLP (gate_proj/up_proj/down_proj) found")
    inter = mlps[0][1].down_proj.in_features
    ratio = neurons_to_remove / inter
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith(("gate_proj", "up_proj"))]
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        raise ValueError(f"unknown importance {importance!r}")
    example = {"input_ids": calib[:1], "use_cache": False}
    with simple_rotary(model):
        pruner = tp.pruner.MetaPruner(model, example_inputs=example, importance=imp,
                                      global_pruning=False, pruning_ratio=ratio,
                                      ignored_layers=ignored)
    if importance == "taylor":
        model.zero_grad()
        with torch.enable_grad():
            for batch in calib.split(batch_size):
                out = model(input_ids=batch, labels=batch, use_cache=False)
                (out.loss * len(batch) / len(calib)).backward()
    groups = 0
    for group in pruner.step(interactive=True):
        group.prune()
        groups += 1
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    after = {n: m.down_proj.in_features for n, m in mlps}
    model.config.intermediate_size = next(iter(after.values()))
    for n, m in mlps:
        for attr in ("intermediate_size",):
            if hasattr(m, attr):
                setattr(m, attr, m.down_proj.in_features)
    return {"importance": type(imp).__name__, "groups_pruned": groups,
            "ffn_neurons_after": sorted(set(after.values())), "ffn_neurons_before": inter}
