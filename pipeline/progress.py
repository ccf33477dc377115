"""A one-line progress display: items done, rate and ETA, throttled so logs stay readable."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None, interval: float = 2.0):
        self.label, self.total, self.done, self.failed = label, total, 0, 0
        self.stream = stream or sys.stderr
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, done: int, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        now = time.monotonic()
        if now - self.last >= self.interval and self.done < self.total:  # finish() prints the last line
            self.last = now
            self._print(final=False)

    def finish(self) -> float:
        elapsed = time.monotonic() - self.start
        self._print(final=True)
        return elapsed

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        return (f"{self.label}: {self.done}/{self.total} items ({self.failed} failed), "
                f"{rate:.1f} items/s, ETA {eta_text}, {elapsed:.1f}s elapsed")

    def _print(self, final: bool) -> None:
        end = "\n" if final or not self.tty else ""
        prefix = "\r" if self.tty else ""
        print(prefix + self.line(), end=end, file=self.stream, flush=True)
