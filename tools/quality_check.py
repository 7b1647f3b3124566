"""Perplexity of a few pruned SmolLM2-135M models on the KJV held-out split and on text of
another kind, in one process: the quick check of a change that moves quality.

    python tools/quality_check.py --out q.json [--configs goa/refit/0.2,goa/none/0.2]
        [--ood pydoc[,OTHER,...]] [--eval-tokens 4096] [--set calib=kjv+pydoc]
        [--module-inputs dense|pruned] [--set refit_prior=original --set ridge=0.3]
        [--set attention_unit=query-head]

Each configuration is criterion/reconstruction/ratio, pruned with the defaults otherwise
(KJV calibration split, --num-samples 32 windows of 128 tokens, seed 0) through the same
pipeline as `goa compile` (driver.pipeline.prune_captured on one capture), and scored in
PyTorch on the rewritten graph (the graph `goa compile` exports; every export is verified
against it). --ood is any DATA that `goa eval --data` reads (the default is the named set
pydoc, the Python reference's help topics from the standard library; earlier measurements
used the Python tutorial from Debian's python3.11-doc,
/usr/share/doc/python3.11/html/_sources/tutorial).
Writes JSON: per configuration and data set, perplexity and its ratio to the dense model.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

DEFAULT_CONFIGS = "goa/refit/0.2,goa/none/0.2,goa/refit/0.5,flap/refit/0.5,wanda-sp/refit/0.5"
DEFAULT_OOD = "pydoc"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--ood", default=DEFAULT_OOD,
                   help="DATA for the out-of-domain perplexity; a comma-separated list measures each "
                        "(the first is reported as 'ood', the others under their own names)")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--module-inputs", default=None, choices=["dense", "pruned"],
                   help="passed to every compile (default: the compiler's default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="another CompileOptions field for every compile, e.g. refit_prior=original, ridge=0.3")
    p.add_argument("--attention-units", type=int, default=None, metavar="N",
                   help="experiment: with --set allocation=uniform, every attention loses N units and the "
                        "FFNs share the rest of the budget (one common fraction)")
    args = p.parse_args(argv)
    if args.attention_units is not None:
        _force_attention_units(args.attention_units)

    from goa_compiler.analysis import analyze_graph
    from goa_compiler.capture.sources import load_model
    from goa_compiler.capture.torch_export import capture
    from goa_compiler.driver.options import CompileOptions
    from goa_compiler.driver.pipeline import prune_captured
    from goa_compiler.frontends.fx import FxFrontend
    from goa_compiler.measure.eval import evaluation_windows, perplexity_torch
    from goa_compiler.ui.progress import Progress

    extra = {"module_inputs": args.module_inputs} if args.module_inputs else {}
    kinds = {f.name: f.type for f in dataclasses.fields(CompileOptions)}
    for item in args.set:
        key, _, value = item.partition("=")
        kind = str(kinds[key])
        extra[key] = float(value) if kind.startswith("float") else int(value) if kind.startswith("int") else value
    loaded = load_model("smollm2-135m")
    cap = capture(loaded.model, loaded.kind)
    analysis = analyze_graph(FxFrontend(cap.gm).view(), query_heads=extra.get("attention_unit") == "query-head")
    sets = {}
    oods = args.ood.split(",")
    named = [("kjv", "kjv"), ("ood", oods[0])] + [(spec, spec) for spec in oods[1:]]
    for name, spec in named:
        opts = CompileOptions(ratio=0.0, eval_data=spec, eval_tokens=args.eval_tokens)
        sets[name] = evaluation_windows(loaded.tokenizer, opts)
    results = {"dense": {k: perplexity_torch(cap.gm, w)["ppl"] for k, w in sets.items()},
               "eval": {"kjv": "KJV eval split (even chapters)", "ood": oods[0],
                        **{spec: spec for spec in oods[1:]}, "tokens": args.eval_tokens}, "runs": {}}
    print(f"dense: {results['dense']}", file=sys.stderr)
    for cfg in args.configs.split(","):
        crit, recon, ratio = cfg.split("/")
        t = time.perf_counter()
        st = prune_captured(dataclasses.replace(cap, gm=copy.deepcopy(cap.gm)), analysis,
                            CompileOptions(ratio=float(ratio), criterion=crit, reconstruct=recon, **extra),
                            loaded.tokenizer, Progress(False))
        ppl = {k: perplexity_torch(st.captured.gm, w)["ppl"] for k, w in sets.items()}
        results["runs"][cfg] = {"ppl": ppl, "x_dense": {k: ppl[k] / results["dense"][k] for k in ppl},
                                "removed": _removed_units(analysis, st.plan),
                                "block_ratios": _block_ratios(analysis, st.plan, cap.gm),
                                "seconds": time.perf_counter() - t}
        print(f"{cfg}: {ppl} removed {results['runs'][cfg]['removed']}", file=sys.stderr)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def _removed_units(analysis, plan) -> dict:
    """Units removed, summed per structure kind, out of the kind's units."""
    out: dict = {}
    for s in analysis.structures:
        mp = plan.modules.get(s.name)
        kept = len(mp.kept) if mp is not None else s.units
        got = out.setdefault(str(s.kind), [0, 0])
        got[0] += s.units - kept
        got[1] += s.units
    return {k: f"{a} of {b}" for k, (a, b) in out.items()}


def _block_ratios(analysis, plan, gm) -> list[float]:
    """The fraction of each block's structured parameters removed, block by block."""
    from goa_compiler.prune.allocation import unit_params

    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    got: dict[int, list[float]] = {}
    for s in analysis.structures:
        mp = plan.modules.get(s.name)
        per = unit_params(s, shapes)
        b = got.setdefault(s.layer, [0.0, 0.0])
        b[0] += (s.units - (len(mp.kept) if mp is not None else s.units)) * per
        b[1] += s.units * per
    return [round(a / t, 4) for _, (a, t) in sorted(got.items())]


def _force_attention_units(n: int) -> None:
    """Replace uniform allocation's counts: n units from every attention, the FFNs the rest."""
    import numpy as np

    from goa_compiler.prune import allocation

    def counts(structures, ratio, shapes=None):
        per = {s.name: allocation.unit_params(s, shapes) for s in structures}
        left = ratio * allocation.structure_params(structures, shapes)
        out = {}
        for s in structures:
            if s.kind == "attention":
                out[s.name] = n
                left -= n * per[s.name]
        ffn = [s for s in structures if s.kind != "attention"]
        frac = left / sum(s.units * per[s.name] for s in ffn)
        out.update({s.name: int(np.floor(frac * s.units + 0.5)) for s in ffn})
        return out

    allocation.uniform_counts = counts


if __name__ == "__main__":
    sys.exit(main())
