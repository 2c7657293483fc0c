from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import SeaweedFS, seaweedfs

_prefixes = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Inductor cache directory for the session, in the environment of every process a test starts (Ray's
    workers, `warmserve run`, `warmserve build`, workers in subprocesses). A cold one adds 15-18 s to a build of
    the tiny model on two cores: Inductor compiles test programs to pick the CPU's vector instructions and
    precompiles torch's headers, and keeps both there. It holds no engine: warmserve's own cache stays per test."""
    path = tmp_path_factory.mktemp("inductor")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.make_bucket("warmserve")
        yield server


@pytest.fixture
def s3_url(s3_server: SeaweedFS) -> str:
    """A fresh prefix per test in the one bucket (each SeaweedFS bucket reserves its own volumes)."""
    return f"s3://warmserve/t{os.getpid()}-{next(_prefixes)}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("WARMSERVE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
