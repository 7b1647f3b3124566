"""The journal of a compile: each module's result of the greedy reconstruction, written
atomically as the module finishes, in a work directory beside OUT (``.OUT.work``).

A compile that is killed leaves the journal; `goa compile ... --resume` with the same model,
calibration and options reads the finished modules back (weights, kept units, scores,
records, the random generator's state after each) instead of computing them, and goes on
from the first unfinished one: the output is byte-identical to an uninterrupted compile's.
Without --resume, or when the journal belongs to another model or other options, it is
cleared, and the compile says which. A compile that completes removes its journal.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

def work_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.work"


def hash_tensors(h, tensors: dict) -> None:
    """Feed every tensor (name, dtype, shape, bytes; in name order) into the hash ``h``,
    without copying them."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")


def inputs_digest(weights: dict, windows: torch.Tensor) -> str:
    """A hash of every weight and of the calibration windows."""
    h = hashlib.sha256()
    hash_tensors(h, weights)
    h.update(windows.contiguous().numpy().tobytes())
    return h.hexdigest()


def key_of(options: dict, structures: list[str], digest: str) -> str:
    """What a module's result depends on: the options of the reconstruction
    (driver/options.result_options), the structures found, the weights and the windows
    (``digest``)."""
    return hashlib.sha256(json.dumps([{k: str(v) for k, v in sorted(options.items())}, structures,
                                      digest]).encode()).hexdigest()


@dataclass(frozen=True)
class ModuleResult:
    """What one module's steps left in the greedy state (prune/greedy.py)."""

    name: str
    weights: dict[str, torch.Tensor]      # the overrides the module set
    kept: list[int] | None                # None: nothing dropped
    scores: np.ndarray
    record: dict
    new_bias: str | None                  # the name of a bias its level-2 projection gained
    diverged: bool
    rng_state: dict


@dataclass(frozen=True)
class Journal:
    path: Path
    key: str

    @classmethod
    def open(cls, out, key: str, resume: bool, log) -> "Journal":
        """The journal for OUT: resumed when ``resume`` and the one there has this key,
        else a fresh one (what was there is cleared, and ``log`` says why)."""
        path = work_dir(out)
        if path.exists():
            old = _read_key(path)
            done = cls(path, old or "").finished()
            if resume and old == key:
                log(f"resuming from {path}: {done} modules finished by an interrupted compile")
                return cls(path, key)
            why = ("--resume not given" if not resume else
                   "it was for another model, calibration or options")
            log(f"cleared {path} ({done} modules of an interrupted compile; {why})")
            shutil.rmtree(path, ignore_errors=True)
        elif resume:
            log(f"--resume: nothing to resume in {path}; compiling from the start")
        path.mkdir(parents=True)
        atomic_write(path / "key.json", lambda f: f.write(json.dumps({"key": key}).encode()))
        return cls(path, key)

    def finished(self) -> int:
        """The number of consecutive modules, from the first, whose results are here."""
        n = 0
        while (self.path / f"{n}.pt").is_file():
            n += 1
        return n

    def write(self, index: int, result: ModuleResult) -> None:
        data = {"name": result.name, "weights": result.weights,
                "kept": result.kept, "scores": torch.from_numpy(np.asarray(result.scores, dtype=np.float64)),
                "record": json.dumps(result.record, default=_number), "new_bias": result.new_bias, "diverged": result.diverged,
                "rng_state": json.dumps(result.rng_state)}
        atomic_write(self.path / f"{index}.pt", lambda f: torch.save(data, f))

    def read(self, index: int) -> ModuleResult:
        d = torch.load(self.path / f"{index}.pt", weights_only=True)
        return ModuleResult(d["name"], d["weights"], d["kept"], d["scores"].numpy(), json.loads(d["record"]),
                            d["new_bias"], d["diverged"], json.loads(d["rng_state"]))

    def write_counts(self, counts: dict[str, int]) -> None:
        atomic_write(self.path / "counts.json", lambda f: f.write(json.dumps(counts, default=_number).encode()))

    def read_counts(self) -> dict[str, int] | None:
        p = self.path / "counts.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _number(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _read_key(path: Path) -> str | None:
    try:
        return json.loads((path / "key.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, synced, then renamed onto it:
    a reader sees the whole file or none."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
