"""Entry manifests: what an entry was built from, what its blob must hash to, and who signed it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from warmserve.cache.errors import CacheCorrupt
from warmserve.cache.keys import CacheKey, canonical_json

FORMAT = 1


def producer() -> str:
    """``host:pid`` of the process writing an entry, for `warmserve cache ls`."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Provenance:
    """What made a blob, kept in its manifest: the backend, the versions of what built it, and free notes."""

    backend: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The commit point of an entry: written after its blob, read before it."""

    key_id: str
    key: Mapping[str, Any]
    blob_sha256: str
    size: int
    created: float
    producer: str
    backend: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    format: int = FORMAT
    signature: str | None = None

    @classmethod
    def for_blob(cls, key: CacheKey, blob: bytes | memoryview, provenance: Provenance | None = None) -> Manifest:
        made = provenance or Provenance()
        return cls(
            key_id=key.id,
            key=key.doc,
            blob_sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
            created=time.time(),
            producer=producer(),
            backend=made.backend,
            versions=dict(made.versions),
            meta=dict(made.meta),
        )

    @property
    def provenance(self) -> Provenance:
        return Provenance(self.backend, self.versions, self.meta)

    def _signed_part(self) -> bytes:
        doc = asdict(self)
        doc.pop("signature")
        return canonical_json(doc)

    def signed(self, signing_key: bytes) -> Manifest:
        """A copy carrying an HMAC-SHA256 over every field, the blob's digest and size included."""
        mac = hmac.new(signing_key, self._signed_part(), hashlib.sha256).hexdigest()
        return Manifest(**{**asdict(self), "signature": mac})

    def check_signature(self, signing_key: bytes | None) -> None:
        """Raise ``CacheCorrupt`` unless the signature is valid; with no signing key, any entry passes."""
        if signing_key is None:
            return
        if not self.signature:
            raise CacheCorrupt(f"entry {self.key_id[:12]} is unsigned and signing is on", reason="unsigned")
        want = hmac.new(signing_key, self._signed_part(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, self.signature):
            raise CacheCorrupt(f"entry {self.key_id[:12]} has a bad signature", reason="signature")

    def check_blob(self, blob: bytes | memoryview) -> None:
        if len(blob) != self.size:
            raise CacheCorrupt(
                f"entry {self.key_id[:12]}: blob is {len(blob)} bytes, manifest says {self.size}", reason="size"
            )
        if hashlib.sha256(blob).hexdigest() != self.blob_sha256:
            raise CacheCorrupt(f"entry {self.key_id[:12]}: blob sha256 does not match", reason="digest")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("manifest is not a JSON object")
            if doc.get("format") != FORMAT:
                raise CacheCorrupt(f"manifest format {doc.get('format')!r} is not {FORMAT}", reason="format")
            return cls(**doc)
        except CacheCorrupt:
            raise
        except (ValueError, TypeError) as e:
            raise CacheCorrupt(f"unreadable manifest: {e}", reason="manifest") from e
