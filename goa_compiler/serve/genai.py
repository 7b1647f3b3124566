"""genai_config.json: what onnxruntime-genai needs, beside model.onnx and the tokenizer files,
to load a compile's OUT and generate (``onnxruntime_genai.Model(OUT)``).

The model type is ``decoder``, onnxruntime-genai's generic decoder-only model: the graph is
not one of its model builder's, so no per-family type applies. Each layer's K/V head count
is read by onnxruntime-genai (0.15 on) from the static dims of the past inputs, which is
what lets the layers differ after pruning; the config's head counts are the largest. The
cache is not shared between past and present (its buffers grow per step), so the
continuous-batching engine, which needs one head count for its paged cache, is not for
models with per-layer widths. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderFacts:
    layers: int
    kv_heads: int                # largest over the layers
    head_size: int
    hidden_size: int
    attention_heads: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    position_ids: bool = True    # the graph takes position_ids (else it counts positions from its cache)


def genai_config(f: DecoderFacts, filename: str = "model.onnx") -> dict:
    eos = f.eos_token_id if f.eos_token_id is not None else 0
    pad = f.pad_token_id if f.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": f.bos_token_id if f.bos_token_id is not None else pad,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "context_length": f.context_length,
            "vocab_size": f.vocab_size,
            "type": "decoder",
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": f.head_size,
                "hidden_size": f.hidden_size,
                "num_attention_heads": f.attention_heads,
                "num_hidden_layers": f.layers,
                "num_key_value_heads": f.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if f.position_ids else {}),
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": f.context_length,
                   "min_length": 0, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def eos_ids(config: dict) -> set[int]:
    eos = config.get("model", {}).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}


__all__ = ["DecoderFacts", "genai_config", "eos_ids"]
