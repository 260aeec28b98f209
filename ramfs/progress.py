"""A one-line progress bar on stderr, only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, label: str, *, enabled: bool | None = None,
                 stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self.t0 = time.monotonic()
        self._last = 0.0
        self._count = 0

    def __call__(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        self._count = done
        now = time.monotonic()
        if now - self._last < 0.2 and not force:
            return  # at most 5 frames a second; done() draws the last one
        self._last = now
        elapsed = max(now - self.t0, 1e-6)
        rate = done / elapsed
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            eta = (self.total - done) / rate if rate > 0 else 0
            line = (f"{self.label} [{bar:<30}] {frac * 100:5.1f}%  {rate / 1e6:7.1f} MB/s  "
                    f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        else:
            line = f"{self.label} {done / 1e6:10.1f} MB  {rate / 1e6:7.1f} MB/s"
        self.stream.write("\r" + line)
        self.stream.flush()

    def scanned(self, done: int, total: int | None = None) -> None:
        """``progress(done, total)`` callbacks (open_image): the total may come late."""
        if total:
            self.total = total
        self(done)

    def done(self) -> None:
        if self.enabled and self._last:
            self(self._count, force=True)  # the last count, not the last frame drawn
            self.stream.write("\n")
            self._last = 0.0
            self.stream.flush()
