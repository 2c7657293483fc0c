"""The engine cache: L1 on this node, the cluster's other nodes (peers), L2 shared; get_or_build builds each key
once per fleet."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

from warmserve.cache.config import CacheConfig
from warmserve.cache.events import NO_EVENTS, CacheEvents, emit
from warmserve.cache.keys import CacheKey
from warmserve.cache.leases import Lease, lease_or_entry
from warmserve.cache.locks import BuildLock
from warmserve.cache.manifest import Manifest, Provenance
from warmserve.cache.peers import Peers
from warmserve.cache.stores import open_store
from warmserve.cache.stores.local import LocalStore
from warmserve.cache.tier import Tier

logger = logging.getLogger(__name__)

Outcome = Literal["built", "local-hit", "peer-hit", "shared-hit", "waited"]


HIT: dict[str, Outcome] = {"local": "local-hit", "peer": "peer-hit", "shared": "shared-hit"}


@dataclass(frozen=True)
class Fetched:
    """What ``get_or_build`` returns: the blob, how it was obtained, and how long that took."""

    key: CacheKey
    blob: bytes
    outcome: Outcome
    seconds: float
    manifest: Manifest | None = None


class EngineCache:
    def __init__(
        self,
        local: Tier,
        shared: Tier | None = None,
        *,
        wait_timeout: float = 3600.0,
        lease_ttl: float = 30.0,
        events: CacheEvents = NO_EVENTS,
        single_flight: bool = True,
        peers: Peers | None = None,
    ) -> None:
        if not isinstance(local.store, LocalStore):
            raise ValueError("the L1 tier must be a local directory (it holds the per-node build locks)")
        self.local = local
        self._builds: LocalStore = local.store  # where the per-node build locks live
        self.shared = shared
        self.peers = peers
        if peers is not None:
            peers.events = events
        # Read-only: entries come from other nodes' L1, checked as any other, then published to this L1.
        self.peer = None if peers is None else Tier(peers.store, "peer", signing_key=local.signing_key, events=events)
        self.wait_timeout = wait_timeout
        self.lease_ttl = lease_ttl
        self.events = events
        self.single_flight = single_flight

    @classmethod
    def from_config(
        cls, config: CacheConfig, events: CacheEvents = NO_EVENTS, peers: Peers | None = None
    ) -> EngineCache:
        local = Tier(
            LocalStore(config.cache_dir),
            "local",
            budget_bytes=config.local_budget,
            signing_key=config.signing_key,
            events=events,
            retry_after=config.retry_after,
        )
        shared = None
        if config.shared_url:
            shared = Tier(
                open_store(config.shared_url, config.store_options()),
                "shared",
                budget_bytes=config.shared_budget,
                signing_key=config.signing_key,
                events=events,
                retry_after=config.retry_after,
            )
        return cls(
            local,
            shared,
            wait_timeout=config.wait_timeout,
            lease_ttl=config.lease_ttl,
            events=events,
            single_flight=config.single_flight,
            peers=peers,
        )

    @property
    def tiers(self) -> list[Tier]:
        return [self.local] if self.shared is None else [self.local, self.shared]

    def get(self, key: CacheKey) -> tuple[bytes, Manifest, str] | None:
        """L1, then the peers, then L2 (copying a hit into L1). Returns (blob, manifest, tier name) or None."""
        found = self.local.lookup(key)
        if found is not None:
            emit(self.events.hit, self.local.name)
            return found[0], found[1], self.local.name
        for tier in [t for t in (self.peer, self.shared) if t is not None]:
            found = tier.lookup(key)
            if found is not None:
                emit(self.events.hit, tier.name)
                blob, manifest = found
                self.local.publish(key, blob, manifest.provenance)
                return blob, manifest, tier.name
        return None

    def put(
        self,
        key: CacheKey,
        blob: bytes,
        provenance: Provenance | None = None,
    ) -> Manifest | None:
        """Publish to L2 first (other nodes can use it at once), then L1. Store failures are logged."""
        manifest = None
        for tier in reversed(self.tiers):
            manifest = tier.publish(key, blob, provenance) or manifest
        return manifest

    def get_or_build(
        self,
        key: CacheKey,
        build: Callable[[], bytes],
        provenance: Provenance | None = None,
    ) -> Fetched:
        """Return the entry for ``key``, building it with ``build()`` only if no process has it.

        On this node a file lock elects one builder; across nodes the peers do (a builder that dies hands
        the build on at once), or else a lease in the shared store. Everyone else waits (up to
        ``wait_timeout``) and then reads the published entry. A shared store that fails is skipped: this
        process then builds locally and still serves.
        """
        t0 = time.perf_counter()

        def done(blob: bytes, outcome: Outcome, manifest: Manifest | None) -> Fetched:
            if self.peers is not None:
                self.peers.announce(key.id)
            return Fetched(key, blob, outcome, time.perf_counter() - t0, manifest)

        hit = self.get(key)
        if hit is not None:
            return done(hit[0], HIT[hit[2]], hit[1])
        emit(self.events.miss)
        if not self.single_flight:
            blob = self._build(build)
            return done(blob, "built", self.put(key, blob, provenance))

        lock = BuildLock(self._builds.build_lock_path(key.id))
        waited = lock.acquire(self.wait_timeout)
        lease: Lease | None = None
        building = ExitStack()  # the peers' claim on the build, once this process has it
        try:
            if waited:
                emit(self.events.waited, time.perf_counter() - t0)
                hit = self.get(key)
                if hit is not None:
                    return done(hit[0], "waited", hit[1])
            while self.peers is not None:
                claim = self.peers.claim(key.id, self.wait_timeout)
                if claim is not None:
                    building.enter_context(claim)
                    break
                hit = self.get(key)  # a node holds it now; if its copy is refused, that copy is forgotten
                if hit is not None:
                    return done(hit[0], "waited", hit[1])
            if self.shared is not None and self.shared.available:
                got = lease_or_entry(
                    self.shared, key, ttl=self.lease_ttl, wait_timeout=self.wait_timeout, events=self.events, t0=t0
                )
                if isinstance(got, Lease):
                    lease = got
                elif got is not None:
                    blob, manifest = got
                    self.local.publish(key, blob, manifest.provenance)
                    return done(blob, "waited", manifest)
            logger.info("building %s entry %s", (provenance and provenance.backend) or "cache", key.short)
            blob = self._build(build)
            published = self.put(key, blob, provenance)
            return done(blob, "built", published)
        finally:
            if lease is not None:
                lease.release()
            building.close()
            lock.release()

    @staticmethod
    def _build(build: Callable[[], bytes]) -> bytes:
        blob = build()
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise TypeError(f"the builder must return bytes, got {type(blob).__name__}")
        return bytes(blob)

    def close(self) -> None:
        for tier in self.tiers if self.peer is None else [*self.tiers, self.peer]:
            tier.store.close()
