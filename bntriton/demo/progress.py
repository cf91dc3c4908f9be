"""A one-line progress bar on stderr for the demo's training runs."""
from __future__ import annotations

import sys
import time


class Progress:
    """``tick(label)`` after each run; redrawn in place, so only meant for a terminal."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()

    def __call__(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // max(self.total, 1)
        line = (f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
                f" {time.perf_counter() - self.start:6.1f}s {label}")
        self.stream.write(line.ljust(79)[:79])
        if self.done >= self.total:
            self.stream.write("\r" + " " * 79 + "\r")
        self.stream.flush()
