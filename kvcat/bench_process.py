"""What a benchmark process says and measures of itself: its log lines and its peak resident memory.

Standard library only: benchmarks/kvpress_runner.py runs in the peers venv, without kvcat, and loads this file
by path, so that both sides of `kvcat bench peers` log and measure memory the same way.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable


def logger(name: str) -> Callable[[str], None]:
    """A benchmark's log: `[NAME HH:MM:SS] message` lines on stderr, flushed at once (stdout keeps the table)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def _reset_high_water_mark() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _high_water_mark() > 0
    except OSError:
        return False


def _high_water_mark() -> float:
    """This process's peak RSS (MB) since start or the last reset; 0 if the kernel does not say."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakRSS:
    """Peak resident set size (MB) of this process while inside the block (blocks must not nest).

    Exact where Linux lets the process reset its high-water mark (`/proc/self/clear_refs`, then `VmHWM`):
    sampling misses the short-lived tensors that make the peak. Elsewhere, sampled every 5 ms."""

    def __enter__(self) -> "PeakRSS":
        self.peak = self.rss()
        self._exact = _reset_high_water_mark()
        if not self._exact:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._exact:
            self.peak = max(self.peak, _high_water_mark())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss(pid: int | str = "self") -> float:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

