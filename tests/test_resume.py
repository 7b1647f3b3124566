"""Interrupted compiles (prune/journal.py, ui/output.clear_stale): a compile killed with
SIGKILL after some modules resumes with --resume from its journal and writes byte-identical
output; without --resume, or with other options, the journal is cleared and the compile
says so; staging directories of killed compiles are cleared, a living one's are not."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from goa_compiler.prune.journal import work_dir
from goa_compiler.ui import cli
from goa_compiler.ui.output import clear_stale
from models import tiny

ROOT = Path(__file__).resolve().parents[1]

# the compile of cli.main, killed (SIGKILL, nothing runs after it) once the journal holds
# module KILL_AFTER's result
KILLED = """
import os, signal, sys
from goa_compiler.prune import journal
write = journal.Journal.write
def write_then_die(self, index, result):
    write(self, index, result)
    if index == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
journal.Journal.write = write_then_die
from goa_compiler.ui import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _args(tmp_path, *extra):
    model = tmp_path / "llama"
    if not model.exists():
        tiny.save("llama-gqa", model)
    calib = tmp_path / "calib.txt"
    calib.write_text("In the beginning God created the heaven and the earth. And the earth was without "
                     "form, and void; and darkness was upon the face of the deep. " * 30)
    return ["compile", str(model), "--ratio", "0.3", "--num-samples", "4", "--seq-len", "16", "--batch-size", "2",
            "--calib", str(calib), "--criterion", "random", "--allocation", "uniform", "--reconstruct", "refit",
            *extra]


def _killed(args, kill_after: int):
    env = {**os.environ, "KILL_AFTER": str(kill_after), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", KILLED, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == -9, r.stderr[-2000:]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in ("report.json", "report.html")}


def test_killed_compile_resumes_to_identical_bytes(tmp_path, capsys):
    """--criterion random: the journal must also restore the random generator's state."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert cli.main([*_args(tmp_path), "--out", str(whole)]) == 0
    _killed([*_args(tmp_path), "--out", str(resumed)], kill_after=1)
    journal = work_dir(resumed)
    assert sorted(p.name for p in journal.iterdir()) == ["0.pt", "1.pt", "counts.json", "key.json"]
    assert not resumed.exists()
    capsys.readouterr()
    assert cli.main([*_args(tmp_path), "--out", str(resumed), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "2 modules finished" in err
    assert _files(whole) == _files(resumed)
    assert not journal.exists()          # a completed compile removes its journal


def test_resume_says_what_it_did(tmp_path, capsys):
    out = tmp_path / "out"
    _killed([*_args(tmp_path), "--out", str(out)], kill_after=0)
    capsys.readouterr()
    # other options: the journal is not this compile's
    assert cli.main([*_args(tmp_path, "--seed", "5"), "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "cleared" in err and "another model, calibration or options" in err
    _killed([*_args(tmp_path), "--out", str(tmp_path / "b")], kill_after=0)
    assert cli.main([*_args(tmp_path), "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "cleared" in err and "--resume not given" in err
    # killed after the last module (before the export): nothing is computed again
    _killed([*_args(tmp_path), "--out", str(tmp_path / "c")], kill_after=3)
    assert cli.main([*_args(tmp_path), "--out", str(tmp_path / "c"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "4 modules finished" in err


def test_stale_staging_is_cleared_and_a_living_one_kept(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    (stale / "hf").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    living = tmp_path / f".out.tmp-{os.getpid()}-def456"
    living.mkdir()
    other = tmp_path / ".outer.tmp-1-x"      # another OUT's
    other.mkdir()
    done = clear_stale(out)
    assert done == [f"cleared {stale}, left by a compile that was killed"]
    assert not stale.exists() and living.exists() and other.exists()


def test_previous_out_put_back_after_a_kill_between_the_renames(tmp_path):
    out = tmp_path / "out"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    backup = tmp_path / f".out.old-{dead}"
    backup.mkdir()
    (backup / "model.onnx").write_bytes(b"previous")
    [line] = clear_stale(out)
    assert line.startswith(f"restored {out}")
    assert (out / "model.onnx").read_bytes() == b"previous"
