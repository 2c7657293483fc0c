"""How `warmserve run` lays the service out on a host: replicas per GPU, GPU shares, the ingress."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from warmserve.deployments import cli, host, runner
from warmserve.deployments.cli import DEFAULT_CONFIG

HAPROXY = "/usr/sbin/haproxy"


def config(deployment: dict[str, Any] | None = None, **actor: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG.read_text())
    dep = doc["applications"][0]["deployments"][0]
    dep["ray_actor_options"].update(actor)
    dep.update(deployment or {})
    return doc


def deployment(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["applications"][0]["deployments"][0]  # type: ignore[no-any-return]


def fits(layout: host.Layout, gpus: int) -> bool:
    """Ray's view: every replica's share, in its 1/10,000 steps, fits on the GPUs."""
    assert layout.replicas is not None and layout.num_gpus is not None
    per_gpu = -(-layout.replicas // gpus)
    return per_gpu * round(layout.num_gpus * host.RESOURCE_STEP) <= host.RESOURCE_STEP


def test_a_gpu_host_autoscales_up_to_as_many_replicas_as_share_each_gpu_behind_haproxy() -> None:
    doc = config()
    layout = host.plan(doc, gpus=1, cpus=16, haproxy=HAPROXY)
    assert (layout.ingress, layout.replicas, layout.max_replicas, layout.num_gpus) == ("haproxy", None, 12, 0.0833)
    layout.apply(doc)
    dep = deployment(doc)
    assert "num_replicas" not in dep
    assert dep["autoscaling_config"] == {**deployment(config())["autoscaling_config"], "max_replicas": 12}
    assert dep["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.0833}
    assert layout.why.startswith(
        "autoscaling 1-12 replicas (as many as fit this host, in place of the config's max_replicas 4; "
        "target 4 requests in flight per replica, upscale after 10 s) on 1 GPU(s)"
    ), layout.why
    assert "12 per GPU for 16 cores: one per 4/3 cores, at most 12; --replicas to fix a count" in layout.why
    assert "HAProxy ingress" in layout.why


def test_a_gpu_host_without_autoscaling_gets_as_many_replicas_as_fit() -> None:
    doc = config()
    deployment(doc).pop("autoscaling_config")
    layout = host.plan(doc, gpus=1, cpus=16, haproxy=HAPROXY)
    assert (layout.replicas, layout.max_replicas, layout.num_gpus) == (12, None, 0.0833)
    layout.apply(doc)
    assert deployment(doc)["num_replicas"] == 12 and layout.why.startswith("12 replicas on 1 GPU(s)")


@pytest.mark.parametrize(
    ("gpus", "cpus", "per_gpu"),
    [(1, 2, 1), (1, 6, 4), (1, 12, 9), (1, 14, 10), (2, 8, 3), (8, 128, 12), (4, 4, 1), (1, 64, 12), (3, 16, 4)],
)
def test_three_replicas_per_four_cores_at_most_twelve_per_gpu(gpus: int, cpus: int, per_gpu: int) -> None:
    layout = host.plan(config(), gpus=gpus, cpus=cpus, haproxy=HAPROXY)
    assert layout.max_replicas == per_gpu * gpus
    full = host.Layout(layout.ingress, layout.max_replicas, layout.num_gpus, layout.why)
    assert fits(full, gpus), layout  # 6 x round(1/6, 4) = 1.0002 GPUs would leave one replica unplaced
    assert layout.max_replicas <= cpus  # the config's num_cpus: 1 each


def test_replicas_that_need_more_cores_are_fewer() -> None:
    assert host.plan(config(num_cpus=4), gpus=1, cpus=16, haproxy=HAPROXY).max_replicas == 4
    assert host.plan(config(), gpus=8, cpus=4, haproxy=HAPROXY).max_replicas == 4  # one per GPU, but 4 cores


def test_what_the_operator_chose_wins() -> None:
    mine = host.plan(config(), gpus=1, cpus=16, replicas=3, haproxy=HAPROXY)
    assert (mine.replicas, mine.num_gpus) == (3, 0.3333) and fits(mine, 1)
    two = host.plan(config(), gpus=2, cpus=16, replicas=3, haproxy=HAPROXY)
    assert (two.replicas, two.num_gpus) == (3, 0.5) and fits(two, 2)
    fixed = host.plan(config({"num_replicas": 2}), gpus=1, cpus=16, haproxy=HAPROXY)
    assert (fixed.replicas, fixed.num_gpus) == (2, 0.5) and "replacing" not in fixed.why
    share = host.plan(config(num_gpus=0.5), gpus=1, cpus=16, haproxy=HAPROXY)
    assert (share.num_gpus, share.replicas, share.max_replicas) == (0.5, None, None) and "(the config's)" in share.why
    assert share.why.startswith("autoscaling 1-4 replicas (the config's max_replicas;")
    one = host.plan(config(), gpus=1, cpus=16, replicas=1, haproxy=HAPROXY)
    assert one.why.startswith("1 replica (replacing the config's autoscaling) on 1 GPU(s)")
    assert host.plan(config(), gpus=1, cpus=16, ingress="serve", haproxy=HAPROXY).ingress == "serve"


def test_more_replicas_than_cores_is_an_error_not_a_hang() -> None:
    with pytest.raises(ValueError, match="16 replicas with num_cpus 1 each need 16 cores and this host has 8"):
        host.plan(config(), gpus=1, cpus=8, replicas=16, haproxy=HAPROXY)


def test_a_cpu_host_keeps_the_configs_autoscaling_up_to_its_cores_behind_haproxy() -> None:
    doc = config({"autoscaling_config": {"min_replicas": 3, "initial_replicas": 3, "max_replicas": 4}})
    layout = host.plan(doc, gpus=0, cpus=2, haproxy=HAPROXY)
    assert (layout.ingress, layout.replicas, layout.max_replicas, layout.num_gpus) == ("haproxy", None, 2, None)
    layout.apply(doc)
    assert deployment(doc)["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 2}
    assert "num_gpus" not in deployment(doc)["ray_actor_options"]
    assert layout.why.startswith(
        "autoscaling 2-2 replicas (as many as fit this host, below the config's max_replicas 4) on the CPU"
    ), layout.why
    roomy = host.plan(config(), gpus=0, cpus=8, haproxy=HAPROXY)
    assert roomy.max_replicas == 4 and roomy.why.startswith("autoscaling 1-4 replicas (the config's max_replicas;")
    assert host.plan(config(), gpus=0, cpus=2, ingress="serve", haproxy=HAPROXY).ingress == "serve"
    assert host.plan(config(), gpus=0, cpus=2, haproxy=None).ingress == "serve"  # no HAProxy here
    one = host.plan(config(), gpus=0, cpus=2, replicas=1, haproxy=HAPROXY)
    assert one.why.startswith("1 replica (replacing the config's autoscaling) on the CPU")


def test_a_joined_cluster_is_laid_out_by_its_own_config() -> None:
    doc = config()
    layout = host.plan(doc, gpus=1, cpus=16, haproxy=None, ingress="haproxy", joining=True)
    assert (layout.ingress, layout.replicas, layout.num_gpus) == ("cluster", None, None)
    layout.apply(doc)
    assert doc == config()
    assert "the ingress its nodes started with" in layout.why


def test_actor_options_may_be_null() -> None:
    doc = config({"ray_actor_options": None})
    host.plan(doc, gpus=1, cpus=16, haproxy=HAPROXY).apply(doc)
    assert deployment(doc)["ray_actor_options"] == {"num_gpus": 0.0833}


def test_no_haproxy_binary() -> None:
    assert host.plan(config(), gpus=1, cpus=16, haproxy=None).ingress == "serve"  # auto falls back
    with pytest.raises(ValueError, match="--ingress haproxy selects HAProxy, which needs an HAProxy binary"):
        host.plan(config(), gpus=1, cpus=16, ingress="haproxy", haproxy=None, ingress_source="--ingress haproxy")


def test_the_haproxy_ray_serve_would_run_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    found = host.haproxy_binary()
    assert found is None or Path(found).is_file()
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "absent"))
    assert host.haproxy_binary() is None
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path))  # a directory is no binary
    assert host.haproxy_binary() is None


def test_the_environment_a_local_ray_gets_for_each_ingress(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.ingress_env(False, "haproxy", {}) == {}  # a joined cluster chose at its start
    # Serve's own proxy keeps Serve's replica defaults; behind HAProxy user code runs on each replica's own loop
    assert runner.ingress_env(True, "serve", {}) == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert runner.ingress_env(True, "haproxy", {})["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    mine = {
        "RAY_SERVE_HAPROXY_STATS_PORT": "7000",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "7001",
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "32768",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    }
    # HAProxy's tuning for one host (a short drain, HTTP/2 windows for large gRPC requests); the operator's
    # own values win, Serve's thread for user code among them
    assert runner.ingress_env(True, "haproxy", mine) == {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        **runner.HAPROXY_TUNING,
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "32768",
    }
    assert runner.HAPROXY_TUNING["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("0.0.0.0", 8404))
            held.listen()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise  # already busy: the case under test all the same
        env = runner.ingress_env(True, "haproxy", {})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert int(env["RAY_SERVE_HAPROXY_STATS_PORT"]) != 8404
    assert "HAProxy's stats port 8404 is taken" in capsys.readouterr().err


def test_print_config_shows_the_layout_it_chose(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "_gpus", lambda: 1)
    monkeypatch.setattr(host, "haproxy_binary", lambda: HAPROXY)
    monkeypatch.setattr(host, "host_cpus", lambda: 16)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    argv = ["run", "--print-config", "--no-resume", "--cache-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ") and "# autoscaling 1-12 replicas (as many as fit this host" in out
    doc = yaml.safe_load(out)
    assert deployment(doc)["autoscaling_config"]["max_replicas"] == 12
    assert deployment(doc)["ray_actor_options"]["num_gpus"] == 0.0833
    assert cli.main([*argv, "--replicas", "12"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert deployment(doc)["num_replicas"] == 12 and "autoscaling_config" not in deployment(doc)
    # The operator's environment decides the ingress when --ingress is left at auto.
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert cli.main(argv) == 0
    assert "Serve's HTTP proxy" in capsys.readouterr().out
    # An app that runs on the CPU asks for no GPU share.
    assert cli.main([*argv, "--device", "cpu"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert "num_gpus" not in deployment(doc)["ray_actor_options"]
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--print-config", "--replicas", "0"])
    assert e.value.code == 2 and "must be a whole number of at least 1" in capsys.readouterr().err
    # A model that does not exist is said, not printed into a config that would fail in every replica.
    assert cli.main([*argv, "--model", "torchvision:resnet81"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and "torchvision has no model 'resnet81'" in said.err and "resnet18" in said.err
