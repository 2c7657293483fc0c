"""Store registry: a local path or ``file://`` URL gives a LocalStore, any other fsspec URL an FsspecStore."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from warmserve.cache.stores.base import ObjectInfo, Store


def open_store(location: str, storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open the store at ``location`` (a path, or a URL such as ``s3://bucket/prefix``).

    Backends are imported only when used; a missing one raises ``UnknownStore`` naming what to install.
    """
    if "://" not in location or location.startswith("file://"):
        from warmserve.cache.stores.local import LocalStore

        return LocalStore(location.removeprefix("file://"))
    from warmserve.cache.stores.remote import FsspecStore

    return FsspecStore(location, storage_options)


__all__ = ["ObjectInfo", "Store", "open_store"]
