"""The worker: warm-start an engine from the cache, serve batches, swap weights without a rebuild."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from warmserve.cache.config import CacheConfig
from warmserve.cache.engine_cache import EngineCache
from warmserve.cache.keys import CacheKey
from warmserve.cache.manifest import Provenance
from warmserve.cache.peers import Peers
from warmserve.serve import backends, batching, fence
from warmserve.serve.backends.base import Backend, Engine, device_doc, flatten
from warmserve.serve.batching import OutputSpec
from warmserve.serve.errors import (
    BackendUnavailable,
    ModelSpecError,
    NotReady,
    RefitError,
    ToolchainChanged,
    WeightsError,
)
from warmserve.serve.facts import FactsStore, ModelFacts
from warmserve.serve.metrics import Metrics, MetricsCacheEvents
from warmserve.serve.model import architecture_doc, build_model, class_names
from warmserve.serve.rwlock import RWLock
from warmserve.serve.spec import InputSpec, ModelSpec
from warmserve.serve.weights import StateDict, ensure_demo_weights, expected_tensors, read_weights, validate

logger = logging.getLogger(__name__)

KEY_FORMAT = 1


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use cpu or auto")
    return d


def open_device(device: torch.device) -> threading.Thread | None:
    """Create ``device``'s context on a thread of its own, so that it overlaps reading the weights: the first copy
    to the device waits for it there instead of creating it. Nothing to do for a CPU. A ``cuda`` without an index
    is the thread's current device, 0, as it is for the worker (Ray makes a replica's GPU device 0)."""
    if device.type != "cuda":
        return None

    def run() -> None:
        try:
            torch.zeros(1, device=device)
        except Exception as e:  # said, not raised: the weights' copy to the device opens it again, and raises
            logger.warning("could not open %s ahead of the weights (the start tries again): %s", device, e)

    thread = threading.Thread(target=run, name="open-device", daemon=True)
    thread.start()
    return thread


def process_age() -> float | None:
    """Seconds since this process started (Linux): interpreter start-up and imports, before the worker."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")), 4)
    except (OSError, ValueError, IndexError):
        return None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| for floats; 0 or 1 (equal or not) for integers and booleans."""
    if not want.is_floating_point():
        return 0.0 if torch.equal(got.cpu(), want.cpu()) else 1.0
    want = want.float()
    scale = float(want.abs().max().clamp_min(1e-12))
    return float((got.float() - want).abs().max()) / scale


def check_precision(precision: str, dtype: torch.dtype, device: torch.device) -> None:
    """A clear error, before anything is built, where ``device`` cannot compute in ``dtype``."""
    if dtype == torch.float32:
        return
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise BackendUnavailable(f"precision {precision}: {torch.cuda.get_device_name(device)} has no bfloat16")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.nn.functional.conv2d(a.view(1, 1, 4, 4), a[:1, :1].reshape(1, 1, 1, 1))
        (a @ a).sum().item()
    except RuntimeError as e:
        raise BackendUnavailable(f"precision {precision} cannot run on {device}: {str(e).splitlines()[0]}") from e


def materialise(model_name: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model with ``state`` as its weights (shared, not copied). Built on the meta device first (no random
    initialisation); a model with tensors outside its state dict (a non-persistent buffer) is built for real."""
    model = build_model(model_name, meta=True)
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # Built on the host for the tensors its constructor makes; the weights are then ``state``'s own, so
        # the device holds no second copy of them, and only those tensors move to it.
        floats = [t for t in state.values() if t.is_floating_point()]
        like = floats[0] if floats else next(iter(state.values()), torch.empty(0))
        model = build_model(model_name)
        model.load_state_dict(state, assign=True)
        model.to(device=like.device, dtype=like.dtype if floats else None)
    return model.eval()


def fixed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's non-persistent buffers: tensors its constructor makes (transformers' BERT has
    ``position_ids`` and ``token_type_ids``) that its state dict, and so no weights file, holds."""
    persistent = set(model.state_dict())
    return {name: b for name, b in model.named_buffers() if name not in persistent}


def output_specs(spec: ModelSpec, real: Callable[[Sequence[torch.Tensor]], Any] | None = None) -> list[OutputSpec]:
    """Each output's name, dtype and shape, found by running the model on the meta device (nothing is computed)
    at sizes that differ in one dimension at a time: an output dimension equal to an input dimension's size at
    every probe is named after it (and cut to each request's own length); one that changes otherwise is
    dynamic, ``?``. A model that cannot run on meta tensors is run for real (``real``, on its device) when
    given; a forward that does not take the declared inputs is a `ModelSpecError`."""
    sig = spec.input.cast(spec.torch_dtype)
    base = sig.example_sizes()
    b0 = sig.export_batch
    b1 = b0 + 1 if b0 < sig.max_batch else max(sig.min_batch, b0 - 1)
    probes: dict[str, tuple[int, dict[str, int]]] = {"": (b0, base), "batch": (b1, base)}
    for d, (_, hi) in sig.dims.items():
        step = sig.step(d)
        probes[d] = (b0, {**base, d: base[d] + step if base[d] < hi or base[d] == 1 else base[d] - step})

    def answers(forward: Callable[..., Any], device: str) -> dict[str, list[tuple[str, torch.Tensor]]]:
        runs = {}
        for k, (b, sizes) in probes.items():
            xs = [x.to(device) for x in sig.examples(batch=b, sizes=sizes)]
            with torch.inference_mode():
                try:
                    out = forward(*xs)
                except TypeError as e:
                    raise ModelSpecError(
                        f"{spec.model} does not take the inputs declared ({sig.text()}): {e}; declare the inputs its "
                        "forward takes, in its order, with --inputs"
                    ) from e
                except (RuntimeError, ValueError, IndexError) as e:
                    if device == "meta" or isinstance(e, torch.OutOfMemoryError):
                        raise  # the meta run's failures are the real run's to judge; memory is not the declaration's
                    at = ", ".join([f"batch {b}", *(f"{d} {n}" for d, n in sizes.items())])
                    raise ModelSpecError(
                        f"{spec.model} fails on inputs the declaration allows ({sig.text()}; at {at}): "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:300]}; declare the sizes its forward takes"
                    ) from e
            runs[k] = [(n, t.to("meta")) for n, t in flatten(out)]
        return runs

    try:
        runs = answers(build_model(spec.model, meta=True).to(spec.torch_dtype), "meta")
    except ModelSpecError:
        raise
    except Exception as e:  # a model that cannot run on meta tensors: its real answers
        if real is None:
            return []
        logger.info("outputs from the real model (on meta tensors: %s: %s)", type(e).__name__, e)
        runs = answers(lambda *xs: real(xs), "cpu")
    first = runs[""]
    names = list(spec.outputs) or [n for n, _ in first]
    if len(names) != len(first):
        found = ", ".join(n for n, _ in first)
        raise ModelSpecError(f"outputs: {len(names)} name(s) given, but {spec.model} returns {len(first)} ({found})")
    out = []
    for i, (name, (_, t)) in enumerate(zip(names, first, strict=True)):
        if t.dim() == 0 or (b1 != b0 and runs["batch"][i][1].shape[0] == t.shape[0]):
            raise ModelSpecError(f"output {name} does not have the batch as its first dimension: {list(t.shape)}")
        dims: list[int | str] = list(t.shape[1:])
        for d in sig.dims:
            other = probes[d][1][d]
            for a, n in enumerate(t.shape[1:]):
                moved = runs[d][i][1].shape[a + 1]
                if moved == n:
                    continue
                if n == base[d] and moved == other:
                    dims[a] = d
                elif d in sig.padded_dims:
                    raise ModelSpecError(
                        f"output {name}'s dimension {a + 1} changes with {d} without equalling it ({n} at {d}={base[d]}"
                        f"): padded requests could not be cut back"
                    )
                else:
                    dims[a] = "?"
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        out.append(OutputSpec(name, str(dtype).removeprefix("torch."), tuple(dims)))
    return out


@functools.cache
def derivation() -> str | None:
    """The code that finds a model's facts (`ModelFacts`): warmserve's worker, every file of it, so that facts
    another version recorded are not read. None (no facts kept) where its sources cannot be read."""
    h = hashlib.sha256(f"key format {KEY_FORMAT}".encode())
    try:
        root = Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    except OSError as e:
        logger.info("no model facts: warmserve's sources are unreadable (%s)", e)
        return None
    return h.hexdigest()


class Steps:
    """Seconds per named step, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:  # a step run twice (a retry) counts both times
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 4)


@dataclass(frozen=True)
class StartReport:
    """How a worker became ready: ``outcome`` is built, local-hit, peer-hit, shared-hit, waited or uncached."""

    model: str
    backend: str
    device: str
    key: str
    outcome: str
    seconds: float
    steps: dict[str, float]
    weights_version: str
    probe_error: float | None = None
    total_seconds: float = 0.0  # including building the module and reading weights
    weights: str = ""  # the file the weights came from
    weights_sha256: str = ""
    # Seconds of the whole replica start by phase: imports (process start to the worker), model, weights,
    # engine (fingerprint, cache, load, refit, CUDA graphs), verify.
    phases: dict[str, float] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)  # how the backend builds (its C++ compiler, say)
    fallback: str | None = None  # why ``auto`` passed over a backend, if it did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SwapReport:
    ok: bool
    version: str
    previous: str
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    probe_error: float | None = None
    requested: str = ""  # the version asked for; equals ``version`` when ok
    sha256: str = ""  # of the weights served after the swap (the old ones when it failed)
    requested_sha256: str = ""  # the digest the weights asked for were pinned to ("" if none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Live:
    engine: Engine
    version: str
    sha256: str  # of the weights file ("" for weights handed over in memory)


class Worker:
    """One model on one device. ``start()`` once, then ``infer()`` from any number of threads."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        backend: str = "auto",
        device: str = "auto",
        cache: EngineCache | None = None,
        cache_config: CacheConfig | None = None,
        peers: Peers | None = None,
        metrics: Metrics | None = None,
        verify: bool = True,
        tolerance: float | None = None,
    ) -> None:
        self.spec = spec
        self.device = pick_device(device)
        # ``auto`` may fall back along this list when a backend turns out unusable while starting.
        self._choices = backends.choices(backend, self.device)
        self.metrics = metrics or Metrics()
        self.cache_config = cache_config or CacheConfig()  # the environment is read by Settings.load, not here
        self._events = MetricsCacheEvents(self.metrics, self._choices[0].name)
        if cache is None:
            self.cache_config.require_trust()
            cache = EngineCache.from_config(self.cache_config, self._events, peers)
        self.cache = cache
        self.backend: Backend = self._make_backend(self._choices.pop(0))
        self.verify = verify
        self.tolerance = tolerance if tolerance is not None else spec.tolerance
        check_precision(spec.precision, spec.torch_dtype, self.device)
        # The signature as the engine takes it: float inputs in the serving precision.
        self.engine_spec: InputSpec = spec.input.cast(spec.torch_dtype)
        self.outputs: list[OutputSpec] = []
        self.report: StartReport | None = None
        self.labels: list[str] = []
        self.fence: fence.CompileFence | None = None
        self.fallback: str | None = None
        self._live: _Live | None = None
        self._spare: Engine | None = None  # the engine the last standby swap replaced, its next standby
        self._rw = RWLock()
        self._swap_lock = threading.Lock()
        self._artifact = b""
        self._expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._model: nn.Module | None = None  # built when something needs it (`model`)
        self._model_lock = threading.Lock()
        self._state: StateDict | None = None  # the live weights, on the device
        self._buffers: StateDict = {}  # the module's non-persistent buffers, for a backend that refits them
        self.facts = FactsStore(
            Path(self.cache_config.cache_dir) / "facts",
            {
                "model": spec.model,
                "precision": spec.precision,
                "input": self.engine_spec.doc(),
                "outputs": list(spec.outputs),
            },
            derivation(),
            self.cache_config.signing_key,
        )

    def _make_backend(self, cls: type[Backend]) -> Backend:
        self._events.backend = cls.name
        return cls(self.device, cache=self.cache, workdir=Path(self.cache_config.cache_dir))

    # -- start-up ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._live is not None

    @property
    def version(self) -> str | None:
        live = self._live
        return live.version if live else None

    @property
    def weights_sha256(self) -> str | None:
        live = self._live
        return live.sha256 if live else None

    @property
    def model(self) -> nn.Module | None:
        """The eager module with the live weights (shared with the engine, not copied), or None before
        `start` reads the weights. A start from recorded facts builds none: the first use here builds it."""
        with self._model_lock:
            if self._model is None and self._state is not None:
                self._model = materialise(self.spec.model, self._state)
            return self._model

    def key_for(self, model: nn.Module) -> CacheKey:
        """Weight-agnostic: architecture, input spec, precision, backend settings, device and versions."""
        return self._key(architecture_doc(model))

    def _key(self, architecture: Mapping[str, Any]) -> CacheKey:
        return CacheKey.from_doc(
            {
                "format": KEY_FORMAT,
                "backend": self.backend.name,
                "settings": self.backend.settings(),
                "architecture": dict(architecture),
                "input": self.engine_spec.doc(),
                "precision": self.spec.precision,
                "device": device_doc(self.device),
                "versions": self.backend.versions(),
            }
        )

    def _weights_uri(self) -> str:
        if self.spec.weights:
            return self.spec.weights
        return ensure_demo_weights(self.spec.model, self._expected, Path(self.cache_config.cache_dir) / "weights")

    def _prepare(self, state: Mapping[str, torch.Tensor]) -> StateDict:
        """Validated weights, cast to the serving precision, on the device."""
        validate(state, self._expected)
        dtype = self.spec.torch_dtype
        return {
            k: (v.to(device=self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in state.items()
        }

    def _probe_input(self) -> tuple[torch.Tensor, ...]:
        # Made outside inference mode, as requests are: a Dynamo-guarded engine must not trace again for it.
        return self.engine_spec.examples(device=self.device, seed=1234)

    def _reference(self, state: StateDict, xs: Sequence[torch.Tensor], sha256: str = "") -> list[torch.Tensor]:
        """Eager PyTorch's answer for ``xs`` with ``state`` (its tensors shared, not copied); recorded for the
        weights file of digest ``sha256`` (read from that file), for the next start with it (`_recorded`)."""
        model = materialise(self.spec.model, state)
        with torch.inference_mode():
            want = [t for _, t in flatten(model(*xs))]
        self.facts.save_reference(sha256, device_doc(self.device), xs, want)
        return want

    def _recorded(self, sha256: str, xs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The answer eager gave a start or a swap here for the weights file of digest ``sha256``, if one did."""
        recorded = self.facts.reference(sha256, device_doc(self.device), xs)
        return None if recorded is None else [t.to(self.device) for t in recorded]

    def _check(self, engine: Engine, xs: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
        with torch.inference_mode():
            got = engine(xs)
        if len(got) != len(want):
            raise RefitError(f"{self.backend.name} engine returned {len(got)} outputs; eager returns {len(want)}")
        probe = max(relative_error(g, w) for g, w in zip(got, want, strict=True))
        if probe > self.tolerance:
            raise RefitError(
                f"{self.backend.name} engine disagrees with eager after the refit "
                f"(relative error {probe:.2e} > {self.tolerance:.0e} for {self.spec.precision})"
            )
        return probe

    def _output_specs(self, model: nn.Module) -> list[OutputSpec]:
        return output_specs(self.spec, lambda xs: model(*(x.to(self.device) for x in xs)))

    def start(self, imports: float | None = None) -> StartReport:
        """Model and weights, then the artifact from the cache (or built once), load, refit, verify: ready.
        ``imports``: the seconds this process spent before the worker, where the caller knows them better than
        the process's age does (a process started ahead that then waited idle)."""
        imports = process_age() if imports is None else round(imports, 4)
        t0 = time.perf_counter()
        steps = Steps()
        open_device(self.device)
        with fence.expected():  # compiling is expected until the worker is ready
            with steps("model"):
                # Facts a start recorded here before: no module is built (nor torchvision imported) for them.
                facts = self.facts.load()
                if facts is None:
                    self._expected = expected_tensors(build_model(self.spec.model, meta=True))
                else:
                    self._expected = dict(facts.expected)
            with steps("weights"):
                uri = self._weights_uri()
                loaded = read_weights(uri)
                live_state = self._prepare(loaded.state)  # validates once, before anything uses the weights
                self._state, self._model = live_state, None
                if facts is None:
                    model = self._require_model()
                    self.outputs = self._output_specs(model)
                    architecture = architecture_doc(model)
                    self._buffers = fixed_buffers(model)
                else:
                    self.outputs, architecture = list(facts.outputs), facts.architecture
            t_key = time.perf_counter()
            key, outcome, artifact = self._fetch(architecture, steps)
            engine = self._engine(artifact, live_state, steps)
            probe, num_outputs = self._first_answer(engine, live_state, loaded.sha256, steps)
        if facts is not None and len(facts.labels) == num_outputs:
            self.labels = facts.labels
        else:  # no facts, or ones whose labels do not fit the engine's outputs: recorded (again)
            self.labels = class_names(self.spec.model, num_outputs)
            if not self._buffers:  # facts hold no tensor values: a module with buffers of its own is built
                self.facts.save(ModelFacts(architecture, self._expected, self.outputs, self.labels))
        if self.backend.swap == "in-place":
            self._state = None  # the engine's module holds the live weights, and refits them in place
        self._artifact = artifact
        self._live = _Live(engine, self.spec.weights_version, loaded.sha256)
        self.fence = fence.CompileFence(self.metrics, self.backend.name)
        seconds = time.perf_counter() - t_key  # fingerprint to a refitted, runnable engine
        total = time.perf_counter() - t0
        phases = self._phases(imports, steps.seconds)
        for phase, value in phases.items():
            self.metrics.observe("warmserve_start_phase_seconds", value, phase=phase)
        self.metrics.observe("warmserve_warm_start_seconds", total, outcome=outcome)
        self.metrics.set("warmserve_weights_version_info", 1, version=self.spec.weights_version)
        self.report = StartReport(
            model=self.spec.model,
            backend=self.backend.name,
            device=str(self.device),
            key=key.id,
            outcome=outcome,
            seconds=round(seconds, 4),
            steps=steps.seconds,
            weights_version=self.spec.weights_version,
            probe_error=probe,
            total_seconds=round(total, 4),
            weights=uri,
            weights_sha256=loaded.sha256,
            phases=phases,
            build=self.backend.report(),
            fallback=self.fallback,
        )
        logger.info("ready: %s via %s/%s in %.2fs (%s)", self.spec.model, self.backend.name, outcome, total, phases)
        return self.report

    @staticmethod
    def _phases(imports: float | None, steps: Mapping[str, float]) -> dict[str, float]:
        engine = ("fingerprint", "cache", "load", "refit", "prepare")
        phases = {
            "model": steps.get("model", 0.0),
            "weights": steps.get("weights", 0.0),
            "engine": round(sum(steps.get(s, 0.0) for s in engine), 4),
            "verify": steps.get("verify", 0.0),
        }
        return {"imports": imports, **phases} if imports is not None else phases

    def _fetch(self, architecture: Mapping[str, Any], steps: Steps) -> tuple[CacheKey, str, bytes]:
        """The key and the artifact: from the cache, or built once. ``auto`` moves on to the next backend if
        this one turns out unusable (no working C++ compiler, say), and the report says why."""
        rekeys = 0
        while True:
            try:
                with steps("fingerprint"):
                    key = self._key(architecture)
                if not self.backend.cacheable:
                    return key, "uncached", b""
                with steps("cache"):
                    fetched = self.cache.get_or_build(
                        key,
                        functools.partial(self._build, key),
                        Provenance(self.backend.name, self.backend.versions(), {"model": self.spec.model}),
                    )
                return key, fetched.outcome, fetched.blob
            except ToolchainChanged as e:  # the compiler check chose another compiler: key again (it is kept)
                rekeys += 1
                if rekeys > 2:
                    raise BackendUnavailable(f"the {self.backend.name} compiler choice kept changing: {e}") from e
                logger.info("%s; computing the cache key again", e)
            except BackendUnavailable as e:
                if not self._choices:
                    raise
                self.fallback = "; ".join(filter(None, [self.fallback, f"{self.backend.name}: {e}"]))
                self.backend = self._make_backend(self._choices.pop(0))
                logger.warning("auto backend: %s; using %s instead", self.fallback, self.backend.name)

    def _build(self, key: CacheKey) -> bytes:
        name = self.backend.name
        logger.info("compiling %s with %s (key %s); this can take minutes", self.spec.model, name, key.short)
        t0 = time.perf_counter()
        artifact = self.backend.compile(self._require_model(), self.engine_spec)
        self.metrics.observe("warmserve_compile_seconds", time.perf_counter() - t0, backend=name)
        return artifact

    def _load(self, artifact: bytes) -> Engine:
        """The backend's engine for ``artifact``; with the eager module only for a backend that runs it."""
        model = self._require_model() if self.backend.needs_model else None
        return self.backend.load(artifact, model, self.engine_spec)

    def _engine(self, artifact: bytes, state: StateDict, steps: Steps) -> Engine:
        name = self.backend.name
        with steps("load"):
            engine = self._load(artifact)
        self.metrics.observe("warmserve_engine_load_seconds", steps.seconds["load"], backend=name)
        if self.backend.cacheable:
            with steps("refit"):
                engine.refit(self._refit_state(state))
            self.metrics.observe("warmserve_refit_seconds", steps.seconds["refit"], backend=name)
        with steps("prepare"):
            engine.prepare()
        return engine

    def _refit_state(self, state: StateDict) -> StateDict:
        """``state`` as the backend's refit takes it: with the module's non-persistent buffers where it
        refits them too (their values come from the module's constructor, never from the weights)."""
        return {**self._buffers, **state} if self.backend.refits_buffers and self._buffers else state

    def _first_answer(self, engine: Engine, state: StateDict, sha256: str, steps: Steps) -> tuple[float | None, int]:
        """Run the engine once (its first output's width names the labels) and, with ``verify``, compare it
        with eager PyTorch: (relative error or None, number of labels)."""
        xs = self._probe_input()
        if not (self.verify and self.backend.cacheable):
            with torch.inference_mode():
                return None, int(engine(xs)[0].shape[-1])
        with steps("verify"):
            want = self._recorded(sha256, xs)
            if want is not None:
                try:
                    return self._check(engine, xs, want), int(want[0].shape[-1])
                except RefitError as e:  # a stale record (other CUDA libraries, say): eager decides
                    logger.warning("%s against the answer recorded for these weights; asking eager PyTorch", e)
                    self.facts.forget_reference(sha256, device_doc(self.device), xs)
            want = self._reference(state, xs, sha256)
            probe = self._check(engine, xs, want)
        return probe, int(want[0].shape[-1])

    # -- serving ----------------------------------------------------------------------------------
    def check_inputs(self, xs: Sequence[Any], pixels: bool = False) -> list[torch.Tensor]:
        """``xs`` if they are one request this model takes (``pixels``: a UINT8 image the caller converts),
        else ``InputError`` saying what was expected."""
        return batching.check_request(self.spec.input, xs, pixels)

    def check_input(self, x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`check_inputs` for a model of one input."""
        return self.check_inputs([x], pixels=dtype == torch.uint8)[0]

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Run a batch of any size (split or padded to the engine's range) of a model of one input; returns
        its first output, on the CPU."""
        return self.infer_versioned(x)[0]

    def infer_versioned(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        """``infer``, also returning the weights version that produced every row of the output."""
        outs, version = self.run(self.check_inputs([x]))
        return outs[0], version

    def run(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
        """One batch of every input (checked, one length) -> every output on the CPU (floats as float32),
        and the weights version that produced every row of them."""
        answers, version = self.run_requests([xs])
        return answers[0], version

    def run_requests(self, requests: Sequence[Sequence[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], str]:
        """Requests (each checked) -> each one's outputs: batched together, padded to a length bucket where the
        signature has a mask, and cut back to each request's rows and lengths."""
        t0 = time.perf_counter()
        # One read section for all chunks: a swap lands before or after the whole batch, never inside it.
        with self._rw.read():
            live = self._live
            if live is None:
                raise NotReady("the model is still loading")
            answers = batching.run_requests(
                self.engine_spec, self.outputs, requests, lambda xs: self._run_engine(live.engine, xs)
            )
        items = sum(r[0].shape[0] for r in requests)
        self.metrics.observe("warmserve_inference_seconds", time.perf_counter() - t0, backend=self.backend.name)
        self.metrics.inc("warmserve_inference_items", items, backend=self.backend.name)
        if self.fence is not None:
            self.fence.check("inference")
        return answers, live.version

    def _run_engine(self, engine: Engine, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A batch of any size through the engine: split into its largest batch, padded to its smallest."""
        spec = self.engine_spec
        xs = [x.to(self.device, dtype=t.torch_dtype, non_blocking=True) for t, x in zip(spec.tensors, xs, strict=True)]
        chunks: list[list[torch.Tensor]] = []
        for part in zip(*(torch.split(x, spec.max_batch) for x in xs), strict=True):
            n = part[0].shape[0]
            if n < spec.min_batch:
                part = tuple(torch.cat([c, c[-1:].expand(spec.min_batch - n, *c.shape[1:])]) for c in part)
            outs = engine(part)
            chunks.append([(o.float() if o.is_floating_point() else o)[:n].cpu() for o in outs])
        return [torch.cat(c) if len(c) > 1 else c[0] for c in zip(*chunks, strict=True)]

    # -- weight swaps -----------------------------------------------------------------------------
    def swap_weights(
        self, weights: str | Mapping[str, torch.Tensor], version: str, sha256: str | None = None
    ) -> SwapReport:
        """Validate, refit (a standby engine, or the live one in an exclusive section), verify, switch.

        Eager PyTorch's reference answer is computed before any lock, so requests wait at most for a refit
        and one engine call (or, recording CUDA graphs for a standby engine, for the recording). With
        ``sha256``, a weights file whose content has another digest is refused.
        Never raises for bad weights: the report says why, and the old version keeps serving.
        """
        t0 = time.perf_counter()
        steps = Steps()
        with self._swap_lock:
            live = self._live
            if live is None:
                raise NotReady("start() the worker before swapping weights")
            try:
                state, digest = self._incoming(weights, sha256, steps)
                x = self._probe_input()
                want = None
                if self.verify:
                    with steps("reference"):
                        want = self._reference(state, x, digest if isinstance(weights, str) else "")
                probe = self._refit_and_switch(live, state, version, digest, x, want, steps)
            except (WeightsError, RefitError) as e:
                logger.warning("weights %s rejected; still serving %s: %s", version, live.version, e)
                return self._not_swapped(live, version, sha256, t0, steps, str(e), "rejected")
            except Exception as e:  # a backend failure: keep serving, report it
                logger.exception("swap to %s failed; still serving %s", version, live.version)
                return self._not_swapped(live, version, sha256, t0, steps, f"{type(e).__name__}: {e}", "failed")
            finally:
                if self.fence is not None:
                    self.fence.check("weight swap")
        refit = steps.seconds.get("refit", steps.seconds.get("exclusive", 0))
        self.metrics.observe("warmserve_refit_seconds", refit, backend=self.backend.name)
        self.metrics.inc("warmserve_weight_swaps", result="ok")
        self.metrics.set("warmserve_weights_version_info", 0, version=live.version)
        self.metrics.set("warmserve_weights_version_info", 1, version=version)
        logger.info("now serving weights %s (was %s) after %.3fs", version, live.version, time.perf_counter() - t0)
        seconds = round(time.perf_counter() - t0, 4)
        return SwapReport(
            True, version, live.version, seconds, steps.seconds, None, probe, version, digest, sha256 or ""
        )

    def _incoming(
        self, weights: str | Mapping[str, torch.Tensor], sha256: str | None, steps: Steps
    ) -> tuple[StateDict, str]:
        """New weights read (a file's pinned to ``sha256``, if given), validated and cast; and their digest."""
        with steps("read"):
            if isinstance(weights, str):
                loaded = read_weights(weights, sha256)
                state, digest = loaded.state, loaded.sha256
            else:
                state, digest = dict(weights), sha256 or ""
        with steps("validate"):
            return self._prepare(state), digest

    def _not_swapped(
        self, live: _Live, version: str, sha256: str | None, t0: float, steps: Steps, error: str, result: str
    ) -> SwapReport:
        """The report of a swap that did not happen: ``live`` keeps serving."""
        self.metrics.inc("warmserve_weight_swaps", result=result)
        seconds = round(time.perf_counter() - t0, 4)
        return SwapReport(
            False, live.version, live.version, seconds, steps.seconds, error, None, version, live.sha256, sha256 or ""
        )

    def _refit_and_switch(
        self,
        live: _Live,
        state: StateDict,
        version: str,
        digest: str,
        x: Sequence[torch.Tensor],
        want: Sequence[torch.Tensor] | None,
        steps: Steps,
    ) -> float | None:
        """Put ``state`` into service as ``version``; raises ``RefitError`` (the old weights keep serving)."""
        probe: float | None = None
        if self.backend.swap == "standby":
            # The engine the last swap replaced is this one's standby: two engines for the life of the
            # replica. A load per swap would map another copy of the engine's code each time (a loaded
            # AOTInductor library is never unloaded): memory that grew with every rollout.
            engine, self._spare = self._spare, None
            if engine is None:
                with steps("load"):
                    engine = self._load(self._artifact)
            try:
                with steps("refit"):
                    engine.refit(self._refit_state(state))
                if engine.exclusive_prepare:  # recording CUDA graphs: no other call on the device meanwhile
                    with steps("prepare"), self._rw.write():
                        engine.prepare()
                else:
                    engine.prepare()
                if want is not None:
                    with steps("verify"):
                        probe = self._check(engine, x, want)
            except BaseException:
                engine.idle()  # refused weights never serve; the next swap refits it whole
                self._spare = engine
                raise
            with steps("switch"), self._rw.write():
                self._live = _Live(engine, version, digest)
            with self._model_lock:  # the eager module, if one is asked for, has the new weights
                self._state, self._model = state, None
            # No request holds the replaced engine any more: each reads the live one inside its read section.
            live.engine.idle()
            self._spare = live.engine
            return probe
        old_state = {k: v.detach().clone() for k, v in self._require_model().state_dict().items()}
        with steps("exclusive"), self._rw.write():
            live.engine.refit(state)
            try:
                if want is not None:
                    probe = self._check(live.engine, x, want)
            except RefitError:
                live.engine.refit(old_state)
                raise
            self._live = _Live(live.engine, version, digest)
        return probe

    def _require_model(self) -> nn.Module:
        model = self.model
        if model is None:
            raise NotReady("start() the worker first")
        return model

    def describe(self) -> dict[str, Any]:
        """Model metadata, as the HTTP layer and `warmserve build --json` show it."""
        spec = self.spec
        return {
            "name": spec.name,
            "model": spec.model,
            "backend": self.backend.name,
            "device": str(self.device),
            "weights_version": self.version,
            "input": {
                "shape": [-1, *spec.input.shape],
                "dtype": spec.input.dtype,
                "batch": [spec.input.min_batch, spec.input.max_batch],
            },
            "inputs": spec.input.text(),
            "precision": spec.precision,
            "outputs": len(self.labels),
            "output_tensors": [o.doc() for o in self.outputs],
            "ready": self.ready,
            "start": self.report.to_dict() if self.report else None,
        }
