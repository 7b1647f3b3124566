"""Tiny RANDOM transformers models, one per architecture family, for structural tests.

Every model is ~64 wide, 2 layers, vocab 256, float32, eval mode, SDPA attention, no
dropout, no KV cache. Weights are random (seeded); biases and norm weights get a small
seeded perturbation so that a bug that slices a bias or a norm wrongly changes outputs.
These models say nothing about pruning quality: use them for shapes, slicing and export.

    model, vocab_size, kind = build("llama-gqa", seed=0)
    save("qwen2", "/tmp/tiny-qwen2")   # a local Hugging Face directory for CLI tests
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    FalconConfig,
    Gemma3TextConfig,
    GPT2Config,
    GPTBigCodeConfig,
    GPTJConfig,
    GPTNeoXConfig,
    BloomConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    GptOssConfig,
    MptConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    XGLMConfig,
)

VOCAB = 256
HIDDEN = 64
LAYERS = 2
MAX_POS = 512


def _llama_like(cls, heads, kv_heads, hidden=HIDDEN, **extra):
    return cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POS,
        **extra,
    )


def _config(family: str):
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS,
                          n_head=4, n_inner=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return _llama_like(LlamaConfig, heads=4, kv_heads=4)
    if family == "llama-gqa":
        # transformers 5 requires hidden % heads == 0 even with an explicit head_dim, hence 96.
        return _llama_like(LlamaConfig, heads=6, kv_heads=2, hidden=96)
    if family == "llama-mqa":
        # one K/V head for 4 query heads, repeated by repeat_kv (expand + reshape)
        return _llama_like(LlamaConfig, heads=4, kv_heads=1)
    if family == "mistral":
        return _llama_like(MistralConfig, heads=8, kv_heads=2, sliding_window=None)
    if family == "qwen2":
        return _llama_like(Qwen2Config, heads=8, kv_heads=2)  # q/k/v biases are built in
    if family == "phi3":
        return _llama_like(Phi3Config, heads=8, kv_heads=2, original_max_position_embeddings=MAX_POS,
                           pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gemma3":
        # heads * head_dim = 128 != hidden 64 (q/o not square, as in real Gemma 3). Layer 0 uses
        # sliding-window attention, layer 1 global, as in real Gemma 3 (5 sliding : 1 global).
        return _llama_like(Gemma3TextConfig, heads=4, kv_heads=2, head_dim=32, query_pre_attn_scalar=32,
                           sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=128,
                         num_attention_heads=4, max_position_embeddings=MAX_POS, dropout=0.0,
                         attention_dropout=0.0, word_embed_proj_dim=HIDDEN)
    if family == "gpt-neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                             num_attention_heads=4, intermediate_size=128, max_position_embeddings=MAX_POS,
                             rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
    if family == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=MAX_POS, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    if family == "falcon":
        # the new decoder architecture: q/k/v of each K/V group fused as [groups, q per group + 2,
        # head], K/V picked by a constant index and broadcast; projections are x @ W.T matmuls
        return FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                            num_kv_heads=2, new_decoder_architecture=True, alibi=False, bias=False,
                            max_position_embeddings=MAX_POS)
    if family == "falcon-mqa":
        # multi-query (one K/V head for every query head), parallel attention and MLP
        return FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                            multi_query=True, new_decoder_architecture=False, parallel_attn=True, alibi=False,
                            bias=False, max_position_embeddings=MAX_POS)
    if family == "gptj":
        # interleaved rotary (every two channels) on the first 8 of each head's 16
        return GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, rotary_dim=8, n_inner=128,
                          n_positions=MAX_POS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0)
    if family == "gpt-bigcode":
        # multi-query with a fused c_attn [q heads | k | v], its one K/V head expanded to the heads
        return GPTBigCodeConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_inner=128,
                                multi_query=True, n_positions=MAX_POS, resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if family == "mpt":
        # ALiBi attention; torch.export needs a sequence range one short of max_seq_len
        return MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=4, expansion_ratio=2,
                         max_seq_len=MAX_POS)
    if family == "bloom":
        # ALiBi attention (counted from the attention mask) with the heads merged into the
        # batch axis of baddbmm and bmm
        return BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4)
    if family == "xglm":
        # fairseq-style attention: q, k, v reshaped to [batch * heads, seq, head_dim] for bmm
        return XGLMConfig(vocab_size=VOCAB, d_model=HIDDEN, num_layers=LAYERS, attention_heads=4, ffn_dim=128,
                          max_position_embeddings=MAX_POS, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "olmo2":
        # q and k normalised over all heads at once (one RMSNorm over the projection)
        return _llama_like(Olmo2Config, heads=4, kv_heads=4, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "gpt-oss":
        # attention sinks (a learned logit per head, concatenated to the scores) and experts
        return _llama_like(GptOssConfig, heads=4, kv_heads=2, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=32,
                           layer_types=["sliding_attention", "full_attention"])
    if family == "mixtral":
        # experts as 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and a router
        return _llama_like(MixtralConfig, heads=4, kv_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2-moe":
        # experts beside a shared expert whose output a sigmoid gate scales
        # (its config names no end-of-sequence token: the others' ids)
        return _llama_like(Qwen2MoeConfig, heads=4, kv_heads=2, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=64, shared_expert_intermediate_size=96,
                           bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES + EXPERTS + list(PARTIAL))}")


FAMILIES = ["gpt2", "llama", "llama-gqa", "mistral", "qwen2", "opt", "gpt-neox", "phi3", "gemma3", "bert",
            "falcon", "falcon-mqa", "gptj", "gpt-bigcode", "llama-mqa", "mpt", "bloom", "xglm"]
ENCODERS = {"bert"}
# mixture-of-experts families: attention, every expert's FFN (and a shared expert) pruned;
# GPT-OSS: transposed experts with biases, gate and up interleaved, attention sinks
EXPERTS = ["mixtral", "qwen2-moe", "gpt-oss"]
# families whose graphs have a structure analysis refuses (the kind named), with its reason
# in the report: the other kind is pruned
PARTIAL = {"olmo2": "attention"}


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add small seeded noise to every bias and every norm weight (in place).

    Initialisers leave biases at 0 and norm weights at 1 (or 0 for Gemma's 1 + w), so a wrong
    slice of them would be invisible; after this it is not.
    """
    g = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or (is_norm and name == "weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def build(family: str, seed: int = 0):
    """Return (model, vocab_size, kind) with kind "causal-lm" or "encoder"."""
    config = _config(family)
    config.use_cache = False
    kind = "encoder" if family in ENCODERS else "causal-lm"
    auto = AutoModel if kind == "encoder" else AutoModelForCausalLM
    torch.manual_seed(seed)
    try:
        model = auto.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    except ValueError:          # a family without SDPA attention (Bloom, MPT, XGLM)
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    perturb_(model, seed)
    return model.eval(), VOCAB, kind


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 ids (one per byte, no merges, no special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-in character for each byte value; byte b gets id b.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save(family: str, path, seed: int = 0) -> str:
    """Write the tiny model, with the 256-id byte tokenizer, as a local Hugging Face directory.

    AutoTokenizer reads the directory back with the tokenizer class registered for the
    family (Qwen2Tokenizer for qwen2), whose defaults add special tokens of their own
    (``<|endoftext|>``: 257 ids for a 256-row embedding); the config names none, so every
    family reads back exactly the byte tokenizer's 256 ids."""
    import json

    model, _, _ = build(family, seed)
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(dict.fromkeys(("bos_token", "eos_token", "unk_token", "pad_token")))
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(path)
