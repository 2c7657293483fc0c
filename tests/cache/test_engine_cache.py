"""get_or_build across tiers and processes: outcomes, single-flight, crashes, LRU, outages."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cache import workers
from tests.cache.helpers import key, make_cache
from tests.servers import SeaweedFS, seaweedfs
from warmserve.cache import CacheKey, InvalidKey, LeaseTimeout, maintenance
from warmserve.cache.layout import entry_path
from warmserve.cache.leases import lease_state
from warmserve.cache.manifest import Provenance

spawn = mp.get_context("spawn")


def test_outcomes_local_then_shared(tmp_path: Path, s3_server: SeaweedFS, s3_url: str) -> None:
    opts = s3_server.storage_options()
    node_a, ev_a = make_cache(tmp_path / "a", s3_url, opts)
    node_b, ev_b = make_cache(tmp_path / "b", s3_url, opts)
    built = node_a.get_or_build(key(1), lambda: b"engine", Provenance("aoti", {"torch": "t"}))
    assert built.outcome == "built" and built.blob == b"engine"
    assert node_a.get_or_build(key(1), lambda: b"never").outcome == "local-hit"
    shared = node_b.get_or_build(key(1), lambda: b"never")
    assert shared.outcome == "shared-hit" and shared.blob == b"engine"
    assert shared.manifest is not None and shared.manifest.backend == "aoti"
    # The shared hit filled node b's L1.
    assert node_b.get_or_build(key(1), lambda: b"never").outcome == "local-hit"
    assert ev_a.counts[("miss",)] == 1 and ev_b.counts[("hit", "shared")] == 1


def test_key_documents_are_stable_and_strict() -> None:
    a = CacheKey.from_doc({"b": [1, 2], "a": {"y": 1.5, "x": "s"}})
    b = CacheKey.from_doc({"a": {"x": "s", "y": 1.5}, "b": (1, 2)})
    assert a.id == b.id and len(a.id) == 64
    for bad in ({"s": {1, 2}}, {"f": float("nan")}, {1: "int key"}, {"o": object()}):
        with pytest.raises(InvalidKey):
            CacheKey.from_doc(bad)  # type: ignore[arg-type]


def test_builder_errors_propagate_and_release_the_lock(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path)

    def boom() -> bytes:
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.get_or_build(key(1), boom)
    assert cache.get_or_build(key(1), lambda: b"ok").outcome == "built"


def test_single_flight_can_be_switched_off(tmp_path: Path) -> None:
    from warmserve.cache import CacheConfig

    assert CacheConfig.load({"WARMSERVE_SINGLE_FLIGHT": "0"}).single_flight is False
    with pytest.raises(ValueError, match="WARMSERVE_SINGLE_FLIGHT"):
        CacheConfig.load({"WARMSERVE_SINGLE_FLIGHT": "maybe"})
    cache, _ = make_cache(tmp_path, single_flight=False)
    assert cache.get_or_build(key(1), lambda: b"x").outcome == "built"
    assert cache.get_or_build(key(1), lambda: b"y").outcome == "local-hit"


def test_builder_must_return_bytes(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path)
    with pytest.raises(TypeError, match="bytes"):
        cache.get_or_build(key(1), lambda: "text")  # type: ignore[arg-type,return-value]


def test_wait_timeout_names_the_holder(tmp_path: Path) -> None:
    from warmserve.cache.locks import BuildLock

    cache, _ = make_cache(tmp_path, wait_timeout=0.3)
    # Another process holds the build lock longer than we are willing to wait.
    lock = BuildLock(cache.local.store.build_lock_path(key(1).id))  # type: ignore[attr-defined]
    proc = spawn.Process(target=_hold_build_lock, args=(str(lock.path), 5.0))
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while not lock.path.exists() or not lock.path.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(LeaseTimeout, match=str(proc.pid)):
            cache.get_or_build(key(1), lambda: b"x")
    finally:
        proc.kill()
        proc.join()


def _hold_build_lock(path: str, seconds: float) -> None:
    from warmserve.cache.locks import BuildLock

    lock = BuildLock(Path(path))
    lock.acquire(60)
    time.sleep(seconds)


@pytest.mark.parametrize("topology", ["one-node", "two-nodes-shared-s3"])
def test_eight_processes_three_keys_build_each_key_once(
    tmp_path: Path, topology: str, request: pytest.FixtureRequest
) -> None:
    shared_url = opts = None
    if topology == "two-nodes-shared-s3":
        server: SeaweedFS = request.getfixturevalue("s3_server")
        shared_url, opts = request.getfixturevalue("s3_url"), server.storage_options()
    log = tmp_path / "builds.log"
    start = time.time() + 4  # after every child has imported
    args = []
    for i in range(8):
        node = "node0" if topology == "one-node" else f"node{i % 2}"
        args.append((str(tmp_path / node), shared_url, opts, [0, 1, 2], str(log), 1.0, start))
    with spawn.Pool(8) as pool:
        results = pool.starmap(workers.get_or_build_keys, args)
    builds = log.read_text().splitlines()
    assert sorted(int(line.split()[0]) for line in builds) == [0, 1, 2], builds
    outcomes = [o for r in results for _, o, _ in r]
    assert outcomes.count("built") == 3
    for r in results:
        for n, _, blob in r:
            assert blob == f"engine-{n}".encode() * 1000


def test_kill_9_builder_lease_expires_and_a_waiter_builds(tmp_path: Path, s3_server: SeaweedFS, s3_url: str) -> None:
    opts = s3_server.storage_options()
    marker = tmp_path / "building"
    victim = spawn.Process(target=workers.hold_lease_and_hang, args=(str(tmp_path / "a"), s3_url, opts, str(marker)))
    victim.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and victim.is_alive()
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()

    node_b, events = make_cache(tmp_path / "b", s3_url, opts, lease_ttl=2)
    assert node_b.shared is not None
    assert lease_state(node_b.shared.store, key("k").id) is not None  # the dead man's lease
    assert node_b.shared.lookup(key("k")) is None  # no partial entry visible
    t0 = time.monotonic()
    got = node_b.get_or_build(key("k"), lambda: b"rebuilt")
    assert got.outcome == "built" and got.blob == b"rebuilt"
    assert time.monotonic() - t0 >= 2  # waited for the lease to go stale...
    assert events.counts[("lease_takeover",)] == 1  # ...then took it over
    assert lease_state(node_b.shared.store, key("k").id) is None  # and released it


def test_kill_9_mid_write_never_shows_a_partialentry_path(tmp_path: Path) -> None:
    cache, events = make_cache(tmp_path, local_budget=None)
    for attempt in range(5):
        proc = spawn.Process(target=workers.publish_forever, args=(str(tmp_path), 8 * 2**20))
        proc.start()
        time.sleep(2.0 + 0.37 * attempt)  # interrupt at a different point each time
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        for n in range(3):
            found = cache.local.lookup(key(n))
            if found is not None:
                blob, _manifest = found
                assert len(blob) == 8 * 2**20 and blob == blob[:1] * len(blob)
    assert events.total("refused") == 0
    maintenance.gc(cache.local.store, older_than=0)  # temp files of the killed writers
    leftovers = [
        n
        for k in maintenance.key_ids(cache.local.store)
        for n in cache.local.store.listdir(entry_path(k))
        if n.startswith(".tmp")
    ]
    assert leftovers == []


def test_lru_eviction_with_two_processes_sharing_the_directory(tmp_path: Path) -> None:
    mib = 2**20
    cache, events = make_cache(tmp_path, local_budget=int(3.5 * mib))
    for n in range(3):
        cache.local.publish(key(n), bytes([n]) * mib)
        time.sleep(0.02)
    # Another process reads entry 0: it becomes the most recently used.
    with spawn.Pool(1) as pool:
        assert pool.apply(workers.touch_entry, (str(tmp_path), 0)) is True
    cache.local.publish(key(3), b"\x03" * mib)  # over budget: the least recently *used* (1) goes
    remaining = sorted(maintenance.key_ids(cache.local.store))
    assert remaining == sorted(key(n).id for n in (0, 2, 3))
    assert events.counts[("evicted", "local")] == 1


def test_an_entry_being_read_is_not_evicted(tmp_path: Path) -> None:
    mib = 2**20
    cache, _ = make_cache(tmp_path, local_budget=int(2.5 * mib))
    cache.local.publish(key(0), b"\x00" * mib)
    time.sleep(0.02)
    cache.local.publish(key(1), b"\x01" * mib)
    marker = tmp_path / "reading"
    reader = spawn.Process(target=workers.read_entry_slowly, args=(str(tmp_path), 0, 3.0, str(marker)))
    reader.start()
    while not marker.exists():
        time.sleep(0.02)
    cache.local.publish(key(2), b"\x02" * mib)  # LRU would pick 0, but it is being read: 1 goes
    reader.join()
    assert sorted(maintenance.key_ids(cache.local.store)) == sorted([key(0).id, key(2).id])


def test_too_large_for_the_budget_is_served_not_stored(tmp_path: Path) -> None:
    cache, events = make_cache(tmp_path, local_budget=100)
    got = cache.get_or_build(key(1), lambda: b"x" * 1000)
    assert got.outcome == "built" and len(got.blob) == 1000
    assert maintenance.key_ids(cache.local.store) == []
    assert events.counts[("refused", "local", "too-large")] == 1


def test_shared_store_down_mid_run(tmp_path: Path) -> None:
    with seaweedfs(tmp_path / "weed") as server:
        url = server.make_bucket("outage") + "/c"
        opts = server.storage_options()
        node_a, _ = make_cache(tmp_path / "a", url, opts)
        assert node_a.get_or_build(key(1), lambda: b"one").outcome == "built"
        server.stop()
        # Node a still has L1; a fresh node builds locally; neither raises.
        t0 = time.monotonic()
        assert node_a.get_or_build(key(1), lambda: b"never").outcome == "local-hit"
        node_b, events_b = make_cache(tmp_path / "b", url, opts)
        got = node_b.get_or_build(key(1), lambda: b"built while S3 was down")
        assert got.outcome == "built" and got.blob == b"built while S3 was down"
        assert node_a.get_or_build(key(2), lambda: b"two").outcome == "built"
        assert events_b.total("store_error") >= 1
        assert time.monotonic() - t0 < 30  # fails fast, no long retry loops
        # The store comes back: after retry_after the shared tier is used again.
        server.start()
        # SeaweedFS answers before its volumes are back: allow it a little time, as a client would.
        outcome, deadline = "", time.monotonic() + 60
        while outcome != "shared-hit" and time.monotonic() < deadline:
            node_c, _ = make_cache(tmp_path / f"c{int(time.monotonic() * 1000)}", url, opts)
            outcome = node_c.get_or_build(key(1), lambda: b"never").outcome
            time.sleep(1)
        assert outcome == "shared-hit"
