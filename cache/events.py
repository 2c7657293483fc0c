"""Hooks through which the cache reports what it does; serve/metrics.py turns them into Prometheus series."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ParamSpec

logger = logging.getLogger(__name__)
P = ParamSpec("P")


class CacheEvents:
    """No-op base: subclass and override what you want to count. A hook must never raise."""

    def hit(self, tier: str) -> None: ...
    def miss(self) -> None: ...
    def refused(self, tier: str, reason: str) -> None: ...
    def evicted(self, tier: str, count: int, nbytes: int) -> None: ...
    def tier_bytes(self, tier: str, nbytes: int) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def lease_takeover(self) -> None: ...
    def store_error(self, tier: str, op: str) -> None: ...
    def load_seconds(self, tier: str, seconds: float, nbytes: int) -> None: ...
    def store_seconds(self, tier: str, seconds: float, nbytes: int) -> None: ...


NO_EVENTS = CacheEvents()


def emit(hook: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
    """Call a hook (a `CacheEvents` method, so its arguments are type-checked); a failing hook is logged,
    never raised into a cache operation."""
    try:
        hook(*args, **kwargs)
    except Exception:  # a failing metrics hook never fails a cache operation (logged below)
        logger.exception("cache event hook %s failed", getattr(hook, "__name__", hook))
