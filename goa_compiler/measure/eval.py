"""Perplexity of a causal LM on token windows, in PyTorch or in onnxruntime.

Both backends score the same windows (see data.token_windows) the same way: within each
window the logits at position t predict token t+1, so positions 1..L-1 are predicted; the
negative log-likelihood is averaged over all predicted tokens in float64, and
perplexity = exp(mean NLL). Each result is a dict: ppl, nll, tokens (predicted tokens),
windows, seconds (wall time of the forward passes and scoring).

An ONNX model that cannot be read or run (corrupt file, wrong inputs or outputs, a vocabulary
smaller than the token ids) raises ``ModelRunError`` with a one-line message.
"""
from __future__ import annotations

import math
import re
import time

import numpy as np
import torch


class ModelRunError(ValueError):
    """The ONNX model cannot be loaded or run on the windows; the message is one line."""


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
    has one, all ones, int64; a KV-cache decoder gets positions and an empty cache) and an
    output ``logits`` [batch, seq, vocab]."""
    windows = _check_windows(windows)
    from goa_compiler.serve.feeds import SignatureError, full_feeds, signature

    session = onnx_session(path, providers)
    try:
        sig = signature(session, path)
    except SignatureError as e:
        raise ModelRunError(f"{path}: {e}") from e
    outs = session.get_outputs()
    if not outs:
        raise ModelRunError(f"{path}: the model has no outputs")
    out = next((o for o in outs if o.name == "logits"), outs[0])
    vocab = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None
    top = int(windows.max())
    if vocab is not None and top >= vocab:
        raise ModelRunError(f"{path}: token id {top} is outside the model's vocabulary of {vocab} "
                            "(the tokenizer does not match the model)")
    total, count = 0.0, 0
    start = time.perf_counter()
    for batch in windows.split(batch_size):
        ids = batch.numpy().astype(np.int64)
        feed = full_feeds(sig, ids)
        try:
            (logits,) = session.run([out.name], feed)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base class
            raise ModelRunError(f"{path}: onnxruntime cannot run the model ({_one_line(e)})") from e
        logits = np.asarray(logits)
        if (logits.dtype.kind != "f" or logits.ndim != 3 or logits.shape[:2] != ids.shape
                or logits.shape[2] <= top):
            raise ModelRunError(f"{path}: output {out.name} is {logits.dtype} {list(logits.shape)}, expected "
                                f"float logits [{ids.shape[0]}, {ids.shape[1]}, vocab > {top}]")
        s, c = _nll_sum(torch.from_numpy(logits.astype(np.float32, copy=False)), batch)
        total, count = total + s, count + c
    return _result(total, count, len(windows), time.perf_counter() - start)


def onnx_session(path, providers=None):
    """An onnxruntime session on ``path``; a file that onnxruntime cannot load raises
    ModelRunError, saying "corrupt or unreadable" when onnx cannot parse and check it either
    (the checker alone is not the judge: it rejects onnxruntime's own ops in the default
    domain, such as SimplifiedLayerNormalization, which onnxruntime-genai's models use)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4   # errors are raised (and reported as one line) here, not logged
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        try:
            onnx.checker.check_model(str(path))
        except Exception as bad:  # noqa: BLE001 - parse and checker errors have no common base class
            raise ModelRunError(f"{path}: corrupt or unreadable ONNX file ({_one_line(bad)})") from bad
        raise ModelRunError(f"{path}: onnxruntime cannot load the model ({_one_line(e)})") from e


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


_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = _ORT_PREFIX.sub("", " ".join(str(e).split())) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _result(total: float, count: int, windows: int, seconds: float) -> dict:
    nll = total / count
    ppl = math.inf if nll > 700 else math.exp(nll)   # exp overflows past ~709 (nan stays nan)
    return {"ppl": ppl, "nll": nll, "tokens": count, "windows": windows, "seconds": seconds}

# ------------------------------------------------------------------------------ for compile

LOGIT_WINDOWS = 4    # windows of --seq-len tokens for --max-logit-error


def evaluation_windows(tokenizer, opts) -> torch.Tensor:
    """Held-out windows: a named set's eval split (kjv, pydoc), else the user's text (of a
    mixture, each part's first windows, an equal share)."""
    from goa_compiler.data import load_texts, mixture_held_out, parts, prefix_texts, token_windows

    count = max(1, opts.eval_tokens // opts.seq_len)
    if len(parts(opts.eval_data)) > 1:
        return mixture_held_out(tokenizer, opts.eval_data, "eval", opts.seq_len, count)
    # tokenize only a prefix large enough for eval_tokens (about 4 characters a token)
    prefix = prefix_texts(load_texts(opts.eval_data, split="eval"), 8 * opts.eval_tokens)
    windows = token_windows(tokenizer, prefix, opts.seq_len, None, seed=0)
    return windows[:count]


def logit_windows(tokenizer, opts, eval_windows, vocab_size: int):
    """The windows of the logit error, and a description: the first LOGIT_WINDOWS held-out
    windows when perplexity is evaluated; else LOGIT_WINDOWS random windows of the
    calibration data (seed + 1, so not the calibration windows themselves); else (no
    tokenizer) random tokens."""
    if eval_windows is not None:
        w = eval_windows[:LOGIT_WINDOWS]
        return w, f"{opts.eval_data} (held-out), first {len(w)} windows of {w.shape[1]} tokens"
    if tokenizer is not None:
        from goa_compiler.data import mixture_windows

        w = mixture_windows(tokenizer, opts.calib, "calib", opts.seq_len, LOGIT_WINDOWS, opts.seed + 1)
        name = opts.calib or "kjv"
        return w, f"{name} (calibration split), {len(w)} random windows of {w.shape[1]} tokens, seed {opts.seed + 1}"
    w = torch.randint(0, vocab_size, (LOGIT_WINDOWS, opts.seq_len),
                      generator=torch.Generator().manual_seed(opts.seed))
    return w, f"random tokens (no tokenizer), {LOGIT_WINDOWS} windows of {opts.seq_len}, seed {opts.seed}"


def dense_outputs(model: torch.nn.Module, kind: str, windows: torch.Tensor) -> np.ndarray:
    """The dense model's logits (causal LM) or last hidden state (encoder), float32."""
    from transformers import PreTrainedModel

    mask = torch.ones_like(windows)
    with torch.inference_mode():
        if isinstance(model, PreTrainedModel):
            kw = {"use_cache": False} if kind == "causal-lm" else {}
            out = model(input_ids=windows, attention_mask=mask, **kw)
        else:
            out = model(windows, mask)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            out = getattr(out, attr)
            break
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().numpy()


def logit_error(onnx_path, windows: torch.Tensor, what: str, reference: np.ndarray) -> dict:
    """Relative Frobenius error ||Z_onnx - Z_dense||_F / ||Z_dense||_F over all windows,
    positions and output channels (float64 sums)."""
    from goa_compiler.export.onnx import run_onnx

    ids = windows.numpy()
    got = run_onnx(onnx_path, ids, np.ones_like(ids))
    if got.shape != reference.shape:
        raise ModelRunError(f"logit error: ONNX output {got.shape} != dense output {reference.shape}")
    diff = np.linalg.norm((got.astype(np.float64) - reference.astype(np.float64)).ravel())
    norm = np.linalg.norm(reference.astype(np.float64).ravel())
    return {"value": float(diff / norm) if norm > 0 else float("inf"),
            "definition": "||Z_pruned - Z_dense||_F / ||Z_dense||_F of the outputs (logits, or the "
                          "last hidden state of an encoder)",
            "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "data": what,
            "measured_on": "onnxruntime (pruned ONNX) vs torch (dense model)"}
