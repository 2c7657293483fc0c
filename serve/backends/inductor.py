"""torch.compile (Inductor) whose cached artifact is the compile cache itself ("Mega-Cache").

The artifact is ``torch.compiler.save_cache_artifacts()`` after compiling and running the model; a warm
start loads it with ``load_cache_artifacts`` so the first call skips Inductor's code generation
(Dynamo still traces). Parameters stay live tensors, so a refit is a copy into them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from serve.backends.base import Backend, Engine
from serve.spec import InputSpec

logger = logging.getLogger(__name__)


def _warm_calls(compiled: Any, spec: InputSpec, device: torch.device) -> None:
    """Run the batch sizes a server will see, so that every graph they need is compiled (and cached).

    The batch dimension is only *maybe* dynamic: Inductor may split the range (a CPU convolution on
    resnet18 guards on batch <= 15, say), and a strict ``mark_dynamic`` would then fail the compile.
    Batch 1 is always its own graph (PyTorch specialises sizes 0 and 1).
    """
    for batch in sorted({spec.min_batch, spec.export_batch, spec.max_batch}):
        x = spec.example(batch=batch, device=device)
        if spec.min_batch != spec.max_batch:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch.inference_mode():
            compiled(x)


class InductorEngine(Engine):
    def __init__(self, model: nn.Module, compiled: Any) -> None:
        self.model = model
        self.compiled = compiled

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.compiled(x)  # type: ignore[no-any-return]

    @torch.inference_mode()
    def refit(self, state: Mapping[str, torch.Tensor]) -> None:
        # In-place copies: compiled code reads the live parameters, so no recompile happens.
        live = self.model.state_dict()
        for name, tensor in state.items():
            live[name].copy_(tensor)


class InductorBackend(Backend):
    name = "inductor"
    swap = "in-place"

    def settings(self) -> dict[str, Any]:
        return {"mode": "default", "dynamic_batch": True, "cache": "mega-cache"}

    def compile(self, model: nn.Module, spec: InputSpec) -> bytes:
        compiled = torch.compile(model)
        _warm_calls(compiled, spec, self.device)
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing to cache")
        return bytes(saved[0])

    def load(self, artifact: bytes, model: nn.Module, spec: InputSpec) -> Engine:
        torch.compiler.load_cache_artifacts(artifact)
        compiled = torch.compile(model)
        _warm_calls(compiled, spec, self.device)
        return InductorEngine(model, compiled)
