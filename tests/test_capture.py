"""Capture: what torch.export refuses becomes one line (a CaptureError, exit 2 from the CLI),
and a sequence-length guard the model imposes narrows the exported range instead."""
from __future__ import annotations

import pytest

from goa_compiler.capture.torch_export import CaptureError, _first_line, _narrower_range, capture
from models import tiny

GUARD = ("Constraints violated (seq)! For more information, run with TORCH_LOGS=\"+dynamic\".\n"
         "  - Not all values of seq = L['input_ids'].size()[1] in the specified range seq <= 512 satisfy "
         "the generated guard L['input_ids'].size()[1] != 512.\n")


def test_a_guard_that_excludes_the_maximum_narrows_the_range():
    assert _narrower_range(GUARD, 512) == 511
    suggested = GUARD + "Suggested fixes:\n  seq = Dim('seq', min=2, max=256)\n"
    assert _narrower_range(suggested, 512) == 256
    assert _narrower_range("Constraints violated (seq)! guard s0 % 2 == 0", 512) is None
    assert _narrower_range("some other error", 512) is None


def test_the_refusal_names_the_guard_in_one_line():
    line = _first_line(RuntimeError(GUARD))
    assert "\n" not in line and "satisfy the generated guard" in line and line.startswith("RuntimeError:")


def test_mpt_is_captured_one_position_short_of_its_maximum():
    model, _, kind = tiny.build("mpt")
    assert capture(model, kind).max_seq == tiny.MAX_POS - 1


def test_what_export_still_refuses_is_a_capture_error(monkeypatch):
    import torch

    def refuse(*a, **k):
        raise RuntimeError("Could not guard on data-dependent expression u0 > 3\nmore text")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(CaptureError, match=r"^torch.export refused LlamaForCausalLM: RuntimeError: Could not guard"):
        capture(tiny.build("llama")[0], "causal-lm")
