from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import ROOT, RayCluster
from tests.e2e.helpers import TINY


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """One local Ray cluster for every module that asks for it (its start and stop cost 10-15 s each on two
    cores); each test leaves it with no application (``cluster``)."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray"), stop_wait_s=0.5).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """The module's cluster with no application left over from the previous test."""
    yield ray_cluster
    ray_cluster.delete_all()


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engine cache holding TINY's engine, compiled once per session by `warmserve build` (a real
    AOTInductor build on this machine): the same key a replica of TINY computes, so it starts from it."""
    cache = tmp_path_factory.mktemp("tiny-engines")
    # No WARMSERVE_* of the developer's shell (this runs before each test's environment is cleaned): the engine
    # stays unsigned, as the tests that start from it expect.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMSERVE_")}
    cmd = [sys.executable, "-m", "warmserve.deployments.cli", "build", TINY["model"], "--input-shape"]
    cmd += [TINY["input_shape"], "--batch", TINY["batch"], "--backend", TINY["backend"], "--device", "cpu"]
    cmd += ["--cache-dir", str(cache), "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return cache


@pytest.fixture
def warm_cache(tiny_engines: Path, tmp_path: Path) -> Path:
    """A test's own engine cache (``tmp_path / "c"``) that already holds TINY's engine: a test about serving,
    not building, skips the build (tens of seconds on two cores). Its replicas start with ``local-hit``."""
    cache = tmp_path / "c"
    shutil.copytree(tiny_engines, cache)
    return cache
