import json

import pytest
import torch

from goa_compiler.capture.sources import LoadedModel, ModelLoadError, embedded_bert_path, load_model
from models.tiny import FAMILIES, build, save


def run(model, kind, vocab, seq=12):
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if kind == "causal-lm" else out.last_hidden_state


def one_line_error(excinfo, spec):
    message = str(excinfo.value)
    assert "\n" not in message and spec in message
    return message


# --- tiny builders -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_tiny_model_reads_back_with_the_byte_tokenizer(family, tmp_path):
    """AutoTokenizer picks the family's own tokenizer class (Qwen2Tokenizer for qwen2), whose
    defaults add special tokens: the saved directory must still give 256 ids, byte b as b."""
    from transformers import AutoTokenizer

    from models.tiny import byte_tokenizer

    tok = AutoTokenizer.from_pretrained(save(family, tmp_path / family))
    text = "In the beginning, caf\u00e9 \u4e2d\t<|endoftext|>\n"
    assert len(tok) == 256
    assert tok(text, add_special_tokens=True)["input_ids"] == byte_tokenizer()(text)["input_ids"] == \
        list(text.encode("utf-8"))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_builds_and_runs(family):
    model, vocab, kind = build(family, seed=0)
    assert kind == ("encoder" if family == "bert" else "causal-lm")
    # sdpa where the family has it (MPT, Bloom and XGLM have eager attention only)
    assert not model.training and model.config._attn_implementation == ("eager" if family in ("mpt", "bloom", "xglm") else "sdpa")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = run(model, kind, vocab)
    assert out.shape == (2, 12, vocab if kind == "causal-lm" else model.config.hidden_size)
    assert torch.isfinite(out).all()
    # biases and norm weights were perturbed: a wrong slice of them would show
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().min() > 0, name
        if "norm" in name.lower() and name.endswith("weight"):
            assert p.std() > 0, name


def test_tiny_structures_of_interest():
    llama_gqa = build("llama-gqa")[0].config
    assert (llama_gqa.num_attention_heads, llama_gqa.num_key_value_heads) == (6, 2)
    assert build("llama")[0].config.num_key_value_heads == 4
    assert build("qwen2")[0].model.layers[0].self_attn.k_proj.bias is not None
    assert build("gpt-neox")[0].gpt_neox.layers[0].attention.rotary_ndims == 8  # half of head size 16
    phi3 = build("phi3")[0].model.layers[0]
    assert hasattr(phi3.self_attn, "qkv_proj") and hasattr(phi3.mlp, "gate_up_proj")
    gemma = build("gemma3")[0].model.layers[0].self_attn
    assert hasattr(gemma, "q_norm") and hasattr(gemma, "k_norm")


def test_tiny_build_is_seeded():
    a, b, c = (build("gpt2", seed=s)[0].state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- local directories ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_saved_tiny_model_loads_from_its_directory(family, tmp_path):
    path = save(family, tmp_path / family)
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel) and loaded.spec == path and loaded.path == path
    model, vocab, kind = build(family)
    assert loaded.kind == kind and type(loaded.model) is type(model)
    assert not loaded.model.training and loaded.model.config._attn_implementation == "sdpa"
    assert torch.allclose(run(loaded.model, kind, vocab), run(model, kind, vocab), atol=1e-6)
    assert len(loaded.tokenizer) == vocab
    assert loaded.tokenizer("hi", add_special_tokens=False)["input_ids"] == [104, 105]


def test_directory_without_tokenizer_gives_none(tmp_path):
    build("llama")[0].save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).tokenizer is None


def test_embedded_bert_is_an_encoder():
    loaded = load_model(embedded_bert_path())
    assert loaded.kind == "encoder" and type(loaded.model).__name__ == "BertModel"
    assert loaded.model.config.num_hidden_layers == 6 and loaded.tokenizer is not None


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/model.gguf", "no/such/deep/path"])
def test_missing_paths(spec):
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    assert "not found" in one_line_error(e, spec)


def test_unreachable_hub_id():
    spec = "no-such-org/no-such-model"
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    assert "hub" in one_line_error(e, spec)


def test_directory_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path))
    assert "config.json" in one_line_error(e, str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"junk")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(other))
    one_line_error(e, str(other))


def test_corrupt_gguf_leaves_no_cache(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as e:
        load_model(str(bad), cache_dir=str(cache))
    one_line_error(e, str(bad))
    assert not cache.exists() or not any(cache.iterdir())


# --- the real checkpoint -------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_alias_converts_once_then_loads_from_cache(tmp_path):
    first = load_model("smollm2-135m", cache_dir=str(tmp_path))
    config = first.model.config
    assert first.kind == "causal-lm" and type(first.model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.tie_word_embeddings
    assert first.model.lm_head.weight.data_ptr() == first.model.model.embed_tokens.weight.data_ptr()
    assert first.model.config._attn_implementation == "sdpa"
    assert first.path == str(tmp_path / "smollm2-135m") and "converted now" in first.source
    saved = json.loads((tmp_path / "smollm2-135m" / "config.json").read_text())
    assert "quantization_config" not in saved
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temporary leftovers

    second = load_model("smollm2-135m", cache_dir=str(tmp_path))
    assert "cached" in second.source
    assert second.model.lm_head.weight.data_ptr() == second.model.model.embed_tokens.weight.data_ptr()
    text = ("The quick brown fox jumps over the lazy dog. "
            "The capital of France is Paris, and the capital of Germany is Berlin.")
    ids = first.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 20
    assert second.tokenizer(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        a, b = first.model(input_ids=ids).logits, second.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    # the dequantized model is a working LM: the text is far more likely than chance
    nll = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:])
    assert nll < 4.0  # chance would be log(49152) = 10.8; measured 2.6
