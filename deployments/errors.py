"""Errors of the service layer (HTTP app, `warmserve run`, `warmserve rollout`); each subclasses the nearest builtin.

The command line maps them to exit codes: 1 a check failed (a refused rollout), 2 a usage mistake,
3 something unreachable.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the service layer's errors."""

    exit_code = 1


class ModelNotFound(ServiceError, LookupError):
    """A request names a model this server does not serve."""


class BodyTooLarge(ServiceError, ValueError):
    """A request body exceeds ``max_body_mb``."""


class Unauthorized(ServiceError, PermissionError):
    """An admin endpoint was called without the admin token."""


class DashboardError(ServiceError, ConnectionError):
    """The Ray dashboard cannot be reached, refuses the token, or answers an error."""

    exit_code = 3


class RolloutError(ServiceError, RuntimeError):
    """A rollout did not complete; the message says what the replicas answered and what was restored."""


class VersionConflict(RolloutError, ValueError):
    """A version label is already bound to other weights (a label names one content)."""

    exit_code = 2


class ReplicaStartError(ServiceError, RuntimeError):
    """A replica cannot serve what its configuration asks for; it stays unready and says why."""


class StartError(ServiceError, RuntimeError):
    """`warmserve run` cannot start the service (a check before Ray, or a failed deployment)."""

    exit_code = 2
