"""Progress for long work: a tqdm bar per phase on a terminal, plain log lines otherwise
(CI logs, pipes). Everything goes to stderr so stdout stays for results (--json)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.timings: dict[str, float] = {}

    def log(self, msg: str):
        if self.enabled:
            print(f"[goa] {msg}", file=self.stream, flush=True)

    @contextmanager
    def phase(self, name: str):
        """Time a phase; the duration lands in ``timings``."""
        self.log(f"{name} ...")
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.timings[name] = self.timings.get(name, 0.0) + dt
            self.log(f"{name} done in {dt:.1f}s")

    def iter(self, items, desc: str, total: int | None = None):
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        if not self.enabled:
            yield from items
            return
        if self.tty:
            from tqdm import tqdm

            yield from tqdm(items, desc=desc, total=total, file=self.stream, leave=False)
            return
        step = max(1, (total or 10) // 10)
        start = time.perf_counter()
        for i, x in enumerate(items):
            if i % step == 0 or (total and i == total - 1):
                self.log(f"{desc}: {i + 1}/{total if total else '?'}{_time_left(start, i, total)}")
            yield x


def _time_left(start: float, done: int, total: int | None) -> str:
    """", about N s left" from the rate of the ``done`` items so far ("" before the first)."""
    if not done or not total:
        return ""
    left = (time.perf_counter() - start) / done * (total - done)
    return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"
