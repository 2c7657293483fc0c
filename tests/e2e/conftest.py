from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import RayCluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    cluster = RayCluster(tmp_path_factory.mktemp("ray")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """The module's cluster with no application left over from the previous test."""
    yield ray_cluster
    ray_cluster.delete_all()
