"""Requests into engine batches and answers back out: the signature's checks, padding to a length bucket, and
each answer cut back to its own rows and length.

Requests of different lengths share one engine call along the dimensions of a mask input (`InputSpec.
padded_dims`): each is padded with zeros (a mask's zeros mark padding) to the smallest bucket that holds the
longest. Along any other dynamic dimension, requests are grouped by length and each group runs at its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from warmserve.serve.errors import InputError
from warmserve.serve.spec import InputSpec, TensorSpec, wire_shape

Request = Sequence[torch.Tensor]
Outputs = list[torch.Tensor]


@dataclass(frozen=True)
class OutputSpec:
    """One output: its name, dtype on the wire, and the dimensions after the batch (an int, or the name of the
    input dimension it follows, such as ``seq``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def doc(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": wire_shape(self.shape),
        }


def _dtype_word(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def accepts(t: TensorSpec, dtype: torch.dtype) -> bool:
    """A float input takes FP32, FP16 or BF16 (cast to the serving precision), an integer one INT32 or INT64."""
    want = t.torch_dtype
    if want.is_floating_point:
        return dtype in (torch.float32, torch.float16, torch.bfloat16)
    if want == torch.bool:
        return dtype == torch.bool
    return dtype in (torch.int32, torch.int64)


def check_request(spec: InputSpec, xs: Sequence[object], pixels: bool = False) -> list[torch.Tensor]:
    """``xs`` if they are one request this signature takes (``pixels``: the first may also be UINT8), else an
    `InputError` that says what was expected."""
    if len(xs) != len(spec.tensors):
        raise InputError(f"this model takes {len(spec.tensors)} input(s) ({', '.join(spec.names)}), got {len(xs)}")
    sizes: dict[str, int] = {}
    batch = None
    out: list[torch.Tensor] = []
    for t, x in zip(spec.tensors, xs, strict=True):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{t.name}: expected a tensor, got {type(x).__name__}")
        dims = ["batch", *(str(d) for d in t.shape)]
        if x.dim() != len(t.shape) + 1:
            raise InputError(f"{t.name}: expected shape [{', '.join(dims)}], got {list(x.shape)}")
        if x.shape[0] < 1:
            raise InputError(f"{t.name}: empty batch")
        if batch is not None and x.shape[0] != batch:
            raise InputError(f"{t.name}: batch of {x.shape[0]} rows, but the other inputs have {batch}")
        batch = x.shape[0]
        for axis, d in enumerate(t.shape):
            n = x.shape[axis + 1]
            if isinstance(d, int):
                if n != d:
                    raise InputError(f"{t.name}: expected shape [{', '.join(dims)}], got {list(x.shape)}")
                continue
            lo, hi = spec.dims[d]
            low = 1 if d in spec.padded_dims else lo  # shorter ones are padded
            if not low <= n <= hi:
                raise InputError(f"{t.name}: {d} is {n}; this model takes {d} from {low} to {hi}")
            step = spec.step(d)
            if n % step and d not in spec.padded_dims:  # a padded one is padded to a multiple
                raise InputError(f"{t.name}: {d} is {n}; this model takes {d} in multiples of {step} only")
            if sizes.setdefault(d, n) != n:
                raise InputError(f"{t.name}: {d} is {n}, but another input has {d} {sizes[d]}")
        if not (accepts(t, x.dtype) or (pixels and x.dtype == torch.uint8 and len(out) == 0)):
            raise InputError(f"{t.name}: expected dtype {t.dtype}, got {_dtype_word(x.dtype)}")
        if t.bound is not None and x.numel() and (int(x.min()) < 0 or int(x.max()) >= t.bound):
            raise InputError(f"{t.name}: values must lie in [0, {t.bound}), got {int(x.min())}..{int(x.max())}")
        out.append(x)
    return out


def lengths(spec: InputSpec, xs: Request) -> tuple[int, ...]:
    """The request's size of each dynamic dimension, in the order of ``spec.dims``."""
    sizes: dict[str, int] = {}
    for t, x in zip(spec.tensors, xs, strict=True):
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                sizes.setdefault(d, x.shape[axis + 1])
    return tuple(sizes[d] for d in spec.dims)


def pad_to(spec: InputSpec, xs: Request, target: dict[str, int]) -> list[torch.Tensor]:
    """Each input zero-padded at the end of its dynamic dimensions to ``target``'s lengths."""
    out = []
    for t, x in zip(spec.tensors, xs, strict=True):
        pad: list[int] = []
        for axis in reversed(range(len(t.shape))):
            d = t.shape[axis]
            pad += [0, (target[d] - x.shape[axis + 1]) if isinstance(d, str) else 0]
        out.append(F.pad(x, pad) if any(pad) else x)
    return out


def cut(outputs: Outputs, specs: Sequence[OutputSpec], rows: int, sizes: dict[str, int]) -> Outputs:
    """One request's answer: the first ``rows`` of each output, each dynamic dimension cut to its ``sizes``."""
    out = []
    for o, s in zip(outputs, specs, strict=True):
        index: list[slice] = [slice(0, rows)]
        index += [slice(0, sizes[d]) if isinstance(d, str) and d in sizes else slice(None) for d in s.shape]
        out.append(o[tuple(index)])
    return out


def run_requests(
    spec: InputSpec, specs: Sequence[OutputSpec], requests: Sequence[Request], run: Callable[[Request], Outputs]
) -> list[Outputs]:
    """Each request's outputs, with as few calls of ``run`` (one batch of every input) as the signature allows."""
    names = list(spec.dims)
    if not names:
        return _split(specs, requests, run, {})
    padded = spec.padded_dims
    own = [dict(zip(names, lengths(spec, r), strict=True)) for r in requests]
    # Requests share a call when their unpadded dimensions agree; padded ones go to the bucket of the longest.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, sizes in enumerate(own):
        groups.setdefault(tuple(n for d, n in sizes.items() if d not in padded), []).append(i)
    answers: list[Outputs | None] = [None] * len(requests)
    for members in groups.values():
        target = dict(own[members[0]])
        for d in padded:
            buckets = spec.buckets(d)
            target[d] = buckets[bisect.bisect_left(buckets, max(own[i][d] for i in members))]
        batch = [pad_to(spec, requests[i], target) for i in members]
        for i, o in zip(members, _split(specs, batch, run, {}), strict=True):
            answers[i] = cut(o, specs, o[0].shape[0], own[i])
    return [a for a in answers if a is not None]


def _split(
    specs: Sequence[OutputSpec], requests: Sequence[Request], run: Callable[[Request], Outputs], sizes: dict[str, int]
) -> list[Outputs]:
    rows = [r[0].shape[0] for r in requests]
    batch = [
        torch.cat([r[k] for r in requests]) if len(requests) > 1 else requests[0][k] for k in range(len(requests[0]))
    ]
    outs = run(batch)
    per_output = [torch.split(o, rows) for o in outs]
    return [cut([p[i] for p in per_output], specs, rows[i], sizes) for i in range(len(requests))]


__all__ = ["OutputSpec", "check_request", "cut", "lengths", "pad_to", "run_requests"]
