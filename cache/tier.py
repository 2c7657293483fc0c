"""One tier of the cache: verified entries (manifest + blob) in a store, published crash-safe, LRU under a budget.

Listing, verifying and collecting entries is `maintenance`; the build leases of a shared tier are `leases`; where
the files live is `layout`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time

from warmserve.cache.errors import CacheCorrupt, StoreFull, StoreUnavailable
from warmserve.cache.events import NO_EVENTS, CacheEvents, emit
from warmserve.cache.keys import CacheKey
from warmserve.cache.layout import BLOB_PREFIX, MANIFEST, QUARANTINE, USED, entry_path
from warmserve.cache.maintenance import checked, entries
from warmserve.cache.manifest import Manifest, Provenance
from warmserve.cache.stores.base import Store

logger = logging.getLogger(__name__)

# Headroom asked of a full filesystem beyond the entry's own bytes (block rounding, directories).
_SLACK = 64 * 2**10


class Tier:
    """Entries in one store. ``name`` is the tier label in metrics: ``local`` (L1) or ``shared`` (L2)."""

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        budget_bytes: int | None = None,
        signing_key: bytes | None = None,
        events: CacheEvents = NO_EVENTS,
        retry_after: float = 30.0,
        touch_interval: float | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.budget_bytes = budget_bytes
        self.signing_key = signing_key
        self.events = events
        self.retry_after = retry_after
        # Recording a use is a utime() locally but a PUT on an object store: throttle the latter.
        self.touch_interval = touch_interval if touch_interval is not None else (0.0 if store.local else 60.0)
        self._down_until = 0.0
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Tier({self.name}, {self.store!r})"

    # -- availability -------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, error: StoreUnavailable) -> None:
        """Remember an outage so that the next calls skip this tier for ``retry_after`` seconds."""
        self._down_until = time.monotonic() + self.retry_after
        logger.warning(
            "%s cache tier unavailable (%s); skipping it for %.0fs: %s", self.name, op, self.retry_after, error
        )
        emit(self.events.store_error, self.name, op)

    # -- lookup and publish -------------------------------------------------------------------
    def lookup(self, key: CacheKey) -> tuple[bytes, Manifest] | None:
        """The verified blob for ``key``, or None. A bad entry is quarantined, counted, and is a miss."""
        if not self.available:
            return None
        t0 = time.perf_counter()
        try:
            with self.store.reading(key.id):
                try:
                    raw = self.store.read(entry_path(key.id, MANIFEST))
                except FileNotFoundError:
                    return None
                try:
                    blob, manifest = checked(self.store, key, raw, self.signing_key)
                except CacheCorrupt as e:
                    self._refuse(key.id, e)
                    return None
        except StoreUnavailable as e:
            self._failed("read", e)
            return None
        self._touch(key.id)
        emit(self.events.load_seconds, self.name, time.perf_counter() - t0, manifest.size)
        return blob, manifest

    def _refuse(self, key_id: str, error: CacheCorrupt) -> None:
        logger.warning("%s cache refused entry %s (%s): %s", self.name, key_id[:12], error.reason, error)
        emit(self.events.refused, self.name, error.reason)
        self.quarantine(key_id, error.reason)

    def quarantine(self, key_id: str, reason: str) -> None:
        """Move an entry's files aside (kept for inspection; ``gc`` deletes them later)."""
        reason = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-") or "bad"
        dest = f"{QUARANTINE}/{key_id}.{int(time.time())}.{reason}"
        try:
            for name in self.store.listdir(entry_path(key_id)):
                self.store.move(entry_path(key_id, name), f"{dest}/{name}")
            self.store.delete_tree(entry_path(key_id))
        except StoreUnavailable as e:
            self._failed("quarantine", e)

    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        if self.touch_interval and now - self._touched.get(key_id, -1e18) < self.touch_interval:
            return
        self._touched[key_id] = now
        try:
            self.store.touch(entry_path(key_id, USED))
        except StoreUnavailable as e:
            logger.debug("could not record use of %s: %s", key_id[:12], e)

    def publish(
        self,
        key: CacheKey,
        blob: bytes,
        provenance: Provenance | None = None,
    ) -> Manifest | None:
        """Write blob, then manifest (the commit point). Returns None if the entry was not stored."""
        if not self.available:
            return None
        if self.budget_bytes is not None and len(blob) > self.budget_bytes:
            logger.warning(
                "%s cache: entry %s (%d bytes) exceeds the budget of %d bytes; not stored",
                self.name,
                key.short,
                len(blob),
                self.budget_bytes,
            )
            emit(self.events.refused, self.name, "too-large")
            return None
        manifest = Manifest.for_blob(key, blob, provenance)
        if self.signing_key is not None:
            manifest = manifest.signed(self.signing_key)
        t0 = time.perf_counter()
        try:
            try:
                self._writeentry_path(key, blob, manifest)
            except StoreFull as e:
                # The filesystem is full (not just over our budget): make room by evicting
                # least-recently-used entries, then try once more.
                free = self.store.free_bytes()
                need = len(blob) + len(manifest.to_bytes()) + _SLACK - (free or 0)
                total = sum(info.size for info in entries(self.store) if info.key_id != key.id)
                if free is None or need > total:
                    raise  # evicting everything would not make room: keep what is there
                logger.warning("%s cache: %s; evicting to make room for %d bytes", self.name, e, len(blob))
                self.evict(protect=key.id, budget=total - need)
                self._writeentry_path(key, blob, manifest)
        except StoreFull as e:
            # Reads still work, so the tier stays in use; only this entry is not stored here.
            logger.warning("%s cache: filesystem full, entry %s not stored: %s", self.name, key.short, e)
            emit(self.events.store_error, self.name, "write-full")
            return None
        except StoreUnavailable as e:
            self._failed("write", e)
            return None
        emit(self.events.store_seconds, self.name, time.perf_counter() - t0, len(blob))
        if self.budget_bytes is not None:
            self.evict(protect=key.id)
        return manifest

    def _writeentry_path(self, key: CacheKey, blob: bytes, manifest: Manifest) -> None:
        """Blob, then manifest (the commit point), then the LRU marker. On failure, nothing is left behind."""
        # Content-addressed blob name: two processes publishing different bytes for one key
        # never pair a manifest with the other's blob.
        blob_name = entry_path(key.id, BLOB_PREFIX + manifest.blob_sha256)
        self.store.write(blob_name, blob)
        try:
            self.store.write(entry_path(key.id, MANIFEST), manifest.to_bytes())
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):
                try:
                    self.store.info(entry_path(key.id, MANIFEST))  # another process committed the same entry
                except FileNotFoundError:
                    self.store.delete(blob_name)
            raise
        with contextlib.suppress(StoreUnavailable):  # committed; the LRU marker is best effort
            self.store.touch(entry_path(key.id, USED))

    # -- eviction ---------------------------------------------------------------------------------
    def evict(self, protect: str | None = None, budget: int | None = None) -> tuple[int, int]:
        """Remove least-recently-used entries until the tier fits its budget. Returns (entries, bytes)."""
        limit = self.budget_bytes if budget is None else budget
        if limit is None:
            return 0, 0
        removed = freed = 0
        try:
            with self.store.exclusive("evict"):
                found = entries(self.store)
                total = sum(e.size for e in found)
                for e in sorted(found, key=lambda e: e.last_used):
                    if total <= limit:
                        break
                    if e.key_id == protect:
                        continue
                    with self.store.evicting(e.key_id) as free:
                        if not free:  # being read right now
                            continue
                        self.store.delete_tree(entry_path(e.key_id))
                    total -= e.size
                    removed += 1
                    freed += e.size
                emit(self.events.tier_bytes, self.name, total)
        except StoreUnavailable as e:
            self._failed("evict", e)
        if removed:
            logger.info("%s cache: evicted %d entries (%d bytes) to fit %d bytes", self.name, removed, freed, limit)
            emit(self.events.evicted, self.name, removed, freed)
        return removed, freed
