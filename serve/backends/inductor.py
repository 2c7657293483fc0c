"""torch.compile (Inductor) whose cached artifact is the compile cache itself ("Mega-Cache").

The artifact is ``torch.compiler.save_cache_artifacts()`` after compiling and running the model; a warm
start loads it with ``load_cache_artifacts`` so the first call skips Inductor's code generation
(Dynamo still traces). Parameters stay live tensors, so a refit is a copy into them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from warmserve.serve.backends.base import Backend, Engine, given, tensors
from warmserve.serve.spec import InputSpec
from warmserve.serve.toolchain import CompilerPin

logger = logging.getLogger(__name__)


def _warm_calls(compiled: Any, spec: InputSpec, device: torch.device) -> None:
    """Run the batch sizes a server will see, so that every graph they need is compiled (and cached).

    The batch dimension is only *maybe* dynamic: Inductor may split the range (a CPU convolution on
    resnet18 guards on batch <= 15, say), and a strict ``mark_dynamic`` would then fail the compile.
    Batch 1 is always its own graph (PyTorch specialises sizes 0 and 1).
    """
    lengths: list[dict[str, int]] = [{}, *({d: n} for d, (lo, hi) in spec.dims.items() for n in {lo, hi})]
    for batch in sorted({spec.min_batch, spec.export_batch, spec.max_batch}):
        for sizes in lengths:
            xs = spec.examples(batch=batch, sizes=sizes, device=device)
            for t, x in zip(spec.tensors, xs, strict=True):
                if spec.min_batch != spec.max_batch:
                    torch._dynamo.maybe_mark_dynamic(x, 0)
                for axis, d in enumerate(t.shape):
                    if isinstance(d, str) and spec.dims[d][0] != spec.dims[d][1]:
                        torch._dynamo.maybe_mark_dynamic(x, axis + 1)
            with torch.inference_mode():
                compiled(*xs)


# CUDA graphs are recorded and replayed per thread (Inductor keeps one graph tree per thread), and a
# capture fails if another thread touches the GPU meanwhile: every compiled call that may record or
# replay a graph runs on this one thread, for every engine of the process.
_GRAPH_THREAD = ThreadPoolExecutor(1, thread_name_prefix="cudagraphs")


class InductorEngine(Engine):
    """A compiled module. With CUDA graphs, every call runs on the graph thread and its output is copied
    out of the graph's static buffer before the next replay can overwrite it."""

    def __init__(self, model: nn.Module, compiled: Any, cudagraphs: bool = False) -> None:
        self.model = model
        self.compiled = compiled
        self._thread = _GRAPH_THREAD if cudagraphs else None

    def _run(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            outs = tensors(self.compiled(*xs))
        return [o.clone() for o in outs] if self._thread is not None else outs

    def __call__(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._thread is None:
            return self._run(xs)
        return self._thread.submit(self._run, xs).result()

    def warm(self, spec: InputSpec, device: torch.device) -> None:
        if self._thread is None:
            _warm_calls(self.compiled, spec, device)
        else:
            self._thread.submit(_warm_calls, self.compiled, spec, device).result()

    @torch.inference_mode()
    def refit(self, state: Mapping[str, torch.Tensor]) -> None:
        # In-place copies: compiled code reads the live parameters, so no recompile happens.
        live = self.model.state_dict()
        for name, tensor in state.items():
            live[name].copy_(tensor)


class InductorBackend(Backend):
    name = "inductor"
    swap = "in-place"

    def __init__(self, device: torch.device, **kw: Any) -> None:
        super().__init__(device, **kw)
        # On the CPU Inductor compiles C++ kernels: with the proven compiler, recorded in the key.
        self.cxx = CompilerPin(self.workdir) if device.type == "cpu" else None

    @property
    def cudagraphs(self) -> bool:
        # CUDA graphs remove the per-kernel launch cost that dominates small batches on a fast GPU
        # (resnet18 on an H100: batch 1 8x, batch 32 1.4x the throughput of Inductor without them).
        return self.device.type == "cuda"

    @property
    def mode(self) -> str:
        return "reduce-overhead" if self.cudagraphs else "default"

    def settings(self) -> dict[str, Any]:
        settings = {"mode": self.mode, "dynamic_batch": True, "cache": "mega-cache"}
        return {**settings, "cxx": self.cxx.key_doc()} if self.cxx else settings

    def report(self) -> dict[str, Any]:
        return self.cxx.report() if self.cxx else {}

    def _compiler(self, prove: bool = True) -> contextlib.AbstractContextManager[object]:
        return self.cxx.building(prove) if self.cxx else contextlib.nullcontext()

    def compile(self, model: nn.Module, spec: InputSpec) -> bytes:
        with self._compiler():
            compiled = torch.compile(model, mode=self.mode)
            InductorEngine(model, compiled, cudagraphs=self.cudagraphs).warm(spec, self.device)
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing to cache")
        return bytes(saved[0])

    def load(self, artifact: bytes, model: nn.Module | None, spec: InputSpec) -> Engine:
        model = given(model)
        torch.compiler.load_cache_artifacts(artifact)
        engine = InductorEngine(model, torch.compile(model, mode=self.mode), cudagraphs=self.cudagraphs)
        with self._compiler(prove=False):  # the warm calls trace again; a missing kernel is rebuilt alike
            engine.warm(spec, self.device)
        return engine
