"""Test setup: the repository root on sys.path (for ``import models.tiny``), no hub access, and
a cache of converted checkpoints ($GOA_CACHE) of the test run's own.

The cache lives under the run's pytest base temp directory (shared by the pytest-xdist workers
of one run), never the user's ~/.cache/goa-compiler: a run whose tests need SmolLM2-135M (the
slow ones, through the ``smollm2`` fixture) converts it from its GGUF afresh, once (about
25-55 s), and reads it from there afterwards. pytest keeps the base temp directories of the
last three runs only, so old caches (about 540 MB each) go away by themselves.
"""
import fcntl
import os
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def goa_cache(tmp_path_factory) -> Path:
    """$GOA_CACHE for the whole run: <pytest base temp>/goa-cache (the same directory for every
    xdist worker of the run: a worker's base temp is <run base temp>/popen-gwN)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "goa-cache"
    root.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("GOA_CACHE")
    os.environ["GOA_CACHE"] = str(root)
    yield root
    if before is None:
        os.environ.pop("GOA_CACHE", None)
    else:
        os.environ["GOA_CACHE"] = before


@pytest.fixture(scope="session")
def smollm2(goa_cache) -> dict:
    """SmolLM2-135M (alias smollm2-135m) converted into this run's cache, once per run: the
    first worker to get here converts it (under a lock, so the others wait and then read the
    cache). Returns {"path": the checkpoint directory, "source": what load_model said,
    "seconds": how long it took here, "converted_by": the worker that converted it}.
    Tests load the model themselves (from the cache: fast), so none shares a mutable model."""
    from goa_compiler.capture.sources import load_model

    marker = goa_cache / "smollm2-135m.converted-by"
    with open(goa_cache / "smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t = time.perf_counter()
        loaded = load_model("smollm2-135m")
        seconds = time.perf_counter() - t
        if "converted now" in loaded.source:
            marker.write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
        path, source = loaded.path, loaded.source
        del loaded
    return {"path": path, "source": source, "seconds": seconds,
            "converted_by": marker.read_text() if marker.is_file() else None}
