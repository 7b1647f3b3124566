"""report.json: what a compile did, assembled from the compile state and the sections the
passes returned (each pass declares its own keys: driver/pipeline.py).

Per module, ``total`` and ``kept`` count one thing whatever the unit: for attention, query
heads (original indices); for an FFN, neurons. ``unit`` says what selection removed whole:
``head``, ``kv-group`` (a K/V head with its query heads; then ``kv_total``/``kv_kept`` count
K/V heads) or ``neuron``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from goa_compiler.capture.torch_export import WRAPPER_PREFIX
from goa_compiler.ir.structure import Analysis, Kind, Plan, Structure, Unit
from goa_compiler.prune.allocation import structure_params, unit_params


def display_name(param: str) -> str:
    return param[len(WRAPPER_PREFIX):] if param.startswith(WRAPPER_PREFIX) else param


def analysis_summary(analysis: Analysis) -> dict:
    """`goa analyze`: the structures found and the projections refused, with reasons."""
    mods = []
    for s in analysis.structures:
        rec = {
            "name": s.name, "layer": s.layer, "kind": s.kind, "units": s.units,
            "unit": s.granularity, "unit_channels": s.unit_channels,
            "level1": [{"param": display_name(x.param), "role": x.role, "axis": x.axis,
                        "per_unit": x.per_unit} for x in s.slices if x.role not in ("o", "down", "level2")],
            "level2": [{"param": display_name(x.param), "role": x.role, "axis": x.axis,
                        "per_unit": x.per_unit} for x in s.level2()],
            "shape_constants": len(s.constants),
        }
        if s.kind == Kind.ATTENTION:
            rec.update(heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim)
        if s.expert is not None:
            rec["expert"] = s.expert
        mods.append(rec)
    refused = [{"node": r.node, "param": display_name(r.param) if r.param else None,
                "reason": r.reason, "candidate": r.candidate} for r in analysis.refused]
    return {"structures": mods, "refused": refused}


def module_record(s: Structure, kept) -> dict:
    """One report record: original indices kept (query heads for attention, neurons for an
    FFN), and K/V heads for a K/V-group unit."""
    rec = {"name": s.name, "layer": s.layer, "kind": s.kind}
    if s.expert is not None:
        rec["expert"] = s.expert
    if s.kind == Kind.ATTENTION and s.heads:
        rep = s.query_heads_per_unit
        rec.update(total=s.heads, kept=sorted(h for g in kept for h in range(g * rep, (g + 1) * rep)))
        if s.granularity == Unit.KV_GROUP:
            rec.update(kv_total=s.kv_heads, kv_kept=sorted(kept))
        elif s.kv is not None:
            rec.update(kv_total=s.kv.groups, kv_kept=s.kv.kept_groups(kept))
    else:
        rec.update(total=s.units, kept=sorted(kept))
    rec["unit"] = s.granularity
    return rec


def modules_section(analysis: Analysis, plan: Plan, scores: dict, records: dict, shapes) -> tuple[list, int]:
    """The per-module records of report.json and the structured parameters removed."""
    modules, removed = [], 0
    for s in analysis.structures:
        mp = plan.modules.get(s.name)
        kept = list(mp.kept) if mp else list(range(s.units))
        removed += (s.units - len(kept)) * unit_params(s, shapes)
        rec = module_record(s, kept)
        sc = np.asarray(scores.get(s.name, []), dtype=np.float64) if scores else np.array([])
        if sc.size:
            rec["scores"] = {"min": float(sc.min()), "median": float(np.median(sc)), "max": float(sc.max())}
        rec.update(records.get(s.name, {}))
        modules.append(rec)
    return modules, removed


def notes(analysis: Analysis) -> list[str]:
    gqa = [s for s in analysis.structures if s.granularity == Unit.KV_GROUP]
    if not gqa:
        return []
    s = gqa[0]
    return [f"grouped-query attention: heads are pruned in whole K/V groups "
            f"({s.heads // s.kv_heads} query heads with their K/V head); each module's "
            f"count is rounded to whole groups"]


def build_report(state, sections: dict) -> dict:
    """report.json of a finished compile: the fixed head, then every pass's section in the
    order the passes ran."""
    opts = state.opts
    modules, removed = modules_section(state.analysis, state.plan, state.scores, state.records, state.shapes)
    total = structure_params(list(state.analysis.structures), state.shapes)
    report = {
        "model": state.source,
        "ratio_requested": opts.ratio,
        "ratio_achieved": removed / total if total else 0.0,
        "criterion": opts.criterion,
        "reconstruction": opts.reconstruct,
        "allocation": opts.allocation,
        "seed": opts.seed,
        "params": {"before": state.params_before, "after": state.rewritten.params_after,
                   "structured_before": total, "structured_removed": removed,
                   "onnx_initializers": state.onnx_params},
        "modules": modules,
        "verify": {"max_rel_diff_onnx_vs_torch": state.verify_error, "dtype": str(state.opts.dtype)},
        "timings": {k: round(v, 3) for k, v in state.progress.timings.items()},
        "notes": notes(state.analysis),
    }
    report.update(sections)
    return report


def compile_inputs(opts, spec, model_path, model, config_path, logit_data) -> dict:
    """sha256 of what the compile read (see provenance.py)."""
    from goa_compiler.driver.provenance import config_input, data_inputs, model_inputs

    inputs: dict = {"model": model_inputs(spec, model_path or (spec if spec and Path(spec).is_dir() else None),
                                          model)}
    if not opts.data_free or (logit_data is not None and "calibration split" in logit_data):
        inputs["calibration"] = data_inputs(opts.calib, "calib")
    if opts.eval_data:
        inputs["eval"] = data_inputs(opts.eval_data, "eval")
    if config_path:
        inputs["config"] = config_input(config_path)
    return inputs
