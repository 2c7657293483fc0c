"""Idle Ray workers started with the cluster for the replicas a scale-up adds (deployments/pool.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.deployments.test_host_layout import HAPROXY, config, deployment
from warmserve.deployments import host, pool, runner
from warmserve.deployments.errors import StartError

# What the pool relies on Ray for, checked on Ray itself: a driver of its own Ray counting 4 CPUs on this 2-core
# machine, as `warmserve run` has Ray count more than the host has, with the start-up concurrency it sets: Ray
# starts 4 workers at once, and 4 actors
# (as Serve's replicas are) then run on exactly those processes, not on new ones.
DRIVER = """
import json, os, sys, time
from pathlib import Path
from typing import Any
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


def test_ray_itself_starts_a_worker_per_counted_cpu_and_hands_those_to_actors(tmp_path: Path) -> None:
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


def gpu_host(**deployment: Any) -> dict[str, Any]:
    """The default config as `warmserve run` lays it out on one GPU and 16 cores."""
    doc = config(deployment or None)
    host.plan(doc, gpus=1, cpus=16, haproxy=HAPROXY).apply(doc)
    return doc


def test_a_gpu_host_that_autoscales_has_ray_start_a_worker_for_each_replica_to_come() -> None:
    doc = gpu_host()
    assert deployment(doc)["autoscaling_config"]["max_replicas"] == 12
    options = runner.ray_options(doc, local=True, cpus=16, environ={})
    assert options["num_cpus"] == 12 + pool.SERVE_ACTORS + pool.SPARE == 19
    assert options["_system_config"] == {
        "preload_python_modules": ["warmserve.deployments.preload"],
        "worker_maximum_startup_concurrency": 19,  # else Ray starts only as many at once as the host has cores
    }


def test_nothing_is_raised_where_it_would_not_help_or_would_let_replicas_past_the_cores() -> None:
    doc = gpu_host()
    off = runner.ray_options(doc, local=True, cpus=16, environ={"WARMSERVE_PRELOAD_POOL": "0"})
    assert off == {"num_cpus": None, "_system_config": {"preload_python_modules": ["warmserve.deployments.preload"]}}
    # a cluster we join keeps its own settings
    assert runner.ray_options(doc, local=False, cpus=16, environ={}) == {"num_cpus": None, "_system_config": None}
    # no replica starts later: nothing to preload for
    fixed = config({"num_replicas": 12, "autoscaling_config": None})
    host.plan(fixed, gpus=1, cpus=16, haproxy=HAPROXY).apply(fixed)
    assert runner.ray_options(fixed, local=True, cpus=16, environ={}) == {"num_cpus": None, "_system_config": None}
    # the config's own GPU share and a maximum past the cores: Ray's count of 16 is what keeps replicas 17-32
    # waiting, so it stays
    own = config({"autoscaling_config": {"min_replicas": 1, "max_replicas": 32}}, num_gpus=0.03)
    host.plan(own, gpus=1, cpus=16, haproxy=HAPROXY).apply(own)
    assert deployment(own)["autoscaling_config"]["max_replicas"] == 32
    assert runner.ray_options(own, local=True, cpus=16, environ={})["num_cpus"] is None
    # a host with cores enough keeps its count
    assert pool.raised_cpus(deployment_app(doc), 64, {}) is None


def test_a_bad_pool_setting_is_refused_even_where_it_would_not_apply() -> None:
    with pytest.raises(StartError, match="WARMSERVE_PRELOAD_POOL must be 0 or 1, got 'no'"):
        runner.ray_options(gpu_host(), local=False, cpus=16, environ={"WARMSERVE_PRELOAD_POOL": "no"})


def test_ray_counts_a_worker_for_each_replica_beside_serves_own_actors() -> None:
    assert pool.ray_cpus(16, 12) == 19
    assert pool.ray_cpus(64, 12) == 64  # the host's own count, where it is enough
    assert pool.ray_cpus(1, 0) == pool.SERVE_ACTORS + pool.SPARE  # never fewer than Serve's actors need
    app = {"deployments": [{"name": "a", "autoscaling_config": {"max_replicas": 12}}, {"name": "b", "num_replicas": 2}]}
    assert pool.ceiling(app, 16) == 12
    assert pool.ceiling({"deployments": [{"name": "b", "num_replicas": 2}]}, 16) == 0
    halves = {
        "deployments": [
            {"name": "a", "autoscaling_config": {"max_replicas": 12}, "ray_actor_options": {"num_cpus": 0.5}}
        ]
    }
    assert pool.ceiling(halves, 8) == 12  # 16 halves fit 8 cores
    assert pool.ceiling(halves, 4) == 0  # 12 do not fit 4: Ray's own count must hold them back


def deployment_app(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["applications"][0]  # type: ignore[no-any-return]
