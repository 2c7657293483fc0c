"""AOTInductor: a ``.pt2`` package compiled ahead of time, weights kept out; ``load_constants`` is the refit.

On CUDA every call replays a CUDA graph recorded after each refit for the smallest batch bucket that fits
(powers of two up to the engine's largest batch): a replay launches the whole network at once, where the
package alone pays a kernel launch per operator. Recording compiles nothing: a warm-up run per bucket (which
loads kernels and picks cuDNN's algorithms), then a capture of the launches; a hot swap holds requests back
while it records the standby engine's graphs (0.15 s for resnet18 on an H100).
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from warmserve.serve.backends.base import Backend, Engine
from warmserve.serve.backends.export import export
from warmserve.serve.batching import lengths
from warmserve.serve.errors import RefitError
from warmserve.serve.spec import InputSpec
from warmserve.serve.toolchain import CompilerPin

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


def buckets(spec: InputSpec) -> list[tuple[int, tuple[int, ...]]]:
    """The shapes that get a CUDA graph: each batch bucket (powers of two inside the range, and its ends) with
    each combination of the padded dimensions' buckets. None where a dynamic dimension is not padded (requests
    run at their own length there, which a graph would fit only by chance): the package runs alone."""
    if any(lo != hi and d not in spec.padded_dims for d, (lo, hi) in spec.dims.items()):
        return []
    shapes: list[tuple[int, tuple[int, ...]]] = [(b, ()) for b in spec.batch_buckets()]
    for name in spec.dims:
        shapes = [(b, (*rest, n)) for b, rest in shapes for n in spec.buckets(name)]
    return shapes


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


class AOTIEngine(Engine):
    """A loaded package. With ``graphs``, calls replay CUDA graphs; any refit records them again (runtime
    constant folding gives the folded weights new memory, which a graph recorded before would still read)."""

    def __init__(self, runner: Any, device: torch.device, spec: InputSpec, graphs: bool = False) -> None:
        self.runner = runner
        self.device = device
        self.spec = spec
        self.use_graphs = graphs
        self.exclusive_prepare = graphs  # a capture must not overlap other work on the device
        # Folded constants are derived from the weights at run time; the rest are the model's tensors.
        self.fqns = {n for n in runner.get_constant_fqns() if not n.startswith(FOLDED_PREFIX)}
        # (the dynamic dimensions' sizes) -> ascending batch sizes -> graph
        self._graphs: dict[tuple[int, ...], dict[int, _Graph]] = {}
        self._lock = threading.Lock()  # a graph's static input and output serve one call at a time

    def _run(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.runner.run(list(xs)))

    @torch.inference_mode()
    def __call__(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        graphs = self._graphs.get(lengths(self.spec, xs)) if self._graphs else None  # swapped whole by a refit
        n = xs[0].shape[0]
        if not graphs or n > next(reversed(graphs)):
            return self._run(xs)  # a length with no bucket: the package alone
        sizes = list(graphs)  # ascending: filled smallest bucket first
        g = graphs[sizes[bisect.bisect_left(sizes, n)]]
        with self._lock:
            for static, x in zip(g.inputs, xs, strict=True):
                static[:n].copy_(x)
            g.graph.replay()
            return [out[:n].clone() for out in g.outputs]

    def refit(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = self.fqns - set(state)
        if missing:
            raise RefitError(f"weights lack {len(missing)} constant(s) the engine needs, e.g. {sorted(missing)[:3]}")
        # Graphs recorded against the old folded constants are never replayed again; the next run folds anew.
        self._graphs = {}
        # Only the engine's constants (num_batches_tracked, for one, is not one).
        constants = {k: state[k].to(self.device).contiguous() for k in self.fqns}
        self.runner.load_constants(constants, False, False)  # into the active buffer, a partial update allowed

    def idle(self) -> None:
        self._graphs = {}  # their memory pool goes with them; the next refit records them anew

    def prepare(self) -> None:
        """Record one CUDA graph per bucket (`buckets`): a warm-up run per bucket (constant folding, kernel
        loading, cuDNN's algorithm choice), then the captures, largest first so the smaller graphs reuse its
        pool memory. Nothing compiles. The warm-up runs on the current stream: on a side stream, the constants
        each refit folds stayed allocated after the next refit (33 MiB of GPU memory per swap for resnet18)."""
        shapes = buckets(self.spec)
        if not self.use_graphs or self._graphs or not shapes:
            return
        names = list(self.spec.dims)
        inputs = {
            shape: self.spec.examples(batch=shape[0], sizes=dict(zip(names, shape[1], strict=True)), device=self.device)
            for shape in shapes
        }
        with torch.inference_mode():
            for shape in shapes:
                self._run(inputs[shape])
        torch.cuda.current_stream(self.device).synchronize()
        pool = torch.cuda.graph_pool_handle()
        recorded: dict[tuple[int, ...], dict[int, _Graph]] = {}
        with torch.inference_mode():
            for shape in sorted(shapes, key=lambda s: (s[0], *s[1]), reverse=True):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    outs = self._run(inputs[shape])
                recorded.setdefault(shape[1], {})[shape[0]] = _Graph(graph, list(inputs[shape]), outs)
        # ascending batch sizes per length, published in one assignment
        self._graphs = {k: dict(sorted(v.items())) for k, v in recorded.items()}


EXTRACTED_PREFIX = "aotinductor_"  # the directories torch's package loader extracts a package into
STALE_AFTER_S = 600.0


def mapped_paths(prefix: str, proc: str = "/proc") -> set[str]:
    """The files under ``prefix`` that some process this user can see has mapped (its loaded libraries)."""
    needle, mapped = prefix.encode(), set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(os.path.join(proc, pid, "maps"), "rb") as f:
                maps = f.read()
        except OSError:  # gone meanwhile, or another user's
            continue
        at = maps.find(needle)
        while at >= 0:
            end = maps.find(b"\n", at)
            end = len(maps) if end < 0 else end
            mapped.add(maps[at:end].decode(errors="replace").removesuffix(" (deleted)"))
            at = maps.find(needle, end)
    return mapped


def sweep_extracted(tmp: str | None = None, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the package directories that processes which are gone left in the temp directory.

    torch's loader extracts each package into ``$TMPDIR/aotinductor_*`` and removes it when the loader is
    destroyed; a process that ends without running destructors (Ray's workers leave with ``os._exit``, a
    replica can be killed) leaves it behind, a few MB per engine per replica process. A directory is removed
    when this user owns it, it is older than ``stale_after_s`` and no live process has a file of it mapped:
    a loaded engine keeps its library mapped for as long as it lives. Processes in other PID namespaces that
    share the temp directory are not seen. Returns the directories removed."""
    tmp = tmp or tempfile.gettempdir()
    names = [n for n in os.listdir(tmp) if n.startswith(EXTRACTED_PREFIX)]
    now, old = time.time(), []
    for name in names:
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # removed since the listing
            continue
        if st.st_uid == os.getuid() and stat.S_ISDIR(st.st_mode) and now - st.st_mtime >= stale_after_s:
            old.append(path)
    if not old:  # the common case: nothing to read every process's maps for
        return []
    # The directory of each mapped file, as the kernel names it: the real path, whatever link TMPDIR goes through
    real = os.path.realpath(tmp)
    live = {os.path.relpath(p, real).split(os.sep)[0] for p in mapped_paths(os.path.join(real, EXTRACTED_PREFIX))}
    removed = []
    for path in old:
        if os.path.basename(path) in live:
            continue
        try:
            shutil.rmtree(path)
        except FileNotFoundError:  # another process's sweep removed it meanwhile
            continue
        except OSError as e:  # said, and the others are still swept
            logger.warning("could not remove %s: %s", path, e)
            continue
        removed.append(path)
    return removed


_swept = threading.Event()


def sweep_in_background() -> None:
    """`sweep_extracted` once per process, on a thread of its own (reading every process's maps takes a
    moment on a busy host); a failure is logged, never raised."""
    if _swept.is_set():
        return
    _swept.set()

    def run() -> None:
        try:
            removed = sweep_extracted()
        except Exception as e:  # best effort: a leftover costs disk, not correctness; the traceback is logged
            logger.warning("could not sweep AOTInductor's leftover package directories: %s", e, exc_info=True)
            return
        if removed:
            logger.info(
                "removed %d package directories that ended processes left in %s", len(removed), tempfile.gettempdir()
            )

    threading.Thread(target=run, name="aoti-sweep", daemon=True).start()


class AOTIBackend(Backend):
    name = "aoti"
    needs_model = False  # the package runs alone; its constants come from the weights
    refits_buffers = True  # and from the module's non-persistent buffers, which the package keeps out too

    def __init__(self, device: torch.device, **kw: Any) -> None:
        super().__init__(device, **kw)
        self.cxx = CompilerPin(self.workdir)

    @property
    def graphs(self) -> bool:
        return self.device.type == "cuda"

    def settings(self) -> dict[str, Any]:
        return {"inductor_configs": INDUCTOR_CONFIGS, "export": "dynamic-batch", "cxx": self.cxx.key_doc()}

    def report(self) -> dict[str, Any]:
        return {**self.cxx.report(), "cuda_graphs": self.graphs}

    def compile(self, model: nn.Module, spec: InputSpec) -> bytes:
        from torch._inductor import aoti_compile_and_package

        with self.cxx.building():
            program = export(model, spec, self.device)
            with tempfile.TemporaryDirectory(prefix="warmserve-aoti-") as tmp:
                path = os.path.join(tmp, "model.pt2")
                aoti_compile_and_package(program, package_path=path, inductor_configs=dict(INDUCTOR_CONFIGS))
                with open(path, "rb") as f:
                    return f.read()

    def load(self, artifact: bytes, model: nn.Module | None, spec: InputSpec) -> Engine:
        # torch's own loader (torch._C._aoti) directly: no import of Inductor (most of a second), and none of
        # the Python wrapper's device-metadata comparison, which only logs a warning yet compiles ISA probe
        # programs with g++ on some CPUs (1.5 s on an AVX-512 VNNI machine). The cache key pins the device.
        # The loader extracts the shared library itself, so the file can go at once. Single-threaded runs skip
        # the runner's own event synchronisation, which a CUDA graph capture cannot contain; the engine
        # serialises calls itself.
        with tempfile.NamedTemporaryFile(prefix="warmserve-", suffix=".pt2") as f:
            f.write(artifact)
            f.flush()
            index = self.device.index if self.device.index is not None else -1
            runner = torch._C._aoti.AOTIModelPackageLoader(f.name, "model", self.graphs, 1, index)
        sweep_in_background()
        return AOTIEngine(runner, self.device, spec, graphs=self.graphs)
