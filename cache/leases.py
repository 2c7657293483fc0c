"""Single-flight across nodes: one process builds a key while the others wait, through a lease in the shared store.

The whole protocol is here: the lease document, its heartbeat, waiting for the holder's entry, and taking a
lease over when its holder stopped renewing it. (On one node a file lock elects the builder: `locks.BuildLock`.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid

from warmserve.cache.errors import LeaseTimeout, StoreUnavailable
from warmserve.cache.events import CacheEvents, emit
from warmserve.cache.keys import CacheKey
from warmserve.cache.layout import lease_path
from warmserve.cache.locks import backoff
from warmserve.cache.manifest import Manifest, producer
from warmserve.cache.stores.base import Store
from warmserve.cache.tier import Tier

logger = logging.getLogger(__name__)


class Lease:
    """An exclusive claim on building one key, held in a shared store and renewed by a heartbeat.

    Expiry is judged by the waiter's own monotonic clock: a lease whose bytes have not changed for
    ``ttl`` seconds is stale, whatever the clocks of the two nodes say. A lost race on takeover
    (two waiters break the same stale lease) costs at most one duplicate build, never a bad entry:
    publishing is idempotent and content-addressed.
    """

    def __init__(self, store: Store, key_id: str, ttl: float) -> None:
        self.store = store
        self.key_id = key_id
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def path(self) -> str:
        return lease_path(self.key_id)

    def _doc(self) -> bytes:
        return json.dumps(
            {"owner": producer(), "token": self.token, "beat": self._beat, "ttl": self.ttl, "time": time.time()}
        ).encode()

    def try_acquire(self) -> bool:
        if not self.store.create(self.path, self._doc()):
            return False
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.key_id[:8]}", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = self.store.read(self.path)
                if json.loads(current).get("token") != self.token:
                    self.lost = True
                    logger.warning("lease on %s was taken over by another builder", self.key_id[:12])
                    return
                self._beat += 1
                self.store.write(self.path, self._doc())
            except (FileNotFoundError, StoreUnavailable, ValueError) as e:
                logger.warning("lease heartbeat for %s failed: %s", self.key_id[:12], e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError, StoreUnavailable, ValueError):
            if json.loads(self.store.read(self.path)).get("token") == self.token:
                self.store.delete(self.path)


def try_lease(store: Store, key_id: str, ttl: float) -> Lease | None:
    """The lease on building ``key_id``, or None if someone holds it."""
    lease = Lease(store, key_id, ttl)
    return lease if lease.try_acquire() else None


def lease_state(store: Store, key_id: str) -> bytes | None:
    """The lease document as its holder last wrote it, or None if nobody holds one."""
    try:
        return store.read(lease_path(key_id))
    except FileNotFoundError:
        return None


def break_lease(store: Store, key_id: str, seen: bytes) -> None:
    """Delete a lease that has not changed since ``seen`` (its holder stopped renewing it)."""
    if lease_state(store, key_id) == seen:
        store.delete(lease_path(key_id))


def lease_or_entry(
    shared: Tier, key: CacheKey, *, ttl: float, wait_timeout: float, events: CacheEvents, t0: float
) -> Lease | tuple[bytes, Manifest] | None:
    """Take the build lease on ``key`` in the ``shared`` tier, or wait until its holder publishes the entry.

    Returns the lease, the published (blob, manifest), or None when the shared store failed (then the caller
    builds without a lease). A lease unchanged for ``ttl`` seconds of this process' clock is broken and taken
    over; after ``wait_timeout`` seconds, `LeaseTimeout`.
    """
    seen: bytes | None = None
    seen_since = time.monotonic()
    deadline = time.monotonic() + wait_timeout
    waited = False
    try:
        for delay in backoff(cap=min(1.0, ttl / 4)):
            lease = try_lease(shared.store, key.id, ttl)
            if lease is not None:
                if waited:
                    # The holder may have published just before releasing.
                    found = shared.lookup(key)
                    if found is not None:
                        lease.release()
                        emit(events.hit, shared.name)
                        return found
                return lease
            if not waited:
                waited = True
                logger.info("another node is building %s; waiting", key.short)
            found = shared.lookup(key)
            if found is not None:
                emit(events.waited, time.perf_counter() - t0)
                return found
            if not shared.available:
                return None
            state = lease_state(shared.store, key.id)
            now = time.monotonic()
            if state != seen:
                seen, seen_since = state, now
            elif state is not None and now - seen_since > ttl:
                logger.warning("lease on %s not renewed for %.0fs; taking over the build", key.short, now - seen_since)
                break_lease(shared.store, key.id, state)
                emit(events.lease_takeover)
                continue
            if now > deadline:
                raise LeaseTimeout(f"waited {wait_timeout:.0f}s for another node to build {key.short}")
            time.sleep(delay)
    except StoreUnavailable as e:
        logger.warning("shared cache failed while waiting for %s; building locally: %s", key.short, e)
        return None
    return None  # pragma: no cover
