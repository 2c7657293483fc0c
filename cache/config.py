"""Cache settings: built once from arguments and ``WARMSERVE_*`` environment variables (arguments win)."""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from warmserve.cache.errors import UntrustedCache

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: str | int | None, *, name: str) -> int | None:
    """``"10GiB"``, ``"500M"``, ``"1024"`` -> bytes; ``None``, ``""`` or ``"none"`` -> no budget."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() in ("", "none", "unlimited"):
        return None
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"{name}: cannot read {value!r} as a size; use bytes or a unit, like 10GiB or 500M")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "warmserve"


@dataclass(frozen=True)
class CacheConfig:
    cache_dir: Path = field(default_factory=default_cache_dir)
    shared_url: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    signing_key: bytes | None = field(default=None, repr=False)
    local_budget: int | None = 20 * 2**30
    shared_budget: int | None = None
    wait_timeout: float = 3600.0
    lease_ttl: float = 30.0
    retry_after: float = 30.0
    single_flight: bool = True  # False: every process builds a missing entry itself (for benchmarks)
    trust_shared: bool = False  # True: no signing key needed for a shared store (only trusted writers)

    # environment variable -> (field, parser)
    ENV = {
        "WARMSERVE_CACHE_DIR": "cache_dir",
        "WARMSERVE_SHARED_CACHE": "shared_url",
        "WARMSERVE_SIGNING_KEY": "signing_key",
        "WARMSERVE_CACHE_BUDGET": "local_budget",
        "WARMSERVE_SHARED_CACHE_BUDGET": "shared_budget",
        "WARMSERVE_CACHE_WAIT_TIMEOUT": "wait_timeout",
        "WARMSERVE_LEASE_TTL": "lease_ttl",
        "WARMSERVE_SINGLE_FLIGHT": "single_flight",
        "WARMSERVE_TRUST_SHARED_CACHE": "trust_shared",
    }
    # an old variable -> the one that replaced it; read, with a warning, only where the new one is not set
    RENAMED = {"WARMSERVE_CACHE_KEY": "WARMSERVE_SIGNING_KEY"}

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> CacheConfig:
        """Defaults, then the environment, then explicit ``overrides`` (``None`` values are ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for old, new in cls.RENAMED.items():
            if env.get(old):
                warnings.warn(
                    f"{old} is deprecated and will be removed: set {new} instead"
                    + (f" (both are set; {new} is used)" if env.get(new) else ""),
                    FutureWarning,
                    stacklevel=2,
                )
                if not env.get(new):
                    values[cls.ENV[new]] = (old, env[old])
        for var, name in cls.ENV.items():
            if env.get(var):
                values[name] = (var, env[var])
        for name, value in overrides.items():
            if name not in {f.name for f in fields(cls)}:
                raise TypeError(f"unknown cache setting {name!r}")
            if value is not None:
                values[name] = (name, value)
        return cls(**{name: _coerce(name, where, value) for name, (where, value) in values.items()})

    def __post_init__(self) -> None:
        for name in ("wait_timeout", "lease_ttl", "retry_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def untrusted_stores(self) -> list[str]:
        """The configured stores that someone else may be able to write to, each with the reason.

        A remote store (S3, GCS...) counts unless ``trust_shared`` says only trusted principals can write
        to it; the local directory counts when everyone can write to it, a shared directory when its group can.
        """
        found = []
        if _others_can_write(self.cache_dir, group=False):
            found.append(f"{self.cache_dir} (local cache directory writable by others)")
        if self.shared_url and not self.trust_shared:
            if "://" in self.shared_url and not self.shared_url.startswith("file://"):
                found.append(f"{self.shared_url} (shared store; its access policy cannot be checked from here)")
            elif _others_can_write(Path(self.shared_url.removeprefix("file://")).expanduser(), group=True):
                found.append(f"{self.shared_url} (shared directory writable by others)")
        return found

    def require_trust(self) -> None:
        """Refuse to run without a signing key when a store others can write to is configured.

        Cache entries hold native code (AOTInductor shared libraries, TensorRT engines) and pickled
        artifacts that warmserve loads; without a signature a writer to the store could run code in every
        replica. With ``signing_key`` set, unsigned and forged entries are refused instead.
        """
        if self.signing_key is not None:
            return
        stores = self.untrusted_stores()
        if stores:
            raise UntrustedCache(
                "refusing to load engines from a cache that others may write to: "
                + "; ".join(stores)
                + ". Entries hold code that every replica loads. Set WARMSERVE_SIGNING_KEY to a secret shared by"
                " your replicas (only entries signed with it are used), or, if only trusted principals can"
                " write to the shared store, set WARMSERVE_TRUST_SHARED_CACHE=1."
            )


def _others_can_write(path: Path, *, group: bool) -> bool:
    """True if the directory at ``path`` is writable by everyone (or, with ``group``, by its group)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False  # not there yet: created later under this process' umask
    return bool(mode & (stat.S_IWOTH | (stat.S_IWGRP if group else 0)))


def _coerce(name: str, where: str, value: Any) -> Any:
    try:
        if name == "cache_dir":
            return Path(value).expanduser()
        if name == "signing_key":
            return value if isinstance(value, bytes) else str(value).encode()
        if name in ("local_budget", "shared_budget"):
            return parse_size(value, name=where)
        if name in ("wait_timeout", "lease_ttl", "retry_after"):
            return float(value)
        if name in ("single_flight", "trust_shared") and isinstance(value, str):
            if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ValueError(f"use 1/0, true/false or yes/no, got {value!r}")
            return value.lower() in ("1", "true", "yes")
        return value
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {e}") from e
