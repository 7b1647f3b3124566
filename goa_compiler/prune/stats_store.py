"""Calibration statistics kept for another compile (--save-stats DIR / --load-stats DIR).

What a compile measures on the calibration text is sums (prune/stats.py). Two kinds can be
reused by a compile of the same model and calibration at another ratio:

* the allocation pass's statistics of every structure on the dense model
  (``allocation/<name>.pt``), always;
* each module's statistics of the greedy reconstruction (``modules/<name>.pt``), when they do
  not depend on what was pruned: the modules are measured on the dense model's inputs
  (--module-inputs dense, the default) and no module gains a bias that the stream then
  carries (--reconstruct mean, flap without refit). A compile that loads them runs no
  calibration pass at all: it solves.

``meta.json`` holds the keys the statistics were measured under (the weights, the windows,
the options they depend on); a load under another key is refused with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from goa_compiler.prune.criteria import ModuleStats, gains_bias
from goa_compiler.prune.journal import atomic_write, key_of
from goa_compiler.prune.stats import FoldedCross, HeadSimilarity, Moments


class StatsError(Exception):
    """--load-stats cannot be used for this compile (one line)."""


# ------------------------------------------------------------------------------ (de)serialising

def _moments(m: Moments | None):
    return None if m is None else {"full": m.full, "n": m.n, "s": m.s, "gram": m.gram}


def _to_moments(d) -> Moments | None:
    if d is None:
        return None
    m = Moments(d["full"])
    m.n, m.s, m.gram = d["n"], d["s"], d["gram"]
    return m


def _folded(f: FoldedCross | None):
    return None if f is None else {"windows": f.windows, "folds": [f_.tensors() if f_.n is not None else None
                                                                   for f_ in f.folds]}


def _to_folded(d) -> FoldedCross | None:
    if d is None:
        return None
    f = FoldedCross(len(d["folds"]))
    f.windows = d["windows"]
    for fold, ts in zip(f.folds, d["folds"]):
        if ts is not None:
            fold.n, fold.sx, fold.sy, fold.xtx, fold.xty, fold.yy = ts
    return f


def _heads(h: HeadSimilarity | None):
    return None if h is None else {"js": h.js, "rows": h.rows}


def _to_heads(d) -> HeadSimilarity | None:
    if d is None:
        return None
    h = HeadSimilarity()
    h.js, h.rows = d["js"], d["rows"]
    return h


# ------------------------------------------------------------------------------ the store

@dataclass(frozen=True)
class StatsKeys:
    allocation: str       # what the allocation pass's statistics depend on
    modules: str | None   # what each module's do; None: they depend on the pruning (not kept)


@dataclass(frozen=True)
class StatsStore:
    path: Path
    keys: StatsKeys

    # -- writing
    @classmethod
    def create(cls, path, keys: StatsKeys) -> "StatsStore":
        path = Path(path)
        for part in ("modules", "allocation"):
            (path / part).mkdir(parents=True, exist_ok=True)
            for old in (path / part).glob("*.pt"):
                old.unlink()
        atomic_write(path / "meta.json", lambda f: f.write(json.dumps(
            {"allocation_key": keys.allocation, "modules_key": keys.modules}, indent=1).encode()))
        return cls(path, keys)

    def write_allocation(self, name: str, m: ModuleStats) -> None:
        data = {"x": _moments(m.x), "h": _moments(m.h), "heads": _heads(m.heads)}
        atomic_write(self.path / "allocation" / f"{name}.pt", lambda f: torch.save(data, f))

    def write_module(self, name: str, x: Moments, joint: FoldedCross | None, h: Moments,
                     cross: FoldedCross | None, heads: HeadSimilarity | None) -> None:
        if self.keys.modules is None:
            return
        data = {"x": _moments(x), "joint": _folded(joint), "h": _moments(h), "cross": _folded(cross),
                "heads": _heads(heads)}
        atomic_write(self.path / "modules" / f"{name}.pt", lambda f: torch.save(data, f))

    # -- reading
    @classmethod
    def open(cls, path, keys: StatsKeys) -> "StatsStore":
        """The store at ``path`` for a compile under ``keys``; StatsError when it is not one
        or was measured under another allocation key. Its module statistics are used only
        when their key is this compile's too (``modules_usable``)."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise StatsError(f"--load-stats: {path} holds no statistics of a compile (meta.json: {e})") from e
        if meta.get("allocation_key") != keys.allocation:
            raise StatsError(f"--load-stats: {path} was measured on another model or calibration (or with "
                             f"another --batch-size or head criterion)")
        return cls(path, StatsKeys(meta["allocation_key"], meta.get("modules_key")))

    def usable_for(self, keys: StatsKeys, names: list[str]) -> str | None:
        """None when every module of ``names`` has statistics measured under ``keys``; else why not."""
        if keys.modules is None:
            return "this compile's module statistics depend on the pruning (--module-inputs pruned, or a " \
                   "reconstruction that adds biases)"
        if self.keys.modules != keys.modules:
            return "they were measured with other options (--module-inputs, --reconstruct, --ridge-folds) " \
                   "or for a compile whose statistics depend on the pruning"
        missing = [n for n in names if not (self.path / "modules" / f"{n}.pt").is_file()]
        return f"no statistics of {', '.join(missing[:3])}" if missing else None

    def has_allocation(self, names: list[str]) -> bool:
        return all((self.path / "allocation" / f"{n}.pt").is_file() for n in names)

    def read_allocation(self, name: str) -> ModuleStats:
        d = torch.load(self.path / "allocation" / f"{name}.pt", weights_only=True)
        return ModuleStats(_to_moments(d["x"]), _to_moments(d["h"]), _to_heads(d["heads"]))

    def read_module(self, name: str) -> tuple[Moments, FoldedCross | None, Moments, FoldedCross | None,
                                              HeadSimilarity | None]:
        d = torch.load(self.path / "modules" / f"{name}.pt", weights_only=True)
        return (_to_moments(d["x"]), _to_folded(d["joint"]), _to_moments(d["h"]), _to_folded(d["cross"]),
                _to_heads(d["heads"]))


def stats_keys(opts, needs_heads: bool, structures: list[str], digest: str) -> StatsKeys:
    """The keys of a compile's statistics (``digest``: of its weights and windows,
    journal.inputs_digest)."""
    alloc = {"needs_heads": needs_heads, "batch_size": opts.batch_size}
    allocation = key_of(alloc, structures, digest)
    if opts.module_inputs != "dense" or gains_bias(opts.criterion, opts.reconstruct):
        return StatsKeys(allocation, None)
    module = {**alloc, "dense_stream": opts.reconstruct in ("paper", "refit"), "folds": opts.ridge_folds}
    return StatsKeys(allocation, key_of(module, structures, digest))
