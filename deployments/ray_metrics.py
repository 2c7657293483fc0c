"""warmserve's metrics through Ray's metrics agent: exported as ``ray_warmserve_*`` with replica labels."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from warmserve.serve.metrics import MetricSpec, Sink

logger = logging.getLogger(__name__)


class RaySink(Sink):
    """Records into ``ray.serve.metrics``. Created inside a replica, Serve adds deployment/replica tags.

    Ray exports a gauge only while it keeps being set, so gauge values are re-sent every
    ``refresh_s`` seconds by a daemon thread (the served weights version must not vanish).
    """

    def __init__(self, refresh_s: float = 5.0) -> None:
        self._metrics: dict[str, Any] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[MetricSpec, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True, name="gauge-refresh")
        self._thread.start()

    def _metric(self, spec: MetricSpec) -> Any:
        m = self._metrics.get(spec.name)
        if m is None:
            from ray.serve import metrics

            tags: Any = tuple(spec.labels) or None  # Ray's stubs say tuple[str]; any length works
            if spec.kind == "counter":
                m = metrics.Counter(spec.name, description=spec.help, tag_keys=tags)
            elif spec.kind == "gauge":
                m = metrics.Gauge(spec.name, description=spec.help, tag_keys=tags)
            else:
                m = metrics.Histogram(spec.name, description=spec.help, boundaries=list(spec.buckets), tag_keys=tags)
            self._metrics[spec.name] = m
        return m

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        with self._lock:
            m = self._metric(spec)
        tags = dict(labels) or None
        if spec.kind == "counter":
            if value > 0:
                m.inc(value, tags=tags)
        elif spec.kind == "gauge":
            m.set(value, tags=tags)
            with self._lock:
                self._gauges[(spec.name, tuple(sorted(labels.items())))] = (spec, value)
        else:
            m.observe(value, tags=tags)

    def _refresh(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                gauges = list(self._gauges.items())
            for (_, labels), (spec, value) in gauges:
                try:
                    self._metric(spec).set(value, tags=dict(labels) or None)
                except Exception:  # a failing exporter never fails serving
                    logger.exception("refreshing gauge %s failed", spec.name)
