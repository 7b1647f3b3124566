"""`goa compile --config FILE`: loading, validation, precedence, and a fuzz test of configs."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goa_compiler.ui import cli
from goa_compiler.ui.config import ConfigError, load_config
from models import tiny
import out_files  # tests/out_files.py


def compile_schema():
    args = cli.build_parser().parse_args(["compile"])
    return args.compile_schema


SCHEMA = compile_schema()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save("llama-gqa", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "calib.txt"
    p.write_text("In the beginning God created the heaven and the earth. " * 60)
    return p


def write(tmp_path, text: str, name="goa.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------------------ the loader

def test_every_compile_option_has_a_key():
    expected = {"model", "out", "ratio", "criterion", "reconstruct", "allocation", "calib", "num_samples",
                "seq_len", "skip_layers", "eval", "eval_tokens", "head_criterion", "goa_score", "ridge",
                "batch_size", "seed", "overwrite", "json", "quiet", "trust_remote_code", "module_inputs", "refit_prior",
                "ridge_folds", "attention_unit", "max_ppl_increase", "max_logit_error", "min_speedup", "measure_speed", "dry_run", "kv_cache", "dtype", "tokenizer", "export",
                "resume", "save_stats", "load_stats", "drop_experts", "refit_intercept"}
    assert set(SCHEMA) == expected


def test_load_dashes_underscores_and_types(tmp_path):
    path = write(tmp_path, 'model = "m"\nratio = 0\nnum-samples = 4\nseq_len = 16\nridge = 1\n'
                           'overwrite = true\ncriterion = "magnitude"\nskip-layers = "first, 1"\n'
                           'max-ppl-increase = 0.15\n')
    values = load_config(path, SCHEMA)
    assert values == {"model": "m", "ratio": 0.0, "num_samples": 4, "seq_len": 16, "ridge": 1.0,
                      "overwrite": True, "criterion": "magnitude", "skip_layers": "first, 1",
                      "max_ppl_increase": 0.15}
    assert isinstance(values["ratio"], float) and isinstance(values["ridge"], float)


@pytest.mark.parametrize("text, needles", [
    ("ratoi = 0.2\n", ["unknown key 'ratoi'", "did you mean 'ratio'"]),
    ("config = 'x.toml'\n", ["unknown key 'config'"]),
    ("ratio = '0.2'\n", ["key 'ratio'", "expected a number", "a string"]),
    ("ratio = true\n", ["key 'ratio'", "expected a number", "a boolean"]),
    ("num-samples = 2.5\n", ["key 'num-samples'", "expected an integer"]),
    ("overwrite = 1\n", ["key 'overwrite'", "expected a boolean"]),
    ("calib = ['a', 'b']\n", ["key 'calib'", "expected a string", "an array"]),
    ("[ratio]\nx = 1\n", ["key 'ratio'", "a table"]),
    ("ratio = 1.0\n", ["key 'ratio'", "[0, 1)", "1.0"]),
    ("ratio = nan\n", ["key 'ratio'", "finite"]),
    ("ridge = inf\n", ["key 'ridge'", "finite"]),
    ("ridge = 0\n", ["key 'ridge'", "positive"]),
    ("seq-len = 1\n", ["key 'seq-len'", "at least 2"]),
    ("seed = -1\n", ["key 'seed'", "must be in"]),
    ("criterion = 'best'\n", ["key 'criterion'", "'best' is not one of", "goa"]),
    ("skip-layers = 'middle'\n", ["key 'skip-layers'", "first, last"]),
    ("min-speedup = 0\n", ["key 'min-speedup'", "positive"]),
    ("max-logit-error = -0.1\n", ["key 'max-logit-error'", "non-negative"]),
    ("calib = \"a\\u0000b\"\n", ["key 'calib'", "NUL"]),
    ("ratio = 0.1\nRatio = 0.2\n", ["unknown key 'Ratio'"]),
    ("num-samples = 2\nnum_samples = 3\n", ["given twice"]),
    ("ratio = \n", ["invalid TOML", "line 1"]),
    ("ratio = 0.2\nratio = 0.3\n", ["invalid TOML"]),
])
def test_bad_config_one_line_naming_key_and_file(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, SCHEMA)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(path)
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.toml"), SCHEMA)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path), SCHEMA)
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"ratio = 0.2\n\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad), SCHEMA)


# ------------------------------------------------------------------------------ the CLI

def dry(capsys, argv) -> tuple[int, dict | None, str]:
    rc = cli.main(argv + ["--dry-run", "--json", "--quiet"])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out) if cap.out.strip() else None, cap.err


def test_precedence_defaults_file_flags(llama_dir, tmp_path, capsys):
    out = tmp_path / "o"
    path = write(tmp_path, f'model = "{llama_dir}"\nout = "{out}"\nratio = 0.25\nnum-samples = 4\n'
                           'criterion = "magnitude"\n')
    rc, data, _ = dry(capsys, ["compile", "--config", path, "--num-samples", "8", "--seed", "3"])
    assert rc == 0
    o = data["options"]
    assert o["ratio"] == 0.25 and o["criterion"] == "magnitude"      # from the file
    assert o["num_samples"] == 8 and o["seed"] == 3                    # flags override the file
    assert o["seq_len"] == 128 and o["reconstruct"] == "refit"          # built-in defaults
    assert o["model"] == str(llama_dir) and o["out"] == str(out)
    assert data["config"] == path
    assert not out.exists()                                            # dry run writes nothing
    # a flag given explicitly with the default's value still overrides the file
    rc, data, _ = dry(capsys, ["compile", "--config", path, "--criterion", "goa"])
    assert rc == 0 and data["options"]["criterion"] == "goa"
    # and the positional MODEL / --out override the file's
    rc, data, _ = dry(capsys, ["compile", str(llama_dir), "--config", path, "--out", str(tmp_path / "p")])
    assert rc == 0 and data["options"]["out"] == str(tmp_path / "p")


@pytest.mark.parametrize("text, needle", [
    ("ratio = 0.2\nnum-sample = 3\n", "unknown key 'num-sample'"),
    ("ratio = 'high'\n", "key 'ratio'"),
    ("ratio = 0.2\nseq-len = 0\n", "key 'seq-len'"),
    ("ratio = [\n", "invalid TOML"),
])
def test_cli_bad_config_exits_2_one_line_nothing_written(llama_dir, tmp_path, capsys, text, needle):
    out = tmp_path / "o"
    path = write(tmp_path, text)
    rc = cli.main(["compile", str(llama_dir), "--config", path, "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and path in err[0] and needle in err[0]
    assert not out.exists()


def test_cli_bad_flag_value_and_missing_required(llama_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["compile", str(llama_dir), "--ratio", "0.2", "--seed", "-1", "--out", str(out)]) == 2
    assert "--seed" in capsys.readouterr().err
    assert cli.main(["compile", str(llama_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing --ratio" in err
    path = write(tmp_path, "ratio = 0.2\n")
    assert cli.main(["compile", "--config", path]) == 2
    assert "missing MODEL and --out" in capsys.readouterr().err
    assert cli.main(["compile", str(llama_dir), "--ratio", "0.2", "--max-ppl-increase", "nan",
                     "--out", str(out)]) == 2
    assert "--max-ppl-increase" in capsys.readouterr().err
    assert not out.exists()


def test_json_error_object_on_stdout(llama_dir, tmp_path, capsys):
    path = write(tmp_path, "ratio = 2\n")
    rc = cli.main(["compile", str(llama_dir), "--config", path, "--out", str(tmp_path / "o"), "--json"])
    assert rc == 2
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert data["exit_status"] == 2 and "key 'ratio'" in data["error"]
    assert cap.err.startswith("error: ")


def test_dry_run_reads_the_data(llama_dir, tmp_path, capsys):
    path = write(tmp_path, f'ratio = 0.2\ncalib = "{tmp_path / "missing.txt"}"\n')
    rc, data, err = dry(capsys, ["compile", str(llama_dir), "--config", path, "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.txt" in err and data["exit_status"] == 2


# ------------------------------------------------------------------------------ fuzz

KEYS = sorted(SCHEMA)
KEY_NAMES = st.sampled_from(KEYS).flatmap(lambda k: st.sampled_from([k, k.replace("_", "-")]))
JUNK_KEYS = st.text(min_size=1, max_size=12)
SENSIBLE = st.sampled_from([
    0.0, 0.1, 0.3, 0.99, 1.0, -0.5, 2, 16, 0, -1, True, False, "goa", "magnitude", "refit", "none",
    "uniform", "global", "first,last", "0", "1", "first", "middle", "kjv", "moment", "empirical",
    "", "tiny", "__CALIB__", "__MISSING__", 1e-2, 0.15, 1.0e300, math.inf, math.nan, 2**63 - 1, 2**63,
])
SCALARS = st.one_of(st.booleans(), st.integers(-10, 10**7), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=16), SENSIBLE)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(min_size=1, max_size=5), SCALARS, max_size=2))


def toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def toml_value(v, calib: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        v = v.replace("__CALIB__", calib).replace("__MISSING__", calib + ".missing")
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x, calib) for x in v) + "]"
    return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x, calib)}" for k, x in v.items()) + "}"


EDITS = st.lists(st.tuples(st.integers(0, 400), st.sampled_from(["", "=", "[", "]", "\"", "'", "\n", "{", "#",
                                                                 "\\", "\x00", "é", "ratio = 0.1\n"])),
                 max_size=3)
DOCS = st.dictionaries(st.one_of(KEY_NAMES, KEY_NAMES, JUNK_KEYS), VALUES, max_size=5)


def _valid_value(key: str):
    opt = SCHEMA[key]
    if opt.choices:
        return st.sampled_from(opt.choices)
    special = {
        "ratio": st.floats(0, 0.6), "ridge": st.floats(1e-4, 1.0), "min_speedup": st.floats(0.01, 100),
        "max_ppl_increase": st.floats(0, 10), "max_logit_error": st.floats(0, 10),
        "num_samples": st.integers(1, 4), "seq_len": st.integers(2, 32), "batch_size": st.integers(1, 4),
        "eval_tokens": st.integers(1, 64), "seed": st.integers(0, 2**63 - 1),
        "ridge_folds": st.sampled_from([0, 2, 3]),
        "skip_layers": st.sampled_from(["none", "first", "last", "1", " 0 "]),
        "calib": st.just("__CALIB__"), "eval": st.sampled_from(["kjv", "__CALIB__", "__MISSING__"]),
    }
    if key in special:
        return special[key]
    return {bool: st.booleans(), int: st.integers(0, 8), float: st.floats(0, 1), str: st.text(max_size=8)}[opt.kind]


# documents whose every key is known and every value well-typed and in range (mostly valid)
VALID_DOCS = st.lists(st.sampled_from(KEYS).flatmap(lambda k: st.tuples(
    st.sampled_from([k, k.replace("_", "-")]), _valid_value(k))),
    max_size=6, unique_by=lambda kv: kv[0].replace("-", "_")).map(lambda kvs: {"ratio": 0.3, **dict(kvs)})
CASES = st.one_of(
    VALID_DOCS.map(lambda d: ("doc", d, [])),
    st.tuples(st.just("doc"), DOCS, st.just([])),
    st.tuples(st.just("doc"), st.one_of(DOCS, VALID_DOCS), EDITS),
    st.tuples(st.just("raw"), st.binary(max_size=40), st.just([])),
)
REAL_RUNS: list[int] = []   # examples that ran a whole compile (one, to keep the test fast)


def render_doc(doc: dict, edits, calib: str) -> str:
    text = "".join(f"{toml_str(k)} = {toml_value(v, calib)}\n" for k, v in doc.items())
    for pos, piece in edits:     # syntax mutations: insert a piece, or delete a character
        pos = min(pos, len(text))
        text = text[:pos] + piece + text[pos:] if piece else text[:pos] + text[pos + 1:]
    return text


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=CASES)
def test_fuzz_configs(llama_dir, calib_file, capsys, case):
    """Random and mutated configs: exit status 0, 2 or 3, never 1 or a traceback, and OUT is
    never created when the status is 2. Valid configs are checked with --dry-run (options,
    config, data, OUT, model load); the first one also runs a real compile, kept cheap by explicit
    flags (which override the file, after the whole file has been validated)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tmp / "goa.toml"
        what, doc, edits = case
        if what == "raw":
            cfg.write_bytes(doc)
            doc = {}
        else:
            cfg.write_text(render_doc(doc, edits, str(calib_file)), encoding="utf-8", errors="surrogatepass")
        out = tmp / "out"
        base = ["compile", str(llama_dir), "--config", str(cfg), "--out", str(out), "--quiet"]
        rc = cli.main(base + ["--dry-run"])
        err = capsys.readouterr().err
        assert rc in (0, 2), err
        assert "Traceback" not in err and "internal error" not in err
        assert not out.exists()
        if rc == 2:
            assert [x for x in err.splitlines() if x.startswith("error: ")], err
        if rc == 0 and not REAL_RUNS:
            REAL_RUNS.append(1)
            cheap = ["--num-samples", "2", "--seq-len", "16", "--eval-tokens", "32", "--batch-size", "2",
                     "--criterion", "magnitude", "--reconstruct", "none", "--calib", str(calib_file)]
            rc = cli.main(base + cheap)
            cap = capsys.readouterr()
            assert "Traceback" not in cap.err and "internal error" not in cap.err
            values = {k.replace("-", "_"): v for k, v in doc.items()}
            refused = expected_refusal(values)
            if values.get("dry_run") is True:             # the file asks for a dry run: still one
                assert rc == 0 and not out.exists(), cap.err
            elif refused is not None:
                assert rc == 2 and not out.exists(), cap.err
                errors = [x for x in cap.err.splitlines() if x.startswith("error: ")]
                assert len(errors) == 1 and refused in errors[0], cap.err
            else:
                assert sorted(p.name for p in out.iterdir()) == out_files.expected(values.get("kv_cache"))
                report = json.loads((out / "report.json").read_text())
                assert report["ratio_requested"] == values["ratio"]
                failed = [r["message"] for r in report["gates"]["results"] if not r["passed"]]
                assert rc == (3 if failed else 0), cap.err
                assert [x for x in cap.err.splitlines() if x.startswith("gate ")] == failed


def expected_refusal(values: dict) -> str | None:
    """What the real compile of a config that passed --dry-run must refuse (exit 2), as a
    piece of its one-line message, or None when it must compile. The dry run checks options,
    files, data and OUT, not these: (1) goa-only scores with the test's own --criterion
    magnitude, and block allocation, which needs error scores; (2) a ratio the tiny Llama cannot lose with a block kept dense. The tiny model
    has 2 blocks; each attention has 2 K/V groups."""
    if values.get("head_criterion", "moment") != "moment":
        return "--head-criterion"
    if values.get("goa_score", "empirical") != "empirical":
        return "--goa-score"
    if values.get("allocation") in ("block", "network"):   # output errors: goa or flap, not magnitude
        return f"--allocation {values['allocation']}"
    skip = str(values.get("skip_layers", "none")).strip().lower()
    eff = values["ratio"] if skip in ("", "none") else 2 * values["ratio"]   # a dense block: twice
    if eff >= 1.0:
        return "cannot be reached"
    if values.get("allocation", "uniform") == "uniform" and np.floor(eff * 2 + 0.5) >= 2:
        return "would remove every K/V group"
    return None     # global keeps a unit per module; else the FFNs keep neurons (< 92 % go)
