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


def test_positions_are_the_models_own_where_it_numbers_them_its_way():
    """RoBERTa counts positions from its padding index, from the tokens: the captured graph
    must not replace them with positions from the mask (GPT-2 needs those for left padding)."""
    import torch
    from transformers import RobertaConfig, RobertaForCausalLM

    from goa_compiler.capture.torch_export import example_inputs, positions_from_mask

    torch.manual_seed(0)
    model = RobertaForCausalLM(RobertaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, is_decoder=True,
                                             max_position_embeddings=64)).eval()
    example = example_inputs(256)
    assert not positions_from_mask(model, example, "logits")
    assert positions_from_mask(tiny.build("gpt2")[0], example, "logits")
    captured = capture(model, "causal-lm")
    ids, mask = example
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = captured.gm(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
