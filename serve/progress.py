"""A progress line for long builds: a spinner with elapsed seconds on a terminal, a log line otherwise."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """``with Progress("compiling resnet18 (aoti)"):`` shows ``⠋ compiling resnet18 (aoti)  12s``."""

    def __init__(self, what: str, stream: TextIO | None = None, interval: float = 0.1, log_every: float = 15.0):
        self.what = what
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if self.tty else log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress")
        self._t0 = 0.0

    def _run(self) -> None:
        frames = itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
        while not self._stop.wait(self.interval):
            elapsed = time.monotonic() - self._t0
            if self.tty:
                self.stream.write(f"\r{next(frames)} {self.what}  {elapsed:.0f}s ")
            else:
                self.stream.write(f"... {self.what}: {elapsed:.0f}s\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        elapsed = time.monotonic() - self._t0
        mark = "✗" if exc_type else "✓"
        if self.tty:
            self.stream.write(f"\r{mark} {self.what}  {elapsed:.1f}s\n")
        elif exc_type is None:
            self.stream.write(f"{mark} {self.what}: {elapsed:.1f}s\n")
        self.stream.flush()
