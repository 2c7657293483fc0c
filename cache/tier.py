"""One tier of the cache: verified entries (manifest + blob) in a store, LRU under a budget, and leases."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec

from warmserve.cache.atomic import TEMP_PREFIX
from warmserve.cache.errors import CacheCorrupt, StoreFull, StoreUnavailable
from warmserve.cache.events import NO_EVENTS, CacheEvents
from warmserve.cache.keys import CacheKey, check_key_id
from warmserve.cache.manifest import Manifest, producer
from warmserve.cache.stores.base import Store

logger = logging.getLogger(__name__)

# Headroom asked of a full filesystem beyond the entry's own bytes (block rounding, directories).
_SLACK = 64 * 2**10

ENTRIES = "entries"
LEASES = "leases"
QUARANTINE = "quarantine"
MANIFEST = "manifest.json"
USED = "used"
BLOB_PREFIX = "blob-"


def _entry(key_id: str, name: str = "") -> str:
    return f"{ENTRIES}/{key_id}/{name}" if name else f"{ENTRIES}/{key_id}"


P = ParamSpec("P")


def emit(hook: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
    """Call a metrics hook (a `CacheEvents` method, so its arguments are type-checked); a failing hook is
    logged, never raised into a cache operation."""
    try:
        hook(*args, **kwargs)
    except Exception:  # a failing metrics hook never fails a cache operation (logged below)
        logger.exception("cache event hook %s failed", getattr(hook, "__name__", hook))


@dataclass(frozen=True)
class EntryInfo:
    key_id: str
    size: int
    last_used: float
    manifest: Manifest | None  # None when the manifest is missing or unreadable
    problem: str | None = None


@dataclass(frozen=True)
class Quarantined:
    key_id: str
    reason: str
    since: float  # when it was moved aside (epoch seconds)
    size: int


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
                    raw = self.store.read(_entry(key.id, MANIFEST))
                except FileNotFoundError:
                    return None
                try:
                    blob, manifest = self._check(key, raw)
                except CacheCorrupt as e:
                    self._refuse(key.id, e)
                    return None
        except StoreUnavailable as e:
            self._failed("read", e)
            return None
        self._touch(key.id)
        emit(self.events.load_seconds, self.name, time.perf_counter() - t0, manifest.size)
        return blob, manifest

    def _check(self, key: CacheKey, raw: bytes) -> tuple[bytes, Manifest]:
        manifest = Manifest.from_bytes(raw)
        if manifest.key_id != key.id or dict(manifest.key) != dict(key.doc):
            raise CacheCorrupt(f"entry {key.short} holds the manifest of another key", reason="foreign")
        manifest.check_signature(self.signing_key)
        try:
            blob = self.store.read(_entry(key.id, BLOB_PREFIX + manifest.blob_sha256))
        except FileNotFoundError as e:
            raise CacheCorrupt(f"entry {key.short}: blob is missing", reason="missing-blob") from e
        manifest.check_blob(blob)
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
            for name in self.store.listdir(_entry(key_id)):
                self.store.move(_entry(key_id, name), f"{dest}/{name}")
            self.store.delete_tree(_entry(key_id))
        except StoreUnavailable as e:
            self._failed("quarantine", e)

    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        if self.touch_interval and now - self._touched.get(key_id, -1e18) < self.touch_interval:
            return
        self._touched[key_id] = now
        try:
            self.store.touch(_entry(key_id, USED))
        except StoreUnavailable as e:
            logger.debug("could not record use of %s: %s", key_id[:12], e)

    def publish(
        self,
        key: CacheKey,
        blob: bytes,
        *,
        backend: str = "",
        versions: Mapping[str, str] | None = None,
        meta: Mapping[str, Any] | None = None,
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
        manifest = Manifest.for_blob(key, blob, backend=backend, versions=versions, meta=meta)
        if self.signing_key is not None:
            manifest = manifest.signed(self.signing_key)
        t0 = time.perf_counter()
        try:
            try:
                self._write_entry(key, blob, manifest)
            except StoreFull as e:
                # The filesystem is full (not just over our budget): make room by evicting
                # least-recently-used entries, then try once more.
                free = self.store.free_bytes()
                need = len(blob) + len(manifest.to_bytes()) + _SLACK - (free or 0)
                total = sum(info.size for info in self.entries() if info.key_id != key.id)
                if free is None or need > total:
                    raise  # evicting everything would not make room: keep what is there
                logger.warning("%s cache: %s; evicting to make room for %d bytes", self.name, e, len(blob))
                self.evict(protect=key.id, budget=total - need)
                self._write_entry(key, blob, manifest)
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

    def _write_entry(self, key: CacheKey, blob: bytes, manifest: Manifest) -> None:
        """Blob, then manifest (the commit point), then the LRU marker. On failure, nothing is left behind."""
        # Content-addressed blob name: two processes publishing different bytes for one key
        # never pair a manifest with the other's blob.
        blob_name = _entry(key.id, BLOB_PREFIX + manifest.blob_sha256)
        self.store.write(blob_name, blob)
        try:
            self.store.write(_entry(key.id, MANIFEST), manifest.to_bytes())
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):
                try:
                    self.store.info(_entry(key.id, MANIFEST))  # another process committed the same entry
                except FileNotFoundError:
                    self.store.delete(blob_name)
            raise
        with contextlib.suppress(StoreUnavailable):  # committed; the LRU marker is best effort
            self.store.touch(_entry(key.id, USED))

    # -- listing, eviction, maintenance -------------------------------------------------------
    def key_ids(self) -> list[str]:
        return [n for n in self.store.listdir(ENTRIES) if len(n) == 64 and not n.startswith(".")]

    def entry(self, key_id: str) -> EntryInfo:
        check_key_id(key_id)
        size, last_used = 0, 0.0
        for name in self.store.listdir(_entry(key_id)):
            try:
                info = self.store.info(_entry(key_id, name))
            except FileNotFoundError:
                continue
            size += info.size
            if name in (USED, MANIFEST):
                last_used = max(last_used, info.modified)
        try:
            manifest, problem = Manifest.from_bytes(self.store.read(_entry(key_id, MANIFEST))), None
        except FileNotFoundError:
            manifest, problem = None, "no manifest (incomplete write)"
        except CacheCorrupt as e:
            manifest, problem = None, str(e)
        return EntryInfo(key_id, size, last_used, manifest, problem)

    def quarantined(self) -> list[Quarantined]:
        """Entries moved aside because a check failed, newest first."""
        out = []
        for name in self.store.listdir(QUARANTINE):
            key_id, _, rest = name.partition(".")
            since, _, reason = rest.partition(".")
            size = 0
            for part in self.store.listdir(f"{QUARANTINE}/{name}"):
                with contextlib.suppress(FileNotFoundError):
                    size += self.store.info(f"{QUARANTINE}/{name}/{part}").size
            out.append(Quarantined(key_id, reason, float(since) if since.isdigit() else 0.0, size))
        return sorted(out, key=lambda q: -q.since)

    def entries(self) -> list[EntryInfo]:
        """Every entry with at least one file (an emptied directory left by some S3 servers is no entry)."""
        out = []
        for key_id in self.key_ids():
            with contextlib.suppress(FileNotFoundError):
                info = self.entry(key_id)
                if info.size or info.manifest or info.last_used:
                    out.append(info)
        return out

    def evict(self, protect: str | None = None, budget: int | None = None) -> tuple[int, int]:
        """Remove least-recently-used entries until the tier fits its budget. Returns (entries, bytes)."""
        limit = self.budget_bytes if budget is None else budget
        if limit is None:
            return 0, 0
        removed = freed = 0
        try:
            with self.store.exclusive("evict"):
                entries = self.entries()
                total = sum(e.size for e in entries)
                for e in sorted(entries, key=lambda e: e.last_used):
                    if total <= limit:
                        break
                    if e.key_id == protect:
                        continue
                    with self.store.evicting(e.key_id) as free:
                        if not free:  # being read right now
                            continue
                        self.store.delete_tree(_entry(e.key_id))
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

    def remove(self, key_id: str) -> bool:
        check_key_id(key_id)
        if not self.store.listdir(_entry(key_id)):
            return False
        with self.store.evicting(key_id):
            self.store.delete_tree(_entry(key_id))
        return True

    def verify(self, key_id: str) -> str | None:
        """Check one entry fully (size, digest, signature); return the problem, or None if it is good."""
        check_key_id(key_id)
        try:
            raw = self.store.read(_entry(key_id, MANIFEST))
        except FileNotFoundError:
            return "no manifest (incomplete write)"
        try:
            manifest = Manifest.from_bytes(raw)
            if manifest.key_id != key_id:
                return "manifest belongs to another key"
            key = CacheKey.from_doc(manifest.key)
            if key.id != key_id:
                return "key document does not hash to the entry's id"
            self._check(key, raw)
        except CacheCorrupt as e:
            return f"{e.reason}: {e}"
        return None

    def gc(self, older_than: float = 3600.0) -> dict[str, int]:
        """Delete leftovers: temp files and orphan blobs older than ``older_than`` seconds, quarantine,
        entries without a manifest, and leases nobody renewed."""
        now = time.time()
        counts = {"temp_files": 0, "orphan_blobs": 0, "incomplete_entries": 0, "quarantined": 0, "leases": 0}
        for key_id in self.key_ids():
            names = self.store.listdir(_entry(key_id))
            manifest = None
            with contextlib.suppress(FileNotFoundError, CacheCorrupt):
                manifest = Manifest.from_bytes(self.store.read(_entry(key_id, MANIFEST)))
            for name in names:
                try:
                    age = now - self.store.info(_entry(key_id, name)).modified
                except FileNotFoundError:
                    continue
                if age < older_than:
                    continue
                if name.startswith(TEMP_PREFIX):
                    self.store.delete(_entry(key_id, name))
                    counts["temp_files"] += 1
                elif manifest is None and (name.startswith(BLOB_PREFIX) or name == USED):
                    self.store.delete(_entry(key_id, name))
                    counts["incomplete_entries"] += 1
                elif name.startswith(BLOB_PREFIX) and manifest and name != BLOB_PREFIX + manifest.blob_sha256:
                    self.store.delete(_entry(key_id, name))
                    counts["orphan_blobs"] += 1
        for name in self.store.listdir(QUARANTINE):
            self.store.delete_tree(f"{QUARANTINE}/{name}")
            counts["quarantined"] += 1
        for name in self.store.listdir(LEASES):
            with contextlib.suppress(FileNotFoundError):
                if now - self.store.info(f"{LEASES}/{name}").modified > older_than:
                    self.store.delete(f"{LEASES}/{name}")
                    counts["leases"] += 1
        return counts

    # -- leases (single-flight across nodes) --------------------------------------------------
    def try_lease(self, key_id: str, ttl: float) -> Lease | None:
        lease = Lease(self, key_id, ttl)
        return lease if lease.try_acquire() else None

    def lease_state(self, key_id: str) -> bytes | None:
        try:
            return self.store.read(f"{LEASES}/{key_id}")
        except FileNotFoundError:
            return None

    def break_lease(self, key_id: str, seen: bytes) -> None:
        """Delete a lease that has not changed since ``seen`` (its holder stopped renewing it)."""
        if self.lease_state(key_id) == seen:
            self.store.delete(f"{LEASES}/{key_id}")


class Lease:
    """An exclusive claim on building one key, held in a shared store and renewed by a heartbeat.

    Expiry is judged by the waiter's own monotonic clock: a lease whose bytes have not changed for
    ``ttl`` seconds is stale, whatever the clocks of the two nodes say. A lost race on takeover
    (two waiters break the same stale lease) costs at most one duplicate build, never a bad entry:
    publishing is idempotent and content-addressed.
    """

    def __init__(self, tier: Tier, key_id: str, ttl: float) -> None:
        self.tier = tier
        self.key_id = key_id
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def path(self) -> str:
        return f"{LEASES}/{self.key_id}"

    def _doc(self) -> bytes:
        return json.dumps(
            {"owner": producer(), "token": self.token, "beat": self._beat, "ttl": self.ttl, "time": time.time()}
        ).encode()

    def try_acquire(self) -> bool:
        if not self.tier.store.create(self.path, self._doc()):
            return False
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.key_id[:8]}", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = self.tier.store.read(self.path)
                if json.loads(current).get("token") != self.token:
                    self.lost = True
                    logger.warning("lease on %s was taken over by another builder", self.key_id[:12])
                    return
                self._beat += 1
                self.tier.store.write(self.path, self._doc())
            except (FileNotFoundError, StoreUnavailable, ValueError) as e:
                logger.warning("lease heartbeat for %s failed: %s", self.key_id[:12], e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError, StoreUnavailable, ValueError):
            if json.loads(self.tier.store.read(self.path)).get("token") == self.token:
                self.tier.store.delete(self.path)
