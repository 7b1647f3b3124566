"""`goa generate`: text from a compile's OUT with onnxruntime only, decoding with the KV cache.

Torch-free on purpose (numpy, onnxruntime and the ``tokenizers`` library): what a deployment
imports. One loop of its own rather than onnxruntime-genai, which is optional here: the
prefill runs the prompt once with an empty cache, then each step feeds one token and the
cache the previous step returned (tools/bench.py decode compares this loop with
onnxruntime-genai and with re-running the whole sequence).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from goa_compiler.serve.feeds import SignatureError, full_feeds, signature
from goa_compiler.serve.genai import eos_ids

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class GenerateError(ValueError):
    """Bad input to generation: one line for the user."""


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; else softmax(logits / T) restricted to the smallest
    set of tokens whose probability reaches ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Decoder:
    path: Path
    session: object
    sig: object
    tokenizer: object
    config: dict
    output_names: list[str] = field(default_factory=list)

    @property
    def context_length(self) -> int:
        return int(self.config["model"]["context_length"])


def load(out: str | Path, provider: str = "cpu") -> Decoder:
    """OUT of a KV-cache compile: model.onnx, genai_config.json, tokenizer.json."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    out = Path(out)
    if not out.is_dir():
        raise GenerateError(f"{out} is not a directory (give a compile's OUT)")
    missing = [f for f in ("model.onnx", "genai_config.json", "tokenizer.json") if not (out / f).is_file()]
    if missing:
        hint = " (compiled with --no-kv-cache, or not a compile output)" if "genai_config.json" in missing else ""
        raise GenerateError(f"{out} has no {', '.join(missing)}{hint}")
    if provider not in PROVIDERS:
        raise GenerateError(f"unknown provider {provider!r} (one of {', '.join(PROVIDERS)})")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise GenerateError(f"{name} is not available in this onnxruntime "
                            f"({', '.join(ort.get_available_providers())}; install onnxruntime-gpu for cuda)")
    try:
        config = json.loads((out / "genai_config.json").read_text(encoding="utf-8"))
        int(config["model"]["context_length"])
    except (ValueError, KeyError, TypeError) as e:
        raise GenerateError(f"{out}/genai_config.json is not a usable config ({type(e).__name__}: {e})") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(out / "model.onnx"), options, providers=[name])
        sig = signature(sess, out / "model.onnx")
    except SignatureError as e:
        raise GenerateError(f"{out}/model.onnx: {e}") from e
    except Exception as e:  # noqa: BLE001 - onnxruntime's load errors have no common base class
        raise GenerateError(f"{out}/model.onnx: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})") from e
    if not sig.cached:
        raise GenerateError(f"{out}/model.onnx has no KV cache inputs (compiled with --no-kv-cache)")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    return Decoder(out, sess, sig, tok, config, [o.name for o in sess.get_outputs()])


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row of logits."""
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, s.top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(rng.choice(keep, p=q))


def generate(dec: Decoder, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             on_token: Callable[[int], None] | None = None) -> dict:
    """Tokens after ``prompt_ids`` until ``max_new_tokens`` or an end-of-sequence token, with
    the timings of the prefill and of each decode step (milliseconds). The cache stays in
    onnxruntime's own tensors (OrtValue) from one step to the next: each step's present
    outputs are the next step's past inputs without a copy through numpy."""
    import onnxruntime as ort

    if not prompt_ids:
        raise GenerateError("the prompt is empty")
    if len(prompt_ids) + max_new_tokens > dec.context_length:
        raise GenerateError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds the "
                            f"model's {dec.context_length} positions")
    rng = np.random.default_rng(sampling.seed)
    stop = eos_ids(dec.config)
    names = dec.output_names
    present = {p.present: p.name for p in dec.sig.past}

    def run(feeds: dict) -> tuple[np.ndarray, dict]:
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                  for k, v in feeds.items()}
        outs = dict(zip(names, dec.session.run_with_ort_values(names, values)))
        return outs["logits"].numpy()[0, -1], {present[k]: v for k, v in outs.items() if k in present}

    ids = np.asarray([prompt_ids], dtype=np.int64)
    t = time.perf_counter()
    logits, past = run(full_feeds(dec.sig, ids))
    prefill_ms = (time.perf_counter() - t) * 1e3
    length = len(prompt_ids)
    tokens, steps = [], []
    while True:
        nxt = choose(logits, sampling, rng)
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if nxt in stop or len(tokens) >= max_new_tokens:
            break
        feeds = {"input_ids": np.array([[nxt]], dtype=np.int64),
                 "attention_mask": np.ones((1, length + 1), dtype=np.int64), **past}
        if "position_ids" in dec.sig.inputs:
            feeds["position_ids"] = np.array([[length]], dtype=np.int64)
        t = time.perf_counter()
        logits, past = run(feeds)
        steps.append((time.perf_counter() - t) * 1e3)
        length += 1
    per_token = float(np.median(steps)) if steps else None
    return {"prompt_tokens": len(prompt_ids), "tokens": tokens,
            "timings": {"prefill_ms": prefill_ms, "decode_ms_per_token": per_token,
                        "decode_tokens_per_s": 1e3 / per_token if per_token else None,
                        "provider": dec.session.get_providers()[0]}}


class TextStream:
    """Decoded text as tokens arrive: each call returns what the new token adds (a token that
    ends inside a multi-byte character adds nothing until the character is complete)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new
