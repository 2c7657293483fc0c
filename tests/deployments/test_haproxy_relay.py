"""bench/haproxy_relay.py, shortened for CI: Ray Serve's HAProxy binary with the buffers `warmserve run` sets
relays requests several times larger than those buffers, whole, over gRPC and HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from warmserve.deployments import runner

ROOT = Path(__file__).resolve().parents[2]


def relay(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The script in a session of its own, so that a timeout stops its HAProxies with it."""
    proc = subprocess.Popen(
        [sys.executable, "bench/haproxy_relay.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"bench/haproxy_relay.py ran past {timeout} s: {err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_haproxy_relays_requests_larger_than_its_buffers_whole(tmp_path: Path) -> None:
    bufsize = int(runner.HAPROXY_TUNING["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"])
    sizes = [4096, 4 * bufsize + 1]
    done = relay(
        "--rounds", "3", "--sizes", ",".join(map(str, sizes)), "--out", str(tmp_path), "--tag", "ci",
        "--variant", "warmserve:",
    )  # fmt: skip
    # every answer is the byte count the sink read, checked by the script: one cut short ends it with an error
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "haproxy-relay-ci.json").read_text())["rows"]
    paths = {(r["bytes"], r["protocol"], r["path"]) for r in rows}
    assert paths == {(n, p, path) for n in sizes for p in ("grpc", "http") for path in ("sink", "warmserve")}
    relayed = [r for r in rows if r["path"] == "warmserve"]
    assert all(r["settings"]["bufsize"] == bufsize for r in relayed)  # warmserve run's own buffers


def test_a_variant_without_a_name_of_its_own_is_refused(tmp_path: Path) -> None:
    for variants in (["a:bufsize=65536", "a:bufsize=262144"], ["sink:"]):
        args = [w for v in variants for w in ("--variant", v)]
        done = relay("--rounds", "1", "--sizes", "4096", "--out", str(tmp_path), *args, timeout=120)
        assert done.returncode != 0 and "name" in done.stderr, done.stderr[-2000:]
