"""The contract every store keeps: run against a local directory and against S3 on SeaweedFS."""

from __future__ import annotations

import time

import pytest

from tests.cache.helpers import RecordingEvents, key
from warmserve.cache import CacheCorrupt, CacheKey, InvalidKey, Tier, maintenance
from warmserve.cache.layout import MANIFEST, QUARANTINE, entry_path
from warmserve.cache.leases import try_lease
from warmserve.cache.manifest import Provenance
from warmserve.cache.stores import Store


def test_read_missing_is_file_not_found(store: Store) -> None:
    with pytest.raises(FileNotFoundError):
        store.read("entries/nothing/here")
    with pytest.raises(FileNotFoundError):
        store.info("entries/nothing/here")


def test_write_read_overwrite(store: Store) -> None:
    store.write("a/b", b"one")
    assert store.read("a/b") == b"one"
    store.write("a/b", b"two!")
    assert store.read("a/b") == b"two!"
    assert store.info("a/b").size == 4


def test_create_is_exclusive(store: Store) -> None:
    assert store.create("leases/x", b"first") is True
    assert store.create("leases/x", b"second") is False
    assert store.read("leases/x") == b"first"


def test_delete_list_and_trees(store: Store) -> None:
    store.write("d/1", b"1")
    store.write("d/2", b"2")
    assert store.listdir("d") == ["1", "2"]
    assert store.listdir("missing") == []
    store.delete("d/1")
    store.delete("d/1")  # missing is fine
    assert store.listdir("d") == ["2"]
    store.delete_tree("d")
    assert store.listdir("d") == []


def test_touch_moves_modified_time_forward(store: Store) -> None:
    store.write("t/blob", b"entry")
    store.touch("t/used")
    first = store.info("t/used").modified
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    store.touch("t/used")
    assert store.info("t/used").modified > first


def test_move(store: Store) -> None:
    store.write("m/src", b"payload")
    store.move("m/src", "m2/dst")
    assert store.read("m2/dst") == b"payload"
    with pytest.raises(FileNotFoundError):
        store.read("m/src")


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "/abs/../../x"])
def test_paths_cannot_escape(store: Store, bad: str) -> None:
    with pytest.raises(InvalidKey):
        store.write(bad, b"x")


# -- entries on top of a store ------------------------------------------------------------------


def test_publish_then_lookup(store: Store) -> None:
    tier = Tier(store, "t")
    manifest = tier.publish(key(1), b"engine bytes", Provenance("aoti", {"torch": "x"}))
    assert manifest is not None and manifest.size == 12
    found = tier.lookup(key(1))
    assert found is not None and found[0] == b"engine bytes"
    assert found[1].key == key(1).doc and found[1].backend == "aoti"
    assert tier.lookup(key(2)) is None
    assert maintenance.verify(tier.store, key(1).id, tier.signing_key) is None


def _corrupt(store: Store, k: CacheKey, how: str) -> None:
    names = store.listdir(entry_path(k.id))
    blob = next(n for n in names if n.startswith("blob-"))
    data = bytearray(store.read(entry_path(k.id, blob)))
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        store.write(entry_path(k.id, blob), bytes(data))
    elif how == "truncate":
        store.write(entry_path(k.id, blob), bytes(data[:-3]))
    elif how == "foreign":
        other = store.read(entry_path(key("other").id, MANIFEST))
        store.write(entry_path(k.id, MANIFEST), other)
    elif how == "garbage-manifest":
        store.write(entry_path(k.id, MANIFEST), b"{not json")
    elif how == "missing-blob":
        store.delete(entry_path(k.id, blob))


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("flip", "digest"),
        ("truncate", "size"),
        ("foreign", "foreign"),
        ("garbage-manifest", "manifest"),
        ("missing-blob", "missing-blob"),
    ],
)
def test_bad_entries_are_refused_counted_and_quarantined(store: Store, how: str, reason: str) -> None:
    events = RecordingEvents()
    tier = Tier(store, "t", events=events)
    tier.publish(key("other"), b"another entry")
    tier.publish(key(1), b"x" * 1000)
    _corrupt(store, key(1), how)
    assert maintenance.verify(tier.store, key(1).id, tier.signing_key) is not None
    assert tier.lookup(key(1)) is None
    assert events.counts[("refused", "t", reason)] == 1
    assert store.listdir(entry_path(key(1).id)) == []  # moved aside...
    assert any(n.startswith(key(1).id) for n in store.listdir(QUARANTINE))  # ...not lost
    # The next publish makes the key whole again.
    tier.publish(key(1), b"rebuilt")
    assert tier.lookup(key(1)) == (b"rebuilt", tier.lookup(key(1))[1])  # type: ignore[index]


def test_signing_refuses_unsigned_and_forged_entries(store: Store) -> None:
    events = RecordingEvents()
    unsigned = Tier(store, "t")
    unsigned.publish(key(1), b"made without a key")
    signed = Tier(store, "t", signing_key=b"s3cret", events=events)
    assert signed.lookup(key(1)) is None
    assert events.counts[("refused", "t", "unsigned")] == 1

    signed.publish(key(2), b"signed entry")
    assert signed.lookup(key(2)) is not None
    other_key = Tier(store, "t", signing_key=b"another", events=events)
    assert other_key.lookup(key(2)) is None
    assert events.counts[("refused", "t", "signature")] == 1


def test_signature_covers_the_manifest(store: Store) -> None:
    tier = Tier(store, "t", signing_key=b"k")
    tier.publish(key(1), b"payload")
    raw = store.read(entry_path(key(1).id, MANIFEST)).replace(b'"backend": ""', b'"backend": "evil"')
    store.write(entry_path(key(1).id, MANIFEST), raw)
    with pytest.raises(CacheCorrupt):
        from warmserve.cache.manifest import Manifest

        Manifest.from_bytes(raw).check_signature(b"k")
    assert tier.lookup(key(1)) is None


def test_gc_removes_leftovers(store: Store) -> None:
    tier = Tier(store, "t")
    tier.publish(key(1), b"good")
    store.write(entry_path(key(2).id, "blob-" + "0" * 64), b"orphan of a crashed writer")
    store.write(f"{QUARANTINE}/x/manifest.json", b"{}")
    counts = maintenance.gc(tier.store, older_than=0)
    assert counts["incomplete_entries"] == 1 and counts["quarantined"] == 1
    assert tier.lookup(key(1)) is not None
    assert tier.lookup(key(2)) is None
    assert store.listdir(entry_path(key(2).id)) == []  # the crashed writer's blob is gone
    # Quarantine is emptied (some S3 servers keep an empty "directory" name: no files under it).
    assert all(store.listdir(f"{QUARANTINE}/{n}") == [] for n in store.listdir(QUARANTINE))
    assert [e.key_id for e in maintenance.entries(tier.store)] == [key(1).id]


def test_leases_are_exclusive_and_released(store: Store) -> None:
    tier = Tier(store, "t")
    lease = try_lease(tier.store, key(1).id, ttl=30)
    assert lease is not None
    assert try_lease(tier.store, key(1).id, ttl=30) is None
    lease.release()
    again = try_lease(tier.store, key(1).id, ttl=30)
    assert again is not None
    again.release()
