"""The node-local store: a directory, atomic renames, and flock for readers, evictors and builders."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from warmserve.cache.atomic import atomic_write
from warmserve.cache.errors import InvalidKey, StoreFull, StoreUnavailable
from warmserve.cache.locks import locked, try_lock, unlock
from warmserve.cache.stores.base import ObjectInfo, Store


class LocalStore(Store):
    local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"cannot create cache directory {self.root}: {e}") from e
        self._locks = self.root / "locks"

    def _path(self, path: str) -> Path:
        full = (self.root / path).resolve()
        if full != self.root and self.root not in full.parents:
            raise InvalidKey(f"path {path!r} escapes the cache directory")
        return full

    def read(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise FileNotFoundError(path) from e
        except OSError as e:
            raise StoreUnavailable(f"{self.root}: cannot read {path}: {e}") from e

    def write(self, path: str, data: bytes | memoryview) -> None:
        try:
            atomic_write(self._path(path), data)
        except OSError as e:
            error = StoreFull if e.errno in (errno.ENOSPC, errno.EDQUOT) else StoreUnavailable
            raise error(f"{self.root}: cannot write {path}: {e}") from e

    def create(self, path: str, data: bytes) -> bool:
        full = self._path(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Write under a temp name and hard-link into place: link() fails if the name exists,
            # and a reader never sees the file half-written.
            tmp = full.with_name(f".tmp-{full.name}-{os.getpid()}-{time.monotonic_ns()}")
            atomic_write(tmp, data)
            try:
                os.link(tmp, full)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        except OSError as e:
            raise StoreUnavailable(f"{self.root}: cannot create {path}: {e}") from e

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(path).unlink()

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def listdir(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def info(self, path: str) -> ObjectInfo:
        try:
            st = self._path(path).stat()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise FileNotFoundError(path) from e
        return ObjectInfo(size=st.st_size, modified=st.st_mtime)

    def touch(self, path: str) -> None:
        try:
            self._path(path).touch()
        except FileNotFoundError:  # the entry was removed meanwhile
            pass
        except OSError as e:
            raise StoreUnavailable(f"{self.root}: cannot touch {path}: {e}") from e

    def move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._path(src), target)

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free

    # Readers hold a shared flock on the entry's lock file; the evictor needs it exclusively,
    # so an entry is never removed while any process is between reading its manifest and its blob.
    @contextlib.contextmanager
    def reading(self, key_id: str) -> Iterator[None]:
        with locked(self._locks / f"{key_id}.read", shared=True):
            yield

    @contextlib.contextmanager
    def evicting(self, key_id: str) -> Iterator[bool]:
        fd = try_lock(self._locks / f"{key_id}.read")
        try:
            yield fd is not None
        finally:
            if fd is not None:
                unlock(fd)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        with locked(self._locks / f"{name}.lock"):
            yield

    def build_lock_path(self, key_id: str) -> Path:
        return self._locks / f"{key_id}.build"
