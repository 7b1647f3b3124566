"""The oracle's own knowledge of the tiny families: where each layer's projections live.

This module is deliberately independent of the compiler: it imports nothing from
``goa_compiler``. Which channels a removed unit owns is derived here from the model alone
(its config and the module that owns each weight), never from the compiler's analysis:

* head ``h`` of an attention output projection owns input columns ``[h*d, (h+1)*d)`` of
  that projection, ``d`` the config's ``head_dim`` (or ``hidden_size // heads``);
* neuron ``j`` of an FFN down projection owns input column ``j``;
* the input axis is the weight's own layout: 1 for ``nn.Linear`` (``[out, in]``), 0 for
  GPT-2's ``Conv1D`` (``[in, out]``).

``LAYOUT`` names, per family, each layer's level-1 projections (the ones whose output
channels a unit owns: q/k/v or a fused qkv, up/gate or a fused gate_up) and its level-2
projection (attention output, FFN down). ``{L}`` is the layer index.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper


@dataclass(frozen=True)
class Block:
    level1: tuple[str, ...]     # projections whose OUTPUT channels belong to the units
    level2: str                 # the projection whose INPUT channels belong to the units


@dataclass(frozen=True)
class Family:
    attention: Block
    ffn: Block | None            # None: the FFNs are experts only (EXPERTS)


def _llama(prefix: str = "model.layers.{L}") -> Family:
    return Family(
        Block((f"{prefix}.self_attn.q_proj", f"{prefix}.self_attn.k_proj", f"{prefix}.self_attn.v_proj"),
              f"{prefix}.self_attn.o_proj"),
        Block((f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"), f"{prefix}.mlp.down_proj"))


LAYOUT: dict[str, Family] = {
    "gpt2": Family(Block(("transformer.h.{L}.attn.c_attn",), "transformer.h.{L}.attn.c_proj"),
                   Block(("transformer.h.{L}.mlp.c_fc",), "transformer.h.{L}.mlp.c_proj")),
    "llama": _llama(),
    "llama-gqa": _llama(),
    "llama-mqa": _llama(),
    "mistral": _llama(),
    "qwen2": _llama(),
    "gemma3": _llama(),
    "phi3": Family(Block(("model.layers.{L}.self_attn.qkv_proj",), "model.layers.{L}.self_attn.o_proj"),
                   Block(("model.layers.{L}.mlp.gate_up_proj",), "model.layers.{L}.mlp.down_proj")),
    "opt": Family(
        Block(tuple(f"model.decoder.layers.{{L}}.self_attn.{p}_proj" for p in "qkv"),
              "model.decoder.layers.{L}.self_attn.out_proj"),
        Block(("model.decoder.layers.{L}.fc1",), "model.decoder.layers.{L}.fc2")),
    "gpt-neox": Family(Block(("gpt_neox.layers.{L}.attention.query_key_value",), "gpt_neox.layers.{L}.attention.dense"),
                       Block(("gpt_neox.layers.{L}.mlp.dense_h_to_4h",), "gpt_neox.layers.{L}.mlp.dense_4h_to_h")),
    "falcon": Family(Block(("transformer.h.{L}.self_attention.query_key_value",), "transformer.h.{L}.self_attention.dense"),
                     Block(("transformer.h.{L}.mlp.dense_h_to_4h",), "transformer.h.{L}.mlp.dense_4h_to_h")),
    "falcon-mqa": Family(Block(("transformer.h.{L}.self_attention.query_key_value",),
                               "transformer.h.{L}.self_attention.dense"),
                         Block(("transformer.h.{L}.mlp.dense_h_to_4h",), "transformer.h.{L}.mlp.dense_4h_to_h")),
    "gptj": Family(Block(tuple(f"transformer.h.{{L}}.attn.{p}_proj" for p in "qkv"), "transformer.h.{L}.attn.out_proj"),
                   Block(("transformer.h.{L}.mlp.fc_in",), "transformer.h.{L}.mlp.fc_out")),
    "gpt-bigcode": Family(Block(("transformer.h.{L}.attn.c_attn",), "transformer.h.{L}.attn.c_proj"),
                          Block(("transformer.h.{L}.mlp.c_fc",), "transformer.h.{L}.mlp.c_proj")),
    # ALiBi attention: per-head biases computed in the graph, gathered with the kept heads
    "mpt": Family(Block(("transformer.blocks.{L}.attn.Wqkv",), "transformer.blocks.{L}.attn.out_proj"),
                  Block(("transformer.blocks.{L}.ffn.up_proj",), "transformer.blocks.{L}.ffn.down_proj")),
    # heads merged into the batch axis of the attention's products (Bloom with ALiBi)
    "bloom": Family(Block(("transformer.h.{L}.self_attention.query_key_value",),
                          "transformer.h.{L}.self_attention.dense"),
                    Block(("transformer.h.{L}.mlp.dense_h_to_4h",), "transformer.h.{L}.mlp.dense_4h_to_h")),
    "xglm": Family(Block(tuple(f"model.layers.{{L}}.self_attn.{p}_proj" for p in "qkv"),
                         "model.layers.{L}.self_attn.out_proj"),
                   Block(("model.layers.{L}.fc1",), "model.layers.{L}.fc2")),
    "mixtral": Family(_llama().attention, None),        # experts only: EXPERTS
    "gpt-oss": Family(_llama().attention, None),
    "qwen2-moe": Family(_llama().attention, Block(tuple(f"model.layers.{{L}}.mlp.shared_expert.{p}_proj"
                                                        for p in ("gate", "up")),
                                                  "model.layers.{L}.mlp.shared_expert.down_proj")),
    "bert": Family(
        Block(tuple(f"encoder.layer.{{L}}.attention.self.{p}" for p in ("query", "key", "value")),
              "encoder.layer.{L}.attention.output.dense"),
        Block(("encoder.layer.{L}.intermediate.dense",), "encoder.layer.{L}.output.dense")),
}

# mixture-of-experts layers, experts kept as 3-D parameters ([E, out, in]): an FFN record with
# an ``expert`` is that expert's share of them (``down_proj[expert]``)
EXPERTS: dict[str, Block] = {
    family: Block(("model.layers.{L}.mlp.experts.gate_up_proj",), "model.layers.{L}.mlp.experts.down_proj")
    for family in ("mixtral", "qwen2-moe", "gpt-oss")
}


# the families models/tiny.py lists in PARTIAL: the one kind analysis prunes there
PARTIAL: dict[str, tuple[str, Block]] = {
    "olmo2": ("ffn", _llama().ffn),
}


# ------------------------------------------------------------------ config and layout

def heads(config) -> int:
    return int(config.num_attention_heads)


def kv_heads(config) -> int:
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1                                    # Falcon, GPT-BigCode: one K/V head
    if getattr(config, "new_decoder_architecture", False):
        return int(config.num_kv_heads)             # Falcon's grouped K/V
    return int(getattr(config, "num_key_value_heads", None) or heads(config))


def attention_units(config) -> int:
    """Heads, or whole K/V groups where there are fewer K/V heads than query heads; with a
    single K/V head (multi-query) the query heads are the units and the K/V head stays."""
    return kv_heads(config) if 1 < kv_heads(config) < heads(config) else heads(config)


def head_dim(config) -> int:
    d = getattr(config, "head_dim", None)
    return int(d) if d else int(config.hidden_size) // heads(config)


def layers(config) -> int:
    return int(config.num_hidden_layers)


def in_axis(module: torch.nn.Module) -> int:
    """The axis of ``module.weight`` indexed by the module's input features."""
    if isinstance(module, torch.nn.Linear):
        return 1                                    # [out, in]
    if type(module).__name__ == "Conv1D":           # transformers' GPT-2 Conv1D: [in, out]
        return 0
    raise TypeError(f"no known weight layout for {type(module).__name__}")


def out_axis(module: torch.nn.Module) -> int:
    return 1 - in_axis(module)


def block(family: str, kind: str, layer: int, expert: int | None = None) -> Block:
    if expert is not None:
        b = EXPERTS[family]
    elif family in PARTIAL:
        assert PARTIAL[family][0] == kind, (family, kind)
        b = PARTIAL[family][1]
    else:
        b = getattr(LAYOUT[family], kind)
    return Block(tuple(n.format(L=layer) for n in b.level1), b.level2.format(L=layer))


def input_width(model, family: str, kind: str, layer: int, expert: int | None = None) -> int:
    """Input features of the level-2 projection (heads * head_dim, or the FFN width)."""
    weight, axis = level2_weight(model, block(family, kind, layer, expert).level2, expert)
    return int(weight.shape[axis])


def removed(rec: dict) -> list[int]:
    """Units the report says were removed (query heads for attention, neurons for an FFN)."""
    return sorted(set(range(rec["total"])) - set(rec["kept"]))


def owned_columns(config, kind: str, units: list[int]) -> list[int]:
    """Level-2 input columns owned by ``units``: d per head, one per neuron."""
    if kind == "attention":
        d = head_dim(config)
        return [c for h in units for c in range(h * d, (h + 1) * d)]
    if kind == "ffn":
        return list(units)
    raise ValueError(f"unknown module kind {kind!r}")


# ------------------------------------------------------------------ the oracle

def zeroed_dense(model: torch.nn.Module, family: str, modules: list[dict]) -> torch.nn.Module:
    """A copy of the dense ``model`` whose removed units' level-2 input columns are zero.

    ``modules`` are report.json's per-module records (name, layer, kind, total, kept). A
    record names its layer and kind; where its columns live comes from ``LAYOUT`` and the
    config only."""
    dense = copy.deepcopy(model)
    cfg = dense.config
    for rec in modules:
        kind, layer = rec["kind"], rec["layer"]
        weight, axis = level2_weight(dense, block(family, kind, layer, rec.get("expert")).level2, rec.get("expert"))
        cols = owned_columns(cfg, kind, removed(rec))
        assert all(0 <= c < weight.shape[axis] for c in cols), (rec["name"], cols)
        with torch.no_grad():
            weight.index_fill_(axis, torch.as_tensor(cols, dtype=torch.long), 0.0)
    return dense


def level2_weight(model: torch.nn.Module, name: str, expert: int | None = None) -> tuple[torch.Tensor, int]:
    """(the level-2 weight, its input axis): a module's ``weight``, or for an expert record
    ``expert``'s share of the 3-D parameter ``name`` ([E, out, in]; [E, in, out] where the
    experts module says ``is_transposed``)."""
    if expert is None:
        lin = model.get_submodule(name)
        return lin.weight, in_axis(lin)
    owner, _, leaf = name.rpartition(".")
    transposed = bool(getattr(model.get_submodule(owner), "is_transposed", False))
    return getattr(model.get_submodule(owner), leaf)[expert], 0 if transposed else 1


def dense_output(model: torch.nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """What the emitted ONNX returns: logits of a causal LM, last_hidden_state of an encoder."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False) if kind == "causal-lm" \
            else model(input_ids=ids, attention_mask=mask)
    return getattr(out, "logits" if kind == "causal-lm" else "last_hidden_state").numpy()


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


# ------------------------------------------------------------------ parameter counts

def unit_params(model, family: str, kind: str, layer: int) -> tuple[int, int]:
    """(units, parameters removed with one unit) of one block, from the weights' shapes.

    A unit owns an equal share of every level-1 weight's output rows and bias (fused
    projections included) and of the level-2 weight's input columns; the level-2 bias and
    the norms are not per unit. Units: heads, whole K/V groups where there are fewer K/V
    heads than query heads (a single K/V head: query heads), or FFN neurons."""
    mods = dict(model.named_modules())
    b = block(family, kind, layer)
    cfg = model.config
    if kind == "attention":
        units = attention_units(cfg)
    else:
        units = input_width(model, family, kind, layer)
    total = mods[b.level2].weight.numel()
    if kind == "attention" and kv_heads(cfg) == 1 < heads(cfg):
        # multi-query: a unit owns its query rows of the level 1 (the first heads * d rows
        # of a fused projection), never the shared K/V rows
        q = mods[b.level1[0]]
        rows = heads(cfg) * head_dim(cfg)
        total += rows * q.weight.shape[in_axis(q)] + (rows if getattr(q, "bias", None) is not None else 0)
        return units, total // units
    for name in b.level1:
        m = mods[name]
        total += m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
    assert total % units == 0, (family, kind, layer, total, units)
    return units, total // units


def folded_constants(model, family: str) -> int:
    """Elements of float tensors that the model computes from constants and that the ONNX
    exporter folds into initializers: MPT's ALiBi biases, one row of ``max_seq_len``
    positions per head (kept whole in a pruned model, which gathers the kept heads' rows)."""
    if family == "mpt":
        return model.config.n_heads * model.config.max_seq_len
    if family == "bloom":
        return heads(model.config)            # the ALiBi slopes, one per head (the biases need the mask)
    return 0


def onnx_float_initializers(path) -> int:
    """Elements of the ONNX file's floating-point tensor initializers (one or more
    dimensions), counted with onnx alone. The exporter's 0-d scalar constants (epsilons,
    scales) are not parameters and are left out."""
    m = onnx.load(str(path))
    total = 0
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        if np.issubdtype(arr.dtype, np.floating) and arr.ndim >= 1:
            total += int(arr.size)
    return total


def genai_sequence(out, prompt, max_length: int) -> list[int]:
    """The greedy sequence onnxruntime-genai generates from a compile's OUT for ``prompt`` (ids)."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))
