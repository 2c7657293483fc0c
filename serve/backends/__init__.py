"""Backend registry: names to classes, imported lazily; ``auto`` picks the best one that runs here."""

from __future__ import annotations

import importlib

import torch

from warmserve.serve.backends.base import Backend, Engine
from warmserve.serve.errors import BackendUnavailable

REGISTRY = {
    "tensorrt": "warmserve.serve.backends.tensorrt:TensorRTBackend",
    "aoti": "warmserve.serve.backends.aoti:AOTIBackend",
    "inductor": "warmserve.serve.backends.inductor:InductorBackend",
    "eager": "warmserve.serve.backends.eager:EagerBackend",
}
NAMES = ("auto", *REGISTRY)


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def auto_order(device: torch.device) -> list[str]:
    """Preference for ``auto``: TensorRT on a GPU that has it, else AOTInductor (a warm start loads a
    package and traces nothing), else Inductor, else eager."""
    if device.type == "cuda":
        return ["tensorrt", "aoti", "inductor", "eager"]
    return ["aoti", "inductor", "eager"]


def choices(name: str, device: torch.device) -> list[type[Backend]]:
    """The backends to try, in order: ``name`` alone, or for ``auto`` every one that can run here (a
    worker moves on to the next if one fails while starting, such as AOTInductor without a working
    compiler)."""
    if name != "auto":
        return [resolve(name, device)]
    usable = [backend_class(n) for n in auto_order(device)]
    return [cls for cls in usable if cls.unavailable(device) is None]


def resolve(name: str, device: torch.device) -> type[Backend]:
    """The backend class for ``name`` (or the first usable one for ``auto``); a clear error if it cannot run."""
    if name != "auto":
        cls = backend_class(name)
        reason = cls.unavailable(device)
        if reason:
            raise BackendUnavailable(f"backend {name!r} cannot run on {device}: {reason}")
        return cls
    for candidate in auto_order(device):
        cls = backend_class(candidate)
        if cls.unavailable(device) is None:
            return cls
    raise BackendUnavailable(f"no backend can run on {device}")  # pragma: no cover - eager always can


__all__ = ["NAMES", "Backend", "Engine", "backend_class", "resolve"]
