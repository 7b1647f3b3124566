"""Whole experts removed with their router rows (transform/whole_experts.py, --drop-experts).

The oracle: removing expert e is, by definition, the dense model whose router gives e a
logit of -inf (each token's top-k picked among the others). The test masks the dense
model's router logits itself (a wrapped torch.nn.functional.linear that fills the removed
experts' outputs of the router weight's product), zeroes the removed neurons of the experts
that stay as tests/oracle_layout.py does, and compares with the emitted ONNX in
onnxruntime and with the reloaded OUT/hf checkpoint.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from goa_compiler.driver.options import OptionError, validate
from goa_compiler.driver.pipeline import CompileError, CompileOptions, compile_loaded
from goa_compiler.export.checkpoint import load_pruned
from goa_compiler.export.onnx import run_onnx
from goa_compiler.transform import whole_experts as we
from models import tiny
import oracle_layout as ol

TOL = 1e-4


def _count(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def _router_weight(model, block: str):
    mlp = model.get_submodule(block)
    for name, p in mlp.named_parameters():
        if p.dim() == 2 and p.shape[0] == _count(model.config) and "experts" not in name:
            return p
    raise AssertionError(f"no router weight in {block}")


@contextmanager
def _masked_routers(model, removed: dict[str, list[int]]):
    """The dense model's router logits at -inf for the removed experts (independent of the
    compiler's own masking: a wrapped F.linear keyed by the router weights)."""
    masks = {id(_router_weight(model, b)): e for b, e in removed.items()}
    linear = F.linear

    def masked_linear(x, weight, bias=None):
        y = linear(x, weight, bias)
        if id(weight) in masks:
            y = y.clone()
            y[..., masks[id(weight)]] = float("-inf")
        return y

    torch.nn.functional.linear = masked_linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def _as_dense_records(modules: list[dict], removed: dict[str, list[int]], count: int, blocks: dict[int, str]):
    """report.json's records with each expert renumbered from the pruned model's (the kept
    experts in order) to the dense model's."""
    out = []
    for r in modules:
        if "expert" in r:
            gone = set(removed[blocks[r["layer"]]])
            kept = [e for e in range(count) if e not in gone]
            r = {**r, "expert": kept[r["expert"]]}
        out.append(r)
    return out


@pytest.mark.parametrize("family", tiny.EXPERTS)
def test_dropped_experts_equal_the_masked_router(tmp_path, family):
    model, vocab, kind = tiny.build(family)
    dense = copy.deepcopy(model)
    count = _count(model.config)
    out = tmp_path / "out"
    compile_loaded(model, kind, CompileOptions(ratio=0.3, criterion="random", reconstruct="none", drop_experts=1,
                                               num_samples=4, seq_len=16, batch_size=2, seed=3, kv_cache=False),
                   out, tokenizer=tiny.byte_tokenizer())
    report = json.loads((out / "report.json").read_text())
    section = report["whole_experts"]
    removed = section["removed"]
    assert len(removed) == ol.layers(model.config) and all(len(v) == 1 for v in removed.values())
    # the expert of least loss went from every layer
    assert all(v == [min(range(count), key=section["loss"][b].__getitem__)] for b, v in removed.items())
    assert "Whole experts removed" in (out / "report.html").read_text()
    blocks = {int(b.split(".")[-2]): b for b in removed}
    experts = [r for r in report["modules"] if "expert" in r]
    assert len(experts) == ol.layers(model.config) * (count - 1)
    assert any(r["kept"] != list(range(r["total"])) for r in experts)
    # the caller's model has all its experts again
    assert _count(model.config) == count
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    assert report["params"]["before"] == sum(p.numel() for p in dense.parameters())

    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    zeroed = ol.zeroed_dense(dense, family, _as_dense_records(report["modules"], removed, count, blocks))
    with _masked_routers(zeroed, removed):
        ref = ol.dense_output(zeroed, kind, ids, mask)
    got = run_onnx(out / "model.onnx", ids.numpy(), mask.numpy())
    assert ol.relative_error(got, ref) < TOL
    # without the mask the reference is another function: the oracle can fail
    assert ol.relative_error(got, ol.dense_output(zeroed, kind, ids, mask)) > 1e-3

    assert report["checkpoint"]["written"], report["checkpoint"]
    reloaded = load_pruned(out / "hf")
    assert _count(reloaded.config) == count - 1
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask).logits.numpy()
    assert ol.relative_error(again, ref) < TOL


def test_masked_product_fills_the_router_outputs_only():
    w = torch.randn(4, 3)
    other = torch.randn(4, 3)
    x = torch.randn(5, 3)
    mask = torch.tensor([False, True, False, True])
    with we._MaskLogits({id(w): mask}):
        y = F.linear(x, w)
        z = x @ w.T            # (a transposed view is another tensor: not masked)
        u = F.linear(x, other)
    assert torch.isinf(y[:, mask]).all() and torch.equal(y[:, ~mask], F.linear(x, w)[:, ~mask])
    assert torch.isfinite(z).all() and torch.isfinite(u).all()


def test_lowest_loss_experts():
    assert we.lowest([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    assert we.lowest([1.0, 2.0], 0) == []


def test_a_router_that_slicing_changes_is_refused_and_the_model_restored():
    """A router whose choice adds a per-expert bias to sigmoid scores can still pick a masked
    expert (its bias alone outranks the others): removing it is not masking it."""
    model, vocab, _ = tiny.build("mixtral")
    router = model.model.layers[0].mlp.gate
    router.register_buffer("correction", torch.tensor([5.0, 0.0, 0.0, 0.0]))

    def forward(self, h):
        h = h.reshape(-1, self.hidden_dim)
        logits = F.linear(h, self.weight)
        scores = torch.sigmoid(logits)
        _, index = torch.topk(scores + self.correction, self.top_k, dim=-1)
        weights = scores.gather(1, index)
        return logits, weights / weights.sum(-1, keepdim=True).clamp_min(1e-9), index

    router.forward = forward.__get__(router)
    layers = we.moe_layers(model)
    assert any(t.name == "correction" and t.axis == 0 for t in layers[0].router)
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    from goa_compiler.prune.calibration import batches

    _, first = we.expert_losses(model, layers, batches(ids, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(we.ExpertsRefused, match="does not compute the dense router with them masked"):
        we.drop(model, layers, {layers[0].block: [0], layers[1].block: [0]}, first)
    assert model.config.num_local_experts == 4 and router.num_experts == 4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_refusals(tmp_path):
    model, _, kind = tiny.build("mixtral")
    opts = dict(ratio=0.2, criterion="random", reconstruct="none", num_samples=2, seq_len=16, kv_cache=False)
    with pytest.raises(CompileError, match="at least one must stay"):
        compile_loaded(model, kind, CompileOptions(**opts, drop_experts=4), tmp_path / "a",
                       tokenizer=tiny.byte_tokenizer())
    llama, _, kind = tiny.build("llama")
    with pytest.raises(CompileError, match="no mixture-of-experts layer"):
        compile_loaded(llama, kind, CompileOptions(**opts, drop_experts=1), tmp_path / "b",
                       tokenizer=tiny.byte_tokenizer())
    with pytest.raises(OptionError, match="--drop-experts with --measure-speed"):
        validate(CompileOptions(ratio=0.2, drop_experts=1, measure_speed=True))
    assert not CompileOptions(ratio=0.2, criterion="random", reconstruct="none", drop_experts=1).data_free


def test_cli_refuses_before_loading_calibration(tmp_path, capsys):
    """`--dry-run` checks that the model has experts to remove; an ONNX input is refused."""
    from goa_compiler.ui import cli

    llama = tiny.save("llama", tmp_path / "llama")
    assert cli.main(["compile", llama, "--ratio", "0.2", "--drop-experts", "1", "--out", str(tmp_path / "o"),
                     "--dry-run", "--quiet"]) == 2
    assert "no mixture-of-experts layer" in capsys.readouterr().err
    moe = tiny.save("mixtral", tmp_path / "moe")
    assert cli.main(["compile", moe, "--ratio", "0.2", "--drop-experts", "1", "--out", str(tmp_path / "o"),
                     "--dry-run", "--quiet"]) == 0
    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"")
    assert cli.main(["compile", str(fake), "--tokenizer", moe, "--ratio", "0.2", "--drop-experts", "1",
                     "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "--drop-experts needs the PyTorch model" in capsys.readouterr().err
