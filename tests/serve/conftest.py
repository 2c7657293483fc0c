from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from warmserve.cache import CacheConfig
from warmserve.serve.spec import InputSpec, ModelSpec

TINY = "tests.serve.models:tiny_cnn"


def tiny_spec(**kw: object) -> ModelSpec:
    defaults: dict[str, object] = {"model": TINY, "input": InputSpec(shape=(3, 16, 16), min_batch=1, max_batch=8)}
    return ModelSpec(**{**defaults, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Inductor cache for the whole session: repeated compiles of the tiny model stay cheap."""
    path = tmp_path_factory.mktemp("inductor")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture
def cache_config(tmp_path: Path) -> CacheConfig:
    return CacheConfig.load(environ={}, cache_dir=tmp_path / "cache")
