"""What the end-to-end tests share: the tiny model's settings, one HTTP inference, eager reference, rollout."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

from tests.e2e.cluster import ROOT, RayCluster
from warmserve.serve.model import build_model

# Replicas import the test models from the checkout.
ROOT_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

TINY = {
    "model": "tests.serve.models:tiny_cnn",
    "input_shape": "3,16,16",
    "batch": "1:8",
    "backend": "aoti",
    "max_batch_size": 4,
}


def infer(cluster: RayCluster, x: np.ndarray) -> tuple[np.ndarray, str]:
    body = {"inputs": [{"name": "input__0", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}]}
    r = requests.post(f"{cluster.http}/v2/models/tiny_cnn/infer", json=body, timeout=60)
    r.raise_for_status()
    out = r.json()
    return np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"]), out[
        "model_version"
    ]


def eager(state: dict[str, torch.Tensor], x: np.ndarray, model_ref: str = "tests.serve.models:tiny_cnn") -> np.ndarray:
    model = build_model(model_ref)
    model.load_state_dict(state)
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def rollout(
    cluster: RayCluster, weights: Path, version: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`warmserve rollout` as an operator runs it (with WARMSERVE_ADMIN_TOKEN only when ``token`` is given)."""
    env = {**{k: v for k, v in os.environ.items() if k != "WARMSERVE_ADMIN_TOKEN"}, **cluster.auth_env}
    if token:
        env["WARMSERVE_ADMIN_TOKEN"] = token
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "warmserve.deployments.cli",
            "rollout",
            "--weights",
            str(weights),
            "--version",
            version,
            "--address",
            cluster.dashboard,
            "--http",
            cluster.http,
            "--wait",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def deploy_versions(
    cluster: RayCluster,
    tmp_path: Path,
    seeds: tuple[int, ...],
    x: np.ndarray,
    *,
    app: Mapping[str, Any] | None = None,
    deployment: Mapping[str, Any] | None = None,
    timeout: float = 240,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, np.ndarray], dict[int, dict[str, Any]]]:
    """Two replicas of tiny_cnn serving v1; weights for v1, v2, ... (one per seed) saved as ``v<i>.safetensors``.
    ``app`` overrides TINY's settings (another model, a device), ``deployment`` the deployment's.

    Returns the state dicts, eager's answer to ``x`` per version, and the replicas' statuses."""
    from warmserve.serve.weights import demo_weights, save_weights

    args = {**TINY, "cache_dir": str(tmp_path / "c"), "weights": str(tmp_path / "v1.safetensors"), **(app or {})}
    model = build_model(args["model"])
    states = [demo_weights(model, seed=seed) for seed in seeds]
    for i, state in enumerate(states, 1):
        save_weights(state, tmp_path / f"v{i}.safetensors")
    dep = {"num_replicas": 2, "user_config": {"weights": None, "weights_version": "v1"}, **(deployment or {})}
    cluster.deploy(cluster.config(args, dep), timeout=timeout)
    want = {f"v{i}": eager(state, x, args["model"]) for i, state in enumerate(states, 1)}
    return states, want, cluster.replica_statuses(int(dep["num_replicas"]))
