"""torch.export with the batch range of an input spec: shared by the backends that compile an exported program."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from warmserve.serve.spec import InputSpec


def export(model: nn.Module, spec: InputSpec, device: torch.device) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension covering ``spec``'s batch range."""
    example = spec.example(device=device)
    dynamic: Any = None
    if spec.min_batch != spec.max_batch:
        batch = torch.export.Dim("batch", min=spec.min_batch, max=spec.max_batch)
        dynamic = ({0: batch},)
    else:
        example = spec.example(batch=spec.min_batch, device=device)
    with torch.inference_mode(False), torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic)
