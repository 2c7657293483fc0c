from __future__ import annotations

from pathlib import Path

import pytest

from warmserve.cache import CacheConfig
from warmserve.serve.spec import InputSpec, ModelSpec

TINY = "tests.serve.models:tiny_cnn"


def tiny_spec(**kw: object) -> ModelSpec:
    defaults: dict[str, object] = {"model": TINY, "input": InputSpec(shape=(3, 16, 16), min_batch=1, max_batch=8)}
    return ModelSpec(**{**defaults, **kw})  # type: ignore[arg-type]


@pytest.fixture
def cache_config(tmp_path: Path) -> CacheConfig:
    return CacheConfig.load(environ={}, cache_dir=tmp_path / "cache")
