"""Plain PyTorch: no compile, the baseline every compiled backend is measured against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from warmserve.serve.backends.base import Backend, Engine, given, tensors
from warmserve.serve.spec import InputSpec


class EagerEngine(Engine):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return tensors(self.model(*xs))

    @torch.inference_mode()
    def refit(self, state: Mapping[str, torch.Tensor]) -> None:
        # copy_ keeps the live tensors' storage (and device); load_state_dict validates names.
        self.model.load_state_dict(dict(state), strict=True)


class EagerBackend(Backend):
    name = "eager"
    swap = "in-place"
    cacheable = False

    def compile(self, model: nn.Module, spec: InputSpec) -> bytes:
        return b""

    def load(self, artifact: bytes, model: nn.Module | None, spec: InputSpec) -> Engine:
        return EagerEngine(given(model))
