"""Selection: how many units go where, and which ones.

``--ratio`` is the fraction of the parameters inside the depth-2 structures (level-1 and
level-2 weights and level-1 biases) to remove. Two allocations:

* uniform: every module loses the same fraction of its own parameters, rounded to whole
  units (never all of them);
* global: units of all modules compete on scores made comparable across layers
  (standardised per module, as FLAP does), removed cheapest-first until the target
  parameter count is reached.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..structure import ModulePlan, Plan, Structure


@dataclass
class Budget:
    structure: str
    units: int
    params_per_unit: int
    params_fixed: int        # parameters of the module that no unit owns (level-2 bias...)


def unit_params(s: Structure, shapes: dict[str, tuple]) -> int:
    """Parameters removed with one unit of ``s``."""
    total = 0
    for sl in s.slices:
        shape = shapes[sl.param]
        other = int(np.prod([d for a, d in enumerate(shape) if a != sl.axis])) if len(shape) > 1 else 1
        total += sl.per_unit * other
    return total


def structure_params(structures: list[Structure], shapes: dict[str, tuple]) -> int:
    return sum(s.units * unit_params(s, shapes) for s in structures)


def uniform_counts(structures: list[Structure], ratio: float) -> dict[str, int]:
    """Units to remove per module: round(ratio * units), at most units - 1."""
    out = {}
    for s in structures:
        n = int(np.floor(ratio * s.units + 0.5))
        out[s.name] = min(max(n, 0), s.units - 1)
    return out


def global_counts(structures: list[Structure], scores: dict[str, np.ndarray], ratio: float,
                  shapes: dict[str, tuple], standardize: bool = True) -> dict[str, int]:
    """Remove the lowest (standardised) scores across all modules until ``ratio`` of the
    structured parameters is gone; each module keeps at least one unit."""
    target = ratio * structure_params(structures, shapes)
    cands = []
    for s in structures:
        sc = np.asarray(scores[s.name], dtype=np.float64)
        if standardize and sc.size > 1 and sc.std() > 0:
            sc = (sc - sc.mean()) / sc.std()
        per = unit_params(s, shapes)
        order = np.sort(sc)
        for rank, v in enumerate(order[: s.units - 1]):
            cands.append((v, s.name, per))
    cands.sort(key=lambda c: c[0])
    counts = {s.name: 0 for s in structures}
    removed = 0.0
    for v, name, per in cands:
        if removed + per / 2 > target:
            break
        counts[name] += 1
        removed += per
    return counts


def choose(structures: list[Structure], scores: dict[str, np.ndarray], counts: dict[str, int]) -> Plan:
    """Keep the highest-scoring units; ties broken by index (stable)."""
    plan = Plan({})
    for s in structures:
        n_drop = counts.get(s.name, 0)
        if n_drop <= 0:
            continue
        sc = np.asarray(scores[s.name], dtype=np.float64)
        order = np.argsort(sc, kind="stable")
        drop = set(order[:n_drop].tolist())
        kept = [u for u in range(s.units) if u not in drop]
        plan.modules[s.name] = ModulePlan(s.name, kept)
    return plan
