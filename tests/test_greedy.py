"""Calibration, scoring and greedy reconstruction through the whole compiler on tiny models."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from goa_compiler.export.onnx import run_onnx
from goa_compiler.driver.pipeline import CompileOptions, compile_loaded
from models import tiny


def _compile(family, tmp_path, name="out", **kw):
    model, vocab, kind = tiny.build(family)
    opts = dict(ratio=0.4, criterion="goa", reconstruct="refit", num_samples=8, seq_len=32, seed=0)
    opts.update(kw)
    res = compile_loaded(copy.deepcopy(model), kind, CompileOptions(**opts), tmp_path / name,
                         tokenizer=tiny.byte_tokenizer())
    return model, vocab, res


def _dense_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


def test_ratio_zero_compiles_to_the_dense_model(tmp_path):
    model, vocab, res = _compile("llama-gqa", tmp_path, ratio=0.0)
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = _dense_logits(model, ids)
    got = run_onnx(tmp_path / "out" / "model.onnx", ids.numpy())
    assert res.report["params"]["after"] == res.report["params"]["before"]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("criterion,reconstruct", [
    ("goa", "paper"), ("flap", "none"), ("wanda-sp", "none"), ("magnitude", "refit"), ("goa", "mean")])
def test_every_criterion_and_reconstruction_compiles(tmp_path, criterion, reconstruct):
    _, _, res = _compile("llama-gqa", tmp_path, criterion=criterion, reconstruct=reconstruct)
    r = res.report
    assert r["criterion"] == criterion and r["reconstruction"] == reconstruct
    assert r["params"]["after"] < r["params"]["before"]
    assert r["calibration"]["samples"] == 8 and r["calibration"]["seq_len"] == 32
    assert r["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4
    if criterion == "flap" or reconstruct == "mean":   # bias compensation: a bias for o_proj/down_proj
        assert r["new_biases"]
    else:
        assert not r["new_biases"]


def test_same_seed_same_result(tmp_path):
    _, _, a = _compile("qwen2", tmp_path, name="a", criterion="random", reconstruct="refit", seed=5)
    _, _, b = _compile("qwen2", tmp_path, name="b", criterion="random", reconstruct="refit", seed=5)
    _, _, c = _compile("qwen2", tmp_path, name="c", criterion="random", reconstruct="refit", seed=6)
    keep = lambda r: [m["kept"] for m in r.report["modules"]]  # noqa: E731
    assert keep(a) == keep(b)
    assert keep(a) != keep(c)
    ids = np.arange(40).reshape(2, 20) % 200
    ya = run_onnx(tmp_path / "a" / "model.onnx", ids)
    yb = run_onnx(tmp_path / "b" / "model.onnx", ids)
    assert np.array_equal(ya, yb)


def _unit_params(model) -> dict[str, int]:
    """Parameters one unit removes in a tiny Llama (no biases), from its config: a query head
    with its K/V head (q, k, v rows and o columns: 4 * head_dim * hidden), an FFN neuron
    (gate and up rows, down column: 3 * hidden)."""
    c = model.config
    assert c.num_key_value_heads == c.num_attention_heads and not c.attention_bias and not c.mlp_bias
    hd = c.hidden_size // c.num_attention_heads
    return {"attention": 4 * hd * c.hidden_size, "ffn": 3 * c.hidden_size}


def _removed(report, per) -> int:
    """Structured parameters removed, recounted from the modules' kept units; checks the
    report's own totals against the same count."""
    mods = report["modules"]
    p = report["params"]
    assert sum(m["total"] * per[m["kind"]] for m in mods) == p["structured_before"]
    removed = sum((m["total"] - len(m["kept"])) * per[m["kind"]] for m in mods)
    assert removed == p["structured_removed"]
    assert report["ratio_achieved"] == removed / p["structured_before"]
    return removed


def test_skip_layers_keeps_blocks_dense_and_still_meets_the_ratio(tmp_path):
    """Layer 0 stays dense; layer 1 loses enough that the whole model loses the ratio: uniform
    allocation rounds the attention heads and lets the FFN neurons (the finest units) absorb
    the rounding, so the result is within one FFN neuron of the request."""
    model, _, res = _compile("llama", tmp_path, skip_layers="first", ratio=0.3, allocation="uniform")
    r = res.report
    assert r["skipped_layers"] == [0]
    per = _unit_params(model)
    for m in r["modules"]:
        if m["layer"] == 0:
            assert m["kept"] == list(range(m["total"]))
        else:
            assert len(m["kept"]) < m["total"]
    removed = _removed(r, per)
    assert abs(removed - 0.3 * r["params"]["structured_before"]) <= per["ffn"]


def test_global_allocation_and_head_similarity(tmp_path):
    """Global allocation (FLAP-style standardised scores) with goa's JS head similarity:
    the ratio is met overall within one unit, modules of one kind lose different fractions,
    and the attention scores are the similarity ranking, not the second moment."""
    model, _, res = _compile("llama", tmp_path, allocation="global", head_criterion="similarity",
                             ratio=0.3)
    _, _, mom = _compile("llama", tmp_path, name="moment", allocation="global", head_criterion="moment",
                         ratio=0.3)
    r = res.report
    assert r["allocation"] == "global"
    per = _unit_params(model)
    removed = _removed(r, per)
    # units are taken cheapest-first while they bring the count closer to the target: the
    # result misses it by at most one (the largest) unit
    assert abs(removed - 0.3 * r["params"]["structured_before"]) <= max(per.values())
    assert all(len(m["kept"]) >= 1 for m in r["modules"])
    lost = {}
    for m in r["modules"]:
        lost.setdefault(m["kind"], set()).add((m["total"] - len(m["kept"])) / m["total"])
    assert set(lost) == {"attention", "ffn"}
    assert any(len(fractions) > 1 for fractions in lost.values()), lost

    # the similarity scores of H heads: the H - 1 heads marked redundant score -H, ..., -2,
    # the last one its smallest JS distance to the others (in [0, ln 2])
    heads = model.config.num_attention_heads
    att = [m for m in r["modules"] if m["kind"] == "attention"]
    att_mom = [m for m in mom.report["modules"] if m["kind"] == "attention"]
    assert len(att) == len(att_mom) == model.config.num_hidden_layers
    for m, mm in zip(att, att_mom):
        sc = m["scores"]
        marked = [-float(h) for h in range(heads, 1, -1)]          # -H, ..., -2
        assert sc["min"] == -float(heads) and sc["median"] == float(np.median(marked + [sc["max"]]))
        assert 0.0 <= sc["max"] <= np.log(2)
        assert mm["scores"]["min"] > 0                  # the second moment: positive energies
        assert mm["scores"] != sc
    assert r["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4


@pytest.mark.parametrize("module_inputs", ["pruned", "dense"])
def test_module_inputs_decide_what_the_next_module_sees(tmp_path, module_inputs):
    """--module-inputs pruned: without reconstruction, layer 0's FFN is scored (goa: per-neuron output energy
    ||W_down[:, j]||^2 E[h_j^2]) on the level-2 input of the model whose layer-0 attention has
    already lost its dropped heads (greedy.py step 7: the pruned stream continues with the
    committed weights). Recomputed here in the Hugging Face model with those o_proj columns
    zeroed, on the same calibration windows. --module-inputs dense: on the dense model's."""
    from goa_compiler.prune import calibration

    # uniform: layer 0's attention loses heads (block allocation may keep it whole)
    model, _, res = _compile("llama", tmp_path, reconstruct="none", ratio=0.3, module_inputs=module_inputs,
                             allocation="uniform")
    assert res.report["module_inputs"] == module_inputs
    r = res.report
    att, ffn = r["modules"][0], r["modules"][1]
    assert (att["name"], ffn["name"]) == ("layer0.attention", "layer0.ffn")
    dropped = [h for h in range(att["total"]) if h not in att["kept"]]
    assert dropped
    opts = CompileOptions(ratio=0.3, num_samples=8, seq_len=32, seed=0)
    windows = calibration.calibration_windows(tiny.byte_tokenizer(), opts)

    def energies(m):
        layer = m.model.layers[0]
        seen = []
        hook = layer.mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].double()))
        with torch.no_grad():
            m(input_ids=windows, attention_mask=torch.ones_like(windows))
        hook.remove()
        h = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
        w = layer.mlp.down_proj.weight.detach().double()
        e = (w ** 2).sum(0) * (h ** 2).sum(0) / h.shape[0]
        return {"min": float(e.min()), "median": float(np.median(e.numpy())), "max": float(e.max())}

    dense = energies(model)
    pruned = copy.deepcopy(model)
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for h in dropped:
            pruned.model.layers[0].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0.0
    want = energies(pruned) if module_inputs == "pruned" else dense
    assert abs(energies(pruned)["median"] - dense["median"]) > 1e-3 * dense["median"]   # they differ
    for k in ("min", "median", "max"):
        assert ffn["scores"][k] == pytest.approx(want[k], rel=1e-5), (k, ffn["scores"], want, dense)


# ------------------------------------------------------------------------------ block allocation

def _block_structures():
    """Two blocks, each an attention of 3 units of 100 parameters and an FFN of 10 units of 10
    (hand-built: allocation reads only names, layers, units and unit parameters)."""
    from goa_compiler.ir.structure import Kind, ParamSlice, Probes, Role, Structure

    def mk(name, kind, layer, units, per):
        sl = ParamSlice(f"{name}.w", 0, Role("down" if kind == "ffn" else "o"), np.arange(units)[:, None])
        return Structure(name, Kind(kind), layer, (sl,), Probes("x", "h"), level2_node="l2",
                         projections={}, root_index={}), {f"{name}.w": (units, per)}
    out, shapes = [], {}
    for layer in (0, 1):
        for name, kind, units, per in ((f"attn{layer}", "attention", 3, 100), (f"ffn{layer}", "ffn", 10, 10)):
            s, sh = mk(name, kind, layer, units, per)
            out.append(s)
            shapes.update(sh)
    return out, shapes


def test_block_allocation_meets_each_block_and_follows_cost_per_parameter():
    from goa_compiler.prune.allocation import SelectionError, block_counts, unit_params

    structures, shapes = _block_structures()
    assert [unit_params(s, shapes) for s in structures] == [100, 10, 100, 10]
    # block 0: an attention unit costs 1 per parameter-unit less than any neuron: it goes
    # first; block 1: attention is dear, the budget goes to neurons up to the FFN's last one
    costs = {"attn0": np.array([1.0, 500.0]), "ffn0": np.arange(1, 10) * 50.0,
             "attn1": np.array([1e6, 2e6]), "ffn1": np.arange(1, 10) * 1.0}
    counts = block_counts(structures, costs, 0.3, shapes)     # target 120 parameters a block
    assert counts == {"attn0": 1, "ffn0": 2, "attn1": 0, "ffn1": 9}
    per_block = [counts["attn0"] * 100 + counts["ffn0"] * 10, counts["attn1"] * 100 + counts["ffn1"] * 10]
    assert per_block[0] == 120 and abs(per_block[1] - 120) <= 50     # block 1: the FFN keeps one neuron
    # a module's removals stay in its own order: a cheap later cost cannot jump the queue
    costs["ffn0"] = np.array([1e9, *np.zeros(8)])
    assert block_counts(structures, costs, 0.3, shapes)["ffn0"] == 0
    with pytest.raises(SelectionError, match="cannot be reached in block"):
        block_counts(structures, {k: np.zeros(len(v)) for k, v in costs.items()}, 0.95, shapes)


def test_network_allocation_weighs_blocks_by_sensitivity():
    from goa_compiler.prune.allocation import SelectionError, network_counts

    structures, shapes = _block_structures()
    costs = {n: np.arange(1, k) * 1.0 for n, k in (("attn0", 3), ("ffn0", 10), ("attn1", 3), ("ffn1", 10))}
    # equal costs, block 0 ten times as sensitive: block 1 loses everything it can first
    sens = {"attn0": 10.0, "ffn0": 10.0, "attn1": 1.0, "ffn1": 1.0}
    counts = network_counts(structures, costs, sens, 0.3, shapes)        # 240 of 800 parameters
    assert counts["attn0"] == counts["ffn0"] == 0
    assert counts["attn1"] * 100 + counts["ffn1"] * 10 == 240
    # the other way round: block 0 goes first
    flipped = network_counts(structures, costs, {k: 11.0 - v for k, v in sens.items()}, 0.3, shapes)
    assert flipped["attn1"] == flipped["ffn1"] == 0
    # equal sensitivities: every candidate on one scale, the cheapest per parameter first
    even = network_counts(structures, costs, dict.fromkeys(sens, 1.0), 0.3, shapes)
    assert sum(even[n] * (100 if n.startswith("attn") else 10) for n in even) == 240
    assert even["ffn0"] == even["ffn1"]       # the same costs in both blocks: the same share
    with pytest.raises(SelectionError, match="one unit kept in each module"):
        network_counts(structures, costs, sens, 0.95, shapes)


def test_skip_layers_auto_compiles_and_reports_what_it_measured(tmp_path):
    _, _, res = _compile("llama", tmp_path, skip_layers="auto", ratio=0.3)
    r = res.report
    assert r["skipped_layers"] == []                  # two blocks: never an outlier
    assert all(m["sensitivity"] > 0 for m in r["modules"])
    assert r["params"]["after"] < r["params"]["before"]


def test_sensitivity_on_an_encoder_is_refused_in_one_line(tmp_path):
    from goa_compiler.driver.pipeline import CompileError

    with pytest.raises(CompileError, match="needs a causal language model") as e:
        _compile("bert", tmp_path, allocation="network", ratio=0.3)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_derivative_is_refused_in_one_line(tmp_path, monkeypatch):
    """An op with no backward formula (here every op: autograd raises as torch does for one)
    is a refusal naming the pass, exit 2, not an internal error."""
    from goa_compiler.driver.pipeline import CompileError

    def no_derivative(*args, **kwargs):
        raise RuntimeError("derivative for aten::some_op is not implemented\nmore detail")

    monkeypatch.setattr(torch.autograd, "grad", no_derivative)
    with pytest.raises(CompileError, match="sensitivity pass .* the backward pass failed: derivative") as e:
        _compile("llama", tmp_path, skip_layers="auto", ratio=0.3)
    assert "\n" not in str(e.value)


def test_outlier_blocks_are_those_far_above_the_median_block():
    from goa_compiler.prune.allocation import outlier_blocks

    structures, shapes = _block_structures()
    costs = {n: np.arange(1, k) * 1.0 for n, k in (("attn0", 3), ("ffn0", 10), ("attn1", 3), ("ffn1", 10))}
    # two blocks: the median is their mean, which no block can exceed ten times
    assert outlier_blocks(structures, costs, {"attn0": 1e6, "ffn0": 1e6, "attn1": 1.0, "ffn1": 1.0}, 0.3,
                          shapes) == {}
    # five blocks alike but for block 0's sensitivity
    many, shapes5 = [], {}
    import dataclasses as dc
    for layer in range(5):
        for s in structures[:2]:
            name = s.name[:-1] + str(layer)
            sl = dc.replace(s.slices[0], param=f"{name}.w")
            many.append(dc.replace(s, name=name, layer=layer, slices=(sl,)))
            shapes5[f"{name}.w"] = shapes[f"{s.name}.w"]
    costs5 = {s.name: costs[s.name[:-1] + "0"] for s in many}
    sens = {s.name: (50.0 if s.layer == 0 else 1.0 + s.layer / 10) for s in many}
    got = outlier_blocks(many, costs5, sens, 0.3, shapes5)
    assert list(got) == [0] and got[0] == pytest.approx(50.0 / 1.3)     # the median block: 2
    sens[many[0].name] = sens[many[1].name] = 5.0       # five times the median block's: kept in the pool
    assert outlier_blocks(many, costs5, sens, 0.3, shapes5) == {}


def test_sensitivity_is_the_loss_gradient_at_each_module_output():
    """s_m against autograd on the Hugging Face model itself (hooks on o_proj / down_proj),
    not the compiler's captured graph: the mean over tokens of |dL/dy|^2."""
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.capture.torch_export import capture
    from goa_compiler.frontends.fx import FxFrontend, from_fx
    from goa_compiler.prune.sensitivity import output_sensitivity

    model, vocab, kind = tiny.build("llama-gqa")
    captured = capture(copy.deepcopy(model), kind)
    structures = list(analyze_graph(from_fx(captured.gm)).structures)
    ids = torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(1))
    feeds = [{"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])},
             {"input_ids": ids[2:], "attention_mask": torch.ones_like(ids[2:])}]
    got = output_sensitivity(FxFrontend(captured.gm), structures, feeds)

    outs = {}
    mods = {f"layer{i}.{k}": getattr(getattr(layer, a), p)
            for i, layer in enumerate(model.model.layers)
            for k, a, p in (("attention", "self_attn", "o_proj"), ("ffn", "mlp", "down_proj"))}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.setdefault(n, []).append(o))
             for n, m in mods.items()]
    want = dict.fromkeys(mods, 0.0)
    for f in feeds:
        outs.clear()
        logits = model(**f).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), f["input_ids"][:, 1:].flatten(),
                                                 reduction="sum")
        grads = torch.autograd.grad(loss, [outs[n][0] for n in mods])
        for n, g in zip(mods, grads):
            want[n] += float(g.double().pow(2).sum()) / ids.numel()
    for h in hooks:
        h.remove()
    assert set(got) == set(want)
    for n in want:
        assert want[n] > 0 and abs(got[n] - want[n]) <= 1e-4 * want[n], (n, got[n], want[n])


@pytest.mark.parametrize("family", ["llama-gqa", "mixtral"])
def test_the_sensitivity_pass_measures_goas_unit_energies(family):
    """--skip-layers auto reads goa's scores from the sensitivity pass: they must be the
    output energies a dense statistics pass gives (criteria.output_energy)."""
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.capture.torch_export import capture
    from goa_compiler.frontends.fx import FxFrontend
    from goa_compiler.prune.calibration import dense_stats
    from goa_compiler.prune.criteria import output_energy
    from goa_compiler.prune.sensitivity import output_sensitivity, sensitivity_and_energy

    model, vocab, kind = tiny.build(family)
    fe = FxFrontend(capture(model, kind).gm)
    structures = list(analyze_graph(fe.view()).structures)
    ids = torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(1))
    feeds = [{"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])},
             {"input_ids": ids[2:], "attention_mask": torch.ones_like(ids[2:])}]
    sens, energy = sensitivity_and_energy(fe, structures, feeds, fe.weights())
    assert sens == output_sensitivity(fe, structures, feeds)
    for s, m in dense_stats(fe, structures, feeds, False, None):
        want = np.asarray(output_energy(s, fe.weights(), m))
        assert energy[s.name].shape == want.shape and want.max() > 0
        assert np.abs(energy[s.name] - want).max() <= 1e-10 * want.max(), s.name


def test_sensitivity_sums_and_token_counts_are_summed_over_ranks():
    """Two ranks that saw the same windows: every sum doubles, the mean stays; a rank that
    summed only one of them (the sums, not the token count) would halve or double it."""
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.capture.torch_export import capture
    from goa_compiler.frontends.fx import FxFrontend, from_fx
    from goa_compiler.prune.sensitivity import output_sensitivity

    class TwoSameRanks:
        active, lead = True, True
        summed: list = []

        def sum(self, tensors):
            for t in tensors:
                t.mul_(2.0)
                self.summed.append(t.numel())

    model, vocab, kind = tiny.build("llama")
    captured = capture(model, kind)
    structures = list(analyze_graph(from_fx(captured.gm)).structures)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(2))
    feeds = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    one = output_sensitivity(FxFrontend(captured.gm), structures, feeds)
    ranks = TwoSameRanks()
    two = output_sensitivity(FxFrontend(captured.gm), structures, feeds, ranks=ranks)
    assert sorted(ranks.summed) == [1, len(structures)]
    assert two == pytest.approx(one, rel=1e-12)


def test_removal_costs_by_criterion():
    from goa_compiler.prune.criteria import ScoreSettings, removal_costs

    sc = np.array([3.0, 1.0, 6.0])
    moment = ScoreSettings("moment", "empirical", 0.3)
    assert removal_costs("goa", moment, "ffn", sc).tolist() == [1.0, 3.0, 6.0]
    assert removal_costs("flap", moment, "ffn", sc).tolist() == [1.0, 3.0, 6.0]
    assert removal_costs("goa", ScoreSettings("moment", "obs", 0.3), "ffn", sc).tolist() == [1.0, 2.0, 3.0]
    assert removal_costs("goa", ScoreSettings("similarity", "empirical", 0.3), "attention", sc) is None
    assert removal_costs("wanda-sp", moment, "ffn", sc) is None


def test_block_allocation_compiles_and_each_block_loses_its_share(tmp_path):
    model, vocab, res = _compile("llama", tmp_path, allocation="block", ratio=0.3)
    r = res.report
    per = _unit_params(model)
    blocks = {}
    for m in r["modules"]:
        b = blocks.setdefault(m["layer"], [0, 0])
        b[0] += (m["total"] - len(m["kept"])) * per[m["kind"]]
        b[1] += m["total"] * per[m["kind"]]
    for removed, total in blocks.values():
        assert abs(removed - 0.3 * total) <= max(per.values()) / 2 + 1e-9
    assert r["verify"]["max_rel_diff_onnx_vs_torch"] < 1e-4
    with pytest.raises(Exception, match="--allocation block"):
        _compile("llama", tmp_path, name="x", allocation="block", criterion="wanda-sp")


# ------------------------------------------------------------------------------ one dense pass

def test_by_block_waits_for_each_block_and_keeps_the_order():
    from goa_compiler.prune.calibration import by_block

    structures, _ = _block_structures()           # attn0, ffn0, attn1, ffn1
    decided, read = [], []

    def decide(block):
        decided.append([s.name for s, _ in block])
        return {s.name: len(decided) for s, _ in block}

    def source():
        for s in structures:
            read.append(s.name)
            yield s, f"stats of {s.name}"

    out = [(s.name, m, n, len(read)) for s, m, n in by_block(source(), structures, decide=decide)]
    assert decided == [["attn0", "ffn0"], ["attn1", "ffn1"]]
    names = ("attn0", "ffn0", "attn1", "ffn1")
    assert [o[:3] for o in out] == [(n, f"stats of {n}", 1 + (n[-1] == "1")) for n in names]
    assert [o[3] for o in out] == [2, 2, 4, 4]    # a structure leaves once its block is read, not later
    known = list(by_block(((s, None) for s in structures), structures, counts={"ffn1": 3}))
    assert [(s.name, n) for s, _, n in known] == [("attn0", 0), ("ffn0", 0), ("attn1", 0), ("ffn1", 3)]


@pytest.mark.parametrize("kw", [{}, {"allocation": "uniform", "reconstruct": "paper"}, {"allocation": "global"},
                                {"criterion": "wanda-sp", "reconstruct": "none"}])
def test_one_dense_pass_equals_the_loop_that_measures_the_targets(tmp_path, monkeypatch, kw):
    """With dense module inputs and one fold (greedy.reads_dense_only) every statistic is the
    dense model's, read in one pass (global allocation: two), with the refit targets derived
    from the level-2 input's sums: the same units as the loop that measures the targets, the
    same logits to float rounding."""
    from goa_compiler.frontends.fx import FxFrontend
    from goa_compiler.prune import greedy

    streams = []
    real_stream = FxFrontend.stream
    monkeypatch.setattr(FxFrontend, "stream", lambda self, *a, **k: streams.append(1) or real_stream(self, *a, **k))
    kw = {"batch_size": 2, **kw}
    _, vocab, one = _compile("llama-gqa", tmp_path, "one", **kw)
    passes = len(streams) / 4                     # 8 windows, 2 per batch
    streams.clear()
    monkeypatch.setattr(greedy, "reads_dense_only", lambda settings: False)
    _, _, two = _compile("llama-gqa", tmp_path, "two", **kw)
    assert passes == (2 if kw.get("allocation") == "global" else 1) and len(streams) / 4 >= passes
    assert [m.get("kept") for m in one.report["modules"]] == [m.get("kept") for m in two.report["modules"]]
    assert any(m.get("kept") for m in one.report["modules"])
    ids = np.arange(40).reshape(2, 20) % vocab
    ya, yb = (run_onnx(tmp_path / n / "model.onnx", ids) for n in ("one", "two"))
    assert np.abs(ya - yb).max() <= 1e-4 * np.abs(yb).max()
