"""torch.export with the batch range and dynamic dimensions of an input spec: shared by the backends that
compile an exported program."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from warmserve.serve.errors import ModelSpecError
from warmserve.serve.spec import InputSpec, stepped_range


def dynamic_shapes(spec: InputSpec) -> tuple[dict[int, Any], ...] | None:
    """One ``{axis: Dim}`` per input: the batch (when its range is one) and every named dimension, the same
    ``Dim`` wherever a name appears, so export knows two inputs share a sequence length."""
    dims = {name: dim(name, lo, hi, spec.step(name)) for name, (lo, hi) in spec.dims.items() if lo != hi}
    batch = torch.export.Dim("batch", min=spec.min_batch, max=spec.max_batch)
    shapes = []
    for t in spec.tensors:
        axes: dict[int, Any] = {0: batch} if spec.min_batch != spec.max_batch else {}
        axes.update({i + 1: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dims})
        shapes.append(axes)
    return tuple(shapes) if any(shapes) else None


def dim(name: str, lo: int, hi: int, step: int) -> Any:
    """export's dimension of sizes ``lo``..``hi`` in multiples of ``step``: ``step * Dim`` (a derived dimension)
    where the step is more than 1."""
    if step == 1:
        return torch.export.Dim(name, min=lo, max=hi)
    return step * torch.export.Dim(f"{name}_{step}", min=lo // step, max=hi // step)


def export(model: nn.Module, spec: InputSpec, device: torch.device) -> torch.export.ExportedProgram:
    """torch.export over ``spec``'s ranges (a fixed batch or length traces at that size)."""
    batch = spec.export_batch if spec.min_batch != spec.max_batch else spec.min_batch
    sizes = {name: lo for name, (lo, hi) in spec.dims.items() if lo == hi}
    examples = spec.examples(batch=batch, sizes=sizes, device=device)
    with torch.inference_mode(False), torch.no_grad():
        try:
            return torch.export.export(model, examples, dynamic_shapes=dynamic_shapes(spec))
        except RuntimeError as e:  # torch's UserError for a constraint violation is one
            fixes = suggested_fixes(e)
            if fixes is None:
                raise
            raise ModelSpecError(
                f"the model does not export for every size declared ({spec.text()}): torch.export suggests "
                f"{fixes}; declare ranges it allows{step_hint(spec, fixes)}, or a fixed size"
            ) from e


def step_hint(spec: InputSpec, fixes: str) -> str:
    """For export's ``seq = 8*_seq`` (a length it keeps dynamic only in multiples of 8): the declaration that
    says so, `` (seq=8:128/8)``; empty for any other fix."""
    hints = []
    for name, step in re.findall(r"\b(\w+) = (\d+)\*_\1\b", fixes):
        narrowed = stepped_range(*spec.dims[name], int(step)) if name in spec.dims and int(step) > 1 else None
        if narrowed is not None:
            hints.append(f"{name}={narrowed}")
    return f" ({', '.join(hints)})" if hints else ""


def suggested_fixes(e: BaseException) -> str | None:
    """torch.export's "Suggested fixes" of a constraint violation, on one line; None for any other error."""
    if "CONSTRAINT_VIOLATION" not in str(getattr(e, "error_type", "")):
        return None
    text = str(e)
    _, found, fixes = text.partition("Suggested fixes:")
    lines = [line.strip() for line in fixes.strip().split("\n\n")[0].splitlines() if line.strip()]
    if found and lines:
        return "; ".join(lines)
    return f"no fix (it says: {' '.join(text.splitlines()[0].split())})"
