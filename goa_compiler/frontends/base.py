"""The frontend interface: what the passes need from a model representation.

A frontend owns a graph in its own form (a torch.fx GraphModule today: ``fx.FxFrontend``;
an onnx-ir model next) and offers the passes five things, all in the terms of the
torch-free IR (ir/graph.py, ir/structure.py): the graph view, its parameters by name,
execution for calibration with probes, and the edits rewrite makes. Nothing above this
interface knows which frontend it talks to.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from goa_compiler.ir.graph import Graph


class Stream(Protocol):
    """One calibration batch run node by node; resumable, pausing at any node."""

    hooks: dict[str, Callable]   # node -> fn(args, kwargs, out): observe an op's inputs
    post: dict[str, Callable]    # node -> fn(out) -> out: change a value (a new bias)

    def run_until(self, name: str | None = None) -> None: ...
    def done(self, name: str) -> bool: ...
    def value(self, name: str) -> Any: ...
    def unpin(self, names) -> None: ...
    def output(self) -> Any: ...


class StreamPositions:
    """What both frontends' streams share: ``done`` / ``value`` / ``unpin`` over ``index``
    (node -> position), ``pos`` (the next position), ``env`` (live values) and ``pinned``.
    A stream says when the last reader of a value has run (``_last_use_passed``)."""

    index: dict[str, int]
    pos: int
    env: dict[str, Any]
    pinned: set[str]

    def done(self, name: str) -> bool:
        return self.index[name] < self.pos

    def value(self, name: str):
        if name not in self.env:
            raise KeyError(f"value {name} is not available (not reached or already freed)")
        return self.env[name]

    def unpin(self, names) -> None:
        for name in names:
            self.pinned.discard(name)
            i = self.index.get(name)
            if i is not None and i < self.pos and self._last_use_passed(name):
                self.env.pop(name, None)

    def _last_use_passed(self, name: str) -> bool:
        raise NotImplementedError


class Frontend(Protocol):
    # -- reading
    def view(self) -> Graph:
        """The graph view analysis reads (its node names are the ones every pass uses)."""

    def weights(self) -> dict[str, Any]:
        """Parameter name -> tensor."""

    def param_shapes(self) -> dict[str, tuple]: ...

    def param_count(self) -> int:
        """Elements of the parameters the graph uses (shared ones counted once)."""

    def stream(self, inputs: dict[str, Any], overrides: dict | None = None,
               pinned: set[str] | None = None, grad: bool = False) -> Stream:
        """Execution of one batch, reading parameters through ``overrides`` first; values of
        ``pinned`` nodes are kept after their last use (probes still needed); ``grad``: with
        autograd recording (a backward pass from the output follows)."""

    # -- editing (rewrite)
    def set_param(self, name: str, value: Any) -> None:
        """Replace a parameter (same shape), or add it when the model has none of that name."""

    def slice_param(self, name: str, cuts: list[tuple[int, Any]]) -> tuple[tuple, tuple]:
        """Keep the given indices along each axis; returns (old shape, new shape)."""

    def set_ints(self, node: str, attr: str, values: dict[int | None, int]) -> None:
        """Set the integers an ``IntHandle(node, attr, pos)`` names (every piece of a split)."""

    def add_bias(self, node: str, param: str) -> None:
        """Give a bias-free projection the (already set) bias parameter ``param``."""

    def gather(self, node: str, pos: int, axis: int, index: list[int], period: int | None = None) -> None:
        """Let operand ``pos`` of ``node`` be read through a gather of ``index`` along ``axis``
        (``period``: ``axis`` is batch * ``period`` heads; ``index`` picks heads in each)."""

    def finish(self) -> None:
        """Make the edits take effect (recompile)."""
