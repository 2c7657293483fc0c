"""What to serve: the model spec, its tensor signature (named inputs, dtypes, dynamic dimensions), precision
and weights location.

A signature is written ``NAME:DTYPE[DIM,...]`` per input, the inputs separated by spaces or ``;``, each
dimension after the batch an integer, or a dynamic dimension: ``seq=16:128`` where it first appears and ``seq``
where it appears again (the same length in every input that names it). ``<N`` after an integer input says its
values lie in [0, N): token ids beyond a vocabulary are refused with a 400 instead of reaching the device::

    input_ids:int64[seq=16:128]<30522 attention_mask:int64[seq]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from warmserve.cache.config import Setting, resolve

# The dtypes a tensor of the signature may have: warmserve's names (the key's), with the protocol's
# (FP32, INT64...) and torch's short ones accepted as aliases.
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "long": "int64",
    "int": "int32",
}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The largest relative error (max |engine - eager| / max |eager|) a verify step accepts, per precision: a
# compiled engine fuses and reorders its arithmetic, and half precision rounds each step more coarsely.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}
DEFAULT_INPUT = "input__0"


def dtype_name(text: str) -> str:
    """``"INT64"``, ``"int64"``, ``"long"`` -> ``"int64"``; a ValueError listing the choices otherwise."""
    name = ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or FP32, FP16, BF16, INT64...), got {text!r}")
    return name


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


def powers_of_two(low: int, high: int) -> list[int]:
    """The range's ends and the powers of two between them: the sizes that get a bucket."""
    sizes = {low, high}
    b = 1
    while b < high:
        if b >= low:
            sizes.add(b)
        b *= 2
    return sorted(sizes)


def round_up(n: int, step: int) -> int:
    """The smallest multiple of ``step`` that is at least ``n``."""
    return n + -n % step


def stepped_range(lo: int, hi: int, step: int) -> str | None:
    """``lo:hi/step`` narrowed to the multiples of ``step`` inside it: what to declare for a range whose ends
    are not multiples; None where no multiple lies inside."""
    low, high = round_up(lo, step), hi - hi % step
    return f"{low}:{high}/{step}" if low <= high else None


def wire_shape(dims: Sequence[int | str]) -> list[int]:
    """A shape as the protocol's metadata writes it: -1 for the batch and for every dynamic dimension."""
    return [-1, *(d if isinstance(d, int) else -1 for d in dims)]


@dataclass(frozen=True)
class TensorSpec:
    """One input: its name, dtype, the dimensions after the batch (an int, or a dynamic dimension's name) and,
    for integers, the bound its values stay below (None: unchecked)."""

    name: str
    dtype: str = "float32"
    shape: tuple[int | str, ...] = ()
    bound: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if not re.fullmatch(r"[A-Za-z_][\w.]*", self.name):
            raise ValueError(f"input name must be a word like input_ids, got {self.name!r}")
        if any(isinstance(d, int) and d <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: dimensions must be positive, got {list(self.shape)}")
        if self.bound is not None and (self.torch_dtype.is_floating_point or self.bound < 1):
            raise ValueError(f"{self.name}: a value bound (<N, N >= 1) is for integer inputs only")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_mask(self) -> bool:
        """An attention mask: padding is masked out (zeros) and the model ignores it."""
        return self.name.endswith("mask") and not self.torch_dtype.is_floating_point

    def text(self, ranges: Mapping[str, tuple[int, int]], steps: Mapping[str, int] | None = None) -> str:
        dims, seen = [], set()
        for d in self.shape:
            if isinstance(d, str) and d not in seen and d in ranges:
                step = (steps or {}).get(d)
                dims.append(f"{d}={ranges[d][0]}:{ranges[d][1]}" + (f"/{step}" if step else ""))
            else:
                dims.append(str(d))
            seen.add(d)
        return f"{self.name}:{self.dtype}[{','.join(dims)}]" + (f"<{self.bound}" if self.bound else "")


_ENTRY = re.compile(r"([A-Za-z_][\w.]*)\s*:\s*(\w+)\s*\[([^\]]*)\]\s*(?:<\s*(\d+))?")


Inputs = tuple[tuple[TensorSpec, ...], dict[str, tuple[int, int]], dict[str, int]]


def parse_inputs(text: str) -> Inputs:
    """``"input_ids:int64[seq=16:128] attention_mask:int64[seq]"`` -> the inputs, the dynamic dimensions'
    ranges and their steps (``seq=8:128/8``: multiples of 8 only; dimensions without one are left out); a
    ValueError that shows the form for anything else."""
    form = "NAME:DTYPE[DIM,...] per input, e.g. input_ids:int64[seq=16:128] attention_mask:int64[seq]"
    tensors: list[TensorSpec] = []
    ranges: dict[str, tuple[int, int]] = {}
    steps: dict[str, int] = {}
    pos = 0
    for m in _ENTRY.finditer(text):
        if text[pos : m.start()].strip(" \t\n;,"):
            raise ValueError(f"cannot read {text[pos : m.start()].strip()!r} in the inputs; write {form}")
        pos = m.end()
        name, dtype, dims_text, bound = m.groups()
        dims: list[int | str] = []
        for d in (d.strip() for d in dims_text.split(",") if d.strip()):
            dim, _, rng = d.partition("=")
            if dim.isdigit():
                dims.append(int(dim))
                continue
            if not re.fullmatch(r"[A-Za-z_]\w*", dim):
                raise ValueError(f"{name}: dimension {d!r} is neither a size nor a name like seq=16:128; write {form}")
            if rng:
                lo, hi, step = parse_range(dim, rng)
                if dim in ranges and (ranges[dim] != (lo, hi) or steps.get(dim, 1) != step):
                    before = f"{dim}={ranges[dim][0]}:{ranges[dim][1]}" + (f"/{steps[dim]}" if dim in steps else "")
                    raise ValueError(f"dimension {dim} is given two ranges, {before} and {dim}={rng}")
                ranges[dim] = (lo, hi)
                if step > 1:
                    steps[dim] = step
            dims.append(dim)
        tensors.append(TensorSpec(name, dtype, tuple(dims), int(bound) if bound else None))
    if text[pos:].strip(" \t\n;,") or not tensors:
        raise ValueError(f"cannot read {text[pos:].strip() or text!r} as inputs; write {form}")
    return tuple(tensors), ranges, steps


def parse_range(dim: str, text: str) -> tuple[int, int, int]:
    """``16:128`` -> (16, 128, 1); ``8:128/8`` -> (8, 128, 8): the sizes from MIN to MAX that are multiples of
    STEP (a model that takes only those, such as an attention kernel that wants a length in multiples of 8)."""
    rng, slash, step_text = text.partition("/")
    lo, _, hi = rng.partition(":")
    try:
        low, high, step = int(lo), int(hi), int(step_text if slash else 1)
    except ValueError as e:
        raise ValueError(
            f"dimension {dim}'s range must look like {dim}=16:128 (or {dim}=8:128/8 for multiples of 8), "
            f"got {dim}={text}"
        ) from e
    if not 1 <= low <= high:
        raise ValueError(f"dimension {dim}'s range needs 1 <= MIN <= MAX, got {dim}={text}")
    if step < 1:
        raise ValueError(f"dimension {dim}'s step must be 1 or more, got {dim}={text}")
    if low % step or high % step:
        narrowed = stepped_range(low, high, step)
        if narrowed is None:
            raise ValueError(f"dimension {dim}'s range holds no multiple of its step, got {dim}={text}")
        above = f"; lengths above {narrowed.split(':')[1].split('/')[0]} are then refused" if high % step else ""
        raise ValueError(
            f"dimension {dim}'s step needs MIN and MAX that are multiples of it, got {dim}={text}: write "
            f"{dim}={narrowed} (a dimension padded by a mask still takes shorter requests{above})"
        )
    return low, high, step


@dataclass(frozen=True)
class InputSpec:
    """A model's inputs and the batch sizes to support. With no ``tensors`` it is one input, ``input__0``, of
    ``shape`` (without the batch) and ``dtype``; ``dims`` gives each dynamic dimension's range."""

    shape: tuple[int, ...] = (3, 224, 224)
    dtype: str = "float32"
    min_batch: int = 1
    max_batch: int = 32
    tensors: tuple[TensorSpec, ...] = ()
    dims: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    steps: Mapping[str, int] = field(default_factory=dict)  # a dynamic dimension's sizes are multiples of its step

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.max_batch:
            raise ValueError(f"batch range needs 1 <= min_batch <= max_batch, got {self.min_batch}:{self.max_batch}")
        if not self.tensors:
            if not self.shape or any(int(d) <= 0 for d in self.shape):
                raise ValueError(f"input shape must be positive integers, got {self.shape}")
            object.__setattr__(self, "tensors", (TensorSpec(DEFAULT_INPUT, self.dtype, tuple(self.shape)),))
        first = self.tensors[0]
        object.__setattr__(self, "dtype", first.dtype)
        object.__setattr__(self, "shape", tuple(wire_shape(first.shape)[1:]))
        object.__setattr__(self, "dims", dict(self.dims))
        # a step of 1, or of a fixed size, says nothing: left out, so the key is that of the same engine without it
        steps = {d: n for d, n in self.steps.items() if n != 1 and (d not in self.dims or len(set(self.dims[d])) > 1)}
        object.__setattr__(self, "steps", steps)
        for d, n in self.steps.items():
            if d not in self.dims:
                raise ValueError(f"dimension {d} has a step but no range")
            if n < 1 or self.dims[d][0] % n or self.dims[d][1] % n:
                raise ValueError(f"dimension {d}'s step {n} needs a range of multiples of it, got {self.dims[d]}")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must differ, got {names}")
        used = {d for t in self.tensors for d in t.shape if isinstance(d, str)}
        if used - set(self.dims):
            raise ValueError(f"dynamic dimension(s) {sorted(used - set(self.dims))} need a range, e.g. seq=16:128")
        if set(self.dims) - used:
            raise ValueError(f"dimension(s) {sorted(set(self.dims) - used)} have a range but no input uses them")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The first input's dtype."""
        return DTYPES[self.dtype]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def padded_dims(self) -> list[str]:
        """The dynamic dimensions requests of different lengths are padded along, to share a batch: those of a
        mask input, which tells the model which positions are padding (elsewhere padding would change the
        answers). In the order of ``dims``."""
        masked = {d for t in self.tensors if t.is_mask for d in t.shape if isinstance(d, str)}
        return [d for d in self.dims if d in masked]

    @property
    def padded(self) -> bool:
        return bool(self.padded_dims)

    @property
    def export_batch(self) -> int:
        """The example batch used to trace: never 1 (export would specialise on it), inside the range."""
        return min(max(2, self.min_batch), self.max_batch)

    def example_sizes(self) -> dict[str, int]:
        """A size per dynamic dimension to trace with: inside its range, never 1, and different from the batch
        and from each other, so that export does not take two dimensions for one."""
        taken = {self.export_batch}
        sizes = {}
        for name, (lo, hi) in self.dims.items():
            if lo == hi:
                sizes[name] = lo
                taken.add(lo)
                continue
            step = self.step(name)
            start = min(round_up(max(lo, 2, (lo + hi) // 2), step), hi)
            # the middle of the range, then the sizes above it, then those below (a step leaves few to pick from)
            candidates = [*range(start, hi + 1, step), *range(start - step, round_up(max(lo, 2), step) - 1, -step)]
            size = next((n for n in candidates if n not in taken), None)
            if size is None:
                raise ValueError(
                    f"dimension {name}={self.range_text(name)} has no size to trace with that differs from the "
                    "batch's and the other dimensions'; widen its range"
                )
            taken.add(size)
            sizes[name] = size
        return sizes

    def range_text(self, dim: str) -> str:
        """A dynamic dimension's range as the inputs' form writes it: ``16:128``, ``8:128/8``."""
        lo, hi = self.dims[dim]
        return f"{lo}:{hi}" + (f"/{self.steps[dim]}" if dim in self.steps else "")

    def step(self, dim: str) -> int:
        """The multiple a dynamic dimension's sizes are (1: any size)."""
        return self.steps.get(dim, 1)

    def buckets(self, dim: str) -> list[int]:
        """The lengths a padded dimension is padded to (and a CUDA graph is recorded for): multiples of its step."""
        step = self.step(dim)
        return sorted({round_up(n, step) for n in powers_of_two(*self.dims[dim])})

    def batch_buckets(self) -> list[int]:
        return powers_of_two(self.min_batch, self.max_batch)

    def examples(
        self,
        batch: int | None = None,
        sizes: Mapping[str, int] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        float_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """One example tensor per input: floats random (in ``float_dtype`` if given), masks ones, integers
        below their bound (or 16)."""
        g = torch.Generator().manual_seed(seed)
        lengths = {**self.example_sizes(), **(sizes or {})}
        out = []
        for t in self.tensors:
            shape = (batch or self.export_batch, *(lengths[d] if isinstance(d, str) else d for d in t.shape))
            if t.torch_dtype.is_floating_point:
                x = torch.randn(shape, generator=g).to(float_dtype or t.torch_dtype)
            elif t.is_mask:
                x = torch.ones(shape, dtype=t.torch_dtype)
            elif t.torch_dtype == torch.bool:
                x = torch.rand(shape, generator=g) > 0.5
            else:
                x = torch.randint(0, t.bound or 16, shape, generator=g, dtype=t.torch_dtype)
            out.append(x.to(device))
        return tuple(out)

    def example(self, batch: int | None = None, device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
        """The first input's example (models of one input)."""
        return self.examples(batch, device=device, seed=seed)[0]

    def text(self) -> str:
        return " ".join(t.text(self.dims, self.steps) for t in self.tensors)

    def cast(self, dtype: torch.dtype) -> InputSpec:
        """This signature as the engine takes it: float inputs in ``dtype`` (the serving precision)."""
        name = next(k for k, v in DTYPES.items() if v == dtype)
        tensors = tuple(
            TensorSpec(t.name, name, t.shape, t.bound) if t.torch_dtype.is_floating_point else t for t in self.tensors
        )
        return InputSpec(
            min_batch=self.min_batch, max_batch=self.max_batch, tensors=tensors, dims=self.dims, steps=self.steps
        )

    def doc(self) -> dict[str, Any]:
        """What the compiled engine depends on: part of the cache key."""
        if len(self.tensors) == 1 and not self.dims and self.tensors[0].name == DEFAULT_INPUT:
            return {"shape": list(self.shape), "dtype": self.dtype, "batch": [self.min_batch, self.max_batch]}
        doc: dict[str, Any] = {
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.tensors],
            "dims": {k: list(v) for k, v in sorted(self.dims.items())},
            "batch": [self.min_batch, self.max_batch],
            "padded": self.padded,
        }
        if self.steps:  # only then: the keys of engines built before steps existed stay as they were
            doc["steps"] = dict(sorted(self.steps.items()))
        return doc


@dataclass(frozen=True)
class ModelSpec:
    """``model`` is ``torchvision:<name>`` or ``package.module:factory``; ``weights`` a path or fsspec URL;
    ``outputs`` names the model's outputs (default: a dict's keys, else output__0, output__1...)."""

    model: str = "torchvision:resnet18"
    weights: str | None = None
    input: InputSpec = field(default_factory=InputSpec)
    precision: str = "fp32"
    name: str = ""
    weights_version: str = "v1"
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if ":" not in self.model:
            from warmserve.serve.model import unqualified  # imports torchvision, for the names it may have meant

            raise ValueError(unqualified(self.model))
        if not self.name:
            object.__setattr__(self, "name", self.model.rpartition(":")[2].replace(".", "-"))
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"output names must differ, got {list(self.outputs)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.precision]

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ModelSpec:
        """From `resolve`'s values of `MODEL_SETTINGS`."""
        lo, hi = values["batch"]
        if values["inputs"] is not None:
            if values["input_shape"] != InputSpec.shape or values["dtype"] != InputSpec.dtype:
                raise ValueError("inputs: give either inputs or input_shape and dtype (one input), not both")
            tensors, dims, steps = values["inputs"]
            spec = InputSpec(min_batch=lo, max_batch=hi, tensors=tensors, dims=dims, steps=steps)
        else:
            spec = InputSpec(shape=values["input_shape"], dtype=values["dtype"], min_batch=lo, max_batch=hi)
        return cls(
            model=values["model"],
            weights=values["weights"],
            input=spec,
            precision=values["precision"],
            name=values["name"],
            weights_version=values["weights_version"],
            outputs=values["outputs"] or (),
        )

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> ModelSpec:
        """From a mapping of model settings (`MODEL_SETTINGS`' keys; the rest default); unknown keys are an error."""
        return cls.from_values(resolve(MODEL_SETTINGS, args=doc, environ={}, source="the model settings"))


def _shape(value: str | Sequence[int]) -> tuple[int, ...]:
    return parse_shape(value) if isinstance(value, str) else parse_shape(",".join(str(int(d)) for d in value))


def _batch(value: str | Sequence[int]) -> tuple[int, int]:
    return parse_batch(value) if isinstance(value, str) else parse_batch(":".join(str(int(d)) for d in value))


def _inputs(value: str | Sequence[str]) -> Inputs:
    """The form of `parse_inputs`, or (in config.yaml) a list of such entries, one input each."""
    tensors, dims, steps = parse_inputs(value if isinstance(value, str) else " ".join(str(v) for v in value))
    InputSpec(tensors=tensors, dims=dims, steps=steps)  # every name has a range, every range a name: said here
    return tensors, dims, steps


def _outputs(value: str | Sequence[str]) -> tuple[str, ...]:
    names = tuple(value.replace(",", " ").split()) if isinstance(value, str) else tuple(str(v) for v in value)
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][\w.]*", n)]
    if bad or not names:
        raise ValueError(f"output names must be words like last_hidden_state, got {bad or value!r}")
    return names


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
        "input shape without the batch (a model of one float input)",
        _shape,
        metavar="C,H,W",
        shown=",".join(map(str, InputSpec.shape)),
    ),
    Setting("dtype", InputSpec.dtype, "input dtype (a model of one input)", choices=tuple(DTYPES)),
    Setting(
        "inputs",
        None,
        "the model's inputs, in the order its forward takes them: NAME:DTYPE[DIM,...] each, a dimension an integer "
        "or a dynamic one named with its range (seq=16:128; seq=8:128/8 for multiples of 8 only), <N bounding an "
        "integer input's values, e.g. "
        "'input_ids:int64[seq=16:128]<30522 attention_mask:int64[seq]'",
        _inputs,
        metavar="SIGNATURE",
        shown="one input, input__0, of --input-shape and --dtype",
    ),
    Setting(
        "outputs",
        None,
        "names of the model's outputs, in the order it returns them",
        _outputs,
        metavar="NAMES",
        shown="a returned dict's keys, else output__0, output__1, ...",
    ),
    Setting(
        "batch",
        (InputSpec.min_batch, InputSpec.max_batch),
        "batch sizes the compiled engine takes",
        _batch,
        metavar="MIN:MAX",
        shown=f"{InputSpec.min_batch}:{InputSpec.max_batch}",
    ),
    Setting(
        "precision", ModelSpec.precision, "serving precision (float weights and inputs)", choices=tuple(PRECISIONS)
    ),
    Setting(
        "name",
        ModelSpec.name,
        "the model's name in /v2/models/<name>",
        commands=frozenset(),
        shown="the model's, e.g. resnet18",
    ),
)
