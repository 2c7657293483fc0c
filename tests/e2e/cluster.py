"""A real local Ray cluster for the end-to-end tests: `ray start` processes, the dashboard's REST API."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
# Ray 2.60 reads no RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S yet: a test that autoscales fast sets its
# config's metrics_interval_s.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def ray_processes(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (a Ray temp dir: every Ray daemon names its session dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def processes(marker: bytes) -> list[int]:
    """Processes whose command line (or title: Ray names an actor's process after its class) holds ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def stop_ray(marker: str, grace: float = 3.0, timeout: float = 15.0) -> None:
    """SIGTERM, then after ``grace`` seconds SIGKILL, the Ray daemons of one cluster (a test's cluster keeps
    nothing worth a longer wait); its workers exit with their raylet."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        for pid in ray_processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while ray_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def haproxy_files(tempdir: Path) -> dict[str, str]:
    """Ray Serve's HAProxy with its files in a Ray temp dir (so that `stop_ray` on it finds the HAProxy
    process too) and its listeners on free ports (Ray's defaults are fixed ports two clusters would share).
    Ray adds a directory per node: the paths stay short for Unix sockets."""
    base = tempdir / "hap"
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }


@dataclass
class RayCluster:
    """Token authentication on, as Ray ships it for ``ray.init`` clusters: every dashboard call sends the
    token. The cluster's HOME holds a stale token file, which the explicit token must win over."""

    workdir: Path
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    node_metrics_ports: list[int] = field(default_factory=list)  # of the nodes added to the head
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    # Ray's socket paths must stay short: its temp dir lives directly under the system temp dir.
    tempdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="wsray-")))
    # The deployments' graceful_shutdown_wait_loop_s, when set. Serve's default, 2 s, is the least an idle
    # replica waits before it stops; the tests send nothing while they replace or delete one, and make dozens.
    stop_wait_s: float | None = None

    @property
    def auth_env(self) -> dict[str, str]:
        """What a client of this cluster needs in its environment (`warmserve rollout`, for one)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def api(self, method: str, body: dict[str, Any] | None = None) -> requests.Response:
        """The dashboard's Serve REST API, authenticated."""
        headers = {**self.headers, "content-type": "application/json"} if body is not None else self.headers
        data = json.dumps(body) if body is not None else None
        return requests.request(
            method, f"{self.dashboard}/api/serve/applications/", headers=headers, data=data, timeout=30
        )

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _env(self, node: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        home = self.workdir / "home"
        (home / ".ray").mkdir(parents=True, exist_ok=True)
        (home / ".ray" / "auth_token").write_text("a-stale-token-from-another-cluster")
        env = {**os.environ, **RAY_ENV, **self.auth_env, **self.env, **(extra or {}), "HOME": str(home)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
            env = {**haproxy_files(self.tempdir), **env}
        env["WARMSERVE_CACHE_DIR"] = str(self.workdir / node / "cache")
        return env

    def start(self, num_cpus: int = 4) -> RayCluster:
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--temp-dir={self.tempdir}",
            f"--port={self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            f"--metrics-export-port={self.metrics_port}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            '--resources={"node1": 100}',
            '--system-config={"metrics_report_interval_ms": 1000}',
        ]
        subprocess.run(cmd, env=self._env("node1"), check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        code = None
        while True:
            try:
                code = self.api("GET").status_code
                if code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()  # never leave a cluster behind
                raise TimeoutError(f"the Ray dashboard did not come up (last answer: {code})")
            time.sleep(0.5)

    def _node_metrics_port(self) -> int:
        self.node_metrics_ports.append(free_port())
        return self.node_metrics_ports[-1]

    def add_node(self, name: str, num_cpus: int = 2, env: dict[str, str] | None = None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            f"--address=127.0.0.1:{self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f'--resources={{"{name}": 100}}',
            f"--metrics-export-port={self._node_metrics_port()}",
        ]
        subprocess.run(cmd, env=self._env(name, env), check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        """Stop this cluster's processes only (`ray stop` would stop every Ray cluster on the machine)."""
        stop_ray(str(self.tempdir))
        # The head's Ray client server names only the GCS address, not the temp dir.
        stop_ray(f":{self.gcs_port} --host=")
        shutil.rmtree(self.tempdir, ignore_errors=True)

    # -- Serve ---------------------------------------------------------------------------------
    def config(self, args: dict[str, Any], deployment: dict[str, Any], name: str = "warmserve") -> dict[str, Any]:
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "grpc_options": {
                "port": self.grpc_port,
                "grpc_servicer_functions": ["warmserve.deployments.oip_grpc.add_inference_service"],
            },
            "applications": [
                {
                    "name": name,
                    "route_prefix": "/",
                    "import_path": "warmserve.deployments.app:build_app",
                    "args": args,
                    "deployments": [
                        {
                            "name": "WarmModel",
                            "ray_actor_options": {"num_cpus": 0.5},
                            **({"graceful_shutdown_wait_loop_s": self.stop_wait_s} if self.stop_wait_s else {}),
                            **deployment,
                        }
                    ],
                }
            ],
        }

    def deploy(self, config: dict[str, Any], timeout: float = 240, wait: bool = True) -> None:
        r = self.api("PUT", config)
        assert r.status_code == 200, r.text
        if wait:
            self.wait_running(config["applications"][0]["name"], timeout)

    def app_status(self, app: str = "warmserve") -> str | None:
        details = self.api("GET").json()
        return (details.get("applications") or {}).get(app, {}).get("status")

    def metrics(self, prefix: str = "ray_warmserve") -> dict[str, list[Any]]:
        """Samples of every metric family on Ray's metrics endpoint whose name starts with ``prefix``."""
        from prometheus_client.parser import text_string_to_metric_families

        found: dict[str, list[Any]] = {}
        for port in [self.metrics_port, *self.node_metrics_ports]:  # each node exports its own processes'
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for f in text_string_to_metric_families(text):
                if f.name.startswith(prefix):
                    found.setdefault(f.name, []).extend(f.samples)
        return found

    def wait_running(self, app: str, timeout: float = 240, replicas: int | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            details = self.api("GET").json()
            last = (details.get("applications") or {}).get(app, {})
            dep = (last.get("deployments") or {}).get("WarmModel", {})
            running = [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]
            if last.get("status") == "RUNNING" and (replicas is None or len(running) == replicas):
                return last
            if last.get("status") == "DEPLOY_FAILED":
                raise AssertionError(f"deploy failed: {last.get('message')}")
            time.sleep(0.25)
        raise TimeoutError(f"{app} not RUNNING with {replicas} replicas: {json.dumps(last)[:2000]}")

    def delete_all(self) -> None:
        self.api("DELETE")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            details = self.api("GET").json()
            if not details.get("applications"):
                return
            time.sleep(0.25)

    def replica_statuses(self, expect: int, timeout: float = 60) -> dict[int, dict[str, Any]]:
        """``/v1/status`` of every replica (requests land on random replicas; sample until all seen)."""
        seen: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < expect and time.monotonic() < deadline:
            s = requests.get(f"{self.http}/v1/status", timeout=30).json()
            seen[s["replica_pid"]] = s
        return seen
