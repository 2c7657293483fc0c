"""Enough idle Ray workers, started with the cluster, for the replicas a scale-up will ask for.

With preloading (deployments/preload.py) a Ray worker imports torch and the app as it starts, so a replica that
Serve hands to an idle worker skips those seconds. Ray starts one worker per CPU it counts when the first driver
connects (no more at once than its start-up concurrency), and keeps up to one idle worker per unreserved CPU.
Serve's own actors and the first replica take some of those workers for good: on a 16-core host 9 were left, so
a scale-up from 1 to 11 or 12 replicas put the last ones on new processes, 6-7 s later than the others.

A replica cannot be given a worker started ahead any other way: Ray hands an actor only a worker that has never
run a task, and keeps a worker that ran work without a GPU share for such work. So a local cluster that preloads
counts more CPUs than the host has (`ray_cpus`): Ray starts a worker for every replica the autoscaling may add
beside its own actors. No replica lands on the extra CPUs: the count is raised only where the autoscaling's
``max_replicas`` already fits the real cores at each replica's ``num_cpus`` (deployments/host.py caps it so on a
GPU host, unless the config sets ``num_gpus`` and a larger maximum itself), and Serve's actors reserve none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from warmserve.deployments.errors import StartError

# Workers that Serve and warmserve hold for good besides the replicas, as counted with the HAProxy ingress (16
# workers started on the H100 host and 9 on the 2-core CPU; 9 and 2 idle once the first replica ran): Serve's
# controller, HAProxy manager and proxy actors, the peer tier's index and node reader. SPARE: one more.
SERVE_ACTORS = 6
SPARE = 1


def ceiling(config_app: dict[str, Any], cpus: int) -> int:
    """The most replicas the application's autoscaling may run at once on ``cpus`` cores; 0 where nothing
    autoscales, or where a ``max_replicas`` exceeds what the cores hold (Ray's own count of CPUs is then what
    keeps replicas off cores that are not there, and must stay)."""
    total = 0
    for d in config_app.get("deployments") or []:
        top = int((d.get("autoscaling_config") or {}).get("max_replicas") or 0)
        num_cpus = float((d.get("ray_actor_options") or {}).get("num_cpus", 1) or 0)
        if top and (num_cpus <= 0 or top > math.floor(cpus / num_cpus)):
            return 0
        total += top
    return total


def ray_cpus(cpus: int, replicas: int) -> int:
    """The CPUs a local Ray should count so that it starts a worker for each of ``replicas`` beside Serve's own
    actors: the host's ``cpus``, or more."""
    return max(cpus, replicas + SERVE_ACTORS + SPARE)


def raised_cpus(config_app: dict[str, Any], cpus: int, environ: Mapping[str, str]) -> int | None:
    """The CPUs a local Ray that preloads should count for ``config_app`` on a host of ``cpus``, where that is
    more than the host has; None where nothing autoscales past one replica within the cores, the host has
    enough, or ``WARMSERVE_PRELOAD_POOL=0``."""
    choice = environ.get("WARMSERVE_PRELOAD_POOL", "")
    if choice not in ("", "0", "1"):
        raise StartError(f"WARMSERVE_PRELOAD_POOL must be 0 or 1, got {choice!r}")
    replicas = ceiling(config_app, cpus)
    wanted = ray_cpus(cpus, replicas)
    if replicas < 2 or wanted <= cpus or choice == "0":
        return None
    return wanted


__all__ = ["SERVE_ACTORS", "SPARE", "ceiling", "raised_cpus", "ray_cpus"]
