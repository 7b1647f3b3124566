"""Quality gates of `goa compile`: limits a CI job sets on the compiled model.

  --max-ppl-increase X  relative increase of held-out perplexity, pruned (onnxruntime) over
                        dense (PyTorch): ppl_after / ppl_before - 1 <= X (0.15 = 15 %).
  --max-logit-error X   relative Frobenius error of the model outputs (logits; the last hidden
                        state for encoders), emitted ONNX against the dense PyTorch model on the
                        same windows: ||Z_pruned - Z_dense||_F / ||Z_dense||_F <= X.
  --min-speedup S       onnxruntime CPU prefill latency of the dense model (exported the same
                        way) over the pruned model's: latency_dense / latency_pruned >= S.

A limit is inclusive (a measurement equal to it passes). Each result records ``by``: how far
the measurement is on the wrong side of its limit (measured - threshold for a maximum,
threshold - measured for a minimum), so ``by > 0`` means the gate failed by that much and
``by <= 0`` is the headroom. A gate whose quantity could not be measured (not finite) fails,
with ``measured`` and ``by`` null.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Gate:
    name: str          # the option without dashes: max-ppl-increase, max-logit-error, min-speedup
    threshold: float
    direction: str     # "max": measured <= threshold; "min": measured >= threshold
    quantity: str      # what is measured, for messages
    unit: str = ""     # "%": shown as a percentage; "x": a ratio


GATES = {
    # option dest -> (gate name, direction, quantity, unit)
    "max_ppl_increase": ("max-ppl-increase", "max", "perplexity increase", "%"),
    "max_logit_error": ("max-logit-error", "max", "relative logit error", ""),
    "min_speedup": ("min-speedup", "min", "speedup", "x"),
}


@dataclass
class GateResult:
    name: str
    threshold: float
    measured: float | None
    passed: bool
    by: float | None
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateReport:
    results: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "results": [r.to_dict() for r in self.results]}


def gates_from(options) -> list[Gate]:
    """The gates set on an object with attributes max_ppl_increase, max_logit_error,
    min_speedup (None = not set), e.g. CompileOptions."""
    out = []
    for attr, (name, direction, quantity, unit) in GATES.items():
        value = getattr(options, attr, None)
        if value is not None:
            out.append(Gate(name, float(value), direction, quantity, unit))
    return out


def check(gate: Gate, measured: float | None) -> GateResult:
    """Compare one measurement with its gate."""
    if measured is None or not math.isfinite(measured):
        return GateResult(gate.name, gate.threshold, None, False, None,
                          f"gate {gate.name} failed: the {gate.quantity} could not be measured "
                          f"({'not finite' if measured is not None else 'no measurement'})")
    measured = float(measured)
    by = measured - gate.threshold if gate.direction == "max" else gate.threshold - measured
    passed = by <= 0
    m, t, b = _fmt(measured, gate.unit), _fmt(gate.threshold, gate.unit), _fmt(abs(by), gate.unit, diff=True)
    if passed:
        msg = f"gate {gate.name} passed: {gate.quantity} {m}, limit {t}"
    elif gate.direction == "max":
        msg = f"gate {gate.name} failed: {gate.quantity} {m} exceeds the limit {t} by {b}"
    else:
        msg = f"gate {gate.name} failed: {gate.quantity} {m} is below the limit {t} by {b}"
    return GateResult(gate.name, gate.threshold, measured, passed, by, msg)


def evaluate(gates: list[Gate], measured: dict[str, float | None]) -> GateReport:
    """measured: gate name -> measurement (missing or None: could not be measured)."""
    return GateReport([check(g, measured.get(g.name)) for g in gates])


def _fmt(v: float, unit: str, diff: bool = False) -> str:
    if unit == "%":
        return f"{100 * v:.2f} percentage points" if diff else f"{100 * v:.2f}%"
    if unit == "x":
        return f"{v:.3f}x"
    return f"{v:.4g}"
