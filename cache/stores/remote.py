"""A shared store at any fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///mnt/shared``...)."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from warmserve.cache.errors import InvalidKey, StoreUnavailable, UnknownStore
from warmserve.cache.stores.base import ObjectInfo, Store

T = TypeVar("T")

# What a missing protocol needs installed (fsspec's own registry lists more).
_EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}

# Fail fast when the store is down: the caller falls back to L1 or a local build.
_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 2, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}},
}


def _modified(info: Mapping[str, Any]) -> float:
    for field in ("LastModified", "mtime", "modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


class FsspecStore(Store):
    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        protocol, _, root = self.url.partition("://")
        if not root:
            raise UnknownStore(f"shared cache URL needs a protocol, like s3://bucket/prefix: {url!r}")
        self.protocol = protocol
        self.root = root
        options: dict[str, Any] = dict(storage_options or {})
        if protocol in ("s3", "s3a"):
            for k, v in _S3_DEFAULTS.items():
                options.setdefault(k, v)
            endpoint = options.pop("endpoint_url", None)
            if endpoint:
                options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
        options.setdefault("skip_instance_cache", True)
        if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
            options.setdefault("use_listings_cache", False)
        self._options = options
        try:
            self._cls = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            hint = f" (pip install {_EXTRAS[protocol]})" if protocol in _EXTRAS else ""
            raise UnknownStore(f"no filesystem for {protocol}://{hint}: {e}") from e
        self._fs: Any = None
        self._pid = -1

    @property
    def fs(self) -> Any:
        # Clients hold sockets and event loops that do not survive fork: one per process.
        if self._fs is None or self._pid != os.getpid():
            self._fs = self._cls(**self._options)
            self._pid = os.getpid()
        return self._fs

    def _full(self, path: str) -> str:
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise InvalidKey(f"path {path!r} is not a plain relative object path")
        return posixpath.join(self.root, path)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StoreUnavailable(f"{self.url}: {what} failed: {type(e).__name__}: {e}") from e

    def read(self, path: str) -> bytes:
        full = self._full(path)
        return self._call(f"read {path}", lambda: bytes(self.fs.cat_file(full)))

    def write(self, path: str, data: bytes | memoryview) -> None:
        # One PUT: object stores make it visible whole or not at all.
        full = self._full(path)
        self._call(f"write {path}", lambda: self.fs.pipe_file(full, bytes(data)))

    def create(self, path: str, data: bytes) -> bool:
        full = self._full(path)

        def go() -> bool:
            try:
                if self.protocol == "file":
                    with self.fs.open(full, "xb") as f:
                        f.write(data)
                else:
                    self.fs.pipe_file(full, data, mode="create")
            except FileExistsError:
                return False
            except OSError as e:
                # s3fs maps S3's PreconditionFailed (IfNoneMatch="*" on an existing key) to EINVAL.
                if e.errno == errno.EINVAL and "pre-condition" in str(e).lower():
                    return False
                raise
            return True

        return self._call(f"create {path}", go)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            full = self._full(path)
            self._call(f"delete {path}", lambda: self.fs.rm_file(full))

    def delete_tree(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            full = self._full(prefix)
            self._call(f"delete {prefix}", lambda: self.fs.rm(full, recursive=True))

    def listdir(self, prefix: str) -> list[str]:
        full = self._full(prefix)
        try:
            names = self._call(f"list {prefix}", lambda: self.fs.ls(full, detail=False))
        except FileNotFoundError:
            return []
        # Some servers list an emptied "directory" as an object of its own name: skip it.
        return sorted(posixpath.basename(n) for n in (str(n).rstrip("/") for n in names) if n != full)

    def info(self, path: str) -> ObjectInfo:
        full = self._full(path)
        info = self._call(f"stat {path}", lambda: self.fs.info(full))
        if info.get("type") == "directory":
            raise FileNotFoundError(path)
        return ObjectInfo(size=int(info.get("size") or 0), modified=_modified(info) or time.time())

    def touch(self, path: str) -> None:
        full = self._full(path)
        self._call(f"touch {path}", lambda: self.fs.pipe_file(full, b""))

    def move(self, src: str, dst: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            a, b = self._full(src), self._full(dst)
            self._call(f"move {src}", lambda: self.fs.mv(a, b))

    def close(self) -> None:
        self._fs = None
