"""Errors raised by the worker; each subclasses the nearest builtin."""

from __future__ import annotations


class WarmserveError(Exception):
    """Base class of the worker's errors."""


class ModelSpecError(WarmserveError, ValueError):
    """The model spec cannot be resolved to an ``nn.Module`` (bad syntax, unknown model, bad factory)."""


class WeightsError(WarmserveError, ValueError):
    """Weights cannot be read, or do not fit the model (missing/unexpected keys, shapes, dtypes, NaN/inf)."""


class BackendUnavailable(WarmserveError, RuntimeError):
    """The requested compile backend cannot run here; the message says what to install or choose instead."""


class InputError(WarmserveError, ValueError):
    """An inference input has the wrong shape, dtype or batch size."""


class RefitError(WarmserveError, RuntimeError):
    """A refit failed or produced outputs that do not match eager; the old weights keep serving."""


class NotReady(WarmserveError, RuntimeError):
    """The worker has no loaded engine yet."""


class ToolchainChanged(WarmserveError, RuntimeError):
    """The compiler a cache key named failed its check and another was chosen: compute the key again."""
