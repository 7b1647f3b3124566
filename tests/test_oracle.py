"""The oracle: removing units equals zeroing the same channels in the dense model.

What it proves. For every tiny family, magnitude and random selection at several ratios,
the emitted ONNX (run in onnxruntime) equals, to 1e-4 relative, the DENSE model in which
the units report.json says were removed have their level-2 input columns zeroed: for a
removed query head ``h``, columns ``[h*d, (h+1)*d)`` of the attention output projection;
for a removed neuron ``j``, column ``j`` of the FFN down projection.

Why it is independent. Which columns to zero is decided by tests/oracle_layout.py from the
model alone: a per-family table of the modules that own each level-2 weight, the head size
from the config, and the weight's own layout (``nn.Linear`` [out, in], GPT-2's ``Conv1D``
[in, out]). Nothing from the compiler's analysis (Structure, ParamSlice, their index
arrays) is consulted, so a wrong but self-consistent mapping from units to heads or
neurons (the rewrite keeps head 1's q/k/v with head 0's output columns) no longer passes:
the report's kept heads are compared with what the model computes with exactly those
heads. ``test_oracle_catches_a_wrong_unit_mapping`` shows it: a test double swaps two
units' level-2 index rows in the analysis, the compile succeeds (the pruned graph is
self-consistent, so the compiler's own verify passes), and the oracle fails.

The report's parameter counts are checked the same way, from weight shapes alone: the
structured parameters and those removed, the achieved ratio within one unit per module,
and the ONNX file's float initializers (counted with onnx) between the parameters after
and those plus the float buffers.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from goa_compiler.driver.pipeline import CompileOptions, analyze_model, compile_loaded, prune_captured
from goa_compiler.driver.report import modules_section
from goa_compiler.export.onnx import export_onnx, run_onnx
from goa_compiler.ui.progress import Progress
from models import tiny
import oracle_layout as ol  # tests/oracle_layout.py (pytest puts tests/ on sys.path)

CASES = [(f, c, r) for f in tiny.FAMILIES for c, r in (("magnitude", 0.1), ("random", 0.35), ("magnitude", 0.6))]
TOL = 1e-4


def _inputs(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 19), generator=g)
    return ids, torch.ones_like(ids)


def _oracle_error(model, family, kind, vocab, modules, onnx_path) -> float:
    """Relative error of the ONNX file against the dense model with the removed units'
    level-2 columns zeroed (the columns found by oracle_layout, from the model alone)."""
    ids, mask = _inputs(vocab)
    ref = ol.dense_output(ol.zeroed_dense(model, family, modules), kind, ids, mask)
    got = run_onnx(onnx_path, ids.numpy(), mask.numpy())
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return ol.relative_error(got, ref)


def _check_records(model, family, modules):
    """Every layer has one attention and one FFN record, each well-formed against the config."""
    cfg = model.config
    want = {(layer, k) for layer in range(ol.layers(cfg)) for k in ("attention", "ffn")}
    assert {(r["layer"], r["kind"]) for r in modules} == want
    assert len(modules) == len(want)
    for rec in modules:
        assert rec["name"] == f"layer{rec['layer']}.{rec['kind']}"
        assert rec["kept"] == sorted(set(rec["kept"])) and len(rec["kept"]) >= 1, rec
        assert all(0 <= k < rec["total"] for k in rec["kept"]), rec
        if rec["kind"] == "attention":
            assert rec["total"] == ol.heads(cfg), rec
            assert ol.input_width(model, family, "attention", rec["layer"]) == ol.heads(cfg) * ol.head_dim(cfg)
            if ol.attention_units(cfg) < ol.heads(cfg):
                # whole K/V groups: query head h reads K/V head h // (heads / kv_heads)
                rep = ol.heads(cfg) // ol.kv_heads(cfg)
                assert rec["kv_total"] == ol.kv_heads(cfg), rec
                assert rec["kept"] == [h for g in rec["kv_kept"] for h in range(g * rep, (g + 1) * rep)], rec
            elif ol.kv_heads(cfg) < ol.heads(cfg) and "kv_kept" in rec:
                # query-head units: a K/V head stays exactly while one of its query heads does
                rep = ol.heads(cfg) // ol.kv_heads(cfg)
                assert rec["kv_kept"] == sorted({h // rep for h in rec["kept"]}), rec
            else:
                assert "kv_kept" not in rec, rec
        else:
            assert rec["total"] == ol.input_width(model, family, "ffn", rec["layer"]), rec


def _removed_units(model, rec) -> int:
    cfg = model.config
    if rec["kind"] == "attention" and ol.attention_units(cfg) < ol.heads(cfg):
        return rec["kv_total"] - len(rec["kv_kept"])
    return rec["total"] - len(rec["kept"])


@pytest.mark.parametrize("family,criterion,ratio", CASES)
def test_pruned_onnx_equals_zeroed_dense(tmp_path, family, criterion, ratio):
    model, vocab, kind = tiny.build(family)
    out = tmp_path / "out"
    result = compile_loaded(copy.deepcopy(model), kind, CompileOptions(
        ratio=ratio, criterion=criterion, reconstruct="none", seed=3), out)
    assert not [r for r in result.analysis.refused if r.candidate], result.analysis.refused
    report = json.loads((out / "report.json").read_text())    # the file, as a user reads it
    assert report["modules"] == json.loads(json.dumps(result.report["modules"]))
    modules = report["modules"]
    _check_records(model, family, modules)

    # something was actually removed
    assert report["params"]["after"] < report["params"]["before"]
    assert any(rec["kept"] != list(range(rec["total"])) for rec in modules)

    rel = _oracle_error(model, family, kind, vocab, modules, out / "model.onnx")
    assert rel < TOL, f"{family} {criterion} {ratio}: relative error {rel:.2e}"

    # the report's parameter counts, from the weights' shapes alone
    per = {(r["layer"], r["kind"]): ol.unit_params(model, family, r["kind"], r["layer"]) for r in modules}
    total = sum(units * p for units, p in per.values())
    removed = sum(_removed_units(model, r) * per[(r["layer"], r["kind"])][1] for r in modules)
    params = report["params"]
    assert params["structured_before"] == total
    assert params["structured_removed"] == removed
    assert params["before"] - params["after"] == removed
    # the claimed ratio is the requested one within one unit per module
    slack = sum(p for _, p in per.values())
    assert report["ratio_achieved"] == pytest.approx(removed / total)
    assert abs(report["ratio_achieved"] - ratio) * total <= slack
    # the ONNX file holds the parameters the report claims (plus the float buffers)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point()) + ol.folded_constants(model, family)
    n_onnx = ol.onnx_float_initializers(out / "model.onnx")
    assert params["after"] <= n_onnx <= params["after"] + buffers, (n_onnx, params["after"], buffers)


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_physically_smaller_weights(tmp_path, family):
    model, vocab, kind = tiny.build(family)
    compile_loaded(model, kind, CompileOptions(ratio=0.5, criterion="magnitude", reconstruct="none"), tmp_path / "o")
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    dims = [tuple(i.dims) for i in m.graph.initializer]
    # no initializer keeps the dense intermediate width of the FFN
    cfg = model.config
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.n_embd
    assert not any(inter in d for d in dims), dims


# ------------------------------------------------------------------ the oracle can fail

def test_layout_table_matches_the_models():
    """Every name in the table is a module of its family's tiny model, with the layout and
    widths the oracle assumes (level-2 input = heads * head_dim, or the FFN width)."""
    assert set(ol.LAYOUT) == set(tiny.FAMILIES) | set(tiny.EXPERTS)
    for family in tiny.FAMILIES:
        model, _, _ = tiny.build(family)
        mods = dict(model.named_modules())
        cfg = model.config
        for layer in range(ol.layers(cfg)):
            for kind in ("attention", "ffn"):
                b = ol.block(family, kind, layer)
                for name in (*b.level1, b.level2):
                    assert name in mods, f"{family}: no module {name}"
                    ol.in_axis(mods[name])
                l2 = mods[b.level2]
                width = l2.weight.shape[ol.in_axis(l2)]
                rows = sum(mods[n].weight.shape[ol.out_axis(mods[n])] for n in b.level1)
                if kind == "attention":
                    assert width == ol.heads(cfg) * ol.head_dim(cfg), (family, layer, width)
                    assert rows == (ol.heads(cfg) + 2 * ol.kv_heads(cfg)) * ol.head_dim(cfg), (family, rows)
                else:
                    # up (and gate, separate or fused) rows: one or two per neuron
                    assert rows in (width, 2 * width), (family, rows, width)


def test_oracle_is_independent_of_the_analysis():
    """oracle_layout imports nothing from goa_compiler; this module imports neither the
    analysis nor the structure IR (the meta-test edits an Analysis with dataclasses.replace)."""
    def imported(path):
        tree = ast.parse(Path(path).read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(node.module or "")
        return names

    here = Path(__file__).parent
    assert not [n for n in imported(here / "oracle_layout.py") if n.startswith("goa_compiler")]
    bad = ("goa_compiler.analysis", "goa_compiler.ir")
    assert not [n for n in imported(here / "test_oracle.py") if n.startswith(bad)]


def _swap_rows(sl, a: int, b: int):
    """The same ParamSlice with units a and b owning each other's indices."""
    index = np.array(sl.index, copy=True)
    index[[a, b]] = index[[b, a]]
    return dataclasses.replace(sl, index=index)


def _tampered(analysis, name: str, role: str, a: int, b: int):
    """A copy of ``analysis`` whose structure ``name`` maps units a and b to each other's
    level-2 columns (slice role ``role``: "o" for attention, "down" for an FFN); every
    other slice, the level-1 rows included, is left as analysed."""
    structures = []
    hit = 0
    for s in analysis.structures:
        if s.name == name:
            slices = tuple(_swap_rows(sl, a, b) if sl.role == role else sl for sl in s.slices)
            hit += sum(sl.role == role for sl in s.slices)
            s = dataclasses.replace(s, slices=slices)
        structures.append(s)
    assert hit == 1, f"{name} has {hit} slices of role {role!r}"
    return dataclasses.replace(analysis, structures=tuple(structures))


def _prune_and_export(cap, analysis, opts, path):
    c = dataclasses.replace(cap, gm=copy.deepcopy(cap.gm))
    state = prune_captured(c, analysis, opts, None, Progress(False))
    export_onnx(state.captured.gm, cap.example, path, cap.output_name, cap.max_seq)
    modules, _ = modules_section(state.analysis, state.plan, {}, {}, state.shapes)
    return state, json.loads(json.dumps(modules))


# llama: 4 heads of 16 (one head per unit), 128 neurons; gpt2: the same through Conv1D ([in, out])
@pytest.mark.parametrize("family,module,role", [("llama", "layer0.attention", "o"), ("llama", "layer1.ffn", "down"),
                                                ("gpt2", "layer1.attention", "o")])
def test_oracle_catches_a_wrong_unit_mapping(tmp_path, family, module, role):
    """A test double maps two units of one module to each other's level-2 columns (heads of
    the output projection, or neurons of the down projection); the compile still succeeds
    and is self-consistent, and the independent oracle reports the mismatch, while the
    untampered compile of the same model passes it."""
    model, vocab, kind = tiny.build(family)
    cap, analysis = analyze_model(copy.deepcopy(model), kind)
    opts = CompileOptions(ratio=0.5, criterion="magnitude", reconstruct="none")

    state, modules = _prune_and_export(cap, analysis, opts, tmp_path / "honest.onnx")
    honest = _oracle_error(model, family, kind, vocab, modules, tmp_path / "honest.onnx")
    assert honest < TOL, f"untampered compile fails the oracle: {honest:.2e}"

    kept = set(state.plan.modules[module].kept)
    units = next(s.units for s in analysis.structures if s.name == module)
    pairs = [(a, b) for a in sorted(kept) for b in range(units) if b not in kept]
    for a, b in pairs[:4]:
        tampered = _tampered(analysis, module, role, a, b)
        path = tmp_path / f"tampered-{a}-{b}.onnx"
        t_state, t_modules = _prune_and_export(cap, tampered, opts, path)
        t_kept = set(t_state.plan.modules[module].kept)
        if (a in t_kept) != (b in t_kept):   # the swap matters: one unit kept, the other removed
            break
    else:
        pytest.fail(f"no swap in {pairs[:4]} keeps exactly one of its units")
    assert (a in t_kept) != (b in t_kept), (a, b, sorted(t_kept))

    # the tampered graph is self-consistent: torch and onnx agree, and the shapes are pruned
    ids, mask = _inputs(vocab)
    with torch.no_grad():
        torch_out = t_state.captured.gm(ids, mask).numpy()
    assert ol.relative_error(run_onnx(path, ids.numpy(), mask.numpy()), torch_out) < TOL
    # ... but it computes the wrong function for the heads/neurons the report says it kept
    wrong = _oracle_error(model, family, kind, vocab, t_modules, path)
    assert wrong > 100 * TOL, f"oracle missed a wrong unit mapping ({module}, swap {a}<->{b}): {wrong:.2e}"


def test_merged_heads_kept_differently_per_layer_with_a_padded_mask(tmp_path):
    """Bloom: one shared `batch * heads` size sizes every layer's reshapes, and its ALiBi
    biases are counted from the attention mask. With layers keeping different heads, the
    emitted ONNX equals the zeroed dense model, on a left-padded batch too (the biases are
    read per kept head of every batch entry)."""
    model, vocab, kind = tiny.build("bloom")
    out = tmp_path / "out"
    compile_loaded(copy.deepcopy(model), kind, CompileOptions(ratio=0.6, criterion="random",
                                                              reconstruct="none", seed=0), out)
    modules = json.loads((out / "report.json").read_text())["modules"]
    kept = [tuple(r["kept"]) for r in modules if r["kind"] == "attention"]
    assert len(set(kept)) == len(kept) == 2 and all(len(k) < ol.heads(model.config) for k in kept), kept
    zeroed = ol.zeroed_dense(model, "bloom", modules)
    ids, mask = _inputs(vocab)
    mask[1, :7] = 0                                  # the second row left-padded
    ref = ol.dense_output(zeroed, kind, ids, mask)
    assert ol.relative_error(run_onnx(out / "model.onnx", ids.numpy(), mask.numpy()), ref) < TOL
