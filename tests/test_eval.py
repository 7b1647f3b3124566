import math

import pytest
import torch

from goa_compiler.measure.eval import perplexity_onnx, perplexity_torch
from models.tiny import build


class LogitsModule(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def random_windows(vocab, n=5, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


@pytest.fixture(scope="module")
def tiny_llama():
    model, vocab, _ = build("llama", seed=0)
    return model, vocab


@pytest.fixture(scope="module")
def llama_onnx(tiny_llama, tmp_path_factory):
    model, vocab = tiny_llama
    path = tmp_path_factory.mktemp("onnx") / "tiny-llama.onnx"
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    example = random_windows(vocab, n=2, seq=16, seed=1)
    torch.onnx.export(LogitsModule(model).eval(), (example, torch.ones_like(example)), str(path), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)
    return path


def test_perplexity_matches_a_direct_computation(tiny_llama):
    model, vocab = tiny_llama
    windows = random_windows(vocab)
    result = perplexity_torch(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).double(), windows[:, 1:].reshape(-1))
    assert result["tokens"] == 5 * 23 and result["windows"] == 5
    assert result["nll"] == pytest.approx(expected.item(), rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
    # a random model on random tokens is near chance: ppl close to the vocabulary size
    assert 0.5 * vocab < result["ppl"] < 2 * vocab


def test_batch_size_does_not_change_the_result(tiny_llama):
    model, vocab = tiny_llama
    windows = random_windows(vocab, n=7)
    a = perplexity_torch(model, windows, batch_size=1)
    b = perplexity_torch(model, windows, batch_size=4)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)


def test_plain_module_returning_logits(tiny_llama):
    model, vocab = tiny_llama
    windows = random_windows(vocab)
    assert perplexity_torch(LogitsModule(model), windows)["nll"] == pytest.approx(
        perplexity_torch(model, windows)["nll"], rel=1e-9)


def test_onnx_and_torch_agree(tiny_llama, llama_onnx):
    model, vocab = tiny_llama
    windows = random_windows(vocab, n=5, seq=40, seed=2)  # a shape not seen at export
    t = perplexity_torch(model, windows, batch_size=2)
    o = perplexity_onnx(llama_onnx, windows, batch_size=3)
    assert (o["tokens"], o["windows"]) == (t["tokens"], t["windows"])
    assert o["nll"] == pytest.approx(t["nll"], rel=1e-5)


def test_bad_windows_are_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError):
        perplexity_torch(model, torch.zeros(4, 1, dtype=torch.long))
