"""A small text progress bar on a stream (standard error), redrawn at most 10 times/s."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """``label [#####-----] done/total pct rate eta``, rewritten in place with ``\\r``.

    Args:
        total: images to do.
        stream: where to draw (normally ``sys.stderr``).
        enabled: draw at all; when false every method does nothing.
    """

    def __init__(self, total: int, stream: TextIO, *, enabled: bool, label: str = "") -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.enabled = enabled
        self.label = label
        self.done = 0
        self.failed = 0
        self._start = time.perf_counter()
        self._drawn = 0.0

    def advance(self, done: int, failed: int = 0) -> None:
        """Count ``done`` more images finished, ``failed`` of them failed."""
        self.done += done
        self.failed += failed
        now = time.perf_counter()
        if self.enabled and (now - self._drawn >= 0.1 or self.done >= self.total):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        frac = min(self.done / self.total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        failed = f"  {self.failed} failed" if self.failed else ""
        self.stream.write(
            f"\r{self.label}[{bar}] {self.done}/{self.total} {100 * frac:3.0f}%  "
            f"{rate:,.0f} img/s  eta {eta:.0f} s{failed}  "
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            if self.done < self.total:  # else the last advance drew the final state
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
