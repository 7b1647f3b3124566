"""`goa compile --config FILE`: compile options from a TOML file.

The file holds flat top-level keys, one per option of `goa compile`: the option's long
name with dashes or underscores (``num-samples`` or ``num_samples``), plus ``model`` (the
positional MODEL) and ``out``. Values have the option's type: a string, an integer, a
float (an integer is accepted), or a boolean for a flag (``overwrite = true``). Paths are
taken relative to the current directory, as on the command line. Precedence: the built-in
defaults, then the file, then flags given explicitly on the command line.

Every value -- from the file or from the command line -- is checked here (type, choices,
range, syntax) before anything slow runs or OUT is touched; a bad one raises ConfigError
with a one-line message naming the key (and the file). The contents of data files are
checked when they are read (data.py), still before OUT is touched; `--dry-run` reads them.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(Exception):
    """A configuration file or value is unusable; the message is one line naming the key."""


@dataclass(frozen=True)
class Option:
    """One compile option: its name (argparse dest), value type and allowed choices."""
    name: str
    kind: type                      # bool, int, float or str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-") if self.name != "model" else "MODEL"


# The options that are not plain values of the command line (the file itself).
NOT_IN_FILE = ("config", "func", "compile_defaults", "help")


def schema_from_parser(parser) -> dict[str, Option]:
    """The compile options of an argparse (sub)parser: dest -> Option."""
    import argparse

    out: dict[str, Option] = {}
    for a in parser._actions:  # noqa: SLF001 (argparse has no public list of actions)
        if a.dest in NOT_IN_FILE or isinstance(a, argparse._HelpAction):  # noqa: SLF001
            continue
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
            kind = bool
        else:
            kind = a.type if a.type in (int, float) else str
        out[a.dest] = Option(a.dest, kind, tuple(a.choices) if a.choices else None)
    return out


# ------------------------------------------------------------------------------ reading

def read_toml(path: str) -> dict[str, Any]:
    """The parsed document; ConfigError (one line) when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {_one_line(str(e))}") from None
    except (ValueError, RecursionError) as e:  # tomllib may raise these on pathological input
        raise ConfigError(f"{path}: invalid TOML: {_one_line(str(e)) or type(e).__name__}") from None


def load_config(path: str, schema: dict[str, Option]) -> dict[str, Any]:
    """Read FILE and return {dest: value}, every value type-checked and value-checked."""
    doc = read_toml(path)
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key in doc:
        name = key.replace("-", "_")
        if name not in schema:
            raise ConfigError(f"{path}: unknown key {_show_key(key)}"
                              + _suggest(name, schema))
        if name in seen:
            raise ConfigError(f"{path}: key {_show_key(key)} given twice (also as {_show_key(seen[name])})")
        seen[name] = key
        where = f"{path}: key {_show_key(key)}"
        values[name] = check_value(schema[name], coerce(schema[name], doc[key], where), where)
    return values


def coerce(opt: Option, value: Any, where: str) -> Any:
    """A TOML value of the option's type (int accepted for float), else ConfigError."""
    if opt.kind is bool:
        ok = isinstance(value, bool)
    elif opt.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif opt.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
                str: "a string"}[opt.kind]
        raise ConfigError(f"{where}: expected {want}, got {_type_name(value)}")
    return value


# ------------------------------------------------------------------------------ values

_SKIP_PART = re.compile(r"^\s*(first|last|\d+)\s*$", re.IGNORECASE)
MAX_SEED = 2**63 - 1


def _in_unit(v):
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _at_least(n):
    return lambda v: None if v >= n else f"must be at least {n}"


def _positive(v):
    return None if v > 0 else "must be positive"


def _non_negative(v):
    return None if v >= 0 else "must be non-negative"


def _seed(v):
    return None if 0 <= v <= MAX_SEED else f"must be in [0, {MAX_SEED}]"


def _skip_layers(v):
    s = v.strip().lower()
    if s in ("", "none") or all(_SKIP_PART.match(p) for p in s.split(",")):
        return None
    return "must be none, first, last, or comma-separated block numbers (e.g. first,last or 0,5)"


def _non_empty(v):
    return None if v.strip() else "must not be empty"


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "ratio": _in_unit,
    "num_samples": _at_least(1),
    "seq_len": _at_least(2),
    "batch_size": _at_least(1),
    "eval_tokens": _at_least(1),
    "ridge": _positive,
    "seed": _seed,
    "skip_layers": _skip_layers,
    "model": _non_empty,
    "out": _non_empty,
    "max_ppl_increase": _non_negative,
    "max_logit_error": _non_negative,
    "min_speedup": _positive,
}
# Upper limits that keep a typo from asking for days of work or all memory.
LIMITS = {"num_samples": 1_000_000, "seq_len": 1_000_000, "batch_size": 1_000_000,
          "eval_tokens": 10**10}


def check_value(opt: Option, value: Any, where: str) -> Any:
    """Raise ConfigError ``"{where}: ..."`` when ``value`` is not acceptable for ``opt``."""
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{where}: contains a NUL character")
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, opt.choices))}")
    check = CHECKS.get(opt.name)
    problem = check(value) if check else None
    if problem is None and opt.name in LIMITS and value > LIMITS[opt.name]:
        problem = f"must be at most {LIMITS[opt.name]}"
    if problem:
        raise ConfigError(f"{where}: {problem}, got {_show(value)}")
    return value


# ------------------------------------------------------------------------------ merging

def merge(defaults: dict[str, Any], file_values: dict[str, Any], explicit: dict[str, Any]) -> dict:
    """defaults < config file < flags given on the command line."""
    merged = dict(defaults)
    merged.update(file_values)
    merged.update(explicit)
    return merged


def _show_key(key: str) -> str:
    return repr(key) if key.isprintable() else ascii(key)


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    for t, n in names.items():
        if type(value) is t:
            return f"{n} ({_show(value)})" if t is not dict else n
    return f"a {type(value).__name__} ({_show(value)})"


def _suggest(name: str, schema: dict[str, Option]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(schema), n=1)
    return f" (did you mean {close[0].replace('_', '-')!r}?)" if close else \
        f" (known keys: {', '.join(k.replace('_', '-') for k in sorted(schema))})"


def _one_line(s: str) -> str:
    return " ".join(s.split())
