"""A tier's entries as the operator sees them: list them, check one fully, remove one, collect leftovers.

Every function takes the tier's store, so `warmserve cache` reads a store the same way a replica's `Tier` does.
`checked` is the one check an entry gets, when a replica reads it and when `verify` looks at it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from warmserve.cache.atomic import TEMP_PREFIX
from warmserve.cache.errors import CacheCorrupt
from warmserve.cache.keys import CacheKey, check_key_id
from warmserve.cache.layout import BLOB_PREFIX, ENTRIES, LEASES, MANIFEST, QUARANTINE, USED, entry_path
from warmserve.cache.manifest import Manifest
from warmserve.cache.stores.base import Store


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


def checked(store: Store, key: CacheKey, raw: bytes, signing_key: bytes | None) -> tuple[bytes, Manifest]:
    """The blob of ``key``'s entry, whose manifest reads ``raw``, once the manifest names this key, its signature
    holds (with a ``signing_key``) and the blob has the size and sha256 it names; else `CacheCorrupt`."""
    manifest = Manifest.from_bytes(raw)
    if manifest.key_id != key.id or dict(manifest.key) != dict(key.doc):
        raise CacheCorrupt(f"entry {key.short} holds the manifest of another key", reason="foreign")
    manifest.check_signature(signing_key)
    try:
        blob = store.read(entry_path(key.id, BLOB_PREFIX + manifest.blob_sha256))
    except FileNotFoundError as e:
        raise CacheCorrupt(f"entry {key.short}: blob is missing", reason="missing-blob") from e
    manifest.check_blob(blob)
    return blob, manifest


def key_ids(store: Store) -> list[str]:
    return [n for n in store.listdir(ENTRIES) if len(n) == 64 and not n.startswith(".")]


def entry(store: Store, key_id: str) -> EntryInfo:
    check_key_id(key_id)
    size, last_used = 0, 0.0
    for name in store.listdir(entry_path(key_id)):
        try:
            info = store.info(entry_path(key_id, name))
        except FileNotFoundError:
            continue
        size += info.size
        if name in (USED, MANIFEST):
            last_used = max(last_used, info.modified)
    try:
        manifest, problem = Manifest.from_bytes(store.read(entry_path(key_id, MANIFEST))), None
    except FileNotFoundError:
        manifest, problem = None, "no manifest (incomplete write)"
    except CacheCorrupt as e:
        manifest, problem = None, str(e)
    return EntryInfo(key_id, size, last_used, manifest, problem)


def entries(store: Store) -> list[EntryInfo]:
    """Every entry with at least one file (an emptied directory left by some S3 servers is no entry)."""
    out = []
    for key_id in key_ids(store):
        with contextlib.suppress(FileNotFoundError):
            info = entry(store, key_id)
            if info.size or info.manifest or info.last_used:
                out.append(info)
    return out


def quarantined(store: Store) -> list[Quarantined]:
    """Entries moved aside because a check failed, newest first."""
    out = []
    for name in store.listdir(QUARANTINE):
        key_id, _, rest = name.partition(".")
        since, _, reason = rest.partition(".")
        size = 0
        for part in store.listdir(f"{QUARANTINE}/{name}"):
            with contextlib.suppress(FileNotFoundError):
                size += store.info(f"{QUARANTINE}/{name}/{part}").size
        out.append(Quarantined(key_id, reason, float(since) if since.isdigit() else 0.0, size))
    return sorted(out, key=lambda q: -q.since)


def verify(store: Store, key_id: str, signing_key: bytes | None) -> str | None:
    """Check one entry fully (size, digest, signature); return the problem, or None if it is good."""
    check_key_id(key_id)
    try:
        raw = store.read(entry_path(key_id, MANIFEST))
    except FileNotFoundError:
        return "no manifest (incomplete write)"
    try:
        manifest = Manifest.from_bytes(raw)
        if manifest.key_id != key_id:
            return "manifest belongs to another key"
        key = CacheKey.from_doc(manifest.key)
        if key.id != key_id:
            return "key document does not hash to the entry's id"
        checked(store, key, raw, signing_key)
    except CacheCorrupt as e:
        return f"{e.reason}: {e}"
    return None


def remove(store: Store, key_id: str) -> bool:
    """Delete one entry (waiting for its readers); False if there was none."""
    check_key_id(key_id)
    if not store.listdir(entry_path(key_id)):
        return False
    with store.evicting(key_id):
        store.delete_tree(entry_path(key_id))
    return True


def gc(store: Store, older_than: float = 3600.0) -> dict[str, int]:
    """Delete leftovers: temp files and orphan blobs older than ``older_than`` seconds, quarantine,
    entries without a manifest, and leases nobody renewed."""
    now = time.time()
    counts = {"temp_files": 0, "orphan_blobs": 0, "incomplete_entries": 0, "quarantined": 0, "leases": 0}
    for key_id in key_ids(store):
        names = store.listdir(entry_path(key_id))
        manifest = None
        with contextlib.suppress(FileNotFoundError, CacheCorrupt):
            manifest = Manifest.from_bytes(store.read(entry_path(key_id, MANIFEST)))
        for name in names:
            try:
                age = now - store.info(entry_path(key_id, name)).modified
            except FileNotFoundError:
                continue
            if age < older_than:
                continue
            if name.startswith(TEMP_PREFIX):
                store.delete(entry_path(key_id, name))
                counts["temp_files"] += 1
            elif manifest is None and (name.startswith(BLOB_PREFIX) or name == USED):
                store.delete(entry_path(key_id, name))
                counts["incomplete_entries"] += 1
            elif name.startswith(BLOB_PREFIX) and manifest and name != BLOB_PREFIX + manifest.blob_sha256:
                store.delete(entry_path(key_id, name))
                counts["orphan_blobs"] += 1
    for name in store.listdir(QUARANTINE):
        store.delete_tree(f"{QUARANTINE}/{name}")
        counts["quarantined"] += 1
    for name in store.listdir(LEASES):
        with contextlib.suppress(FileNotFoundError):
            if now - store.info(f"{LEASES}/{name}").modified > older_than:
                store.delete(f"{LEASES}/{name}")
                counts["leases"] += 1
    return counts
