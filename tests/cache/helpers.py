"""Shared helpers for cache tests."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from warmserve.cache import CacheConfig, CacheEvents, CacheKey, EngineCache


class RecordingEvents(CacheEvents):
    """Counts every hook call, e.g. ``events.counts[("refused", "local", "digest")]``."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[Any, ...]] = Counter()
        self._lock = threading.Lock()

    def _add(self, *what: Any) -> None:
        with self._lock:
            self.counts[what] += 1

    def hit(self, tier: str) -> None:
        self._add("hit", tier)

    def miss(self) -> None:
        self._add("miss")

    def refused(self, tier: str, reason: str) -> None:
        self._add("refused", tier, reason)

    def evicted(self, tier: str, count: int, nbytes: int) -> None:
        self._add("evicted", tier)

    def waited(self, seconds: float) -> None:
        self._add("waited")

    def lease_takeover(self) -> None:
        self._add("lease_takeover")

    def store_error(self, tier: str, op: str) -> None:
        self._add("store_error", tier, op)

    def total(self, name: str) -> int:
        return sum(v for k, v in self.counts.items() if k[0] == name)


def key(n: int | str) -> CacheKey:
    return CacheKey.from_doc({"kind": "test", "n": n})


def make_cache(
    cache_dir: Path, shared_url: str | None = None, storage_options: dict[str, Any] | None = None, **kw: Any
) -> tuple[EngineCache, RecordingEvents]:
    events = RecordingEvents()
    config = CacheConfig.load(
        environ={}, cache_dir=cache_dir, shared_url=shared_url, storage_options=storage_options or {}, **kw
    )
    return EngineCache.from_config(config, events), events
