"""Resolve a model spec to an ``nn.Module``, its class names, and a weight-agnostic architecture fingerprint."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import inspect
from typing import Any

import torch
from torch import nn

from warmserve.serve.errors import ModelSpecError


def build_model(model: str, *, meta: bool = False) -> nn.Module:
    """Instantiate ``torchvision:<name>`` or ``package.module:factory`` (no weights are downloaded, ever).

    With ``meta=True`` parameters are allocated on the meta device (no random init): the caller then
    loads real weights with ``load_state_dict(..., assign=True)``.
    """
    source, _, name = model.partition(":")
    if not source or not name:
        raise ModelSpecError(unqualified(model))
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    if source == "torchvision":
        import torchvision

        try:
            with ctx:
                module = torchvision.models.get_model(name, weights=None)
        except ValueError as e:
            raise ModelSpecError(f"torchvision has no model {name!r} ({_nearest(name, torchvision)})") from e
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as e:
            raise ModelSpecError(f"cannot import {name!r} from {source!r}: {e}") from e
        if not callable(factory):
            raise ModelSpecError(f"{model} is not callable; it must be a factory returning an nn.Module")
        with ctx:
            module = factory()
    if not isinstance(module, nn.Module):
        raise ModelSpecError(f"{model} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def unqualified(model: str) -> str:
    """What to say of a model named without its source (``resnet18`` for ``torchvision:resnet18``): the rule,
    and the torchvision models it may have meant, named in full."""
    said = f"model must be torchvision:<name> or package.module:factory, got {model!r}"
    name = model.strip(":")
    if not name or "." in name or ":" in name:
        return said
    import torchvision

    names = sorted(torchvision.models.list_models(torchvision.models))
    exact = [n for n in names if n == name.lower()]
    close = [f"torchvision:{n}" for n in exact or difflib.get_close_matches(name.lower(), names, n=3)]
    if not close:
        return said
    return f"{said} (did you mean {_either(close)}?)"


def _nearest(name: str, torchvision: Any) -> str:
    """The torchvision models a mistyped ``name`` may have meant, or a few that exist."""
    names = sorted(torchvision.models.list_models(torchvision.models))
    close = difflib.get_close_matches(name.lower(), names, n=3)
    if not close:
        return f"some that exist: {', '.join(names[:12])}, ..."
    return f"did you mean {_either(close)}?"


def _either(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def class_names(model: str, num_outputs: int) -> list[str]:
    """Labels for the model's outputs: torchvision's metadata where it has them, else ``class_<i>``."""
    source, _, name = model.partition(":")
    if source == "torchvision":
        import torchvision

        with contextlib.suppress(ValueError, KeyError, IndexError, AttributeError):
            weights = torchvision.models.get_model_weights(name)
            categories = list(next(iter(weights)).meta["categories"])
            if len(categories) == num_outputs:
                return categories
    return [f"class_{i}" for i in range(num_outputs)]


def _class_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def architecture_doc(module: nn.Module) -> dict[str, Any]:
    """What the compiled graph depends on, never the weight values: module tree (with hyper-parameters),
    parameter and buffer names/shapes/dtypes, and the source code of every module class in the tree."""
    tensors = [
        (name, list(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    ]
    classes = sorted({type(m) for m in module.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}")
    code = hashlib.sha256()
    for cls in classes:
        code.update(_class_source(cls).encode())
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "structure": hashlib.sha256(repr(module).encode()).hexdigest(),
        "tensors": hashlib.sha256(repr(tensors).encode()).hexdigest(),
        "code": code.hexdigest(),
    }
