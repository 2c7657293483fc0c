"""Idle Ray workers, started ahead, for the replicas a scale-up will ask for.

With preloading (deployments/preload.py) a Ray worker imports torch and the app as it starts, so a replica that
Serve hands to an idle worker skips those seconds. But Ray starts as many workers as the node has CPUs, and
Serve's own actors (controller, HAProxy manager, the peer tier's) take some of them for good: on a 16-core host
10 were left, so a scale-up from 1 to 12 replicas put 2 replicas on new processes, 5-6 s later than the others.

`top_up` makes the idle pool hold as many workers as the replicas still to come, within what Ray keeps idle (one
per unreserved CPU: it stops idle workers beyond that after a second). It runs that many small tasks at once, each
on a worker of its own: tasks of the driver's job, like the replicas, so Ray hands the same workers on. Where
the pool already has them no process starts; each task ends once all have started, and its worker goes back idle.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BARRIER_TIMEOUT_S = 60.0  # a preloading worker's start imports torch: seconds, more on a busy host


def _meet(directory: str, count: int, timeout: float) -> int:
    """Runs in a Ray worker: sign in under ``directory`` and wait until ``count`` workers have; its pid."""
    pid = os.getpid()
    Path(directory, str(pid)).touch()
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


def wanted(ceiling: int, replicas: int, free_cpus: float) -> int:
    """Idle workers to hold: one per replica a scale-up may still add, no more than Ray keeps idle."""
    return max(0, min(ceiling - replicas, int(free_cpus)))


def top_up(ray: Any, count: int, timeout: float = BARRIER_TIMEOUT_S) -> set[int]:
    """Run ``count`` tasks at once on this node, each on a worker of its own: afterwards the idle pool holds at
    least ``count`` workers (if Ray keeps that many). The workers' pids; fewer where the wait timed out."""
    if count < 1:
        return set()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    meet = ray.remote(num_cpus=0, max_retries=0)(_meet).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), name="warmserve.pool"
    )
    with tempfile.TemporaryDirectory(prefix="warmserve-pool-") as directory:
        pids = ray.get([meet.remote(directory, count, timeout) for _ in range(count)], timeout=timeout + 30)
    return set(pids)


def running_replicas(ray_serve: Any, app: str) -> int:
    """Replicas of ``app`` that hold a worker: running, starting or stopping."""
    status = ray_serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(sum(d.replica_states.values()) for d in status.deployments.values())


def ceiling(config_app: dict[str, Any]) -> int:
    """The most replicas the application's autoscaling may run (0: nothing autoscales)."""
    deployments = config_app.get("deployments") or []
    return sum(int((d.get("autoscaling_config") or {}).get("max_replicas") or 0) for d in deployments)


__all__ = ["ceiling", "running_replicas", "top_up", "wanted"]
