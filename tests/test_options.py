"""One declaration of every compile option: the CLI, the TOML schema and the Python API
agree, combinations are refused in one place, and the report says what ran."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from goa_compiler.driver.options import CompileOptions, JobOptions, OptionError, specs, validate
from goa_compiler.ui import cli
from models import tiny


def _resolved(argv):
    args = cli.build_parser().parse_args(["compile", *argv])
    return cli.compile_options(cli.resolve_compile_args(args))


def test_python_api_defaults_are_the_cli_defaults():
    assert _resolved(["m", "--ratio", "0.2", "--out", "o"]) == validate(CompileOptions(ratio=0.2))
    d = CompileOptions(ratio=0.2)
    assert (d.criterion, d.reconstruct, d.num_samples, d.allocation) == ("goa", "refit", 32, None)
    # the allocation left unset is decided by the criterion: block where scores are errors
    assert validate(d).allocation == "block"
    assert validate(dataclasses.replace(d, criterion="flap")).allocation == "block"
    for crit in ("wanda-sp", "magnitude", "random"):
        assert validate(dataclasses.replace(d, criterion=crit)).allocation == "uniform"
    assert validate(dataclasses.replace(d, head_criterion="similarity")).allocation == "uniform"
    with pytest.raises(OptionError, match="--allocation block"):
        validate(dataclasses.replace(d, criterion="wanda-sp", allocation="block"))
    with pytest.raises(OptionError, match="--allocation network"):
        validate(dataclasses.replace(d, criterion="magnitude", allocation="network"))


def test_skip_layers_auto_needs_error_scores_and_calibration():
    d = CompileOptions(ratio=0.2, skip_layers="auto")
    assert validate(d).skip_layers == "auto"
    assert validate(dataclasses.replace(d, criterion="flap", reconstruct="none")).skip_layers == "auto"
    for bad in (dict(criterion="wanda-sp"), dict(criterion="magnitude", reconstruct="none"),
                dict(head_criterion="similarity")):
        with pytest.raises(OptionError, match="--skip-layers auto"):
            validate(dataclasses.replace(d, **bad))


def test_every_field_is_a_flag_and_a_config_key():
    parser_dests = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["compile"]._actions}
    for cls in (CompileOptions, JobOptions):
        for key, spec in specs(cls).items():
            assert key in parser_dests, key
            assert spec.name in {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("kw, needle", [
    (dict(criterion="magnitude", head_criterion="similarity"), "--head-criterion similarity is a goa score"),
    (dict(criterion="flap", goa_score="gaussian"), "--goa-score gaussian is a goa score"),
    (dict(criterion="nope"), "'nope' is not one of"),
    (dict(ratio=1.0), "--ratio: must be in [0, 1)"),
    (dict(ratio=None), "--ratio is required"),
])
def test_bad_options_and_combinations_are_refused_in_one_place(kw, needle):
    with pytest.raises(OptionError, match=None) as e:
        validate(dataclasses.replace(CompileOptions(ratio=0.2), **kw))
    assert needle in str(e.value)


def test_bad_combination_exits_2_on_the_command_line(tmp_path, capsys):
    rc = cli.main(["compile", "m", "--ratio", "0.2", "--out", str(tmp_path / "o"), "--criterion", "random",
                   "--head-criterion", "similarity"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --criterion goa" in err[0]
    assert not (tmp_path / "o").exists()


def test_data_free_global_allocation_runs_global_and_says_so(tmp_path):
    """--criterion magnitude --reconstruct none --allocation global used to run uniform
    allocation while the report said global."""
    from goa_compiler.driver.pipeline import compile_loaded

    model, _, kind = tiny.build("llama")
    kept = {}
    for how in ("uniform", "global"):
        res = compile_loaded(copy.deepcopy(model), kind, CompileOptions(
            ratio=0.4, criterion="magnitude", reconstruct="none", allocation=how), tmp_path / how)
        on_disk = json.loads((tmp_path / how / "report.json").read_text())
        assert on_disk["allocation"] == how
        kept[how] = {m["name"]: len(m["kept"]) / m["total"] for m in res.report["modules"]}
    # uniform: every FFN keeps the same fraction; global: the standardised magnitudes decide
    ffn = [k for k in kept["uniform"] if k.endswith("ffn")]
    assert len({kept["uniform"][k] for k in ffn}) == 1
    assert kept["global"] != kept["uniform"]


def test_refit_prior_reaches_the_refits_and_the_report(tmp_path):
    from goa_compiler.driver.pipeline import compile_loaded

    model, _, kind = tiny.build("llama-gqa")
    errs, level1 = {}, {}
    for prior in ("zero", "original"):
        res = compile_loaded(copy.deepcopy(model), kind, CompileOptions(
            ratio=0.3, num_samples=4, seq_len=32, ridge=5.0, refit_prior=prior, module_inputs="pruned"),
            tmp_path / prior, tokenizer=tiny.byte_tokenizer())
        assert res.report["refit_prior"] == prior
        modules = res.report["modules"]
        errs[prior] = [m["output_error"]["final"] for m in modules if "output_error" in m]
        level1[prior] = [m["level1_error"]["after"] for m in modules if "level1_error" in m]
    # a strong ridge toward zero shrinks the refits; toward the original weights they can
    # only move as far as the data says: different errors, level 1 and level 2
    assert len(errs["zero"]) == len(errs["original"]) > 0 and errs["zero"] != errs["original"]
    assert len(level1["zero"]) == len(level1["original"]) > 0 and level1["zero"] != level1["original"]
