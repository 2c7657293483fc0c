"""Application settings: the ``args`` of deployments/config.yaml, validated once when the app is built."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from warmserve.serve.backends import NAMES
from warmserve.serve.spec import ModelSpec

MODEL_KEYS = {"model", "weights", "input_shape", "dtype", "batch", "precision", "name", "weights_version"}


@dataclass(frozen=True)
class AppSettings:
    model: ModelSpec = field(default_factory=ModelSpec)
    backend: str = "auto"
    device: str = "auto"
    cache_dir: str | None = None  # None: $WARMSERVE_CACHE_DIR, else ~/.cache/warmserve (per node)
    shared_cache: str | None = None  # None: $WARMSERVE_SHARED_CACHE
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    max_body_mb: float = 64.0
    top_k: int = 5
    verify: bool = True

    @classmethod
    def from_mapping(cls, args: Mapping[str, Any] | None) -> AppSettings:
        args = dict(args or {})
        known = MODEL_KEYS | {f.name for f in fields(cls)} - {"model"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} in the application args; known: {sorted(known)}")
        model = ModelSpec.from_mapping({k: v for k, v in args.items() if k in MODEL_KEYS and v is not None})
        rest = {k: v for k, v in args.items() if k not in MODEL_KEYS and v is not None}
        settings = cls(model=model, **rest)
        if settings.backend not in NAMES:
            raise ValueError(f"backend must be one of {NAMES}, got {settings.backend!r}")
        if settings.max_batch_size < 1 or settings.batch_wait_timeout_s < 0 or settings.max_body_mb <= 0:
            raise ValueError("max_batch_size >= 1, batch_wait_timeout_s >= 0 and max_body_mb > 0 are required")
        return settings
