"""The seam to the other nodes of a cluster: a tier read from whichever node holds an entry, and one build of
a key at a time across nodes. The cache knows only this; `warmserve.deployments.peers` implements it on Ray.

Entries read from a peer are checked exactly as entries from any store (size, sha256, signature, key) before
this node publishes them to its own L1: a peer is another process, not a trusted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager

from warmserve.cache.events import NO_EVENTS, CacheEvents
from warmserve.cache.stores.base import Store


class Peers(ABC):
    """The cluster this process runs in, as the cache uses it."""

    #: Reads ``entries/<id>/...`` from a node that holds the entry (FileNotFoundError where none does);
    #: writes are refused, and removing an entry tells the cluster to stop offering this copy.
    store: Store
    #: The cache's hooks (set by the cache that uses these peers): a build taken over is `lease_takeover`.
    events: CacheEvents = NO_EVENTS

    @abstractmethod
    def announce(self, key_id: str) -> None:
        """This node's L1 now holds a verified entry for ``key_id``. Best effort: never raises."""

    @abstractmethod
    def claim(self, key_id: str, timeout: float) -> AbstractContextManager[None] | None:
        """Wait until this process may build ``key_id`` (returns a context to build in: leaving it lets the
        next one go) or a node holds the entry (returns None: read it from `store`). A builder that dies hands
        the build on at once. Raises ``LeaseTimeout`` after ``timeout`` seconds."""
