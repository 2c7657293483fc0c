"""Faults at the Ray level: a replica killed (SIGKILL) while it builds, and while a rollout is under way."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from tests.e2e.cluster import RayCluster
from tests.e2e.helpers import TINY, deploy_versions, infer, rollout
from tests.servers import SeaweedFS
from warmserve.cache import maintenance
from warmserve.cache.stores.remote import FsspecStore
from warmserve.serve.weights import save_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE_TTL = 4.0


def with_env(deployment: dict[str, Any], **env: str) -> dict[str, Any]:
    return {**deployment, "ray_actor_options": {"num_cpus": 0.5, "runtime_env": {"env_vars": env}}}


def wait_for_metric(cluster: RayCluster, name: str, timeout: float = 90) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = cluster.metrics().get(name)
        if samples and any(s.value > 0 for s in samples):
            return samples
        time.sleep(1)  # Ray's agent exports every second here (metrics_report_interval_ms)
    raise AssertionError(f"{name} never counted anything; have {sorted(cluster.metrics())}")


def test_replica_killed_during_a_build_another_takes_over_the_lease(
    cluster: RayCluster, s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    args = {
        **TINY,
        "cache_dir": str(tmp_path / "c"),
        "shared_cache": s3_url,
        "storage_options": s3_server.storage_options(),
    }
    deployment = with_env({"num_replicas": 2}, WARMSERVE_LEASE_TTL=str(LEASE_TTL), WARMSERVE_SIGNING_KEY="fault-key")
    cluster.deploy(cluster.config(args, deployment), wait=False)
    # The builder holds the build lease in the shared store; its document names the holder (host:pid).
    store = FsspecStore(s3_url, s3_server.storage_options())
    deadline = time.monotonic() + 180
    holder = None
    while holder is None and time.monotonic() < deadline:
        for name in store.listdir("leases"):
            try:
                holder = json.loads(store.read(f"leases/{name}"))["owner"]
            except FileNotFoundError:
                continue
        time.sleep(0.2)
    assert holder, "no replica ever took the build lease"
    pid = int(holder.rsplit(":", 1)[1])
    time.sleep(1.0)  # well into the build (compiling takes seconds)
    os.kill(pid, signal.SIGKILL)

    cluster.wait_running("warmserve", timeout=300, replicas=2)
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16), dtype=np.float32)
    out, _ = infer(cluster, x)
    assert out.shape == (2, 10)
    statuses = cluster.replica_statuses(2)
    assert pid not in statuses
    outcomes = sorted(s["start"]["outcome"] for s in statuses.values())
    # The waiter took over the dead builder's lease and built; Serve's replacement replica then found it.
    assert outcomes.count("built") == 1, outcomes
    assert wait_for_metric(cluster, "ray_warmserve_cache_lease_takeovers")
    # Nothing half-written: the one shared entry verifies (size, digest, signature).
    from warmserve.cache import CacheConfig, EngineCache

    config = CacheConfig.load(
        environ={},
        cache_dir=tmp_path / "check",
        shared_url=s3_url,
        storage_options=s3_server.storage_options(),
        signing_key=b"fault-key",
    )
    shared = EngineCache.from_config(config).shared
    assert shared is not None
    entries = maintenance.entries(shared.store)
    assert len(entries) == 1 and maintenance.verify(shared.store, entries[0].key_id, shared.signing_key) is None


def test_replica_killed_during_a_rollout(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16), dtype=np.float32)
    _, want, before = deploy_versions(cluster, tmp_path, (31, 32), x, app={"cache_dir": str(warm_cache)})
    stop = threading.Event()
    results: list[tuple[float, np.ndarray, str]] = []
    errors: list[tuple[float, str]] = []  # first attempts that failed
    lost: list[str] = []  # requests that failed even after a client retry

    def load() -> None:
        while not stop.is_set():
            for attempt in range(3):
                try:
                    out, version = infer(cluster, x)
                    results.append((time.monotonic(), out, version))
                    break
                except requests.RequestException as e:
                    errors.append((time.monotonic(), repr(e)))
                    if attempt == 2:
                        lost.append(repr(e))
                    time.sleep(0.5)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        cmd = [
            sys.executable,
            "-m",
            "warmserve.deployments.cli",
            "rollout",
            "--weights",
            str(tmp_path / "v2.safetensors"),
            "--version",
            "v2",
            "--address",
            cluster.dashboard,
            "--http",
            cluster.http,
            "--wait",
            "180",
        ]
        env = {**{k: v for k, v in os.environ.items() if k != "WARMSERVE_ADMIN_TOKEN"}, **cluster.auth_env}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # Kill one replica as soon as Serve starts applying the new config.
        deadline = time.monotonic() + 60
        while cluster.app_status() == "RUNNING" and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = min(before)
        killed_while_rolling_out = proc.poll() is None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=240)
        assert killed_while_rolling_out, "the rollout finished before the replica was killed"
        assert proc.returncode == 0, stderr
        done_at = time.monotonic()
        cluster.wait_running("warmserve", timeout=240, replicas=2)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert lost == [], lost
    # Only requests in flight on the killed replica failed (and their retry succeeded).
    assert len(errors) <= len(threads), errors
    assert all(at >= killed_at - 1 for at, _ in errors), errors
    for _, out, version in results:
        np.testing.assert_allclose(out, want[version], rtol=1e-4, atol=1e-5)
    after = cluster.replica_statuses(2)
    assert victim not in after
    assert all(s["weights_version"] == "v2" for s in after.values()), after
    # The replacement started warm, from this node's cache, straight on the new weights.
    (replacement,) = [s for pid, s in after.items() if pid not in before]
    assert replacement["start"]["outcome"] == "local-hit", replacement
    assert {v for at, _, v in results if at > done_at} == {"v2"}, "after the rollout only v2 is served"


def kill_and_replace(cluster: RayCluster, victim: int) -> dict[int, dict[str, Any]]:
    """SIGKILL one replica and wait until Serve runs two again; the statuses of the two."""
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, TimeoutError, ValueError, KeyError):
            statuses = cluster.replica_statuses(2, timeout=20)
            if len(statuses) == 2 and victim not in statuses:
                return statuses
        time.sleep(1)
    raise AssertionError("Serve did not replace the killed replica")


def test_refused_rollout_then_replica_killed_serves_the_last_good_weights(
    cluster: RayCluster, tmp_path: Path, warm_cache: Path
) -> None:
    """v2 (good), v8 (refused by every replica), then a replica dies: its replacement serves v2, never the
    refused weights and never the base weights. A label reused for other content is refused up front. A
    weights file changed behind the rollout's back keeps a replacement unready, saying why."""
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16), dtype=np.float32)
    (_, v2), want, before = deploy_versions(cluster, tmp_path, (41, 42), x, app={"cache_dir": str(warm_cache)})
    nan = dict(v2)
    nan["head.bias"] = torch.full_like(v2["head.bias"], float("nan"))
    save_weights(nan, tmp_path / "nan.safetensors")

    assert rollout(cluster, tmp_path / "v2.safetensors", "v2").returncode == 0
    refused = rollout(cluster, tmp_path / "nan.safetensors", "v8")
    assert refused.returncode == 1 and "refused v8" in refused.stderr, refused.stderr
    assert "previous config (v2) is restored" in refused.stderr
    reused = rollout(cluster, tmp_path / "nan.safetensors", "v2")
    assert reused.returncode == 2 and "v2 already names other weights" in reused.stderr, reused.stderr
    live = cluster.api("GET").json()["applications"]["warmserve"]["deployed_app_config"]["deployments"][0]
    assert live["user_config"]["weights"] == str(tmp_path / "v2.safetensors")
    assert live["user_config"]["weights_version"] == "v2"

    after = kill_and_replace(cluster, min(before))
    assert all(s["weights_version"] == "v2" for s in after.values()), after
    for _ in range(8):  # every answer, from either replica, is v2's
        out, version = infer(cluster, x)
        assert version == "v2"
        np.testing.assert_allclose(out, want["v2"], rtol=1e-4, atol=1e-5)

    # Someone overwrites the v2 file; the next replacement must not serve those weights as v2.
    save_weights(nan, tmp_path / "v2.safetensors")
    survivor, victim = sorted(after)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    message = ""
    while time.monotonic() < deadline and "changed" not in message:
        app = cluster.api("GET").json()["applications"]["warmserve"]
        message = json.dumps(app.get("deployments", {}).get("WarmModel", {}).get("message", ""))
        time.sleep(0.5)
    assert "changed" in message and "v2.safetensors" in message, message
    assert set(cluster.replica_statuses(2, timeout=10)) == {survivor}  # only the good replica takes traffic
    out, version = infer(cluster, x)
    assert version == "v2"
    np.testing.assert_allclose(out, want["v2"], rtol=1e-4, atol=1e-5)
