"""Torch-TensorRT: an exported program compiled into refittable TensorRT engines, cached per subgraph.

Written to the documented API of torch-tensorrt 2.11 and 2.13+; type-checked against both sources.
It cannot run on machines without TensorRT: tests/gpu/ exercises it where TensorRT exists.
Pitfalls handled here: caching is off unless ``immutable_weights=False``; unknown keyword arguments are
silently dropped upstream (so every keyword is checked against the installed signature first); a failed
refit verification is only logged upstream (the worker checks outputs itself after every refit).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from warmserve.serve.backends.base import Backend, Engine, given, tensors
from warmserve.serve.backends.export import export
from warmserve.serve.errors import BackendUnavailable
from warmserve.serve.spec import InputSpec

logger = logging.getLogger(__name__)

COMPILE_SETTINGS: dict[str, Any] = {
    "immutable_weights": False,  # refittable engines; without it the engine cache is silently off
    "cache_built_engines": True,
    "reuse_cached_engines": True,
    "min_block_size": 1,
    "optimization_level": 3,
}


def checked_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse keywords the installed ``torch_tensorrt.dynamo.compile`` would silently ignore."""
    import torch_tensorrt
    from torch_tensorrt.dynamo import CompilationSettings

    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    known = set(params) | {f.name for f in dataclasses.fields(CompilationSettings)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise BackendUnavailable(
            f"torch_tensorrt {torch_tensorrt.__version__} does not accept {unknown}; they would be silently ignored"
        )
    return dict(kwargs)


def trt_inputs(spec: InputSpec) -> list[Any]:
    """One ``torch_tensorrt.Input`` per input: its batch and dynamic dimensions from their smallest to their
    largest size, optimised for the traced example's. Precision comes from the dtypes (strong typing): the
    worker casts the model and float inputs to the serving precision first."""
    import torch_tensorrt

    opt = spec.example_sizes()

    def shape(batch: int, pick: Any) -> tuple[int, ...]:
        return (batch, *(pick(d) if isinstance(d, str) else d for d in t.shape))

    out = []
    for t in spec.tensors:
        out.append(
            torch_tensorrt.Input(
                min_shape=shape(spec.min_batch, lambda d: spec.dims[d][0]),
                opt_shape=shape(spec.export_batch, lambda d: opt[d]),
                max_shape=shape(spec.max_batch, lambda d: spec.dims[d][1]),
                dtype=t.torch_dtype,
            )
        )
    return out


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose weights (the tensors of its state dict) are empty meta tensors, for a refit to
    load new weights into: nothing a refit does, refused or not, reaches the module that serves."""
    persistent = set(model.state_dict())
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in persistent:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class TensorRTEngine(Engine):
    def __init__(self, module: Any, model: nn.Module, spec: InputSpec, device: torch.device) -> None:
        self.module = module
        self.model = skeleton(model)  # the engine's own: the worker's model is never written to
        self.spec = spec
        self.device = device

    @torch.inference_mode()
    def __call__(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return tensors(self.module(*xs))

    def refit(self, state: Mapping[str, torch.Tensor]) -> None:
        from torch_tensorrt.dynamo import refit_module_weights

        with torch.no_grad():
            self.model.load_state_dict(dict(state), strict=True, assign=True)  # shared, not copied
        program = export(self.model, self.spec, self.device)
        # Modules from torch_tensorrt.load are "inline": in_place=True is refused upstream, so swap in the copy.
        self.module = refit_module_weights(
            self.module,
            program,
            arg_inputs=list(self.spec.examples(device=self.device)),
            verify_output=False,  # upstream only logs a mismatch; the worker compares with eager itself
            in_place=False,
        )


class TensorRTBackend(Backend):
    name = "tensorrt"

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "the tensorrt backend needs a CUDA GPU"
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as e:  # torch_tensorrt raises a bare Exception when libnvinfer is missing
            return f"torch_tensorrt cannot be imported ({str(e)[:200]}); install warmserve[tensorrt] on a TensorRT host"
        return None

    def settings(self) -> dict[str, Any]:
        return dict(COMPILE_SETTINGS)

    def versions(self) -> dict[str, str]:
        import tensorrt
        import torch_tensorrt

        return {
            "torch": torch.__version__,
            "torch_tensorrt": torch_tensorrt.__version__,
            "tensorrt": str(tensorrt.__version__),
        }

    def compile(self, model: nn.Module, spec: InputSpec) -> bytes:
        import torch_tensorrt

        kwargs = dict(COMPILE_SETTINGS)
        if self.cache is not None:
            from warmserve.cache.trt import engine_cache_adapter

            kwargs["custom_engine_cache"] = engine_cache_adapter(self.cache, extra={"input": spec.doc()})
        program = export(model, spec, self.device)
        module = torch_tensorrt.dynamo.compile(
            program, arg_inputs=trt_inputs(spec), device=self.device, **checked_kwargs(kwargs)
        )
        with tempfile.TemporaryDirectory(prefix="warmserve-trt-") as tmp:
            path = os.path.join(tmp, "model.ep")
            torch_tensorrt.save(module, path, output_format="exported_program", arg_inputs=trt_inputs(spec))
            with open(path, "rb") as f:
                return f.read()

    def load(self, artifact: bytes, model: nn.Module | None, spec: InputSpec) -> Engine:
        import torch_tensorrt

        with tempfile.TemporaryDirectory(prefix="warmserve-trt-") as tmp:
            path = os.path.join(tmp, "model.ep")
            with open(path, "wb") as f:
                f.write(artifact)
            program = torch_tensorrt.load(path)
        return TensorRTEngine(program.module(), given(model), spec, self.device)
