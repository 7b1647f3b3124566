"""The pass protocol: a pass takes the compile state and returns a typed result.

In the manner of onnx_ir.passes and torch.fx.passes.infra: ``PassBase.__call__`` checks the
pass's preconditions (``requires``), runs it (``call``), then checks its postconditions
(``ensures``). A failed condition raises PassError naming the pass; errors meant for the user
(bad input, an impossible ratio) pass through unchanged. ``PassManager`` runs a list of
passes in order, skipping those that do not apply to these options, times each one
(``Progress.phase``, which also shows progress) and keeps their results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence


class PassError(Exception):
    """A pass's pre- or postcondition does not hold: a bug in goa-compiler, not bad input."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass {pass_name}: {message}")
        self.pass_name = pass_name


@dataclass(frozen=True)
class PassResult:
    """What one pass did: whether it changed the model, and its section of report.json
    (top-level keys it contributes; empty when it reports nothing)."""

    name: str
    changed: bool = False
    report: dict[str, Any] = field(default_factory=dict)


class PassBase:
    """One step of the compile. Subclasses set ``name`` and implement ``call``; they may
    override ``applies`` (does it run for these options?), ``requires`` and ``ensures``
    (raise PassError via ``fail`` when a condition does not hold)."""

    name: ClassVar[str] = "pass"

    def applies(self, state) -> bool:
        return True

    def requires(self, state) -> None:
        """Preconditions; the default checks nothing."""

    def ensures(self, state, result: PassResult) -> None:
        """Postconditions; the default checks nothing."""

    def call(self, state) -> PassResult:
        raise NotImplementedError

    def fail(self, message: str):
        raise PassError(self.name, message)

    def __call__(self, state) -> PassResult:
        self.requires(state)
        result = self.call(state)
        if not isinstance(result, PassResult):
            self.fail(f"returned {type(result).__name__}, not a PassResult")
        self.ensures(state, result)
        return result


class PassManager:
    """Run passes in order over one state; ``run(state, until=name)`` stops after that pass."""

    def __init__(self, passes: Sequence[PassBase]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique: {names}")
        self.passes = list(passes)

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, state, progress, until: str | None = None) -> list[PassResult]:
        if until is not None and until not in self.names():
            raise ValueError(f"no pass {until!r} (passes: {', '.join(self.names())})")
        results = []
        for p in self.passes:
            if p.applies(state):
                with progress.phase(p.name):
                    results.append(p(state))
                state.results.append(results[-1])
            if p.name == until:
                break
        return results
