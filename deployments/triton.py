"""Triton's model configuration and statistics extensions, filled from what a replica serves.

Triton's tools (perf_analyzer, model_analyzer, genai-perf) read a model's configuration before they send a
request, and its statistics around each measurement. The documents here are the JSON forms of Triton's
``ModelConfig`` and ``ModelStatisticsResponse`` messages (model_config.proto, grpc_service.proto): what
``GET /v2/models/{name}/config`` and ``/stats`` answer; `oip_grpc` turns the same documents into the RPCs'
messages, so the two protocols cannot disagree.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from warmserve.deployments.oip import TORCH_TO_DATATYPE
from warmserve.serve.spec import InputSpec


def data_type(dtype: torch.dtype | str) -> str:
    """A model configuration's ``data_type``: TYPE_FP32, TYPE_INT64, ..."""
    torch_dtype: torch.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return f"TYPE_{TORCH_TO_DATATYPE[torch_dtype]}"


def dims(shape: Iterable[int | str]) -> list[int]:
    """The dimensions after the batch, -1 for a dynamic one (the configuration leaves the batch out)."""
    return [d if isinstance(d, int) else -1 for d in shape]


def model_config(
    name: str,
    spec: InputSpec,
    outputs: Iterable[Any],
    *,
    backend: str,
    batch_wait_timeout_s: float,
    max_batch_size: int,
    parameters: Mapping[str, str] = {},
) -> dict[str, Any]:
    """The ``ModelConfig`` of a served model. ``max_batch_size`` is the rows one request may carry (the
    engine's largest batch); dynamic batching gathers up to ``max_batch_size`` requests, with the wait a batch
    that forms under load may take."""
    return {
        "name": name,
        "platform": f"warmserve_{backend}",
        "backend": "warmserve",
        "max_batch_size": spec.max_batch,
        "input": [{"name": t.name, "data_type": data_type(t.torch_dtype), "dims": dims(t.shape)} for t in spec.tensors],
        "output": [{"name": o.name, "data_type": data_type(o.dtype), "dims": dims(o.shape)} for o in outputs],
        "dynamic_batching": {
            "preferred_batch_size": [max_batch_size],
            "max_queue_delay_microseconds": round(batch_wait_timeout_s * 1e6),
        },
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def _duration() -> dict[str, int]:
    return {"count": 0, "ns": 0}


@dataclass
class ModelStats:
    """A replica's cumulative inference statistics, as Triton keeps them: ``inference_count`` counts rows,
    ``execution_count`` engine calls; each request adds its own time in the queue and its batch's compute time
    to ``inference_stats``; ``batch_stats`` adds each call's time under its batch size. Thread-safe."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0  # ms since the epoch
    inference: dict[str, dict[str, int]] = field(default_factory=lambda: {k: _duration() for k in DURATIONS})
    batches: dict[int, dict[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self, seconds: float, ok: bool, rows: int = 0) -> None:
        """One request answered (``ok``) or failed, ``seconds`` after it arrived."""
        with self._lock:
            _add(self.inference["success" if ok else "fail"], seconds)
            if ok:
                self.inference_count += rows
                self.last_inference = int(time.time() * 1000)

    def batch(self, rows: int, queued: Iterable[float], run: float) -> None:
        """One engine call of ``rows`` rows that took ``run`` seconds, for requests that waited ``queued``."""
        queued = list(queued)
        with self._lock:
            self.execution_count += 1
            for q in queued:
                _add(self.inference["queue"], q)
                _add(self.inference["compute_infer"], run)
            by_size = self.batches.setdefault(rows, _duration())
            _add(by_size, run)

    def doc(self, name: str, version: str) -> dict[str, Any]:
        """The ``ModelStatisticsResponse`` of this model."""
        with self._lock:
            return {
                "model_stats": [
                    {
                        "name": name,
                        "version": version,
                        "last_inference": self.last_inference,
                        "inference_count": self.inference_count,
                        "execution_count": self.execution_count,
                        "inference_stats": {k: dict(v) for k, v in self.inference.items()},
                        "batch_stats": [
                            {"batch_size": n, "compute_infer": dict(d)} for n, d in sorted(self.batches.items())
                        ],
                    }
                ]
            }


def _add(duration: dict[str, int], seconds: float) -> None:
    duration["count"] += 1
    duration["ns"] += int(seconds * 1e9)
