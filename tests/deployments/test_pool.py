"""Idle Ray workers started ahead for a scale-up (deployments/pool.py), on a real local Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from warmserve.deployments import pool

# A driver of its own Ray (3 CPUs, so Ray starts 3 workers and keeps up to 3 idle). Two actors take two of the
# started workers for good, as Serve's own actors do; then the pool is topped up to 3, twice.
DRIVER = """
import json, os, sys, time
import ray
from warmserve.deployments import pool

ray.init(num_cpus=3, include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0)
class Holder:
    def pid(self):
        return os.getpid()

holders = [Holder.remote() for _ in range(2)]
taken = ray.get([h.pid.remote() for h in holders])
first = pool.top_up(ray, 3)
time.sleep(3)  # Ray stops idle workers beyond what it keeps after a second
alive = []
for pid in first:
    try:
        os.kill(pid, 0)
        alive.append(pid)
    except ProcessLookupError:
        pass
second = pool.top_up(ray, 3)
print(json.dumps({"taken": taken, "first": sorted(first), "alive": sorted(alive), "second": sorted(second)}))
ray.shutdown()
"""


def test_a_top_up_leaves_that_many_idle_workers_and_a_second_one_starts_none(tmp_path: Path) -> None:
    raytmp = tempfile.mkdtemp(prefix="wsp", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, raytmp], capture_output=True, text=True, timeout=300, env=env
        )
    finally:
        shutil.rmtree(raytmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert len(got["first"]) == 3 and not set(got["first"]) & set(got["taken"]), got
    assert got["alive"] == got["first"], got  # kept idle
    assert got["second"] == got["first"], got  # found idle: no new process


def test_the_pool_holds_one_worker_per_replica_still_to_come_within_what_ray_keeps() -> None:
    assert pool.wanted(12, 1, 15.0) == 11
    assert pool.wanted(12, 1, 6.5) == 6  # Ray keeps one idle worker per unreserved CPU
    assert pool.wanted(12, 12, 4.0) == 0
    assert pool.wanted(2, 3, 4.0) == 0  # more than the ceiling while scaling down
    app = {"deployments": [{"name": "a", "autoscaling_config": {"max_replicas": 12}}, {"name": "b", "num_replicas": 2}]}
    assert pool.ceiling(app) == 12
    assert pool.ceiling({"deployments": [{"name": "b", "num_replicas": 2}]}) == 0
