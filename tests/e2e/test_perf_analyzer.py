"""Triton's own perf_analyzer, unmodified, against warmserve over HTTP and gRPC (where its binary runs: the
perf-analyzer wheel needs glibc >= 2.38). The configuration endpoints it reads are checked against
tritonclient on every machine (tests/e2e/test_serve_app.py)."""

from __future__ import annotations

import csv
import io
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.cluster import RayCluster
from tests.e2e.helpers import TINY


def runnable(name: str) -> tuple[str | None, str]:
    """The binary ``name`` where it is installed and loads here, else None and why. tritonclient's older wheels
    bring a perf_analyzer of their own that cannot load its libraries on most machines (libb64): on the PATH
    is not enough."""
    path = shutil.which(name)
    needs = f"the perf-analyzer wheel needs glibc >= 2.38, this machine has {' '.join(platform.libc_ver())}"
    if path is None:
        return None, f"{name} is not installed (pip install perf-analyzer; {needs})"
    try:
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} does not run here ({e})"
    if "error while loading shared libraries" in done.stderr or done.returncode in (126, 127):
        first = (done.stderr.strip().splitlines() or ["?"])[0]
        return None, f"{path} does not run here ({first}; {needs})"
    return path, ""


PERF_ANALYZER, WHY_NOT = runnable("perf_analyzer")
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.skipif(PERF_ANALYZER is None, reason=WHY_NOT)]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_to_completion(cluster: RayCluster, tmp_path: Path, warm_cache: Path, protocol: str) -> None:
    assert PERF_ANALYZER is not None
    cluster.deploy(cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1}))
    port = cluster.http.rsplit(":", 1)[1] if protocol == "http" else str(cluster.grpc_port)
    report = tmp_path / "pa.csv"
    cmd = [PERF_ANALYZER, "-m", "tiny_cnn", "-u", f"127.0.0.1:{port}", "-i", protocol]
    cmd += ["--concurrency-range", "1:4:3", "--measurement-interval", "1500", "-f", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(report.read_text())))
    assert [int(r["Concurrency"]) for r in rows] == [1, 4]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
