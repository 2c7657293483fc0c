"""Lease expiry is judged by the waiter's own clock: a holder whose wall clock is hours off is not robbed
while it keeps renewing, and a dead holder is taken over after one TTL whatever its clock said."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.cache.helpers import key, make_cache
from warmserve.cache.leases import try_lease
from warmserve.cache.stores import open_store
from warmserve.cache.tier import Tier


@pytest.mark.parametrize("skew", [-3600.0, 3600.0])
def test_a_live_holder_with_a_skewed_clock_keeps_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    shared = tmp_path / "shared"
    holder, _ = make_cache(tmp_path / "a", f"file://{shared}", lease_ttl=1.0)
    waiter, events = make_cache(tmp_path / "b", f"file://{shared}", lease_ttl=1.0)
    assert holder.shared is not None and waiter.shared is not None
    real_time = time.time
    monkeypatch.setattr("warmserve.cache.leases.time.time", lambda: real_time() + skew)  # the holder's lease docs lie
    lease = try_lease(holder.shared.store, key(1).id, ttl=1.0)
    assert lease is not None
    monkeypatch.setattr("warmserve.cache.leases.time.time", real_time)
    built = threading.Event()

    def publish_later() -> None:
        time.sleep(3.0)  # three TTLs: a clock-based expiry would have broken the lease by now
        holder.shared.publish(key(1), b"from the holder")  # type: ignore[union-attr]
        built.set()
        lease.release()

    threading.Thread(target=publish_later).start()
    got = waiter.get_or_build(key(1), lambda: b"should not build")
    assert got.blob == b"from the holder" and got.outcome == "waited"
    assert events.counts[("lease_takeover",)] == 0 and built.is_set()


def test_a_dead_holder_is_taken_over_after_one_ttl(tmp_path: Path) -> None:
    shared = Tier(open_store(str(tmp_path / "shared")), "shared")
    # A lease written by a holder that died an hour "in the future": its time field must not matter.
    shared.store.write(f"leases/{key(1).id}", b'{"owner": "ghost", "token": "t", "beat": 0, "ttl": 1, "time": 9e9}')
    waiter, events = make_cache(tmp_path / "b", f"file://{tmp_path / 'shared'}", lease_ttl=1.0)
    t0 = time.monotonic()
    assert waiter.get_or_build(key(1), lambda: b"rebuilt").outcome == "built"
    assert 1.0 <= time.monotonic() - t0 < 10 and events.counts[("lease_takeover",)] == 1
