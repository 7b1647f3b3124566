"""Padding: in a batch with one right-padded and one left-padded row, the real positions get the
outputs of each sequence run alone, unpadded: in the dense PyTorch model and in the ONNX that
`goa compile` emits (onnxruntime), for every tiny family.

What holds (checked family by family; tolerance 1e-4 of the largest output magnitude):
  * right padding: every family, PyTorch and ONNX. For the causal families the mask cannot
    matter there (a real position never attends to a later one); for BERT it does.
  * left padding: every family whose positions are relative (rotary: llama, mistral, qwen2,
    phi3, gemma3, gpt-neox; OPT's learned positions are derived from the attention mask by
    transformers itself), PyTorch and ONNX.
  * left padding with absolute positions counted from 0 whatever the mask (gpt2, bert,
    gpt-bigcode, xglm):
    transformers' models number positions 0..seq-1 when no ``position_ids`` are given, so the
    left-padded row's real tokens get shifted positions. The PyTorch model gives the right
    answer only when handed position_ids = cumsum(mask) - 1 (what generate() does for GPT-2);
    the emitted graph derives them from attention_mask (capture passes cumsum(mask) - 1 as
    position_ids wherever the model takes them), so it gets them right.
The pad positions hold random tokens, not a pad id, so nothing can depend on what they hold.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from goa_compiler.driver.options import CompileOptions
from goa_compiler.driver.pipeline import compile_loaded
from goa_compiler.export.onnx import run_onnx
from models import tiny

TOL = 1e-4
# no position_ids input in the graph; these families' positions do not follow the mask
ABSOLUTE = {"gpt2", "bert", "gpt-bigcode", "xglm"}
RELATIVE = [f for f in tiny.FAMILIES if f not in ABSOLUTE]
# longer than gemma3's sliding window (32), so that the window meets the padding
SEQ, RIGHT_LEN, LEFT_LEN = 48, 44, 37


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """family -> (dense PyTorch model, kind, vocab, path of the emitted model.onnx), compiled
    once per family (magnitude, no reconstruction: data-free and quick)."""
    cache: dict[str, tuple] = {}

    def get(family):
        if family not in cache:
            model, vocab, kind = tiny.build(family)
            dense = copy.deepcopy(model)
            out = tmp_path_factory.mktemp(f"pad-{family}") / "out"
            compile_loaded(model, kind, CompileOptions(ratio=0.3, criterion="magnitude", reconstruct="none"),
                           out)
            cache[family] = (dense, kind, vocab, out / "model.onnx")
        return cache[family]
    return get


def batch(vocab: int):
    """Two sequences a, b and the batch [a right-padded; b left-padded] with its mask."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, vocab, (RIGHT_LEN,), generator=g)
    b = torch.randint(0, vocab, (LEFT_LEN,), generator=g)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)     # what the pad positions hold
    mask = torch.zeros((2, SEQ), dtype=torch.long)
    ids[0, :RIGHT_LEN], mask[0, :RIGHT_LEN] = a, 1
    ids[1, SEQ - LEFT_LEN:], mask[1, SEQ - LEFT_LEN:] = b, 1
    return a, b, ids, mask


def torch_run(model, kind, ids, mask=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kw)
    return (out.logits if kind == "causal-lm" else out.last_hidden_state).numpy()


def close(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference relative to the largest magnitude of the reference."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def onnx_rows(path, a, b, ids, mask):
    alone_a = run_onnx(path, a[None].numpy())[0]
    alone_b = run_onnx(path, b[None].numpy())[0]
    padded = run_onnx(path, ids.numpy(), mask.numpy())
    return (padded[0, :RIGHT_LEN], alone_a), (padded[1, SEQ - LEFT_LEN:], alone_b)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_right_padding(family, compiled):
    dense, kind, vocab, path = compiled(family)
    a, b, ids, mask = batch(vocab)
    got = torch_run(dense, kind, ids, mask)[0, :RIGHT_LEN]
    assert close(got, torch_run(dense, kind, a[None])[0]) < TOL
    (got, alone), _ = onnx_rows(path, a, b, ids, mask)
    assert close(got, alone) < TOL


@pytest.mark.parametrize("family", RELATIVE)
def test_left_padding(family, compiled):
    dense, kind, vocab, path = compiled(family)
    a, b, ids, mask = batch(vocab)
    got = torch_run(dense, kind, ids, mask)[1, SEQ - LEFT_LEN:]
    assert close(got, torch_run(dense, kind, b[None])[0]) < TOL
    _, (got, alone) = onnx_rows(path, a, b, ids, mask)
    assert close(got, alone) < TOL
    # the mask is what makes it hold: without it the pad tokens change the real positions
    # (least under ALiBi, whose biases fade the far pad positions: Bloom 7.6e-3)
    ones = run_onnx(path, ids.numpy())[1, SEQ - LEFT_LEN:]
    assert close(ones, alone) > 1e-3


@pytest.mark.parametrize("family", sorted(ABSOLUTE))
def test_left_padding_absolute_positions_in_pytorch(family, compiled):
    """The dense model handles left padding given position_ids from the mask, and not without."""
    dense, kind, vocab, _ = compiled(family)
    _, b, ids, mask = batch(vocab)
    alone = torch_run(dense, kind, b[None])[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    assert close(torch_run(dense, kind, ids, mask, position_ids=positions)[1, SEQ - LEFT_LEN:], alone) < TOL
    assert close(torch_run(dense, kind, ids, mask)[1, SEQ - LEFT_LEN:], alone) > 1e-2


@pytest.mark.parametrize("family", sorted(ABSOLUTE))
def test_left_padding_absolute_positions_in_onnx(family, compiled):
    """Capture derives position_ids from the mask (capture/torch_export.py LogitsOnly), so the
    emitted graph gets left padding right where the bare model needs them handed in."""
    _, _, vocab, path = compiled(family)
    _, (got, alone) = onnx_rows(path, *batch(vocab))
    assert close(got, alone) < TOL
