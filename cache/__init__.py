"""warmserve's engine cache: verified entries in a node-local tier and a shared tier, built once per fleet."""

from cache.config import CacheConfig
from cache.engine_cache import EngineCache, Fetched
from cache.errors import (
    CacheCorrupt,
    CacheError,
    InvalidKey,
    LeaseTimeout,
    StoreFull,
    StoreUnavailable,
    UnknownStore,
    UntrustedCache,
)
from cache.events import CacheEvents
from cache.keys import CacheKey
from cache.manifest import Manifest
from cache.tier import Tier

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
    "StoreFull",
    "StoreUnavailable",
    "Tier",
    "UnknownStore",
    "UntrustedCache",
]
