"""bench/haproxy_relay.py, shortened for CI: Ray Serve's HAProxy binary with the buffers `warmserve run` sets
relays requests larger than its buffers whole, over gRPC and HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from warmserve.deployments import runner

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_haproxy_relays_requests_larger_than_its_buffers(tmp_path: Path) -> None:
    bufsize = int(runner.HAPROXY_TUNING["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"])
    sizes = f"4096,{4 * bufsize + 1}"
    cmd = [sys.executable, "bench/haproxy_relay.py", "--rounds", "3", "--sizes", sizes, "--out", str(tmp_path)]
    cmd += ["--variant", f"warmserve:bufsize={bufsize}", "--tag", "ci"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "haproxy-relay-ci.json").read_text())["rows"]
    seen = {(r["bytes"], r["protocol"], r["path"]) for r in rows}
    paths = ("sink", "warmserve")
    assert seen == {(int(n), p, path) for n in sizes.split(",") for p in ("grpc", "http") for path in paths}
    # every answer is the byte count the sink read, checked: a request cut short would have ended the run
    assert all(r["p50_ms"] > 0 for r in rows)
    assert "| warmserve |" in (tmp_path / "haproxy-relay-ci.md").read_text()
