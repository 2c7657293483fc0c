"""`warmserve rollout`: push new weights to every live replica through Serve's declarative config.

Only ``user_config`` changes, so Serve does a lightweight update: each replica's ``reconfigure`` refits
its engine in place. Nothing restarts and nothing is rebuilt. The weights are pinned by their sha256, and
a version label is bound to one digest for good. If any replica refuses the weights, or the update does
not finish, the previous config is put back exactly, so a replica started later (a replacement, a
scale-out) starts on the last good weights, never on the refused ones.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from warmserve.cache.config import CacheConfig
from warmserve.deployments import ledger
from warmserve.deployments.auth import TOKEN_ENV, sign_rollout
from warmserve.deployments.dashboard import Dashboard
from warmserve.deployments.errors import DashboardError, RolloutError, VersionConflict
from warmserve.serve.spec import ModelSpec
from warmserve.serve.weights import weights_digest

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def _app(config: dict[str, Any], app: str) -> dict[str, Any]:
    target = next((a for a in config["applications"] if a.get("name") == app), None)
    if target is None:
        names = [a.get("name") for a in config["applications"]]
        raise RolloutError(f"no application {app!r} on the cluster (it has {names}); pass --app")
    return target  # type: ignore[no-any-return]


def _deployment(config: dict[str, Any], app: str, deployment: str) -> dict[str, Any]:
    """The deployment's entry in ``config`` (created if absent), to edit in place."""
    deployments = _app(config, app).setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    return entry  # type: ignore[no-any-return]


def user_config_of(config: dict[str, Any], app: str, deployment: str) -> dict[str, Any]:
    return dict(_deployment(copy.deepcopy(config), app, deployment).get("user_config") or {})


def versions_of(user_config: dict[str, Any]) -> dict[str, str]:
    """label -> sha256 of every version this deployment has been given (the current one included)."""
    known = dict(user_config.get("versions") or {})
    if user_config.get("weights_version") and user_config.get("weights_sha256"):
        known[str(user_config["weights_version"])] = str(user_config["weights_sha256"])
    return known


def with_weights(
    config: dict[str, Any],
    app: str,
    deployment: str,
    weights: str,
    version: str,
    sha256: str,
    token: str | None = None,
) -> dict[str, Any]:
    """``config`` with the deployment's user_config pointing at ``weights`` as ``version`` (signed with the
    admin ``token``, if there is one).

    Raises ``VersionConflict`` if ``version`` already names weights with another digest."""
    new = copy.deepcopy(config)
    entry = _deployment(new, app, deployment)
    user_config = dict(entry.get("user_config") or {})
    known = versions_of(user_config)
    if known.get(version, sha256) != sha256:
        raise VersionConflict(
            f"version {version} already names other weights (sha256 {known[version][:16]}...), and "
            f"{weights} has sha256 {sha256[:16]}...: a version label names one content; "
            "roll these weights out under a new label"
        )
    known[version] = sha256
    user_config.update({"weights": weights, "weights_version": version, "weights_sha256": sha256, "versions": known})
    user_config.pop("signature", None)
    if token:
        user_config["signature"] = sign_rollout(token, weights, version, sha256)
    entry["user_config"] = user_config
    return new


def replica_states(http: str, samples: int, token: str | None = None) -> dict[int, dict[str, Any]]:
    """Sample ``/v1/status`` through one proxy (requests land on its replicas at random): pid -> status."""
    seen: dict[int, dict[str, Any]] = {}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    for _ in range(samples):
        try:
            r = requests.get(f"{http}/v1/status", headers=headers, timeout=10)
            if r.status_code == 401:
                raise RolloutError(f"the replicas require an admin token: set {TOKEN_ENV}")
            status = r.json()
            seen[int(status["replica_pid"])] = status
        except (requests.RequestException, ValueError, KeyError, TypeError):
            continue
    return seen


class Confirmation:
    """Whether every running replica serves ``version`` from weights with ``sha256``, each asked through the
    proxy of its own node (Serve's proxies prefer their node's replicas), or through ``http`` when given.
    A replica that refused raises; one that never answers for ``silence_s`` raises too: what it serves
    cannot be confirmed, so the rollout is not called done."""

    def __init__(
        self,
        config: dict[str, Any],
        version: str,
        sha256: str,
        http: str | None,
        silence_s: float = 90.0,
        token: str | None = None,
    ) -> None:
        options = config.get("http_options") or {}
        self.host = str(options.get("host") or "127.0.0.1")
        self.port = int(options.get("port") or 8000)
        self.http = http
        self.target = (version, sha256)
        self.silence_s = silence_s
        self.token = token
        self._unseen_since: dict[int, float] = {}

    def url(self, replica: dict[str, Any]) -> str:
        if self.http:
            return self.http
        host = str(replica.get("node_ip") or "127.0.0.1") if self.host in WILDCARD else self.host
        return f"http://{'127.0.0.1' if host in LOOPBACK else host}:{self.port}"

    def _refused(self, status: dict[str, Any]) -> bool:
        swap = status.get("last_swap") or {}
        version, sha256 = self.target
        return swap.get("requested") == version and swap.get("requested_sha256") in (sha256, "") and not swap.get("ok")

    def __call__(self, replicas: list[dict[str, Any]]) -> bool:
        expected = {int(r["pid"]): r for r in replicas if r.get("pid")}
        by_url: dict[str, set[int]] = {}
        for pid, replica in expected.items():
            by_url.setdefault(self.url(replica), set()).add(pid)
        seen: dict[int, dict[str, Any]] = {}
        for url, pids in by_url.items():
            seen.update(replica_states(url, samples=4 * len(pids) + 4, token=self.token))
        serving = {pid for pid, s in seen.items() if (s.get("weights_version"), s.get("weights_sha256")) == self.target}
        refused = {
            pid: s["last_swap"].get("error") for pid, s in seen.items() if pid not in serving and self._refused(s)
        }
        if refused:
            raise RolloutError(f"replicas refused {self.target[0]} and keep serving their old weights: {refused}")
        now = time.monotonic()
        for pid in expected:
            if pid in seen:
                self._unseen_since.pop(pid, None)
            elif now - self._unseen_since.setdefault(pid, now) > self.silence_s:
                raise RolloutError(
                    f"replica {pid} never answered through {self.url(expected[pid])} in {self.silence_s:.0f}s, so "
                    "what it serves cannot be confirmed; pass --http with a URL that reaches it"
                )
        return bool(expected) and set(expected) <= serving


def _wait(
    dashboard: Dashboard,
    app: str,
    deployment: str,
    deadline: float,
    done: Callable[[list[dict[str, Any]]], bool],
) -> tuple[str, int]:
    """Poll until the app is RUNNING with the deployment HEALTHY and ``done(running replicas)``;
    returns (status, number of replicas)."""
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        a = dashboard.app(app)
        status = a.get("status", "UNKNOWN")
        dep = (a.get("deployments") or {}).get(deployment, {})
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RolloutError(f"application {app} is {status}: {str(a.get('message', ''))[:500]}")
        if status == "RUNNING" and dep.get("status") == "HEALTHY":
            replicas = [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]
            if done(replicas):
                return status, len(replicas)
        time.sleep(0.5)
    raise RolloutError(f"application {app} did not finish the update in time (last status {status})")


def service_url(config: dict[str, Any]) -> str:
    """Where the cluster's Serve proxy answers HTTP (its http_options), as a URL this machine can call."""
    http = config.get("http_options") or {}
    host = str(http.get("host") or "127.0.0.1")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{int(http.get('port') or 8000)}"


def _check_reachable(config: dict[str, Any], address: str) -> None:
    """A service that listens on loopback can be confirmed only from its own machine."""
    host = str((config.get("http_options") or {}).get("host") or "127.0.0.1")
    if host in LOOPBACK and urlsplit(address).hostname not in LOOPBACK:
        raise VersionConflict(
            f"the service listens on {host} of the cluster's nodes, which this machine cannot reach to confirm what "
            "each replica serves: pass --http with a URL that reaches it, or --http '' to wait for Serve alone"
        )


def _check_http(http: str, config: dict[str, Any], address: str) -> None:
    """A loopback --http must be this cluster's own proxy: else the rollout would change one service and
    wait on another."""
    got, want = urlsplit(http), urlsplit(service_url(config))
    if got.hostname in LOOPBACK and got.port != want.port:
        raise VersionConflict(
            f"the cluster whose dashboard is {address} serves HTTP on port {want.port}, but --http is {http}: "
            "give that service's dashboard with --address (warmserve run prints it), or leave --http out"
        )


def rollout(
    address: str,
    weights: str,
    version: str,
    *,
    app: str = "warmserve",
    deployment: str = "WarmModel",
    wait_s: float = 300.0,
    http: str | None = None,
    sha256: str | None = None,
    check: bool = True,
    token: str | None = None,
) -> dict[str, Any]:
    """Apply the new weights and wait until every running replica serves ``version`` from weights with
    ``sha256`` (each asked through its own node's proxy, or ``http``); on any refusal, failure or
    interruption put the previous config back and raise ``RolloutError``. ``check=False`` waits for Serve
    only, not for the replicas. ``token``: the replicas' admin token, to sign the weights and ask their status."""
    dashboard = Dashboard(address)
    before = dashboard.config()
    if http:
        _check_http(http, before, address)
    elif check:
        _check_reachable(before, address)
    if sha256 is None:
        try:
            sha256 = weights_digest(weights)
        except ValueError as e:
            raise RolloutError(f"{e}; warmserve rollout reads the file to pin its sha256 (or pass --sha256)") from e
    config = with_weights(before, app, deployment, weights, version, sha256, token)
    current = user_config_of(before, app, deployment)
    result = {"app": app, "deployment": deployment, "weights": weights, "version": version, "sha256": sha256}
    if current.get("weights_version") == version and current.get("weights_sha256") == sha256:
        return {**result, "status": "unchanged", "replicas": None}
    confirm: Callable[[list[dict[str, Any]]], bool] = (
        Confirmation(before, version, sha256, http, token=token) if check else (lambda replicas: True)
    )
    try:
        dashboard.apply(config)
        status, replicas = _wait(dashboard, app, deployment, time.monotonic() + wait_s, confirm)
    except (RolloutError, DashboardError, KeyboardInterrupt) as e:
        raise RolloutError(f"{str(e) or 'interrupted'}; {_restore(dashboard, before, app, deployment)}") from e
    try:
        _record(before, app, weights, version, sha256, versions_of(user_config_of(config, app, deployment)))
    except (OSError, ValueError) as e:
        logger.warning("every replica serves %s, but recording it for the next `warmserve run` failed: %s", version, e)
    return {**result, "status": status, "replicas": replicas}


def _restore(dashboard: Dashboard, before: dict[str, Any], app: str, deployment: str) -> str:
    """Put the config from before the rollout back (Ctrl-C and SIGTERM wait meanwhile); say what happened."""
    old = user_config_of(before, app, deployment).get("weights_version", "the previous weights")
    with _signals_deferred():
        try:
            dashboard.apply(before)
        except DashboardError as e:
            return f"restoring the previous config ({old}) failed too: {e}"
        try:
            _wait(dashboard, app, deployment, time.monotonic() + 30, lambda replicas: True)
        except RolloutError as e:
            return f"the previous config ({old}) is put back, and Serve is still applying it ({e})"
    return f"the previous config ({old}) is restored, so every replica, new ones included, serves {old}"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM inside the block (main thread only): a restore is not cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _record(
    config: dict[str, Any], app: str, weights: str, version: str, sha256: str, versions: dict[str, str]
) -> Path:
    """Record the last good rollout in the cache directory `warmserve run` uses for this app."""
    args = _app(config, app).get("args") or {}
    directory = CacheConfig.load(cache_dir=args.get("cache_dir")).cache_dir
    model = str(args.get("model") or ModelSpec().model)
    return ledger.record(directory, ledger.Rollout(app, model, weights, version, sha256, versions=versions))
