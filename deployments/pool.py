"""Enough idle Ray workers, started with the cluster, for the replicas a scale-up will ask for.

With preloading (deployments/preload.py) a Ray worker imports torch and the app as it starts, so a replica that
Serve hands to an idle worker skips those seconds. Ray starts one worker per CPU it counts when the first driver
connects, and keeps up to one idle worker per unreserved CPU. Serve's own actors take some of those workers for
good (its controller, the HAProxy manager, the fallback proxy, the peer tier's two): on a 16-core host 10 were
left, so a scale-up from 1 to 12 replicas put the last ones on new processes, 6-7 s later than the others.

A replica cannot be given a worker started ahead any other way: Ray hands an actor only a worker that has never
run a task, and one that never held a GPU share only to work that holds none. So a local cluster that preloads
counts more CPUs than the host has (`ray_cpus`): Ray starts a worker for every replica the autoscaling may add
beside its own actors. Nothing is placed on the extra CPUs: the replica ceiling comes from the real cores
(deployments/host.py), and Serve's actors reserve none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from warmserve.deployments.errors import StartError

SERVE_ACTORS = 5  # workers Serve and warmserve hold for good besides the replicas (measured: 5 on a GPU host)
SPARE = 2


def ceiling(config_app: dict[str, Any]) -> int:
    """The most replicas the application's autoscaling may run (0: nothing autoscales)."""
    deployments = config_app.get("deployments") or []
    return sum(int((d.get("autoscaling_config") or {}).get("max_replicas") or 0) for d in deployments)


def ray_cpus(cpus: int, replicas: int) -> int:
    """The CPUs a local Ray should count so that it starts a worker for each of ``replicas`` beside Serve's own
    actors: the host's ``cpus``, or more."""
    return max(cpus, replicas + SERVE_ACTORS + SPARE)


def raised_cpus(config_app: dict[str, Any], cpus: int, environ: Mapping[str, str]) -> int | None:
    """The CPUs a local Ray that preloads should count for ``config_app`` on a host of ``cpus``, where that is
    more than the host has; None where nothing autoscales past one replica, the host has enough, or
    ``WARMSERVE_PRELOAD_POOL=0``."""
    choice = environ.get("WARMSERVE_PRELOAD_POOL", "")
    if choice not in ("", "0", "1"):
        raise StartError(f"WARMSERVE_PRELOAD_POOL must be 0 or 1, got {choice!r}")
    replicas = ceiling(config_app)
    wanted = ray_cpus(cpus, replicas)
    if replicas < 2 or wanted <= cpus or choice == "0":
        return None
    return wanted


__all__ = ["SERVE_ACTORS", "ceiling", "raised_cpus", "ray_cpus"]
