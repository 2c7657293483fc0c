"""Cache keys: a JSON key document and the sha256 of its canonical form."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warmserve.cache.errors import InvalidKey

KEY_ID = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(doc: Any) -> bytes:
    """Serialise ``doc`` the same way in every process: sorted keys, no whitespace, no NaN.

    Sets are refused rather than silently ordered by Python's per-process hash seed.
    """
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise InvalidKey(f"key document must be plain JSON (dict, list, str, int, finite float, bool): {e}") from e


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidKey(f"key document field names must be strings, got {k!r} at {where}")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidKey(f"key document holds a non-finite number at {where}")
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise InvalidKey(
            f"key document holds a {type(value).__name__} at {where}; use str, int, float, bool, list or dict"
        )


@dataclass(frozen=True)
class CacheKey:
    """A key document (what the entry was built from) and its id, the sha256 of the canonical JSON."""

    doc: Mapping[str, Any]
    id: str

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> CacheKey:
        _check_plain(doc, "$")
        # Round-trip so tuples become lists: the stored and the live document then compare equal.
        plain = json.loads(canonical_json(doc))
        return cls(doc=plain, id=hashlib.sha256(canonical_json(plain)).hexdigest())

    @property
    def short(self) -> str:
        return self.id[:12]


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is a 64-char lowercase hex digest; anything else could escape the store root."""
    if not isinstance(key_id, str) or not KEY_ID.match(key_id):
        raise InvalidKey(f"not a cache key id (64 lowercase hex characters): {key_id!r}")
    return key_id
