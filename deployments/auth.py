"""Access control for the admin paths: weight rollouts and replica status.

With ``WARMSERVE_ADMIN_TOKEN`` set on the replicas, a rollout's ``user_config`` must carry an HMAC of its
weights URI, version and sha256 made with the same token (``warmserve rollout`` adds it), and ``/v1/status``
needs ``Authorization: Bearer <token>``. Anyone who can edit the Serve config without the token cannot
make replicas load other weights.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

TOKEN_ENV = "WARMSERVE_ADMIN_TOKEN"


def sign_rollout(token: str, weights: str, version: str, sha256: str = "") -> str:
    return hmac.new(token.encode(), f"{weights}\n{version}\n{sha256}".encode(), hashlib.sha256).hexdigest()


def rollout_problem(config: Mapping[str, Any], token: str | None) -> str | None:
    """Why a rollout's user_config must be refused, or None if it may proceed."""
    if token is None:
        return None
    signature = config.get("signature")
    if not isinstance(signature, str) or not signature:
        return f"unsigned rollout refused: {TOKEN_ENV} is set on this replica; use `warmserve rollout` with the token"
    want = sign_rollout(
        token, str(config.get("weights")), str(config.get("weights_version")), str(config.get("weights_sha256") or "")
    )
    if not hmac.compare_digest(want, signature):
        return "rollout signature does not match this replica's admin token"
    return None


def authorized(header: str | None, token: str | None) -> bool:
    if token is None:
        return True
    return header is not None and hmac.compare_digest(header, f"Bearer {token}")
