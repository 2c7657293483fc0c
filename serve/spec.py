"""What to serve: the model spec, its input spec, precision and weights location."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from warmserve.cache.config import Setting, resolve

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
    def from_values(cls, values: Mapping[str, Any]) -> ModelSpec:
        """From `resolve`'s values of `MODEL_SETTINGS`."""
        lo, hi = values["batch"]
        return cls(
            model=values["model"],
            weights=values["weights"],
            input=InputSpec(shape=values["input_shape"], dtype=values["dtype"], min_batch=lo, max_batch=hi),
            precision=values["precision"],
            name=values["name"],
            weights_version=values["weights_version"],
        )

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> ModelSpec:
        """From a mapping of model settings (`MODEL_SETTINGS`' keys; the rest default); unknown keys are an error."""
        return cls.from_values(resolve(MODEL_SETTINGS, args=doc, environ={}, source="the model settings"))


def _shape(value: str | Sequence[int]) -> tuple[int, ...]:
    return parse_shape(value) if isinstance(value, str) else parse_shape(",".join(str(int(d)) for d in value))


def _batch(value: str | Sequence[int]) -> tuple[int, int]:
    return parse_batch(value) if isinstance(value, str) else parse_batch(":".join(str(int(d)) for d in value))


# What to serve, as settings: options of `warmserve build` and `warmserve run`, keys of config.yaml's args. No
# variable gives any of them: every replica of a deployment must serve the same model, whatever its node.
MODEL_SETTINGS: tuple[Setting, ...] = (
    Setting("model", ModelSpec.model, "torchvision:<name> or package.module:factory", metavar="MODEL"),
    Setting(
        "weights",
        None,
        "safetensors or torch state dict: a path or fsspec URL",
        metavar="URI",
        shown="seeded demo weights, written once under the cache directory",
    ),
    Setting("weights_version", ModelSpec.weights_version, "label of these weights", metavar="V"),
    Setting(
        "input_shape",
        InputSpec.shape,
        "input shape without the batch",
        _shape,
        metavar="C,H,W",
        shown=",".join(map(str, InputSpec.shape)),
    ),
    Setting("dtype", InputSpec.dtype, "input dtype", choices=tuple(DTYPES)),
    Setting(
        "batch",
        (InputSpec.min_batch, InputSpec.max_batch),
        "batch sizes the compiled engine takes",
        _batch,
        metavar="MIN:MAX",
        shown=f"{InputSpec.min_batch}:{InputSpec.max_batch}",
    ),
    Setting("precision", ModelSpec.precision, "serving precision", choices=tuple(PRECISIONS)),
    Setting(
        "name",
        ModelSpec.name,
        "the model's name in /v2/models/<name>",
        commands=frozenset(),
        shown="the model's, e.g. resnet18",
    ),
)
