"""Writing OUT/ safely: everything goes to a temporary directory beside OUT and is renamed
into place only when complete, so a crash or a full disk never leaves a half-written
model, and a previous OUT stays untouched until the new one is whole."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


class OutputError(Exception):
    """OUT cannot be used (exists and is not empty without --overwrite, or not a directory)."""


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces ``out`` atomically (rename)."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except BaseException:
        if backup is not None:
            os.rename(backup, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_json(path: str | os.PathLike, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_default)
        f.write("\n")


def _default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
