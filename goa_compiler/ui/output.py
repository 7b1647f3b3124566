"""Writing OUT/ safely: everything goes to a temporary directory beside OUT and is renamed
into place only when complete, so a crash or a full disk never leaves a half-written
model, and a previous OUT stays untouched until the new one is whole."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


class OutputError(Exception):
    """OUT cannot be used (exists and is not empty without --overwrite, or not a directory),
    or the disk filled up while writing it."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    """Yield a temporary directory; on success it replaces ``out`` atomically (rename).

    On any failure the temporary directory is removed and ``out`` is left as it was; a full
    disk (or quota) while writing becomes an OutputError."""
    out = check_out(out, overwrite)
    created = missing_parents(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())     # mkdtemp's 0700 would make OUT private
    except OSError as e:
        remove_empty(created)
        if _disk_full(e):
            raise OutputError(f"no space left on device to write {out} ({_reason(e)})") from e
        raise
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        if _disk_full(e):
            state = "left as it was" if out.exists() else "not created"
            raise OutputError(f"no space left on device while writing {out} ({_reason(e)}); "
                              f"nothing written, {out} {state}") from e
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


def clear_stale(out: str | os.PathLike) -> list[str]:
    """Remove what compiles into ``out`` that were killed left beside it (the staging
    directory ``.OUT.tmp-PID-*`` and the previous OUT ``.OUT.old-PID`` of a process that is
    no longer running; a previous OUT whose replacement never arrived is put back); returns
    what was done, a line each. A living process's are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:tmp-(\d+)-.*|tmp-.*|old-(\d+))", p.name)
        if m is None or not p.is_dir():
            continue
        pid = m.group(1) or m.group(2)
        if pid is not None and _running(int(pid)):
            continue
        if p.name.startswith(f".{out.name}.old-") and not out.exists():
            os.rename(p, out)       # killed between its two renames: the previous OUT comes back
            removed.append(f"restored {out} from {p.name}, left by a compile that was killed while replacing it")
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(f"cleared {p}, left by a compile that was killed")
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(e: BaseException) -> bool:
    """An ENOSPC/EDQUOT OSError, also when wrapped by a library (its cause or context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        e = e.__cause__ or e.__context__
    return False


def _reason(e: BaseException) -> str:
    while e is not None and not (isinstance(e, OSError) and e.errno in DISK_FULL):
        e = e.__cause__ or e.__context__
    if e is None:
        return "disk full"
    where = f" ({os.path.basename(str(e.filename))})" if getattr(e, "filename", None) else ""
    return f"{os.strerror(e.errno)}{where}"


def missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what a
    ``mkdir(parents=True)`` is about to create, so that a failure can remove it again)."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def remove_empty(dirs: list[Path]):
    """Remove each directory of ``dirs`` (deepest first) that is still empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


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
