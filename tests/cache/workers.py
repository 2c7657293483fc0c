"""Functions run in child processes by the multi-process cache tests (importable under spawn)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.cache.helpers import key, make_cache
from warmserve.cache import maintenance


def build_log_append(log: Path, what: str) -> None:
    # O_APPEND writes of one short line are atomic across processes.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{what}\n".encode())
    finally:
        os.close(fd)


def get_or_build_keys(
    cache_dir: str,
    shared_url: str | None,
    storage_options: dict[str, Any] | None,
    keys: list[int],
    log: str,
    build_seconds: float,
    start_at: float,
) -> list[tuple[int, str, bytes]]:
    cache, _ = make_cache(Path(cache_dir), shared_url, storage_options, lease_ttl=5)
    time.sleep(max(0.0, start_at - time.time()))  # start every process at the same moment
    out = []
    for n in keys:

        def build(n: int = n) -> bytes:
            build_log_append(Path(log), f"{n} {os.getpid()}")
            time.sleep(build_seconds)
            return f"engine-{n}".encode() * 1000

        got = cache.get_or_build(key(n), build)
        out.append((n, got.outcome, got.blob))
    return out


def hold_lease_and_hang(cache_dir: str, shared_url: str, storage_options: dict[str, Any], marker: str) -> None:
    """Become the builder of key 'k', announce it, then hang in the build until killed."""
    cache, _ = make_cache(Path(cache_dir), shared_url, storage_options, lease_ttl=2)

    def build() -> bytes:
        Path(marker).write_text("building")
        time.sleep(3600)
        return b"never"

    cache.get_or_build(key("k"), build)


def publish_forever(cache_dir: str, size: int) -> None:
    """Publish large entries back to back until killed (for kill -9 mid-write)."""
    cache, _ = make_cache(Path(cache_dir), local_budget=None)
    i = 0
    while True:
        cache.local.publish(key(i % 3), bytes([i % 251]) * size)
        i += 1


def read_entry_slowly(cache_dir: str, key_n: int, hold: float, marker: str) -> None:
    """Hold the reader lock on one entry for ``hold`` seconds (an eviction must skip it)."""
    cache, _ = make_cache(Path(cache_dir))
    with cache.local.store.reading(key(key_n).id):
        Path(marker).write_text("reading")
        time.sleep(hold)


def touch_entry(cache_dir: str, key_n: int) -> bool:
    cache, _ = make_cache(Path(cache_dir))
    return cache.local.lookup(key(key_n)) is not None


def full_filesystem(l1: str, l2: str) -> dict[str, Any]:
    """Run with ``l1`` on a 1 MiB tmpfs: fill it, and report what the cache did (see test_full_filesystem)."""
    cache, events = make_cache(Path(l1), l2, local_budget=None)
    kib = 350 * 1024
    out: dict[str, Any] = {}
    cache.put(key("a"), b"a" * kib)
    cache.put(key("b"), b"b" * kib)
    time.sleep(0.05)
    assert cache.get(key("a")) is not None  # "a" is now more recently used than "b"
    cache.put(key("c"), b"c" * kib)  # does not fit: the least recently used entry makes room
    out["after_c"] = _names(cache.local)
    out["b_in_l2"] = cache.shared is not None and cache.shared.lookup(key("b")) is not None
    got = cache.get_or_build(key("d"), lambda: b"d" * (2 * 2**20))  # larger than the whole filesystem
    out["d"] = (got.outcome, len(got.blob))
    out["after_d"] = _names(cache.local)
    out["d_in_l2"] = cache.shared is not None and cache.shared.lookup(key("d")) is not None
    out["local_hit_a"] = cache.local.lookup(key("a")) is not None
    out["temp_files"] = [str(p) for p in Path(l1).rglob(".tmp-*")]
    out["events"] = {" ".join(map(str, k)): v for k, v in events.counts.items()}
    return out


def _names(tier: Any) -> list[str]:
    """The committed entries of a tier, by the names the scenario gave their keys."""
    names = {key(n).id: n for n in "abcd"}
    return sorted(names.get(e.key_id, e.key_id) for e in maintenance.entries(tier.store) if e.manifest is not None)
