"""Quality smoke test on a real model with few calibration windows: on SmolLM2-135M at ratio 0.2,
without reconstruction, goa's selection leaves a smaller output error than random and
magnitude selection.

The error is the compile's --max-logit-error measurement, ||Z_pruned - Z_dense||_F /
||Z_dense||_F of the logits on the same windows (4 random windows of the KJV calibration split,
seed + 1, so not the calibration windows themselves: measure.eval.logit_windows). To stay
within a few minutes it runs in process: one capture, three prunings of copies of the captured
graph (driver.pipeline.prune_captured, the compile's own passes up to the rewrite), the pruned
graphs evaluated in PyTorch, instead of three full compiles with ONNX export (about 2 minutes
each). That the emitted ONNX computes what the rewritten graph computes is verified elsewhere
(every compile's verify step, test_real_model.py).
"""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

RATIO = 0.2
CRITERIA = ("goa", "magnitude", "random")


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    diff = np.linalg.norm((got.astype(np.float64) - ref.astype(np.float64)).ravel())
    return float(diff / np.linalg.norm(ref.astype(np.float64).ravel()))


def test_goa_selection_beats_random_and_magnitude(smollm2):
    from goa_compiler.capture.sources import load_model
    from goa_compiler.driver.options import CompileOptions
    from goa_compiler.driver.pipeline import analyze_model, prune_captured
    from goa_compiler.measure.eval import dense_outputs, logit_windows
    from goa_compiler.ui.progress import Progress

    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    captured, analysis = analyze_model(loaded.model, loaded.kind)

    def opts(criterion):
        # uniform: every criterion removes the same units per module (block is goa's and flap's)
        return CompileOptions(ratio=RATIO, criterion=criterion, reconstruct="none", num_samples=4,
                              seq_len=64, max_logit_error=1e9, allocation="uniform")

    windows, what = logit_windows(loaded.tokenizer, opts("goa"), None, int(loaded.model.config.vocab_size))
    assert windows.shape == (4, 64) and "calibration split" in what
    reference = dense_outputs(loaded.model, loaded.kind, windows)

    errors, achieved = {}, {}
    for criterion in CRITERIA:
        gm = copy.deepcopy(captured.gm)
        state = prune_captured(dataclasses.replace(captured, gm=gm), analysis, opts(criterion),
                               loaded.tokenizer, Progress(False), model=loaded.model)
        assert state.rewritten.modified
        achieved[criterion] = state.rewritten.params_after
        errors[criterion] = relative_error(dense_outputs(gm, loaded.kind, windows), reference)
        del gm, state
    seconds = time.perf_counter() - start
    print(f"logit error at ratio {RATIO}, no reconstruction, {what}: "
          + ", ".join(f"{c} {e:.4f}" for c, e in errors.items()) + f" ({seconds:.0f} s)")

    # the same ratio for all three: uniform allocation removes the same counts everywhere
    assert len(set(achieved.values())) == 1, achieved
    assert all(np.isfinite(e) and 0 < e for e in errors.values()), errors
    assert errors["goa"] < errors["magnitude"], errors
    assert errors["goa"] < errors["random"], errors
