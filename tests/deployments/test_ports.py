"""A busy port is reported with the process that holds it; an HAProxy that Ray Serve left behind is named as one,
with its pid and how to stop it, and `warmserve run` stops its own when Ray did not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from warmserve.deployments import ports, runner

NODE = "ab" * 28  # a Ray node id's form


@pytest.fixture
def orphan(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A process that looks like Ray Serve's HAProxy of node NODE (argv[0] named haproxy, `-f <node>/haproxy.cfg`),
    listening on a port, with no HAProxy manager above it and no raylet of its node."""
    haproxy = tmp_path / "bin" / "haproxy"
    haproxy.parent.mkdir()
    haproxy.symlink_to(os.path.realpath(sys.executable))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import socket, sys, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(300)"
    )
    cfg = tmp_path / "hap" / NODE / "haproxy.cfg"
    proc = subprocess.Popen([str(haproxy), "-c", code, "-db", "-f", str(cfg)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    try:
        yield proc, port
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_an_orphaned_haproxy_on_the_port_is_named_with_its_pid_and_how_to_stop_it(
    orphan: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = orphan
    (holder,) = ports.holders(port)
    assert holder.pid == proc.pid and holder.is_serve_haproxy and holder.node_id == NODE and holder.orphaned
    with pytest.raises(runner.StartError) as caught:
        runner.check_port("127.0.0.1", port)
    message = str(caught.value)
    assert "Ray Serve's HAProxy left behind by an earlier run" in message
    assert f"pid {proc.pid}" in message and f"kill {proc.pid}" in message and "--port" in message


def test_an_haproxy_whose_ray_node_is_alive_is_a_running_service(
    orphan: tuple[subprocess.Popen[bytes], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port = orphan
    monkeypatch.setattr(ports, "live_nodes", lambda: {NODE})  # its raylet still runs: not ours to kill
    with pytest.raises(runner.StartError, match="served by a running Ray Serve's HAProxy"):
        runner.check_port("127.0.0.1", port)


def test_another_program_on_the_port_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(runner.StartError) as caught:
            runner.check_port("127.0.0.1", port, flag="--grpc-port")
    assert f"already in use by pid {os.getpid()}" in str(caught.value) and "--grpc-port" in str(caught.value)


def test_the_haproxies_of_a_stopped_node_are_stopped(orphan: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = orphan
    assert ports.stop_haproxies("cd" * 28) == []  # another node's: left alone
    assert proc.poll() is None
    (stopped,) = ports.stop_haproxies(NODE, grace=5)
    assert stopped.pid == proc.pid
    assert proc.wait(10) is not None
    deadline = time.monotonic() + 5
    while ports.holders(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ports.holders(port) == []


def test_processes_are_found_by_the_environment_they_inherited() -> None:
    """Ray's agents rename themselves (``ray::DashboardAgent``), so their command line no longer says which
    cluster they are of; the environment they inherited from `warmserve run` still does: a run's processes are
    found by it, and another run's are left alone."""
    sleeper = "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(60)"
    started = []
    for marker in ("run-1", "run-2"):
        ready = Path(f"/tmp/warmserve-test-{os.getpid()}-{marker}")
        env = {**os.environ, runner.RUN_MARKER: marker}
        started.append((subprocess.Popen([sys.executable, "-c", sleeper, str(ready)], env=env), ready))
    try:
        for _, ready in started:
            deadline = time.monotonic() + 30
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        stopped = ports.stop_marked(runner.RUN_MARKER, "run-1", grace=5)
        assert [h.pid for h in stopped] == [started[0][0].pid]
        assert started[0][0].wait(10) == -15  # SIGTERM
        assert started[1][0].poll() is None  # another run's: left alone
        assert ports.stop_marked(runner.RUN_MARKER, "run-3") == []
    finally:
        for proc, ready in started:
            proc.kill()
            proc.wait()
            ready.unlink(missing_ok=True)


def test_rays_own_processes_are_found_by_the_logs_they_hold_open(tmp_path: Path) -> None:
    """Ray's agents write over their environment and command line as they rename themselves; the logs they hold
    open in their session's directory still say which Ray they are of. A user's `tail -f` of those logs is not
    Ray's, and is left alone."""
    log = tmp_path / "session" / "logs" / "dashboard_agent.out"
    log.parent.mkdir(parents=True)
    log.write_text("")
    agent = subprocess.Popen(["bash", "-c", f"exec -a ray::DashboardAgent tail -f {log}"])
    reader = subprocess.Popen(["tail", "-f", str(log)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            any(str(log) in link for link in ports._links(Path(f"/proc/{p.pid}/fd"))) for p in (agent, reader)
        ):
            time.sleep(0.05)
        stopped = ports.stop_marked(runner.RUN_MARKER, "no-such-run", session_dir=str(tmp_path / "session"))
        assert [h.pid for h in stopped] == [agent.pid] and agent.wait(10) == -15
        assert reader.poll() is None
    finally:
        for proc in (agent, reader):
            proc.kill()
            proc.wait()
