"""Calibration over torch.distributed ranks (prune/distributed.py): `torchrun --nproc_per_node 2`
on CPU (gloo) keeps the same units as one process, with logits within 1e-5 relative; the
split of windows and the summed statistics are checked alone too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from goa_compiler.prune.distributed import DistributedError, Ranks
from goa_compiler.prune.stats import FoldedCross
from models import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_shards_cover_the_windows_in_order():
    for n, world in ((6, 2), (7, 3), (3, 3), (10, 4)):
        shards = [Ranks(r, world).shard(n) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    with pytest.raises(DistributedError, match="--num-samples"):
        Ranks(0, 4).shard(3)


def test_folds_follow_the_window_numbers_not_the_split():
    """Windows 0..5 in folds of 3, seen by one accumulator or by two starting at 0 and 3:
    the same fold sums (window w in fold w mod 3)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, 3, generator=g), torch.randn(6, 4, 2, generator=g)
    one = FoldedCross(3)
    one.update(x, y)
    a, b = FoldedCross(3, start=0), FoldedCross(3, start=3)
    a.update(x[:3], y[:3])
    b.update(x[3:], y[3:])
    for fa, fb, f in zip(a.folds, b.folds, one.folds):
        assert torch.allclose(fa.xtx + fb.xtx, f.xtx)


def test_empty_folds_are_padded_for_the_reduction_and_dropped_after():
    """A rank that saw 1 window of 3 folds holds two empty folds: tensors() fills them with
    zeros of the right shapes (another rank may have their windows); a fold empty on every
    rank is empty again after drop_empty."""
    f = FoldedCross(3)
    f.update(torch.ones(1, 2, 4), torch.ones(1, 2, 2))
    tensors = f.tensors()
    assert len(tensors) == 3 * 6
    f.drop_empty()
    assert len(f.usable_folds()) == 1


def _calib(tmp_path) -> Path:
    calib = tmp_path / "calib.txt"
    calib.write_text("In the beginning God created the heaven and the earth. And the earth was without "
                     "form, and void; and darkness was upon the face of the deep. " * 30)
    return calib


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    from goa_compiler.export.onnx import run_onnx

    model = tiny.save("llama-gqa", tmp_path / "llama")
    args = [model, "--ratio", "0.3", "--num-samples", "7", "--seq-len", "16", "--batch-size", "2",
            "--ridge-folds", "3", "--calib", str(_calib(tmp_path)), "--seed", "3", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "goa_compiler", "compile", *args, "--out", str(one)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "goa_compiler", "compile", *args, "--out", str(two)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert rb["calibration"]["processes"] == 2 and ra["calibration"]["processes"] == 1
    assert [(m["name"], m["kept"]) for m in ra["modules"]] == [(m["name"], m["kept"]) for m in rb["modules"]]
    assert any(len(m["kept"]) < m["total"] for m in ra["modules"])
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    za, zb = (run_onnx(d / "model.onnx", ids, np.ones_like(ids)) for d in (one, two))
    assert np.linalg.norm(za - zb) / np.linalg.norm(za) < 1e-5
    # only rank 0 wrote: OUT and nothing else beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "llama", "one", "two"]


def test_a_compile_leaves_the_group_it_joined_and_only_that(monkeypatch):
    """from_environment joins torchrun's group when none exists and Ranks.leave destroys it
    (gloo's threads must not outlive the interpreter: a rank exiting with them alive can abort
    at shutdown); a group the caller made before the compile is left alone."""
    import torch.distributed as dist

    from goa_compiler.prune.distributed import from_environment

    calls, live = [], {"group": False}

    def init(**kwargs):
        calls.append("init")
        live["group"] = True

    def destroy():
        calls.append("destroy")
        live["group"] = False

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: live["group"])
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    ranks = from_environment()
    assert (ranks.rank, ranks.world, ranks.joined) == (1, 2, True)
    ranks.leave()
    assert calls == ["init", "destroy"]

    calls.clear()
    live["group"] = True                     # the caller's own group
    ranks = from_environment()
    ranks.leave()
    assert not ranks.joined and calls == [] and live["group"]
