"""Perplexity of a causal LM on token windows, in PyTorch or in onnxruntime.

Both backends score the same windows (see data.token_windows) the same way: within each
window the logits at position t predict token t+1, so positions 1..L-1 are predicted; the
negative log-likelihood is averaged over all predicted tokens in float64, and
perplexity = exp(mean NLL). Each result is a dict: ppl, nll, tokens (predicted tokens),
windows, seconds (wall time of the forward passes and scoring).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch


def perplexity_torch(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity of a PyTorch model: a Hugging Face causal LM, or any module called as
    ``model(input_ids, attention_mask)`` that returns logits [batch, seq, vocab]."""
    from transformers import PreTrainedModel

    windows = _check_windows(windows)
    is_hf = isinstance(model, PreTrainedModel)
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            mask = torch.ones_like(batch)
            if is_hf:
                out = model(input_ids=batch, attention_mask=mask, use_cache=False)
            else:
                out = model(batch, mask)
            s, c = _nll_sum(_logits_of(out), batch)
            total, count = total + s, count + c
    return _result(total, count, len(windows), time.perf_counter() - start)


def perplexity_onnx(path, windows: torch.Tensor, batch_size: int = 8, providers=None) -> dict:
    """Perplexity of an ONNX causal LM with inputs ``input_ids`` (+ ``attention_mask`` if it
    has one, all ones, int64) and an output ``logits`` [batch, seq, vocab]."""
    import onnxruntime as ort

    windows = _check_windows(windows)
    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    unknown = [n for n in inputs if n not in ("input_ids", "attention_mask")]
    if "input_ids" not in inputs or unknown:
        raise ValueError(f"{path}: expected inputs input_ids[, attention_mask], found {', '.join(inputs)}")
    outputs = [o.name for o in session.get_outputs()]
    output = "logits" if "logits" in outputs else outputs[0]
    total, count = 0.0, 0
    start = time.perf_counter()
    for batch in windows.split(batch_size):
        ids = batch.numpy().astype(np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones_like(ids)
        (logits,) = session.run([output], feed)
        s, c = _nll_sum(torch.from_numpy(logits), batch)
        total, count = total + s, count + c
    return _result(total, count, len(windows), time.perf_counter() - start)


def _check_windows(windows) -> torch.Tensor:
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be [n >= 1, seq_len >= 2], got {tuple(windows.shape)}")
    return windows.long()


def _logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum over positions 1..L-1 of -log p(token), in float64, one window at a time."""
    total = 0.0
    for row_logits, row_ids in zip(logits, ids):
        pred = row_logits[:-1].double()
        target = row_ids[1:].unsqueeze(1)
        nll = torch.logsumexp(pred, dim=-1) - pred.gather(1, target).squeeze(1)
        total += float(nll.sum())
    return total, ids.shape[0] * (ids.shape[1] - 1)


def _result(total: float, count: int, windows: int, seconds: float) -> dict:
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": windows, "seconds": seconds}
