"""The seam between the cache's entry logic and where bytes live."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    modified: float  # seconds since the epoch; for entries, the last time they were used


class Store(ABC):
    """A flat namespace of byte objects under relative paths such as ``entries/<id>/manifest.json``.

    Every method raises ``FileNotFoundError`` for a missing object and ``StoreUnavailable`` when the
    backing service fails; nothing else escapes.
    """

    url: str
    #: True for node-local stores, where cross-process file locks exist (single-flight, eviction).
    local: bool = False

    @abstractmethod
    def read(self, path: str) -> bytes: ...

    @abstractmethod
    def write(self, path: str, data: bytes | memoryview) -> None:
        """Replace ``path`` atomically: readers never see a partial object."""

    @abstractmethod
    def create(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if absent; return False if it already exists. The basis of leases."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove ``path``; a missing object is not an error."""

    @abstractmethod
    def delete_tree(self, prefix: str) -> None:
        """Remove every object under ``prefix``; a missing prefix is not an error."""

    @abstractmethod
    def listdir(self, prefix: str) -> list[str]:
        """Names (not paths) directly under ``prefix``; empty if it does not exist."""

    @abstractmethod
    def info(self, path: str) -> ObjectInfo: ...

    @abstractmethod
    def touch(self, path: str) -> None:
        """Record a use of ``path`` (its ``modified`` time becomes now); used for LRU."""

    def move(self, src: str, dst: str) -> None:
        """Move one object (quarantine); stores with a native rename override this."""
        try:
            data = self.read(src)
        except FileNotFoundError:
            return
        self.write(dst, data)
        self.delete(src)

    def free_bytes(self) -> int | None:
        """Bytes free on the backing filesystem, when the store can tell."""
        return None

    @contextlib.contextmanager
    def reading(self, key_id: str) -> Iterator[None]:
        """Hold off eviction of one entry while it is read. Only local stores can enforce this."""
        yield

    @contextlib.contextmanager
    def evicting(self, key_id: str) -> Iterator[bool]:
        """Yield True if the entry may be removed now (nobody is reading it)."""
        yield True

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """A store-wide critical section (eviction); a no-op where the store has no locks."""
        yield

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and file handles."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
