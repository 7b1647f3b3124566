"""Selection (allocation): how many units go where, and which ones.

``--ratio`` is the fraction of the parameters inside the depth-2 structures (level-1 and
level-2 weights and level-1 biases) to remove. Four allocations:

* uniform: every module loses the same fraction of its own parameters, rounded to whole
  units; a ratio whose rounding would remove every unit of a module (every K/V group of a
  layer's attention, every neuron of its FFN) is refused, naming the layer;
* global: units of all modules compete on scores made comparable across layers
  (standardised per module, as FLAP does), removed cheapest-first until the target
  parameter count is reached;
* block: every block loses the ratio; inside it, attention and FFN units compete by output
  error per parameter;
* network: the units of all blocks compete by output error per parameter, each module's
  errors weighted by what an error in its output costs the loss (prune/sensitivity.py).
"""
from __future__ import annotations

import numpy as np

from goa_compiler.ir.structure import ModulePlan, Plan, Structure


class SelectionError(Exception):
    """The request cannot be met (a one-line reason)."""


def skipped_layers(spec: str, layers: list[int]) -> set[int]:
    """--skip-layers: none | first | last | first,last | comma-separated block numbers."""
    spec = (spec or "none").strip().lower()
    if spec in ("", "none"):
        return set()
    lo, hi = min(layers), max(layers)
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if part == "first":
            out.add(lo)
        elif part == "last":
            out.add(hi)
        elif part.isdigit():
            out.add(int(part))
        else:
            raise SelectionError(f"--skip-layers: cannot read {part!r} (use none, first, last or numbers)")
    return out


def targets(structures: list[Structure], ratio: float, skip_spec: str, shapes: dict[str, tuple]):
    """The structures to prune (blocks in --skip-layers stay dense) and the ratio they must
    lose so that ``ratio`` of ALL structured parameters goes."""
    skip = skipped_layers(skip_spec, sorted({s.layer for s in structures}))
    chosen = [s for s in structures if s.layer not in skip]
    if not chosen:
        raise SelectionError("--skip-layers keeps every block dense: nothing to prune")
    eff = ratio * structure_params(structures, shapes) / structure_params(chosen, shapes)
    if eff >= 1.0:
        raise SelectionError(f"--ratio {ratio} cannot be reached with layers {sorted(skip)} kept dense")
    return chosen, skip, eff


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


def uniform_counts(structures: list[Structure], ratio: float,
                   shapes: dict[str, tuple] | None = None) -> dict[str, int]:
    """Units to remove per module: round(ratio * units).

    With ``shapes``, the rounding error of coarse modules (a K/V group is a third of
    SmolLM2's attention) is absorbed by the finest-grained modules (FFN neurons), spread
    evenly over them, so the whole model lands on the requested ratio.

    A count that would remove every unit of a module raises SelectionError (a module with
    nothing left is no longer the same function family: the compiler does not do that)."""
    out = {}
    for s in structures:
        n = int(np.floor(ratio * s.units + 0.5))
        out[s.name] = _at_most_all_but_one(s, max(n, 0), ratio)
    if shapes is None or ratio <= 0:
        return out
    per = {s.name: unit_params(s, shapes) for s in structures}
    finest = min(per.values())
    fine = [s for s in structures if per[s.name] == finest]
    coarse = [s for s in structures if per[s.name] != finest]
    if not fine or not coarse:
        return out
    target = ratio * structure_params(structures, shapes)
    left = target - sum(out[s.name] * per[s.name] for s in coarse)
    fine_total = sum(s.units for s in fine)
    frac = min(max(left / (finest * fine_total), 0.0), 1.0)
    for s in fine:
        out[s.name] = _at_most_all_but_one(s, int(np.floor(frac * s.units + 0.5)), ratio)
    return out


def _at_most_all_but_one(s: Structure, n: int, ratio: float) -> int:
    if n >= s.units:
        unit = {"kv-group": "K/V group", "head": "head"}.get(s.granularity, "neuron")
        what = "attention" if s.kind == "attention" else "FFN"
        raise SelectionError(
            f"ratio {ratio:.4g} would remove every {unit} of layer {s.layer}'s {what} ({s.name}: "
            f"{n} of {s.units}); use a smaller --ratio or --allocation global")
    return n


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


def block_counts(structures: list[Structure], costs: dict[str, np.ndarray], ratio: float,
                 shapes: dict[str, tuple]) -> dict[str, int]:
    """Every block (the structures of one layer) loses ``ratio`` of its structured parameters;
    inside the block, units of all its modules compete by cost per parameter removed.

    ``costs[name]``: the output error each further removal adds, in removal order (length
    units - 1: a module keeps one unit; criteria.removal_costs). The block's candidates are
    visited in ascending cost / parameters; one is taken while the block's removed parameters
    stay within half a unit of its target; a candidate that would overshoot is passed over,
    and with it the rest of its module (a module's removals stay in its own order), so finer
    units fill what a coarse one (a K/V group) would overshoot."""
    counts = {}
    layers: dict[int, list[Structure]] = {}
    for s in structures:
        layers.setdefault(s.layer, []).append(s)
    for block in layers.values():
        got, reached = _cheapest_first(block, costs, ratio * structure_params(block, shapes), shapes)
        if not reached:
            raise SelectionError(f"ratio {ratio:.4g} cannot be reached in block {block[0].layer} with one unit "
                                 f"kept in each of its modules; use a smaller --ratio")
        counts.update(got)
    return counts


def network_counts(structures: list[Structure], costs: dict[str, np.ndarray], sensitivity: dict[str, float],
                   ratio: float, shapes: dict[str, tuple]) -> dict[str, int]:
    """The modules of all blocks compete together (``ratio`` of the structured parameters of
    the whole network goes), by output error per parameter weighted by each module's
    sensitivity (prune/sensitivity.py: what an error in its output costs in loss), in the
    order and with the rules of block_counts."""
    weighted = _weighted(structures, costs, sensitivity)
    counts, reached = _cheapest_first(structures, weighted, ratio * structure_params(structures, shapes), shapes)
    if not reached:
        raise SelectionError(f"ratio {ratio:.4g} cannot be reached with one unit kept in each module; "
                             f"use a smaller --ratio")
    return counts


OUTLIER_FACTOR = 10.0


def outlier_blocks(structures: list[Structure], costs: dict[str, np.ndarray], sensitivity: dict[str, float],
                   ratio: float, shapes: dict[str, tuple], factor: float = OUTLIER_FACTOR) -> dict[int, float]:
    """--skip-layers auto: each block's estimated loss from losing ``ratio`` of its parameters
    (block allocation's choice on the sensitivity-weighted costs of network_counts, those
    costs summed), relative to the median block's; the blocks above ``factor`` are returned
    with theirs. With two blocks none can be (the median is their mean)."""
    weighted = _weighted(structures, costs, sensitivity)
    got = block_counts(structures, weighted, ratio, shapes)
    loss: dict[int, float] = {}
    for s in structures:
        loss[s.layer] = loss.get(s.layer, 0.0) + float(np.sum(weighted[s.name][: got[s.name]]))
    median = float(np.median(list(loss.values())))
    if median <= 0:
        return {}
    return {layer: v / median for layer, v in sorted(loss.items()) if v > factor * median}


def _weighted(structures: list[Structure], costs: dict[str, np.ndarray],
              sensitivity: dict[str, float]) -> dict[str, np.ndarray]:
    """Each module's removal costs times its sensitivity (a loss, comparable across blocks)."""
    return {s.name: np.asarray(costs[s.name], dtype=np.float64) * max(sensitivity[s.name], 0.0)
            for s in structures}


def _cheapest_first(structures: list[Structure], costs: dict[str, np.ndarray], target: float,
                    shapes: dict[str, tuple]) -> tuple[dict[str, int], bool]:
    """Counts taking candidates in ascending cost / parameters while the removed parameters
    stay within half a unit of ``target`` (block_counts), and whether the target was met."""
    counts = {s.name: 0 for s in structures}
    per_unit = {s.name: unit_params(s, shapes) for s in structures}
    cands = []
    for s in structures:
        per = per_unit[s.name]
        for k, c in enumerate(np.asarray(costs[s.name], dtype=np.float64)[: s.units - 1]):
            cands.append((max(float(c), 0.0) / per, k, s.name, per))
    cands.sort(key=lambda c: (c[0], c[1]))
    removed, closed, overshot = 0.0, set(), False
    for _, k, name, per in cands:
        if name in closed or k != counts[name]:
            closed.add(name)
            continue
        if removed + per / 2 > target:
            closed.add(name)
            overshot = True
            continue
        counts[name] += 1
        removed += per
    return counts, overshot or removed + min(per_unit.values()) / 2 >= target


def drop_lowest(scores: np.ndarray, n_drop: int) -> list[int]:
    """The ``n_drop`` lowest-scoring units, ascending; ties broken by index (stable). The one
    keep/drop rule, used by the greedy loop and the data-free path alike."""
    if n_drop <= 0:
        return []
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    return sorted(order[:n_drop].tolist())


def choose(structures: list[Structure], scores: dict[str, np.ndarray], counts: dict[str, int]) -> Plan:
    """Keep the highest-scoring units of every structure that loses any."""
    modules = {}
    for s in structures:
        drop = set(drop_lowest(scores[s.name], counts.get(s.name, 0)))
        if drop:
            modules[s.name] = ModulePlan(s.name, tuple(u for u in range(s.units) if u not in drop))
    return Plan(modules)


def plan_of(kept: dict[str, list[int]]) -> Plan:
    """A Plan from kept units per structure name."""
    return Plan({name: ModulePlan(name, tuple(k)) for name, k in kept.items()})
