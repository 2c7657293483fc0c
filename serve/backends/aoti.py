"""AOTInductor: a ``.pt2`` package compiled ahead of time, weights kept out; ``load_constants`` is the refit."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import torch
import torch._inductor.config
from torch import nn

from serve.backends.base import Backend, Engine
from serve.errors import RefitError
from serve.spec import InputSpec

logger = logging.getLogger(__name__)

INDUCTOR_CONFIGS: dict[str, Any] = {
    # The package holds code only; weights arrive through load_constants (refit) after every load.
    "aot_inductor.package_constants_in_so": False,
    # Without this, Inductor folds some weights at compile time (a conv bias with its batch norm, say)
    # into constants that load_constants cannot reach: a refit would silently keep the old values.
    # Folding at run time recomputes them from the loaded weights.
    "aot_inductor.use_runtime_constant_folding": True,
}
FOLDED_PREFIX = "_FOLDED_CONST_"


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


class AOTIEngine(Engine):
    def __init__(self, runner: Any, device: torch.device) -> None:
        self.runner = runner
        self.device = device
        # Folded constants are derived from the weights at run time; the rest are the model's tensors.
        self.fqns = {n for n in runner.get_constant_fqns() if not n.startswith(FOLDED_PREFIX)}

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.runner(x)
        return out[0] if isinstance(out, list | tuple) else out  # type: ignore[no-any-return]

    def refit(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = self.fqns - set(state)
        if missing:
            raise RefitError(f"weights lack {len(missing)} constant(s) the engine needs, e.g. {sorted(missing)[:3]}")
        # Only the engine's constants (num_batches_tracked, for one, is not one).
        constants = {k: state[k].to(self.device).contiguous() for k in self.fqns}
        self.runner.load_constants(constants, check_full_update=False)


class AOTIBackend(Backend):
    name = "aoti"

    def settings(self) -> dict[str, Any]:
        return {"inductor_configs": INDUCTOR_CONFIGS, "export": "dynamic-batch"}

    def compile(self, model: nn.Module, spec: InputSpec) -> bytes:
        from torch._inductor import aoti_compile_and_package

        program = export(model, spec, self.device)
        with tempfile.TemporaryDirectory(prefix="warmserve-aoti-") as tmp:
            path = os.path.join(tmp, "model.pt2")
            aoti_compile_and_package(program, package_path=path, inductor_configs=dict(INDUCTOR_CONFIGS))
            with open(path, "rb") as f:
                return f.read()

    def load(self, artifact: bytes, model: nn.Module, spec: InputSpec) -> Engine:
        from torch._inductor import aoti_load_package

        # The loader wants a file; it extracts the shared library itself, so the file can go at once.
        # After loading, torch compares the package's device metadata with this machine's, only to log a
        # warning, and finding this CPU's ISA compiles and dlopens probe programs with g++ (1.5 s on an
        # AVX-512 VNNI machine, in every process whose Inductor cache is empty). The cache key already
        # pins the ISA (device_doc), so that comparison is skipped.
        with tempfile.NamedTemporaryFile(prefix="warmserve-", suffix=".pt2") as f, _no_device_comparison():
            f.write(artifact)
            f.flush()
            index = self.device.index if self.device.index is not None else -1
            runner = aoti_load_package(f.name, device_index=index)
        return AOTIEngine(runner, self.device)


# The patch swaps a module attribute: two loads at once in one process must not interleave it.
_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_device_comparison() -> Iterator[None]:
    """Skip the loader's device-metadata comparison (a warning only; see ``AOTIBackend.load``)."""
    import torch._inductor.codecache as codecache

    if hasattr(codecache, "get_device_information"):
        skip: contextlib.AbstractContextManager[object] = mock.patch.object(
            codecache, "get_device_information", lambda device_type: {}
        )
    else:  # a torch without that function: at least skip the ISA probe build
        skip = torch._inductor.config.patch({"cpp.vec_isa_ok": True})
    with _LOAD_LOCK, skip:
        yield
