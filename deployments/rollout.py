"""`warmserve rollout`: push new weights to every live replica through Serve's declarative config.

Only ``user_config`` changes, so Serve does a lightweight update: each replica's ``reconfigure`` refits
its engine in place. Nothing restarts and nothing is rebuilt.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import requests

from deployments.auth import admin_token, sign_rollout


class RolloutError(RuntimeError):
    pass


def current_config(address: str, timeout: float = 10) -> dict[str, Any]:
    """The declarative config the cluster runs now, rebuilt from the dashboard's Serve REST API."""
    try:
        r = requests.get(f"{address}/api/serve/applications/", timeout=timeout)
    except requests.RequestException as e:
        raise RolloutError(f"cannot reach the Ray dashboard at {address}: {e}") from e
    if r.status_code != 200:
        raise RolloutError(f"GET /api/serve/applications/ answered {r.status_code}: {r.text[:300]}")
    details = r.json()
    apps = [a.get("deployed_app_config") for a in (details.get("applications") or {}).values()]
    if not apps or any(a is None for a in apps):
        raise RolloutError(
            "no application on this cluster was deployed from a config file; "
            "start it with `warmserve run` or `serve deploy deployments/config.yaml`"
        )
    config: dict[str, Any] = {"applications": apps}
    for k in ("proxy_location", "http_options"):
        if details.get(k) is not None:
            config[k] = details[k]
    return config


def with_weights(config: dict[str, Any], app: str, deployment: str, weights: str, version: str) -> dict[str, Any]:
    new = copy.deepcopy(config)
    target = next((a for a in new["applications"] if a.get("name") == app), None)
    if target is None:
        names = [a.get("name") for a in new["applications"]]
        raise RolloutError(f"no application {app!r} on the cluster (it has {names})")
    deployments = target.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    user_config = dict(entry.get("user_config") or {})
    user_config.update({"weights": weights, "weights_version": version})
    user_config.pop("signature", None)
    token = admin_token()
    if token:
        user_config["signature"] = sign_rollout(token, weights, version)
    entry["user_config"] = user_config
    return new


def replica_states(http: str, samples: int) -> dict[int, dict[str, Any]]:
    """Sample ``/v1/status`` through the proxy (requests land on random replicas): pid -> status."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(samples):
        try:
            token = admin_token()
            headers = {"authorization": f"Bearer {token}"} if token else {}
            r = requests.get(f"{http}/v1/status", headers=headers, timeout=10)
            if r.status_code == 401:
                raise RolloutError("the replicas require an admin token: set WARMSERVE_ADMIN_TOKEN")
            status = r.json()
            seen[int(status["replica_pid"])] = status
        except (requests.RequestException, ValueError, KeyError, TypeError):
            continue
    return seen


def rollout(
    address: str,
    weights: str,
    version: str,
    *,
    app: str = "warmserve",
    deployment: str = "WarmModel",
    wait_s: float = 300.0,
    http: str | None = None,
) -> dict[str, Any]:
    """Apply the new user_config, wait until Serve reports the deployment healthy, then (with ``http``)
    until every replica seen through the proxy serves ``version`` or has refused it."""
    config = with_weights(current_config(address), app, deployment, weights, version)
    r = requests.put(
        f"{address}/api/serve/applications/",
        data=json.dumps(config),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    if r.status_code != 200:
        raise RolloutError(f"PUT /api/serve/applications/ answered {r.status_code}: {r.text[:500]}")
    deadline = time.monotonic() + wait_s
    status, replicas = "UNKNOWN", 0
    while time.monotonic() < deadline:
        details = requests.get(f"{address}/api/serve/applications/", timeout=10).json()
        a = (details.get("applications") or {}).get(app, {})
        status = a.get("status", "UNKNOWN")
        dep = (a.get("deployments") or {}).get(deployment, {})
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RolloutError(f"application {app} is {status}: {a.get('message', '')[:500]}")
        if status == "RUNNING" and dep.get("status") == "HEALTHY":
            replicas = len(dep.get("replicas") or [])
            if not http:
                break
            seen = replica_states(http, samples=max(8, 4 * replicas))
            pending = {p: s for p, s in seen.items() if s.get("weights_version") != version}
            refused = {
                p: (s.get("last_swap") or {}).get("error")
                for p, s in pending.items()
                if (s.get("last_swap") or {}).get("requested") == version
            }
            if refused:
                raise RolloutError(f"replicas refused {version} and keep serving their old weights: {refused}")
            if seen and not pending:
                break
        time.sleep(0.5)
    else:
        raise RolloutError(f"application {app} did not finish the update in {wait_s:.0f}s (last status {status})")
    return {
        "app": app,
        "deployment": deployment,
        "weights": weights,
        "version": version,
        "status": status,
        "replicas": replicas,
    }
