"""Generated bad input against the live HTTP API: schemathesis reads the app's own /openapi.json through the
Serve proxy and sends valid and invalid requests to every operation. No 5xx, answers as documented, no leak."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.cluster import RayCluster
from tests.e2e.helpers import TINY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def replica_usage(pid: int) -> tuple[int, int]:
    """(resident KiB, open file descriptors) of a replica process on this machine."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_generated_requests_get_no_server_error(cluster: RayCluster, warm_cache: Path) -> None:
    cluster.deploy(cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1}))
    pid = requests.get(f"{cluster.http}/v1/status", timeout=30).json()["replica_pid"]
    schema = schemathesis.openapi.from_url(f"{cluster.http}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v2/models/{name}/infer", "POST /v1/classify"}

    def fuzz(examples: int) -> int:
        calls = 0
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                def call(case: schemathesis.Case) -> None:
                    nonlocal calls
                    calls += 1
                    case.call_and_validate(base_url=cluster.http, checks=CHECKS, timeout=60)

                try:
                    call()
                except Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE, op.label  # nothing to get wrong (no parameters)
        return calls

    fuzz(10)  # warm up allocators and caches before measuring
    before = replica_usage(pid)
    calls = fuzz(40)
    after = replica_usage(pid)
    assert calls > 150  # hypothesis stops early on operations with little to vary
    assert requests.get(f"{cluster.http}/v2/health/ready", timeout=10).status_code == 200
    assert requests.get(f"{cluster.http}/v1/status", timeout=10).json()["replica_pid"] == pid, "replica restarted"
    assert after[1] <= before[1] + 8, f"file descriptors grew from {before[1]} to {after[1]}"
    assert after[0] <= before[0] + 150 * 1024, f"resident memory grew from {before[0]} KiB to {after[0]} KiB"
