"""The Ray dashboard's Serve REST API, with Ray's token on every call.

Ray (2.60 on) turns token authentication on for clusters that ``ray.init()`` starts, and for any cluster
started where a token exists. The token is read where Ray itself reads it: ``$RAY_AUTH_TOKEN``, then the
file named by ``$RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from warmserve.deployments.errors import DashboardError

API = "/api/serve/applications/"


def ray_token(environ: Mapping[str, str] | None = None) -> str | None:
    """Ray's authentication token, from the places Ray looks for it, or None."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ray_auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    token = ray_token(environ)
    return {"authorization": f"Bearer {token}"} if token else {}


class Dashboard:
    """Read and replace the declarative Serve config of a cluster through its dashboard."""

    def __init__(self, address: str, environ: Mapping[str, str] | None = None, timeout: float = 10.0) -> None:
        self.address = address.rstrip("/")
        self.headers = ray_auth_headers(environ)
        self.timeout = timeout

    def _call(self, method: str, data: str | None = None, timeout: float | None = None) -> requests.Response:
        headers = dict(self.headers)
        if data is not None:
            headers["content-type"] = "application/json"
        try:
            r = requests.request(
                method, f"{self.address}{API}", data=data, headers=headers, timeout=timeout or self.timeout
            )
        except requests.RequestException as e:
            raise DashboardError(
                f"cannot reach the Ray dashboard at {self.address} ({type(e).__name__}); is the cluster running? "
                "Pass its dashboard with --address (or $RAY_DASHBOARD_ADDRESS)"
            ) from e
        if r.status_code in (401, 403):
            how = "the token sent was refused" if self.headers else "no token was found"
            raise DashboardError(
                f"the Ray dashboard at {self.address} needs Ray's authentication token and {how}: set "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token; `ray get-auth-token` prints it "
                "on a machine of the cluster"
            )
        if r.status_code != 200:
            raise DashboardError(f"{method} {API} on {self.address} answered {r.status_code}: {r.text[:300]}")
        return r

    def details(self) -> dict[str, Any]:
        """Serve's instance details: applications, their status, deployments and deployed configs."""
        try:
            return dict(self._call("GET").json())
        except ValueError as e:
            raise DashboardError(f"the Ray dashboard at {self.address} answered something other than JSON") from e

    def config(self) -> dict[str, Any]:
        """The declarative config the cluster runs now, rebuilt from the details."""
        details = self.details()
        apps = [a.get("deployed_app_config") for a in (details.get("applications") or {}).values()]
        if not apps or any(a is None for a in apps):
            raise DashboardError(
                "no application on this cluster was deployed from a config file; "
                "start it with `warmserve run` or `serve deploy deployments/config.yaml`"
            )
        config: dict[str, Any] = {"applications": apps}
        for k in ("proxy_location", "http_options"):
            if details.get(k) is not None:
                config[k] = details[k]
        return config

    def apply(self, config: Mapping[str, Any]) -> None:
        self._call("PUT", json.dumps(config), timeout=30)

    def delete(self) -> None:
        self._call("DELETE", timeout=30)

    def app(self, name: str) -> dict[str, Any]:
        """One application's details (status, message, deployments), or {} if it does not exist."""
        return dict((self.details().get("applications") or {}).get(name) or {})
