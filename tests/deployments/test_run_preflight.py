"""`warmserve run` with the mistakes people make: one clear line and an exit, before any Ray process starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.servers import free_port
from warmserve.deployments import cli, runner
from warmserve.deployments.errors import StartError
from warmserve.serve.model import build_model
from warmserve.serve.weights import demo_weights, save_weights

TINY = ["--model", "tests.serve.models:tiny_cnn", "--input-shape", "3,16,16", "--batch", "1:8"]


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fail the test if anything tries to start or join Ray; no stale cluster address from elsewhere."""
    import ray

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("Ray was started although the run should have stopped before")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    t0 = time.monotonic()
    code = cli.main(["run", *argv])
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 60, "a mistake must not wait for anything"
    return code, err


def test_mistakes_are_reported_before_ray_starts(
    no_ray: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = ["--cache-dir", str(tmp_path / "c"), "--port", str(free_port())]
    wide = tmp_path / "wide.safetensors"
    save_weights(demo_weights(build_model("tests.serve.models:tiny_cnn_wide")), wide)
    (tmp_path / "notes.pt").write_bytes(b"not weights at all")
    cases = [
        (["--model", "torchvision:resnet_nope", *cache], "torchvision has no model 'resnet_nope'"),
        ([*TINY, "--weights", str(tmp_path / "absent.safetensors"), *cache], "cannot read weights"),
        ([*TINY, "--weights", str(wide), *cache], "weights do not fit the model"),
        ([*TINY, "--weights", str(tmp_path / "notes.pt"), *cache], "neither safetensors nor a torch state dict"),
        ([*TINY, "--backend", "tensorrt", *cache], "backend 'tensorrt' cannot run on cpu"),
        ([*TINY, "--shared-cache", "s3://bucket/warmserve", *cache], "WARMSERVE_SIGNING_KEY"),
        ([*TINY, "--batch", "8:1", *cache], "batch range"),
    ]
    for argv, message in cases:
        code, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err


def test_a_busy_port_names_the_option(no_ray: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, err = run(capsys, *TINY, "--cache-dir", str(tmp_path / "c"), "--port", str(s.getsockname()[1]))
    assert code == 2 and "already in use" in err and "--port" in err


def test_a_busy_grpc_port_names_its_option(no_ray: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        argv = ["--port", str(free_port()), "--grpc-port", str(s.getsockname()[1])]
        code, err = run(capsys, *TINY, "--cache-dir", str(tmp_path / "c"), *argv)
    assert code == 2 and "already in use" in err and "--grpc-port" in err


def test_a_stale_cluster_address_is_named_with_the_fix(
    no_ray: None, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "raytmp" / "ray").mkdir(parents=True)
    (tmp_path / "raytmp" / "ray" / "ray_current_cluster").write_text(dead)  # where `ray start` notes it
    code, err = run(capsys, *TINY, "--cache-dir", str(tmp_path / "c"), "--port", str(free_port()))
    assert code == 2 and dead in err and "ray stop --force" in err
    monkeypatch.setenv("RAY_ADDRESS", dead)
    code, err = run(capsys, *TINY, "--cache-dir", str(tmp_path / "c"), "--port", str(free_port()))
    assert code == 2 and "RAY_ADDRESS" in err and "unset RAY_ADDRESS" in err


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "raytmp"), "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", "warmserve.deployments.cli", "run", "--model", "torchvision:resnet_nope", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: torchvision has no model 'resnet_nope' (did you mean ") and "resnet18" in line
    assert not (tmp_path / "raytmp").exists(), "Ray left files behind: it was started"


def test_deployment_failure_reason_is_one_line() -> None:
    message = (
        "Deploying application warmserve failed: The deployment failed to start 3 times in a row. This may be "
        "due to a problem with its constructor or initial health check failing. See controller logs for "
        "details. Error:\nray::ServeReplica:warmserve:WarmModel.initialize_and_get_metadata() (pid=1, ip=x)\n"
        '  File "replica.py", line 1, in initialize\n    raise RuntimeError(traceback.format_exc()) from None\n'
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "app.py", line 3, in __init__\n'
        "warmserve.deployments.errors.ReplicaStartError: this replica cannot serve the configured weights v2 (/w): "
        "/w changed\n"
    )
    assert runner.failure_reason(message) == (
        "ReplicaStartError: this replica cannot serve the configured weights v2 (/w): /w changed"
    )


def test_checks_are_exact_about_where_the_weights_come_from(tmp_path: Path) -> None:
    good = tmp_path / "v2.safetensors"
    state = demo_weights(build_model("tests.serve.models:tiny_cnn"), seed=2)
    save_weights(state, good)
    config = {
        "applications": [
            {
                "name": "warmserve",
                "args": {"model": "tests.serve.models:tiny_cnn", "input_shape": "3,16,16", "batch": "1:8"},
                "deployments": [
                    {"name": "WarmModel", "user_config": {"weights": str(good), "weights_sha256": "0" * 64}}
                ],
            }
        ]
    }
    with pytest.raises(StartError, match=r"user_config weights: .* changed"):
        runner.preflight(config, local=False)
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    save_weights(state, good)
    config["applications"][0]["deployments"][0]["user_config"].pop("weights_sha256")
    with pytest.raises(StartError, match="NaN"):
        runner.preflight(config, local=False)


def test_a_ray_task_error_is_reported_by_its_cause_on_one_line() -> None:
    """`warmserve run` prints why a Ray task failed (HAProxy's words), not where the task ran."""
    from ray.exceptions import RayTaskError

    from warmserve.deployments.runner import one_line

    crashed = RuntimeError("HAProxy crashed during startup:\n[ALERT] (1) : Starting frontend stats: cannot bind")
    e = RayTaskError("HAProxyManager.ready", "Traceback (most recent call last): ...", crashed)
    want = "RuntimeError: HAProxy crashed during startup: [ALERT] (1) : Starting frontend stats: cannot bind"
    assert one_line(e) == want
    assert one_line(ValueError("")) == "ValueError"


def test_every_command_maps_its_errors_to_the_documented_exit_codes() -> None:
    """0 done, 1 a check failed, 2 usage or configuration, 3 unreachable or refusing; anything else is a bug
    and keeps its traceback (None)."""
    import requests

    from warmserve.cache import errors as cache
    from warmserve.deployments import errors as service
    from warmserve.serve import errors as serve

    assert cli.exit_code(cache.StoreUnavailable("s3 down")) == 3
    assert cli.exit_code(cache.StoreFull("disk full")) == 3
    assert cli.exit_code(service.DashboardError("no dashboard")) == 3
    assert cli.exit_code(requests.ConnectionError("refused")) == 3
    assert cli.exit_code(cache.UntrustedCache("no key")) == 2
    assert cli.exit_code(cache.InvalidKey("../x")) == 2
    assert cli.exit_code(cache.UnknownStore("nosuchproto")) == 2
    assert cli.exit_code(serve.WeightsError("shapes")) == 2
    assert cli.exit_code(serve.BackendUnavailable("no compiler")) == 2
    assert cli.exit_code(service.VersionConflict("v2 taken")) == 2
    assert cli.exit_code(service.StartError("port busy")) == 2
    assert cli.exit_code(FileNotFoundError("no such config")) == 2
    assert cli.exit_code(ValueError("bad option")) == 2
    assert cli.exit_code(service.RolloutError("refused")) == 1
    assert cli.exit_code(serve.RefitError("mismatch with eager")) == 1
    assert cli.exit_code(cache.CacheCorrupt("bad digest", reason="digest")) == 1
    assert cli.exit_code(cache.LeaseTimeout("waited")) == 1
    assert cli.exit_code(RuntimeError("a bug")) is None and cli.exit_code(KeyError("k")) is None


def test_a_port_that_never_answers_ready_is_named_with_what_it_said() -> None:
    """After Serve's RUNNING, `warmserve run` waits for its ports to answer; one that does not ends the start
    with the port and its last error, instead of waiting forever."""
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with pytest.raises(StartError, match=r"HTTP did not answer ready within 1s \(HTTP: .*refused"):
        runner._wait_answering(f"http://127.0.0.1:{free_port()}", None, timeout=1)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        runner._wait_answering(url, None, timeout=5)  # HTTP alone: answered
        with pytest.raises(StartError, match=r"but gRPC did not answer ready within 1s \(gRPC: UNAVAILABLE"):
            runner._wait_answering(url, f"127.0.0.1:{free_port()}", timeout=1)
    finally:
        server.shutdown()
        server.server_close()
