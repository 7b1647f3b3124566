"""Inference speed of emitted models: onnxruntime latency and the FLOPs of a graph.

Used by the `--min-speedup` gate and by tools/bench.py. Latency is a median over repeated
runs after warm-up, in one process, so that two models measured one after the other can be
compared as a ratio (absolute numbers on shared machines are noisy; ratios much less so).
The ideal speedup of a pruned model is dense FLOPs / pruned FLOPs of the same graph at the
same input shape, counted by torch's FlopCounterMode (matmuls, attention, convolutions).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

PREFILL_SEQ = 128


def has_kv_cache(path: str | os.PathLike) -> bool:
    """Whether the ONNX model takes past keys/values as inputs (a decoder with a KV cache)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any("past" in i.name for i in model.graph.input)


def session(path: str | os.PathLike, providers=None, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def feeds_for(sess, batch: int, seq_len: int, vocab_size: int | None, seed: int = 0, path=None) -> dict:
    """Random tokens for one forward over [batch, seq_len] (a KV-cache decoder: the prefill)."""
    from goa_compiler.serve.feeds import full_feeds, signature

    rng = np.random.default_rng(seed)
    high = min(int(vocab_size), 1000) if vocab_size else 100
    ids = rng.integers(0, high, size=(batch, seq_len), dtype=np.int64)
    return full_feeds(signature(sess, path), ids)


def onnx_latency(path: str | os.PathLike, *, batch: int = 1, seq_len: int = PREFILL_SEQ, reps: int = 20,
                 warmup: int = 3, providers=None, vocab_size: int | None = None,
                 threads: int | None = None, sess=None) -> dict:
    """Median wall time of one run of the model on [batch, seq_len] tokens, in milliseconds."""
    sess = sess or session(path, providers, threads)
    feeds = feeds_for(sess, batch, seq_len, vocab_size, path=path)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    q = np.percentile(times, [10, 90])
    return {"median_ms": statistics.median(times), "p10_ms": float(q[0]), "p90_ms": float(q[1]),
            "mean_ms": statistics.fmean(times), "reps": reps, "batch": batch, "seq_len": seq_len,
            "provider": sess.get_providers()[0]}


def interleaved_latency(paths: dict[str, str], *, rounds: int = 5, reps: int = 10, **kw) -> dict[str, dict]:
    """Latency of several models measured in alternating rounds (A B A B ...), so that a slow
    phase of a shared machine hits all of them alike; medians over all rounds' runs."""
    sessions = {k: session(p, kw.get("providers"), kw.get("threads")) for k, p in paths.items()}
    runs: dict[str, list[float]] = {k: [] for k in paths}
    last = {}
    for _ in range(rounds):
        for k, p in paths.items():
            r = onnx_latency(p, reps=reps, sess=sessions[k], **{a: b for a, b in kw.items()
                                                                if a not in ("providers", "threads")})
            runs[k].append(r["median_ms"])
            last[k] = r
    out = {}
    for k, v in runs.items():
        out[k] = {**last[k], "median_ms": statistics.median(v), "round_medians_ms": v,
                  "reps": rounds * reps}
    return out


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of CPU scaled-dot-product attention (FlopCounterMode has no formula for
    the CPU kernel): 2*b*h*s_q*s_k*d for each; a causal mask is not discounted, as for the
    other kernels."""
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def graph_flops(module: torch.nn.Module, batch: int = 1, seq_len: int = PREFILL_SEQ) -> int:
    """FLOPs of one forward pass of ``module(input_ids, attention_mask)`` (a captured or
    rewritten graph, or a Hugging Face model) on [batch, seq_len] tokens: matmuls and
    attention (the rest, norms and activations, is a few percent and left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        module(ids, mask)
    return int(counter.get_total_flops())

# ------------------------------------------------------------------------------ for compile

SPEED_SEQ = 128      # prefill length of the latency measurement
SPEED_ROUNDS, SPEED_REPS, SPEED_WARMUP = 3, 10, 2


def measure_latency(dense_path, pruned_path, vocab_size: int, seq_len: int) -> dict:
    """onnxruntime CPU prefill latency ([1, seq_len] tokens) of both models, in alternating
    rounds (dense, pruned, dense, ...); each model's latency is the median of its round
    medians, and the speedup is dense / pruned."""
    lat = interleaved_latency({"dense": str(dense_path), "pruned": str(pruned_path)}, rounds=SPEED_ROUNDS,
                              reps=SPEED_REPS, warmup=SPEED_WARMUP, batch=1, seq_len=seq_len,
                              vocab_size=vocab_size)
    rounds = {k: [float(x) for x in v["round_medians_ms"]] for k, v in lat.items()}
    dense_ms, pruned_ms = lat["dense"]["median_ms"], lat["pruned"]["median_ms"]
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms,
            "speedup": dense_ms / pruned_ms if pruned_ms > 0 else float("inf"),
            "batch": 1, "seq_len": seq_len, "rounds": SPEED_ROUNDS, "reps_per_round": SPEED_REPS,
            "dense_round_ms": rounds["dense"], "pruned_round_ms": rounds["pruned"],
            "measured_on": "onnxruntime CPUExecutionProvider, prefill; dense model exported the same way"}
