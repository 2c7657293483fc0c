"""Errors raised by the engine cache. Each subclasses the nearest builtin so callers can catch either."""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error the cache raises."""


class CacheCorrupt(CacheError, ValueError):
    """An entry failed a check (size, digest, signature, key document) and was refused."""

    def __init__(self, message: str, *, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason


class LeaseTimeout(CacheError, TimeoutError):
    """Waited longer than the configured timeout for another process to finish a build."""


class StoreUnavailable(CacheError, OSError):
    """A store could not be reached or answered with an error; the caller falls back to another tier."""


class InvalidKey(CacheError, ValueError):
    """A key id or key document is malformed (wrong characters, not JSON-serialisable, ...)."""


class UnknownStore(CacheError, ValueError):
    """A store URL names a protocol that no installed package provides."""


class UntrustedCache(CacheError, PermissionError):
    """A store others may write to is configured without a signing key (entries hold code that gets loaded)."""


class StoreFull(StoreUnavailable):
    """A write failed because the filesystem is full (ENOSPC / EDQUOT)."""
