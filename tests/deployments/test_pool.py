"""Idle Ray workers started with the cluster for the replicas a scale-up adds (deployments/pool.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from warmserve.deployments import pool
from warmserve.deployments.errors import StartError

# A driver of its own Ray, counting 4 CPUs on this 2-core machine as `warmserve run` has Ray count more than the
# host has: Ray starts 4 workers at once, and 4 actors
# (as Serve's replicas are) then run on exactly those processes, not on new ones.
DRIVER = """
import json, os, sys, time
from pathlib import Path
import ray

def idle(marker):
    found = []
    for p in Path("/proc").iterdir():
        try:
            if Path(p, "cmdline").read_bytes().startswith(b"ray::IDLE") and marker in Path(p, "environ").read_bytes():
                found.append(int(p.name))
        except (OSError, ValueError):
            pass
    return sorted(found)

ray.init(
    num_cpus=4,
    include_dashboard=False,
    _temp_dir=sys.argv[1],
    log_to_driver=False,
    _system_config={"worker_maximum_startup_concurrency": 4},  # as `warmserve run` sets it (else: 2 cores, 2)
)
marker = f"WARMSERVE_POOL_TEST={sys.argv[1]}".encode()
deadline = time.monotonic() + 120
while len(idle(marker)) < 4 and time.monotonic() < deadline:
    time.sleep(0.2)
started = idle(marker)

@ray.remote(num_cpus=0)
class Replica:
    def pid(self):
        return os.getpid()

replicas = [Replica.remote() for _ in range(4)]
print(json.dumps({"started": started, "replicas": sorted(ray.get([r.pid.remote() for r in replicas]))}))
ray.shutdown()
"""


def test_ray_starts_a_worker_per_counted_cpu_and_actors_take_those(tmp_path: Path) -> None:
    raytmp = tempfile.mkdtemp(prefix="wsp", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0", "WARMSERVE_POOL_TEST": raytmp}
    try:
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, raytmp], capture_output=True, text=True, timeout=300, env=env
        )
    finally:
        shutil.rmtree(raytmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert len(got["started"]) == 4, got
    assert got["replicas"] == got["started"], got  # no new process for any of them


def test_ray_counts_a_worker_for_each_replica_beside_serves_own_actors() -> None:
    assert pool.ray_cpus(16, 12) == 12 + pool.SERVE_ACTORS + pool.SPARE  # the 16-core GPU host: 19
    assert pool.ray_cpus(64, 12) == 64  # enough already: the host's own count
    assert pool.ray_cpus(2, 0) == 2 + pool.SERVE_ACTORS  # never fewer than the host has
    app = {"deployments": [{"name": "a", "autoscaling_config": {"max_replicas": 12}}, {"name": "b", "num_replicas": 2}]}
    assert pool.ceiling(app) == 12
    assert pool.ceiling({"deployments": [{"name": "b", "num_replicas": 2}]}) == 0


def test_only_a_preloading_service_that_autoscales_past_the_hosts_workers_raises_rays_count() -> None:
    autoscaled = {"deployments": [{"name": "a", "autoscaling_config": {"min_replicas": 1, "max_replicas": 12}}]}
    assert pool.raised_cpus(autoscaled, 16, {}) == 19
    assert pool.raised_cpus(autoscaled, 64, {}) is None  # the host's own count is enough
    assert pool.raised_cpus(autoscaled, 16, {"WARMSERVE_PRELOAD_POOL": "0"}) is None
    fixed = {"deployments": [{"name": "a", "num_replicas": 12}]}  # no replica starts later
    assert pool.raised_cpus(fixed, 2, {}) is None
    one = {"deployments": [{"name": "a", "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}]}
    assert pool.raised_cpus(one, 2, {}) is None
    with pytest.raises(StartError, match="WARMSERVE_PRELOAD_POOL must be 0 or 1, got 'no'"):
        pool.raised_cpus(autoscaled, 16, {"WARMSERVE_PRELOAD_POOL": "no"})
