"""Optimum's ONNX exporter, in a virtual environment of its own (.venv-optimum).

    .venv/bin/python tools/optimum_export.py MODEL_DIR OUT_DIR [--task text-generation-with-past]
    .venv/bin/goa compile OUT_DIR/model.onnx --tokenizer MODEL_DIR --ratio 0.3 --out PRUNED/

optimum-onnx pins an older transformers (< 4.58) than the project's, so it cannot share
.venv. ``ensure_venv`` makes .venv-optimum beside .venv on first use (torch 2.13 CPU,
optimum-onnx, onnxruntime; about 1.3 GB, half a minute from the local index) under a file
lock, so parallel test workers make it once. ``export`` runs ``optimum-cli export onnx``
there on a local Hugging Face directory: Optimum's graphs (TorchScript-based torch.onnx,
with Shape / Gather arithmetic for sizes, merged equal constants, ``past_key_values.N.key``
inputs with ``--task text-generation-with-past``) are inputs goa must take
(tests/test_optimum_input.py).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-optimum"
REQUIREMENTS = ("torch==2.13.0", "optimum-onnx", "onnxruntime")


class Unavailable(RuntimeError):
    """The exporter's environment could not be made (no index, a failed install)."""


def ensure_venv(venv: Path = VENV) -> Path:
    """The exporter environment's python, made once (Unavailable with pip's last line)."""
    python = venv / "bin" / "python"
    stamp = venv / ".goa-optimum"
    want = " ".join(REQUIREMENTS)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == want and python.exists():
            return python
        steps = ([sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS])
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                last = ([ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()] or ["no output"])[-1]
                raise Unavailable(f"{' '.join(cmd[:3])}: {last[:200]}")
        stamp.write_text(want)
    return python


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, task: str = "text-generation-with-past",
           venv: Path = VENV) -> Path:
    """``optimum-cli export onnx`` of a local model directory; OUT_DIR/model.onnx."""
    python = ensure_venv(venv)
    cmd = [str(python), "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(model_dir),
           "--task", task, str(out_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    path = Path(out_dir) / "model.onnx"
    if r.returncode != 0 or not path.exists():
        last = ([ln for ln in r.stderr.splitlines() if ln.strip()] or ["no output"])[-1]
        raise RuntimeError(f"optimum-cli export onnx failed ({r.returncode}): {last[:300]}")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--task", default="text-generation-with-past",
                   help="Optimum's task: text-generation (logits only) or text-generation-with-past (KV cache)")
    a = p.parse_args()
    try:
        print(export(a.model_dir, a.out_dir, a.task))
    except Unavailable as e:
        sys.exit(f"error: the exporter's environment: {e}")


if __name__ == "__main__":
    main()
