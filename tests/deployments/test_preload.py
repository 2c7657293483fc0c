"""Which `warmserve run` has Ray's workers preload torch and the app (deployments/runner.py `preloads`)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from warmserve.deployments.errors import StartError
from warmserve.deployments.runner import preloads, ray_system_config


def config(num_gpus: float | None, autoscaling: bool = True) -> dict[str, Any]:
    deployment: dict[str, Any] = {"name": "WarmModel"}
    if autoscaling:
        deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 12}
    else:
        deployment["num_replicas"] = 12
    if num_gpus is not None:
        deployment["ray_actor_options"] = {"num_gpus": num_gpus}
    return {"applications": [{"name": "warmserve", "deployments": [deployment]}]}


def test_a_local_autoscaling_gpu_service_preloads_and_nothing_else_does() -> None:
    assert preloads(config(0.0833), local=True, environ={})
    assert not preloads(config(None), local=True, environ={})  # the CPU: few cores, imports would contend
    assert not preloads(config(0.0833, autoscaling=False), local=True, environ={})  # no replica starts later
    assert not preloads(config(0.0833), local=False, environ={})  # a cluster we join keeps its own settings
    assert ray_system_config(config(None), local=True) is None


def test_the_variable_decides_on_a_local_cluster() -> None:
    assert not preloads(config(0.0833), local=True, environ={"WARMSERVE_PRELOAD": "0"})
    assert preloads(config(None), local=True, environ={"WARMSERVE_PRELOAD": "1"})
    assert not preloads(config(None), local=False, environ={"WARMSERVE_PRELOAD": "1"})
    with pytest.raises(StartError, match="WARMSERVE_PRELOAD must be 0 or 1, got 'yes'"):
        preloads(config(None), local=True, environ={"WARMSERVE_PRELOAD": "yes"})


def test_the_preload_module_imports_what_a_replica_needs_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from warmserve.deployments import preload

    preload.preload()
    assert {"torch", "ray.serve._private.replica", "warmserve.deployments.app"} <= set(sys.modules)
    monkeypatch.setattr(preload, "MODULES", ("warmserve.no_such_module", "torch"))
    with caplog.at_level("WARNING", logger=preload.__name__):
        preload.preload()  # logged, not raised: Ray would stop the worker
    assert "could not preload warmserve.no_such_module" in caplog.text
    assert "ModuleNotFoundError" in caplog.text  # with its traceback
