"""Two Ray nodes, each with its own local cache directory, sharing an S3 store (SeaweedFS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import RayCluster
from tests.servers import SeaweedFS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    # A shared store needs a signing key (replicas refuse an unsigned one): entries are signed and checked.
    cluster = RayCluster(tmp_path_factory.mktemp("ray2"), env={"WARMSERVE_SIGNING_KEY": "two-node-key"})
    cluster.start(num_cpus=2)
    try:
        cluster.add_node("node2", num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


def test_replica_on_second_node_warm_starts_from_the_shared_tier(
    two_nodes: RayCluster, s3_server: SeaweedFS, s3_url: str
) -> None:
    args = {
        "model": "tests.serve.models:tiny_cnn",
        "input_shape": "3,16,16",
        "batch": "1:8",
        "backend": "aoti",
        "shared_cache": s3_url,
        "storage_options": s3_server.storage_options(),
    }
    spread = {"max_replicas_per_node": 1}
    two_nodes.deploy(two_nodes.config(args, {"num_replicas": 1, **spread}))
    first = two_nodes.replica_statuses(1)
    assert [s["start"]["outcome"] for s in first.values()] == ["built"]
    two_nodes.deploy(two_nodes.config(args, {"num_replicas": 2, **spread}))
    two_nodes.wait_running("warmserve", replicas=2)
    statuses = two_nodes.replica_statuses(2)
    new = [s for pid, s in statuses.items() if pid not in first]
    # The new replica is on the other node (one per node): its L1 is empty, the shared tier has the entry.
    assert len(new) == 1 and new[0]["start"]["outcome"] == "shared-hit", statuses
