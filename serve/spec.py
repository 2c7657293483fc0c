"""What to serve: the model spec, its input spec, precision and weights location."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> (3, 224, 224)."""
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError as e:
        raise ValueError(f"input shape must be comma-separated integers like 3,224,224, got {text!r}") from e
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"input shape must be positive integers like 3,224,224, got {text!r}")
    return dims


def parse_batch(text: str) -> tuple[int, int]:
    """``"1:32"`` -> (1, 32); ``"8"`` -> (8, 8)."""
    lo, _, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError as e:
        raise ValueError(f"batch range must look like MIN:MAX (e.g. 1:32), got {text!r}") from e
    if not 1 <= low <= high:
        raise ValueError(f"batch range needs 1 <= MIN <= MAX, got {text!r}")
    return low, high


@dataclass(frozen=True)
class InputSpec:
    """One input tensor: its shape without the batch dimension, dtype, and the batch sizes to support."""

    shape: tuple[int, ...] = (3, 224, 224)
    dtype: str = "float32"
    min_batch: int = 1
    max_batch: int = 32

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"input dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.min_batch <= self.max_batch:
            raise ValueError(f"batch range needs 1 <= min_batch <= max_batch, got {self.min_batch}:{self.max_batch}")
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise ValueError(f"input shape must be positive integers, got {self.shape}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def export_batch(self) -> int:
        """The example batch used to trace: never 1 (export would specialise on it), inside the range."""
        return min(max(2, self.min_batch), self.max_batch)

    def example(self, batch: int | None = None, device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch or self.export_batch, *self.shape), generator=g)
        return x.to(device=device, dtype=self.torch_dtype)

    def doc(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "batch": [self.min_batch, self.max_batch]}


@dataclass(frozen=True)
class ModelSpec:
    """``model`` is ``torchvision:<name>`` or ``package.module:factory``; ``weights`` a path or fsspec URL."""

    model: str = "torchvision:resnet18"
    weights: str | None = None
    input: InputSpec = field(default_factory=InputSpec)
    precision: str = "fp32"
    name: str = ""
    weights_version: str = "v1"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if ":" not in self.model:
            raise ValueError(f"model must be torchvision:<name> or package.module:factory, got {self.model!r}")
        if not self.name:
            object.__setattr__(self, "name", self.model.rpartition(":")[2].replace(".", "-"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> ModelSpec:
        """Build from a config dict (YAML ``model:`` section); unknown keys are an error."""
        known = {"model", "weights", "input_shape", "dtype", "batch", "precision", "name", "weights_version"}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown model setting(s) {sorted(unknown)}; known: {sorted(known)}")
        shape = doc.get("input_shape", "3,224,224")
        shape_t = parse_shape(shape) if isinstance(shape, str) else tuple(int(d) for d in shape)
        batch = doc.get("batch", "1:32")
        lo, hi = parse_batch(batch) if isinstance(batch, str) else (int(batch[0]), int(batch[1]))
        return cls(
            model=str(doc.get("model", "torchvision:resnet18")),
            weights=doc.get("weights"),
            input=InputSpec(shape=shape_t, dtype=str(doc.get("dtype", "float32")), min_batch=lo, max_batch=hi),
            precision=str(doc.get("precision", "fp32")),
            name=str(doc.get("name", "")),
            weights_version=str(doc.get("weights_version", "v1")),
        )
