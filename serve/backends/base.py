"""The compile-backend seam: compile to an artifact, load an artifact, refit a loaded engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from warmserve.cache.config import default_cache_dir
from warmserve.cache.engine_cache import EngineCache
from warmserve.serve.spec import InputSpec


def flatten(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """A model's return value as (name, tensor) pairs, in the order torch.export flattens it (and so an
    exported engine returns it): a dict's (or a ModelOutput's) values by key, a tuple's as output__<i>."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output__0", out)]
    if isinstance(out, Mapping):
        return [
            p
            for k, v in out.items()
            if v is not None
            for p in flatten(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
        ]
    if isinstance(out, list | tuple):
        return [
            p
            for i, v in enumerate(out)
            if v is not None
            for p in flatten(v, f"{prefix}.{i}" if prefix else f"output__{i}")
        ]
    raise TypeError(f"the model returned a {type(out).__name__}; return tensors (alone, in a tuple or in a dict)")


def tensors(out: Any) -> list[torch.Tensor]:
    return [t for _, t in flatten(out)]


class Engine(ABC):
    """A loaded, runnable model. ``__call__`` takes a batch of every input, in the signature's order, on the
    engine's device, and returns the model's outputs flattened (`flatten`'s order)."""

    #: True when ``prepare`` must run with no other call on the device (recording CUDA graphs).
    exclusive_prepare: bool = False

    @abstractmethod
    def __call__(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...

    @abstractmethod
    def refit(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every weight in place with the tensors of ``state`` (already validated)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook, nothing to do for most engines
        """Ready the engine for serving after a refit (record CUDA graphs, say); with ``exclusive_prepare``
        nothing else may use the device meanwhile, and a swap holds requests back for it."""

    def idle(self) -> None:  # noqa: B027 - optional hook, nothing to do for most engines
        """Let go of what only serving needs (CUDA graphs, say): the engine waits, out of service, to be the
        next swap's standby."""


class Backend(ABC):
    name: ClassVar[str]
    #: "standby": a hot swap loads a second engine, refits it, then switches the reference (requests wait
    #: only for the switch, and for an engine's exclusive ``prepare``). "in-place": the engine is refitted
    #: inside an exclusive section (requests wait briefly).
    swap: ClassVar[Literal["standby", "in-place"]] = "standby"
    #: False for backends without an artifact (eager): the worker skips the cache.
    cacheable: ClassVar[bool] = True
    #: False when ``load`` runs the artifact alone: the worker then builds no eager module to start it.
    needs_model: ClassVar[bool] = True
    #: True when the engine's refit takes the module's non-persistent buffers too (tensors its constructor
    #: makes, such as BERT's position ids, that no weights file holds): the worker adds them to every refit.
    refits_buffers: ClassVar[bool] = False

    def __init__(self, device: torch.device, *, cache: EngineCache | None = None, workdir: Path | None = None) -> None:
        """Every backend is built the same way: the device, the engine cache (for backends that cache
        pieces of their own, like TensorRT's engines), and a node-local directory for what they keep."""
        self.device = device
        self.cache = cache
        self.workdir = workdir if workdir is not None else default_cache_dir()

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (with what to install), or None if it can."""
        return None

    def settings(self) -> dict[str, Any]:
        """Compile settings that change the artifact: part of the cache key."""
        return {}

    def versions(self) -> dict[str, str]:
        """Library versions the artifact is tied to: part of the cache key."""
        return {"torch": torch.__version__}

    def report(self) -> dict[str, Any]:
        """What the start report should say about how this backend builds (its compiler, say)."""
        return {}

    @abstractmethod
    def compile(self, model: nn.Module, spec: InputSpec) -> bytes:
        """Compile ``model`` (weights already on ``self.device``) for ``spec`` and return the artifact."""

    @abstractmethod
    def load(self, artifact: bytes, model: nn.Module | None, spec: InputSpec) -> Engine:
        """Load an artifact. Its weights are unspecified until the caller refits it. ``model`` (the eager
        module, with the live weights) is None only for a backend that does not need it (``needs_model``)."""


def given(model: nn.Module | None) -> nn.Module:
    """``model`` for a backend that needs it; the worker hands one to every backend whose ``needs_model`` is set."""
    if model is None:
        raise TypeError("this backend runs the eager module: load() needs it")
    return model


def device_doc(device: torch.device) -> dict[str, Any]:
    """The hardware an artifact is tied to: part of the cache key."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "sm": f"{major}.{minor}"}
    import platform

    # The vector ISA decides which instructions compiled CPU code uses (AVX2, AVX512...).
    return {"type": device.type, "arch": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}
