"""Calibration: run the captured graph node by node on calibration batches, pausing at the
probe points analysis chose, so statistics can be gathered and weights changed between
modules without ever running the whole model once per module.

A ``Stream`` executes one batch through the GraphModule in topological order. It reads
parameters through an override table (the pruned stream's current weights), frees every
value after its last use unless it is pinned (a probe still needed), and can be resumed:
``run_until(node)`` continues from where it stopped. Two lists of streams, dense and
pruned, advancing in lockstep over the same batches, give the greedy reconstruction its
inputs (pruned upstream) and targets (dense outputs) at a cost of one forward pass each.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from ..graph import fetch_attr


class Stream:
    def __init__(self, gm: torch.fx.GraphModule, inputs: dict[str, torch.Tensor],
                 overrides: dict[str, torch.Tensor] | None = None, pinned: set[str] | None = None):
        self.gm = gm
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

    def done(self, name: str) -> bool:
        return self.index[name] < self.pos

    def value(self, name: str):
        if name not in self.env:
            raise KeyError(f"value {name} is not available (not reached or already freed)")
        return self.env[name]

    def unpin(self, names):
        for name in names:
            self.pinned.discard(name)
            i = self.index.get(name)
            if i is not None and i < self.pos and self._last_use_passed(name):
                self.env.pop(name, None)

    def _last_use_passed(self, name: str) -> bool:
        users = self.nodes[self.index[name]].users
        return all(self.index[u.name] < self.pos for u in users)

    @torch.no_grad()
    def run_until(self, name: str | None = None):
        """Execute nodes up to and including ``name`` (to the end when None)."""
        stop = len(self.nodes) - 1 if name is None else self.index[name]
        env = self.env
        while self.pos <= stop:
            n = self.nodes[self.pos]
            if n.op == "placeholder":
                out = self.inputs[n.target]
            elif n.op == "get_attr":
                out = self.overrides.get(n.target)
                if out is None:
                    out = fetch_attr(self.gm, n.target)
            elif n.op == "call_function":
                args = torch.fx.node.map_arg(n.args, lambda a: env[a.name])
                kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a.name])
                out = n.target(*args, **kwargs)
                hook = self.hooks.get(n.name)
                if hook is not None:
                    hook(args, kwargs, out)
            elif n.op == "call_module":
                out = None       # export's input guards: inputs were built to satisfy them
            elif n.op == "output":
                args = torch.fx.node.map_arg(n.args, lambda a: env[a.name])
                out = args[0]
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

    def output(self):
        self.run_until(None)
        return self.env[self.nodes[-1].name]


def batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]
