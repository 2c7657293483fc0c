"""warmserve's engine cache: verified entries in a node-local tier and a shared tier, built once per fleet."""

from warmserve.cache.config import CacheConfig
from warmserve.cache.engine_cache import EngineCache, Fetched
from warmserve.cache.errors import (
    CacheCorrupt,
    CacheError,
    InvalidKey,
    LeaseTimeout,
    StoreFull,
    StoreUnavailable,
    UnknownStore,
    UntrustedCache,
)
from warmserve.cache.events import CacheEvents
from warmserve.cache.keys import CacheKey
from warmserve.cache.manifest import Manifest, Provenance
from warmserve.cache.tier import Tier

__all__ = [
    "CacheConfig",
    "CacheCorrupt",
    "CacheError",
    "CacheEvents",
    "CacheKey",
    "EngineCache",
    "Fetched",
    "InvalidKey",
    "LeaseTimeout",
    "Manifest",
    "Provenance",
    "StoreFull",
    "StoreUnavailable",
    "Tier",
    "UnknownStore",
    "UntrustedCache",
]
