"""Where a tier keeps its files in its store, the one place these names are written.

entries/<key id>/manifest.json        the commit point: key document, blob size and sha256, signature
entries/<key id>/blob-<sha256>        the engine, content-addressed
entries/<key id>/used                 touched on each use (least-recently-used eviction)
leases/<key id>                       who is building the key (`leases`)
quarantine/<key id>.<time>.<reason>/  an entry moved aside because a check failed (`gc` deletes it)
"""

from __future__ import annotations

ENTRIES = "entries"
LEASES = "leases"
QUARANTINE = "quarantine"
MANIFEST = "manifest.json"
USED = "used"
BLOB_PREFIX = "blob-"


def entry_path(key_id: str, name: str = "") -> str:
    return f"{ENTRIES}/{key_id}/{name}" if name else f"{ENTRIES}/{key_id}"


def lease_path(key_id: str) -> str:
    return f"{LEASES}/{key_id}"
