"""`goa compile --config FILE`: compile options from a TOML file.

The file holds flat top-level keys, one per option of `goa compile`: the option's long
name with dashes or underscores (``num-samples`` or ``num_samples``), plus ``model`` (the
positional MODEL) and ``out``. Values have the option's type: a string, an integer, a
float (an integer is accepted), or a boolean for a flag (``overwrite = true``). Paths are
taken relative to the current directory, as on the command line. Precedence: the built-in
defaults, then the file, then flags given explicitly on the command line.

Every value -- from the file or from the command line -- is checked against its declaration
in driver/options.py (type, choices, range, syntax) before anything slow runs or OUT is touched; a bad one raises ConfigError
with a one-line message naming the key (and the file). The contents of data files are
checked when they are read (data.py), still before OUT is touched; `--dry-run` reads them.
"""
from __future__ import annotations

import tomllib
from typing import Any


from goa_compiler.driver.options import OptionError, Spec, check_value, show_value

# One error class for option values, whether they come from a file or the command line.
ConfigError = OptionError


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


def load_config(path: str, schema: dict[str, Spec]) -> dict[str, Any]:
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


def coerce(opt: Spec, value: Any, where: str) -> Any:
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


# ------------------------------------------------------------------------------ merging

def merge(defaults: dict[str, Any], file_values: dict[str, Any], explicit: dict[str, Any]) -> dict:
    """defaults < config file < flags given on the command line."""
    merged = dict(defaults)
    merged.update(file_values)
    merged.update(explicit)
    return merged


def _show_key(key: str) -> str:
    return repr(key) if key.isprintable() else ascii(key)


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    for t, n in names.items():
        if type(value) is t:
            return f"{n} ({show_value(value)})" if t is not dict else n
    return f"a {type(value).__name__} ({show_value(value)})"


def _suggest(name: str, schema: dict[str, Spec]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(schema), n=1)
    return f" (did you mean {close[0].replace('_', '-')!r}?)" if close else \
        f" (known keys: {', '.join(k.replace('_', '-') for k in sorted(schema))})"


def _one_line(s: str) -> str:
    return " ".join(s.split())
