"""The compile fence: once a worker is ready, nothing in its process should trace, compile or autotune.

A compile after ready means a request paid seconds (a new batch size Dynamo had not seen, a guard that
failed, an autotuning kernel). The fence reads torch's own counters after every engine call and every weight
swap; anything new is counted in ``warmserve_unexpected_compiles_total`` and logged as an error. Counters of
a torch that never imported Dynamo are zero: the fence itself imports nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import weakref
from collections.abc import Iterator

from warmserve.serve.metrics import Metrics

logger = logging.getLogger(__name__)

AUTOTUNE_METRIC = "CachingAutotuner.benchmark_all_configs"


def compile_counts() -> tuple[int, int]:
    """(Dynamo frames compiled, Triton autotuning runs) in this process so far."""
    utils = sys.modules.get("torch._dynamo.utils")
    # A module being imported (torchvision imports Dynamo, after a replica is ready, for nvJPEG or a swap's
    # eager reference) is in sys.modules before its counters exist: nothing has compiled yet.
    counters = getattr(utils, "counters", None)
    if counters is None:
        return 0, 0
    frames = int(counters["frames"]["total"])
    autotunes = len(getattr(utils, "compilation_time_metrics", {}).get(AUTOTUNE_METRIC, ()))
    return frames, autotunes


# Compiles while any worker of the process is starting are expected; the fences re-read the counters after.
_FENCES: weakref.WeakSet[CompileFence] = weakref.WeakSet()
_LOCK = threading.Lock()
_starting = 0


@contextlib.contextmanager
def expected() -> Iterator[None]:
    """Compiles inside this block (a worker's start) are expected: no armed fence counts them."""
    global _starting
    with _LOCK:
        _starting += 1
    try:
        yield
    finally:
        with _LOCK:
            _starting -= 1
            for fence in list(_FENCES):
                fence.baseline = compile_counts()


class CompileFence:
    """Counts compiles in this process since the worker was ready, labelled with its backend."""

    def __init__(self, metrics: Metrics, backend: str) -> None:
        self.metrics = metrics
        self.backend = backend
        self.baseline = compile_counts()
        self.unexpected = 0
        with _LOCK:
            _FENCES.add(self)

    def check(self, where: str) -> int:
        """Count and report what compiled since the last check; returns how many. The counters are the
        process's: with several workers in one process, each counts a compile once under its backend."""
        with _LOCK:
            now = compile_counts()
            if _starting:  # another worker of this process is starting: its compiles are expected
                self.baseline = now
                return 0
            new = sum(max(0, n - b) for n, b in zip(now, self.baseline, strict=True))
            self.baseline = now
            self.unexpected += new
        if new:
            self.metrics.inc("warmserve_unexpected_compiles", new, backend=self.backend)
            logger.error(
                "UNEXPECTED COMPILE after ready (%s, backend %s): %d new Dynamo frame(s) or autotuning run(s); "
                "a request paid for it. Warm-up should cover every batch size and dtype the server sees.",
                where,
                self.backend,
                new,
            )
        return new
