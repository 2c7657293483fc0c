"""The peer tier on Ray: replicas read engines from the cluster's other nodes, and one builds each key.

Two kinds of detached actors, neither holding a CPU:

- ``warmserve-cache-index``, one per cluster: which node holds which entry (fed by every replica that gets an
  entry, and by each node's cache server when it starts), and who builds which key. A builder hands the index
  an object it owns; when the builder's process or node dies, Ray fails that object at once, and the next
  waiter to ask is handed the build. Restarted after a crash with an empty memory: the worst case is a build.
- ``warmserve-cache-<node>-<dir>``, one per node and cache directory: reads that directory's files for replicas
  on other nodes. It outlives the replicas of its node.

Bytes from a peer are checked by the cache like bytes from any store (`warmserve.cache.peers`); a copy that
fails the check, or that its node no longer has, is forgotten by the index.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from warmserve.cache.config import CacheConfig
from warmserve.cache.errors import LeaseTimeout, StoreUnavailable
from warmserve.cache.events import emit
from warmserve.cache.layout import ENTRIES
from warmserve.cache.maintenance import key_ids
from warmserve.cache.peers import Peers
from warmserve.cache.stores.base import ObjectInfo, Store
from warmserve.cache.stores.local import LocalStore
from warmserve.cache.tier import Tier

logger = logging.getLogger(__name__)

NAMESPACE = "warmserve"
INDEX = "warmserve-cache-index"
POLL_S = 0.25  # how often a waiting replica asks the index
CALL_S = 30.0  # the longest a call to the index or a cache server may take


def server_name(node_id: str, cache_dir: Path) -> str:
    """The cache server of one node and directory (replicas of one node may use different directories)."""
    digest = hashlib.sha256(str(cache_dir.expanduser().resolve()).encode()).hexdigest()[:12]
    return f"warmserve-cache-{node_id[:16]}-{digest}"


def _node_of(server: str) -> str:
    """The node part of a cache server's name ("" for a process that serves no directory)."""
    return server.rpartition("-")[0]


def _gone(alive: list[Any]) -> bool:
    """Whether the process that owns ``alive[0]`` (a builder) has died, with its node or alone."""
    try:
        ray.get(alive[0], timeout=5)
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
        return True
    except ray.exceptions.GetTimeoutError:
        return False  # cannot tell yet: it counts as alive
    return False


@ray.remote(num_cpus=0)
class CacheIndex:
    """Which cache server holds which entry, and who builds which key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[str, set[str]] = {}  # key id -> cache servers
        self._builds: dict[str, tuple[str, list[Any]]] = {}  # key id -> (claimant, [object it owns])

    def announce(self, server: str, ids: list[str]) -> None:
        with self._lock:
            for key_id in ids:
                self._holders.setdefault(key_id, set()).add(server)

    def forget(self, server: str, key_id: str) -> None:
        with self._lock:
            self._holders.get(key_id, set()).discard(server)

    def _elsewhere(self, key_id: str, asker: str) -> list[str]:
        """The servers holding ``key_id`` on other nodes than the asker's (its node's directories are its own
        business: another directory on one node is another cache, not a peer)."""
        node = _node_of(asker)
        return sorted(s for s in self._holders.get(key_id, set()) if not node or _node_of(s) != node)

    def holders(self, key_id: str, asker: str) -> list[str]:
        with self._lock:
            return self._elsewhere(key_id, asker)

    def claim(self, key_id: str, claimant: str, alive: list[Any], asker: str) -> str:
        """``held`` (a node other than the asker's holds it), ``build`` (the claimant builds it; a builder
        that died is replaced) or ``wait``."""
        with self._lock:
            if self._elsewhere(key_id, asker):
                return "held"
            current = self._builds.get(key_id)
        if current is not None and current[0] != claimant and not _gone(current[1]):
            return "wait"
        with self._lock:
            if self._builds.get(key_id, current) is not current:
                return "wait"  # another waiter took it over meanwhile
            self._builds[key_id] = (claimant, alive)
            return "takeover" if current is not None and current[0] != claimant else "build"

    def release(self, key_id: str, claimant: str) -> None:
        with self._lock:
            if self._builds.get(key_id, ("",))[0] == claimant:
                del self._builds[key_id]

    def entries(self) -> dict[str, list[str]]:
        """key id -> the cache servers that hold it."""
        with self._lock:
            return {k: sorted(v) for k, v in self._holders.items() if v}

    def building(self) -> dict[str, str]:
        """key id -> who builds it now."""
        with self._lock:
            return {k: claimant for k, (claimant, _) in self._builds.items()}


@ray.remote(num_cpus=0)
class NodeCache:
    """One node's cache directory, read for the replicas of other nodes."""

    def __init__(self, cache_dir: str, name: str) -> None:
        self.store = LocalStore(cache_dir)
        with contextlib.suppress(Exception):  # the index is told again by every replica that gets an entry
            index().announce.remote(name, key_ids(self.store))

    def read(self, path: str) -> bytes | None:
        try:
            return self.store.read(path)
        except (FileNotFoundError, StoreUnavailable):
            return None

    def listdir(self, prefix: str) -> list[str] | None:
        try:
            names = self.store.listdir(prefix)
        except StoreUnavailable:
            return None
        return names or None

    def info(self, path: str) -> ObjectInfo | None:
        try:
            return self.store.info(path)
        except (FileNotFoundError, StoreUnavailable):
            return None


def index() -> Any:
    """The cluster's index actor, started by the first caller."""
    return CacheIndex.options(  # type: ignore[attr-defined]
        name=INDEX, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1, max_concurrency=64
    ).remote()


class PeerStore(Store):
    """Read-only: ``entries/<id>/...`` from a node that holds the entry, the same node for all of one entry's
    files while it answers. Removing an entry (the cache quarantines a copy it refused) forgets that copy."""

    local = False

    def __init__(self, peers: RayPeers) -> None:
        self.peers = peers
        self.url = "ray://peers"
        self._source: dict[str, str] = {}  # key id -> the server its files are read from

    def _ask(self, path: str, method: str) -> Any:
        """``method`` of the cache server holding the entry under ``path``; FileNotFoundError where none has it.
        A server that has it no more, or does not answer, is forgotten for that entry and the next one asked."""
        parts = path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != ENTRIES:
            raise FileNotFoundError(path)
        key_id = parts[1]
        try:
            sticky = self._source.get(key_id)
            for server in [sticky] if sticky else self.peers.holders(key_id):
                try:
                    answer = ray.get(getattr(self.peers.server(server), method).remote(path), timeout=CALL_S)
                except (ray.exceptions.RayError, ValueError) as e:  # ValueError: no actor by that name
                    logger.warning("cache server %s did not answer (%s); trying another node", server, e)
                    answer = None
                if answer is not None:
                    self._source[key_id] = server
                    return answer
                self.peers.forget(server, key_id)
                self._source.pop(key_id, None)
        except ray.exceptions.RayError as e:
            raise StoreUnavailable(f"the cluster's cache index did not answer: {e}") from e
        raise FileNotFoundError(path)

    def read(self, path: str) -> bytes:
        return bytes(self._ask(path, "read"))

    def info(self, path: str) -> ObjectInfo:
        return self._ask(path, "info")  # type: ignore[no-any-return]

    def listdir(self, prefix: str) -> list[str]:
        if prefix.strip("/") == ENTRIES:
            try:
                return sorted(ray.get(self.peers.index.entries.remote(), timeout=CALL_S))
            except ray.exceptions.RayError as e:
                raise StoreUnavailable(f"the cluster's cache index did not answer: {e}") from e
        try:
            return list(self._ask(prefix, "listdir"))
        except FileNotFoundError:
            return []

    def delete_tree(self, prefix: str) -> None:
        key_id = prefix.rstrip("/").rpartition("/")[2]
        server = self._source.pop(key_id, None)
        if server is not None:
            self.peers.forget(server, key_id)

    def move(self, src: str, dst: str) -> None:
        pass  # a refused copy stays where it is, forgotten (delete_tree)

    def write(self, path: str, data: bytes | memoryview) -> None:
        raise StoreUnavailable("the peer tier is read-only")

    def create(self, path: str, data: bytes) -> bool:
        raise StoreUnavailable("the peer tier is read-only")

    def delete(self, path: str) -> None:
        pass

    def touch(self, path: str) -> None:
        pass


class RayPeers(Peers):
    """The peers of a process inside a Ray cluster, for the cache directory ``cache_dir`` of its node (None:
    a process that only looks, such as `warmserve cache ls --tier peer`, and serves no directory)."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.store = PeerStore(self)
        self.index = index()
        if cache_dir is None:
            self.name = self.claimant = ""
            return
        self.node_id = ray.get_runtime_context().get_node_id()
        self.name = server_name(self.node_id, cache_dir)
        self.claimant = f"{self.name}:{os.getpid()}"
        self.node = NodeCache.options(  # type: ignore[attr-defined]
            name=self.name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_concurrency=8,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        ).remote(str(cache_dir), self.name)

    def server(self, name: str) -> Any:
        return ray.get_actor(name, namespace=NAMESPACE)

    def holders(self, key_id: str) -> list[str]:
        return list(ray.get(self.index.holders.remote(key_id, self.name), timeout=CALL_S))

    def forget(self, server: str, key_id: str) -> None:
        with contextlib.suppress(ray.exceptions.RayError):
            self.index.forget.remote(server, key_id)

    def announce(self, key_id: str) -> None:
        try:
            self.index.announce.remote(self.name, [key_id])
        except ray.exceptions.RayError as e:
            logger.warning("could not tell the cluster's cache index about %s: %s", key_id[:12], e)

    def claim(self, key_id: str, timeout: float) -> contextlib.AbstractContextManager[None] | None:
        alive = [ray.put(b"building")]  # owned by this process: if it dies, the index learns at once
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = ray.get(self.index.claim.remote(key_id, self.claimant, alive, self.name), timeout=CALL_S)
            except ray.exceptions.RayError as e:
                logger.warning("the cluster's cache index did not answer (%s): building %s here", e, key_id[:12])
                return contextlib.nullcontext()
            if answer == "held":
                return None
            if answer in ("build", "takeover"):
                if answer == "takeover":
                    logger.warning("the replica building %s died; this one builds it", key_id[:12])
                    emit(self.events.lease_takeover)
                return self._building(key_id, alive)
            if time.monotonic() > deadline:
                raise LeaseTimeout(f"waited {timeout:.0f}s for another replica of the cluster to build {key_id[:12]}")
            time.sleep(POLL_S)

    @contextlib.contextmanager
    def _building(self, key_id: str, alive: list[Any]) -> Iterator[None]:
        """The build's claim, released on leaving (``alive`` stays referenced by the index until then)."""
        try:
            yield
        finally:
            with contextlib.suppress(ray.exceptions.RayError):
                self.index.release.remote(key_id, self.claimant)


def listing(config: CacheConfig) -> Tier:
    """The peer tier of the Ray cluster this machine belongs to ($RAY_ADDRESS, else the one running here), for
    `warmserve cache ls | stats --tier peer`. Raises ConnectionError where there is none."""
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", namespace=NAMESPACE, log_to_driver=False)
        ray.get_actor(INDEX, namespace=NAMESPACE)
    except ConnectionError:
        raise
    except ValueError as e:  # no index: no replica of this cluster ever used the peer tier
        raise ConnectionError(f"this Ray cluster has no peer cache index ({INDEX}): {e}") from e
    except Exception as e:  # Ray's many ways of not finding a cluster
        raise ConnectionError(f"no Ray cluster to ask (set RAY_ADDRESS): {e}") from e
    return Tier(RayPeers(None).store, "peer", signing_key=config.signing_key)


def connect(cache_dir: Path) -> RayPeers | None:
    """The peer tier, inside a Ray cluster; None elsewhere, or where it cannot start (a warning says why)."""
    if not ray.is_initialized():
        return None
    try:
        return RayPeers(cache_dir)
    except Exception as e:  # the replica still serves, with its own directory and the shared store
        logger.warning("the cluster's peer cache is off for this replica: %s", e)
        return None
