"""Every metric warmserve exports, defined once, recorded through a swappable sink.

Inside Ray Serve the sink is Ray's metrics agent (deployments/ray_metrics.py); elsewhere it is a
prometheus_client registry, exposed on a port or pushed to a Pushgateway by the CLI.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from warmserve.cache.events import CacheEvents

logger = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without the _total suffix for counters
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: Sequence[float] = SECONDS


SPECS = {
    s.name: s
    for s in [
        MetricSpec("warmserve_engine_cache_hits", "counter", "Engine cache hits", ("tier", "backend")),
        MetricSpec("warmserve_engine_cache_misses", "counter", "Engine cache misses (a build follows)", ("backend",)),
        MetricSpec("warmserve_compile_seconds", "histogram", "Seconds to compile an engine", ("backend",)),
        MetricSpec("warmserve_refit_seconds", "histogram", "Seconds to refit an engine with weights", ("backend",)),
        MetricSpec("warmserve_engine_load_seconds", "histogram", "Seconds to load an engine artifact", ("backend",)),
        MetricSpec("warmserve_warm_start_seconds", "histogram", "Start to serving, by outcome", ("outcome",)),
        # Exact values of the last event: Ray's exporter reports histogram sums rounded to bucket bounds.
        MetricSpec("warmserve_last_compile_seconds", "gauge", "Seconds the last compile took", ("backend",)),
        MetricSpec("warmserve_last_refit_seconds", "gauge", "Seconds the last refit took", ("backend",)),
        MetricSpec("warmserve_last_engine_load_seconds", "gauge", "Seconds the last engine load took", ("backend",)),
        MetricSpec("warmserve_last_warm_start_seconds", "gauge", "Seconds the last start took", ("outcome",)),
        MetricSpec(
            "warmserve_start_phase_seconds",
            "histogram",
            "Seconds of a replica start by phase (imports, model, weights, engine, verify)",
            ("phase",),
        ),
        MetricSpec(
            "warmserve_unexpected_compiles",
            "counter",
            "Traces, compiles or autotuning runs after the worker was ready (should stay 0)",
            ("backend",),
        ),
        MetricSpec("warmserve_weight_swaps", "counter", "Hot weight swaps by result", ("result",)),
        MetricSpec("warmserve_weights_version_info", "gauge", "1 for the weights version being served", ("version",)),
        MetricSpec("warmserve_inference_seconds", "histogram", "Seconds per engine call", ("backend",)),
        MetricSpec("warmserve_inference_items", "counter", "Items (batch rows) inferred", ("backend",)),
        MetricSpec(
            "warmserve_cache_refused", "counter", "Cache entries refused (corrupt, unsigned...)", ("tier", "reason")
        ),
        MetricSpec("warmserve_cache_evictions", "counter", "Cache entries evicted to fit the budget", ("tier",)),
        MetricSpec("warmserve_cache_bytes", "gauge", "Bytes held by a cache tier", ("tier",)),
        MetricSpec("warmserve_cache_waits", "counter", "get_or_build calls that waited for another builder"),
        MetricSpec("warmserve_cache_lease_takeovers", "counter", "Stale build leases taken over"),
        MetricSpec("warmserve_cache_store_errors", "counter", "Failed store operations", ("tier", "op")),
        MetricSpec("warmserve_cache_load_seconds", "histogram", "Seconds to read and verify an entry", ("tier",)),
        MetricSpec("warmserve_cache_store_seconds", "histogram", "Seconds to publish an entry", ("tier",)),
    ]
}

# Histograms whose last observation is also kept exactly, in a gauge.
LAST = {
    f"warmserve_{noun}_seconds": f"warmserve_last_{noun}_seconds"
    for noun in ("compile", "refit", "engine_load", "warm_start")
}


class Sink(ABC):
    """Where observations go. Implementations must be cheap and must not raise."""

    @abstractmethod
    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None: ...


class NullSink(Sink):
    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        pass


class PrometheusSink(Sink):
    """prometheus_client metrics in a registry of their own (default: a fresh one)."""

    def __init__(self, registry: Any = None) -> None:
        import prometheus_client as pc

        self.registry = registry if registry is not None else pc.CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        for spec in SPECS.values():
            if spec.kind == "counter":
                m: Any = pc.Counter(spec.name, spec.help, spec.labels, registry=self.registry)
            elif spec.kind == "gauge":
                m = pc.Gauge(spec.name, spec.help, spec.labels, registry=self.registry)
            else:
                m = pc.Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=self.registry)
            self._metrics[spec.name] = m

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        m = self._metrics[spec.name]
        m = m.labels(**labels) if spec.labels else m
        if spec.kind == "counter":
            m.inc(value)
        elif spec.kind == "gauge":
            m.set(value)
        else:
            m.observe(value)

    def exposition(self) -> bytes:
        import prometheus_client as pc

        return bytes(pc.generate_latest(self.registry))


class Metrics:
    """The one recording layer: ``metrics.inc("warmserve_weight_swaps", result="ok")``."""

    def __init__(self, sink: Sink | None = None) -> None:
        self.sink = sink or NullSink()

    def _record(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        spec = SPECS[name]
        if set(labels) != set(spec.labels):
            raise ValueError(f"{name} takes labels {spec.labels}, got {sorted(labels)}")
        try:
            self.sink.record(spec, value, {k: str(v) for k, v in labels.items()})
        except Exception:  # a failing exporter never fails a request
            logger.exception("recording %s failed", name)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._record(name, value, labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._record(name, value, labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._record(name, value, labels)
        last = LAST.get(name)
        if last is not None:
            self._record(last, value, labels)


class MetricsCacheEvents(CacheEvents):
    """Cache hooks -> warmserve metrics, labelled with the backend that owns the cache."""

    def __init__(self, metrics: Metrics, backend: str) -> None:
        self.metrics = metrics
        self.backend = backend

    def hit(self, tier: str) -> None:
        self.metrics.inc("warmserve_engine_cache_hits", tier=tier, backend=self.backend)

    def miss(self) -> None:
        self.metrics.inc("warmserve_engine_cache_misses", backend=self.backend)

    def refused(self, tier: str, reason: str) -> None:
        self.metrics.inc("warmserve_cache_refused", tier=tier, reason=reason)

    def evicted(self, tier: str, count: int, nbytes: int) -> None:
        self.metrics.inc("warmserve_cache_evictions", count, tier=tier)

    def tier_bytes(self, tier: str, nbytes: int) -> None:
        self.metrics.set("warmserve_cache_bytes", nbytes, tier=tier)

    def waited(self, seconds: float) -> None:
        self.metrics.inc("warmserve_cache_waits")

    def lease_takeover(self) -> None:
        self.metrics.inc("warmserve_cache_lease_takeovers")

    def store_error(self, tier: str, op: str) -> None:
        self.metrics.inc("warmserve_cache_store_errors", tier=tier, op=op)

    def load_seconds(self, tier: str, seconds: float, nbytes: int) -> None:
        self.metrics.observe("warmserve_cache_load_seconds", seconds, tier=tier)

    def store_seconds(self, tier: str, seconds: float, nbytes: int) -> None:
        self.metrics.observe("warmserve_cache_store_seconds", seconds, tier=tier)
