"""What an emitted model takes: its inputs read from the onnxruntime session, and the feeds
for a forward over whole sequences or for one step of cached decoding.

Torch-free (numpy and onnxruntime only): `goa generate` and deployment code import it.
Two signatures are served:

- the plain graph: ``input_ids`` [batch, seq] (+ ``attention_mask``) -> logits;
- the KV-cache decoder (capture/decoder.py): ``input_ids``, ``attention_mask`` [batch,
  past+seq], ``position_ids``, ``past_key_values.{i}.key/.value`` [batch, heads_i, past,
  dim_i] -> ``logits``, ``present.{i}.key/.value``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class SignatureError(ValueError):
    """The model's inputs are neither signature: one line naming them."""


@dataclass(frozen=True)
class PastInput:
    name: str
    layer: int
    part: str               # "key" or "value"
    heads: int
    dim: int
    dtype: type

    @property
    def present(self) -> str:
        return f"present.{self.layer}.{self.part}"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[str, ...]
    past: tuple[PastInput, ...]            # empty for the plain graph

    @property
    def cached(self) -> bool:
        return bool(self.past)

    def kv_bytes_per_token(self) -> int:
        """Bytes the cache grows by per token and sequence (every layer's keys and values)."""
        return int(sum(p.heads * p.dim * np.dtype(p.dtype).itemsize for p in self.past))


def signature(sess, path=None) -> Signature:
    """Read the inputs of an onnxruntime session; SignatureError for anything else. Cache
    inputs whose heads or head size are symbols (onnxruntime-genai's model builder names the
    head size ``kv_cache_dim``) take them from the genai_config.json beside ``path``."""
    names = tuple(i.name for i in sess.get_inputs())
    past = []
    for i in sess.get_inputs():
        m = PAST.match(i.name)
        if m is None:
            if i.name not in TOKEN_INPUTS:
                raise SignatureError(f"unexpected model input {i.name!r} (inputs: {', '.join(names)})")
            continue
        heads, dim = (i.shape[1], i.shape[3]) if len(i.shape) == 4 else (None, None)
        if len(i.shape) == 4 and not (isinstance(heads, int) and isinstance(dim, int)):
            heads, dim = _from_genai_config(path, heads, dim)
        if not (isinstance(heads, int) and isinstance(dim, int)) or len(i.shape) != 4:
            raise SignatureError(f"input {i.name} has no static heads and head size: {i.shape}")
        past.append(PastInput(i.name, int(m.group(1)), m.group(2), heads, dim, _NUMPY.get(i.type, np.float32)))
    if "input_ids" not in names:
        raise SignatureError(f"the model has no input_ids (inputs: {', '.join(names)})")
    if past and "attention_mask" not in names:
        raise SignatureError("a KV-cache model needs an attention_mask input")
    return Signature(names, tuple(past))


def _from_genai_config(path, heads, dim):
    """(heads, head size): the static ones as given, the symbolic ones from the decoder section
    of genai_config.json beside the model ``path`` (unchanged when there is none)."""
    import json
    from pathlib import Path

    if path is None or not (Path(path).parent / "genai_config.json").is_file():
        return heads, dim
    try:
        dec = json.loads((Path(path).parent / "genai_config.json").read_text())["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return heads, dim
    return (heads if isinstance(heads, int) else dec.get("num_key_value_heads"),
            dim if isinstance(dim, int) else dec.get("head_size"))


def positions(mask: np.ndarray, past: int = 0) -> np.ndarray:
    """Position of each of the last ``mask.shape[1] - past`` tokens: the number of real tokens
    before it (what capture derives for the plain graph, so left padding works alike)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.clip(pos[:, past:], 0, None).astype(np.int64)


def empty_past(sig: Signature, batch: int) -> dict[str, np.ndarray]:
    return {p.name: np.zeros((batch, p.heads, 0, p.dim), dtype=p.dtype) for p in sig.past}


def full_feeds(sig: Signature, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds for one forward over whole sequences (no past): what evaluation and latency run."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
    feeds = {"input_ids": ids}
    if "attention_mask" in sig.inputs:
        feeds["attention_mask"] = mask
    if "position_ids" in sig.inputs:
        feeds["position_ids"] = positions(mask)
    feeds.update(empty_past(sig, ids.shape[0]))
    return feeds


def step_feeds(ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray], inputs=("position_ids",)) -> dict:
    """Feeds for the next ``ids`` [batch, n] after a cache of ``past`` tokens; ``mask`` covers
    past and new tokens; position_ids when ``inputs`` (the model's) has it (a graph without
    it counts positions from its cache)."""
    length = next(iter(past.values())).shape[2] if past else 0
    feeds = {"input_ids": np.asarray(ids, dtype=np.int64), "attention_mask": np.asarray(mask, dtype=np.int64),
             **past}
    if "position_ids" in inputs:
        feeds["position_ids"] = positions(mask, length)
    return feeds


def next_past(sig: Signature, output_names: list[str], outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The present outputs of a step, as the next step's past inputs."""
    by_name = dict(zip(output_names, outputs))
    return {p.name: by_name[p.present] for p in sig.past}
