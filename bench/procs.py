"""What a soak samples of a process: RSS, threads, open files, memory mappings (from /proc) and GPU memory
(from nvidia-smi), and how much each grew from a baseline sample."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.e2e.cluster import RayCluster, ray_processes

# Serve's own actors, sampled beside the replicas: every rollout is a config update they process.
SERVE_ACTORS = ("ServeController", "ProxyActor")
MEASURES = ("rss_kib", "threads", "fds", "maps")


def proc_stats(pid: int) -> dict[str, int] | None:
    """The process's resident set (VmRSS, KiB), threads, open file descriptors and memory mappings; None
    if it is gone. The counts have no allocator noise: a leaked thread, file or mapped library shows as is."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {
            "rss_kib": int(status["VmRSS"].split()[0]),
            "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "maps": len(Path(f"/proc/{pid}/maps").read_text().splitlines()),
        }
    except (OSError, ValueError, KeyError, IndexError):
        return None


def gpu_mib() -> dict[int, float] | None:
    """GPU memory per process id from nvidia-smi, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used: dict[int, float] = {}
    for row in csv.reader(io.StringIO(out)):
        try:
            used[int(row[0])] = used.get(int(row[0]), 0.0) + float(row[1])
        except (ValueError, IndexError):
            continue
    return used


def serve_actors(cluster: RayCluster) -> dict[str, int]:
    """The pids of this cluster's Serve controller and proxy: children of its raylet, which names the
    cluster's temp dir (another cluster's actors on this machine are not its children)."""
    daemons = set(ray_processes(str(cluster.tempdir)))
    found: dict[str, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        name = cmd.removeprefix("ray::").split(".")[0].strip()
        if ppid in daemons and name in SERVE_ACTORS:
            found[name] = int(pid)
    return found


class Sampler:
    """The named processes, sampled on demand: seconds since start, rollouts done, and per measure (``rss_kib``,
    ``threads``, ``fds``, ``maps``, and ``gpu_mib`` where nvidia-smi runs) a value per name (None: gone)."""

    def __init__(self, pids: dict[str, int], t0: float) -> None:
        self.pids, self.t0 = pids, t0
        self.samples: list[dict[str, Any]] = []

    def sample(self, rollouts: int) -> None:
        stats = {name: proc_stats(pid) for name, pid in self.pids.items()}
        s: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2), "rollouts": rollouts}
        for key in MEASURES:
            s[key] = {name: None if st is None else st[key] for name, st in stats.items()}
        gpu = gpu_mib()
        if gpu is not None:
            s["gpu_mib"] = {name: gpu.get(pid) for name, pid in self.pids.items() if name.startswith("replica")}
        self.samples.append(s)


def growth(samples: list[dict[str, Any]], key: str, base: int) -> dict[str, dict[str, Any]]:
    """Per process: the first sample, the baseline (sample ``base``), the last, the max, and the growth
    from the baseline to the last, in total and per rollout (``key``: one of MEASURES or ``gpu_mib``)."""
    if not samples or samples[0].get(key) is None:
        return {}
    names = list(samples[0][key])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        series = [s[key].get(name) for s in samples]
        if all(v is None for v in series):  # nvidia-smi lists no process of another PID namespace
            out[name] = {"unseen": True}
            continue
        if any(v is None for v in series):  # the process went away: its numbers would compare two processes
            out[name] = {"gone_at_sample": series.index(None)}
            continue
        first, start, end = series[0], series[base], series[-1]
        rollouts = samples[-1]["rollouts"] - samples[base]["rollouts"]
        out[name] = {
            "first": first,
            "start": start,
            "end": end,
            "max": max(series),
            "growth": end - start,
            "growth_per_rollout": (end - start) / rollouts if rollouts else None,
        }
    return out
