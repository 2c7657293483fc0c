"""What the benchmark scripts share: running `warmserve build --json` in a fresh process, `warmserve run` in a
fresh HOME, OIP binary requests and a steady load of them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build_command(
    model: str,
    backend: str,
    cache_dir: str | Path,
    *,
    device: str | None = None,
    shared: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "warmserve.deployments.cli",
        "build",
        model,
        "--backend",
        backend,
        "--cache-dir",
        str(cache_dir),
        "--json",
        *extra,
    ]
    if device:
        cmd += ["--device", device]
    if shared:
        cmd += ["--shared-cache", shared]
    return cmd


def build_env(inductor_dir: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A fresh Inductor cache per process, so that only warmserve's cache can help a warm start."""
    return {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
        "PYTHONPATH": str(ROOT),
        "WARMSERVE_SIGNING_KEY": os.environ.get("WARMSERVE_SIGNING_KEY", "bench-signing-key"),  # as in production
        **(extra or {}),
    }


def run_json(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """A command that ends its output with a JSON report (a build, a replica): that report plus ``ok``,
    ``process_s`` and the lines it logged; a crash or timeout is reported, not raised."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout}s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        return {"ok": False, "error": why, "stderr": p.stderr[-2000:], "process_s": wall}
    report = json.loads(p.stdout.strip().splitlines()[-1])
    return {"ok": True, **report, "process_s": wall, "logged": p.stderr.splitlines()}


def run_build(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """`warmserve build --json`'s report plus ``ok`` and ``process_s``."""
    report = run_json(cmd, env, timeout)
    report.pop("logged", None)
    return report


class Service:
    """A `warmserve run` started by `warmserve_run`: its process, log, and seconds to its ready line."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ready_s: float) -> None:
        self.proc, self.log, self.ready_s = proc, log, ready_s
        self.exit_code: int | None = None


@contextmanager
def warmserve_run(
    args: Sequence[str], home: Path, timeout: float = 900, env: Mapping[str, str] | None = None
) -> Iterator[Service]:
    """`warmserve run ARGS` from the checkout in ``home`` as a fresh HOME (no RAY_* or WARMSERVE_* variables but
    those of ``env``), once it has printed its ready line; stopped with SIGTERM on the way out (``exit_code`` then
    says how it ended). A RuntimeError with the log's tail if it exits or is not ready within ``timeout`` s."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WARMSERVE_"))}
    environ.update(HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")])))
    environ.update(env or {})
    log = home / "run.log"
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "warmserve.deployments.cli", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=ROOT,
        )
    service = Service(proc, log, 0.0)
    try:
        while "ready on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"warmserve run did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        service.ready_s = time.monotonic() - t0
        yield service
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            service.exit_code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            service.exit_code = proc.wait()


def ready_line(service: Service, timeout: float = 10) -> dict[str, Any]:
    """The JSON line `warmserve run --json` prints once ready (it follows the "ready on" line that
    `warmserve_run` waits for)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in service.log.read_text().splitlines():
            if line.startswith('{"ready"'):
                return dict(json.loads(line))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no JSON ready line in {service.log} (was --json given?)")
        time.sleep(0.1)


def host_facts() -> dict[str, Any]:
    """The machine a result was measured on: cores, Python, torch, and the GPU if there is one."""
    import platform

    import torch

    facts: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def cache_named(results: dict[str, Any], cache: str | Path) -> dict[str, Any]:
    """``results`` with the engine cache's absolute path written CACHE wherever a whole path starts with it: the
    path (a temp dir, or --cache-dir) is this machine's."""
    text = json.dumps(results)
    for path in {str(Path(cache).absolute()), str(Path(cache).resolve())}:
        text = re.sub(re.escape(json.dumps(path)[1:-1]) + r'(?=[/"])', "CACHE", text)
    named: dict[str, Any] = json.loads(text)
    return named


def write_results(out: Path, stem: str, results: dict[str, Any], markdown: str) -> None:
    """``results`` as ``out/stem.json`` and its ``markdown`` as ``out/stem.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown)


def binary_request(x: Any) -> tuple[bytes, dict[str, str]]:
    """An OIP request for the numpy array ``x`` with the binary tensor extension, as tritonclient sends it
    (binary outputs asked for too)."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input__0",
                    "shape": list(x.shape),
                    "datatype": {"float32": "FP32", "uint8": "UINT8"}[str(x.dtype)],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"}
    return head + x.tobytes(), headers


def must(report: dict[str, Any]) -> dict[str, Any]:
    if not report["ok"]:
        raise RuntimeError(f"build failed: {report['error']}\n{report.get('stderr', '')}")
    return report


class Load:
    """``clients`` threads sending ``x`` back to back as binary OIP requests; records (start, seconds, version)
    of each answer `answer` accepts, on ``time.monotonic``'s clock, and the failures (counted, never stopping
    the load)."""

    def __init__(self, url: str, x: Any, clients: int) -> None:
        self.url = url
        self.body, self.headers = binary_request(x)
        self.records: list[tuple[float, float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def answer(self, r: Any) -> str:
        """The version that answered ``r`` (a requests Response), or raise saying what is wrong with it."""
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        n = int(r.headers.get("Inference-Header-Content-Length", len(r.content)))
        return str(json.loads(r.content[:n])["model_version"])

    def _run(self) -> None:
        import requests

        session = requests.Session()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                version = self.answer(session.post(self.url, data=self.body, headers=self.headers, timeout=120))
                self.records.append((t0, time.monotonic() - t0, version))
            except Exception as e:
                self.failures.append((t0, repr(e)[:300]))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def between(self, t0: float, t1: float) -> list[float]:
        """Seconds of the requests started in [t0, t1) (``time.monotonic``)."""
        return [s for start, s, _ in self.records if t0 <= start < t1]
