"""Every setting of warmserve in one table, and `Settings`, what one process reads from it once at start.

A setting comes from the first place that gives it: an option of `warmserve build` or `warmserve run`, then
config.yaml's application ``args``, then its ``WARMSERVE_*`` variable (only node-level settings and secrets
have one), then its default. `warmserve build --help` and `warmserve run --help` list them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warmserve.cache.config import CACHE_SETTINGS, CacheConfig, Setting, parse_bool, positive, resolve
from warmserve.serve.backends import NAMES
from warmserve.serve.spec import MODEL_SETTINGS, ModelSpec

SERVICE = frozenset({"run"})


def _at_least_zero(value: Any) -> float:
    seconds = float(value)
    if seconds < 0:
        raise ValueError(f"must be zero or more, got {value!r}")
    return seconds


ENGINE_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "backend",
        "auto",
        "tensorrt, aoti, inductor or eager; auto: tensorrt on a GPU with TensorRT, else aoti, else inductor",
        choices=NAMES,
    ),
    Setting("device", "auto", "cpu, cuda, cuda:N, or auto: the first GPU if there is one"),
    Setting("verify", True, "compare the engine's output with eager PyTorch after each refit", parse_bool),
)

SERVICE_SETTINGS: tuple[Setting, ...] = (
    Setting("max_batch_size", 8, "requests one dynamic batch gathers", positive(int), commands=SERVICE, metavar="N"),
    Setting(
        "batch_wait_timeout_s",
        0.005,
        "seconds a batch that forms while the replica is busy may wait for more requests (a request to an idle "
        "replica runs at once)",
        _at_least_zero,
        commands=SERVICE,
        metavar="S",
    ),
    Setting("max_body_mb", 64.0, "largest request body, in MiB", positive(float), commands=SERVICE, metavar="MB"),
    Setting(
        "top_k",
        5,
        "labels /v1/classify answers when the request does not say",
        positive(int),
        commands=SERVICE,
        metavar="K",
    ),
    Setting(
        "admin_token",
        None,
        "on replicas, rollouts must be signed with this token (warmserve rollout signs them where it is set) and "
        "/v1/status needs it as a bearer token",
        env="WARMSERVE_ADMIN_TOKEN",
        commands=frozenset(),
        arg=False,
    ),
)

SETTINGS: tuple[Setting, ...] = MODEL_SETTINGS + ENGINE_SETTINGS + CACHE_SETTINGS + SERVICE_SETTINGS


def _default(key: str) -> Any:
    return next(s.default for s in SETTINGS if s.key == key)


@dataclass(frozen=True)
class Settings:
    """What a process serves and how, read once at its start (`load`)."""

    model: ModelSpec
    cache: CacheConfig
    backend: str = _default("backend")
    device: str = _default("device")
    verify: bool = _default("verify")
    max_batch_size: int = _default("max_batch_size")
    batch_wait_timeout_s: float = _default("batch_wait_timeout_s")
    max_body_mb: float = _default("max_body_mb")
    top_k: int = _default("top_k")
    admin_token: str | None = None

    def __repr__(self) -> str:  # the admin token and the signing key stay out of logs
        return f"Settings(model={self.model!r}, backend={self.backend!r}, device={self.device!r})"

    @classmethod
    def load(
        cls,
        *,
        options: Mapping[str, Any] | None = None,
        args: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """The command line's ``options``, then config.yaml's ``args``, then ``environ`` (default: the
        process' environment), then the defaults. Errors name the option, key or variable at fault."""
        values = resolve(SETTINGS, options=options, args=args, environ=environ)
        return cls(
            model=ModelSpec.from_values(values),
            cache=CacheConfig.from_values(values),
            **{s.attr: values[s.attr] for s in ENGINE_SETTINGS + SERVICE_SETTINGS},
        )
