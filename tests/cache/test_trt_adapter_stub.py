"""The Torch-TensorRT adapter against a STUB of torch_tensorrt's BaseEngineCache.

TensorRT cannot be installed on these machines, so ``torch_tensorrt`` cannot be imported. These tests
put a stand-in for ``torch_tensorrt.dynamo._engine_cache`` into ``sys.modules`` that mirrors upstream's
insert/check/get_hash contract (see the reference sheet). tests/gpu/ runs the adapter for real.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cache.helpers import make_cache
from warmserve.cache import maintenance
from warmserve.cache.trt import engine_cache_adapter, node_arguments_digest


class StubBaseEngineCache:
    """Upstream's shape: abstract save/load, static get_hash on op+target only, insert/check via pickle."""

    @staticmethod
    def get_hash(gm: torch.fx.GraphModule, input_specs: Any, settings: Any) -> str:
        return "|".join(f"{n.op}_{n.target}" for n in gm.graph.nodes) + repr(input_specs) + repr(settings)

    def insert(self, hash: str, entry: tuple[Any, ...]) -> None:
        self.save(hash, pickle.dumps(entry))  # type: ignore[attr-defined]

    def check(self, hash: str) -> Any:
        blob = self.load(hash)  # type: ignore[attr-defined]
        return None if blob is None else pickle.loads(blob)


@pytest.fixture
def stub_torch_tensorrt(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1-stub"  # type: ignore[attr-defined]
    ttrt = types.ModuleType("torch_tensorrt")
    ttrt.__version__ = "2.11.0-stub"  # type: ignore[attr-defined]
    dynamo = types.ModuleType("torch_tensorrt.dynamo")
    ec = types.ModuleType("torch_tensorrt.dynamo._engine_cache")
    ec.BaseEngineCache = StubBaseEngineCache  # type: ignore[attr-defined]
    for name, mod in {
        "tensorrt": trt,
        "torch_tensorrt": ttrt,
        "torch_tensorrt.dynamo": dynamo,
        "torch_tensorrt.dynamo._engine_cache": ec,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    yield


class SumOver(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).sum(dim=self.dim)


def test_keys_include_node_arguments_and_platform(stub_torch_tensorrt: None, tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path)
    adapter = engine_cache_adapter(cache)
    g1, g2 = torch.fx.symbolic_trace(SumOver(1)), torch.fx.symbolic_trace(SumOver(2))
    assert StubBaseEngineCache.get_hash(g1, [], None) == StubBaseEngineCache.get_hash(g2, [], None)  # upstream collides
    h1, h2 = adapter.get_hash(g1, [], None), adapter.get_hash(g2, [], None)
    assert h1 != h2 and len(h1) == 64
    assert adapter.get_hash(torch.fx.symbolic_trace(SumOver(1)), [], None) == h1  # stable
    assert node_arguments_digest(g1) != node_arguments_digest(g2)


def test_insert_and_check_go_through_the_verified_tiers(stub_torch_tensorrt: None, tmp_path: Path) -> None:
    cache, events = make_cache(tmp_path, signing_key=b"k")
    adapter = engine_cache_adapter(cache, extra={"model": "m"})
    h = adapter.get_hash(torch.fx.symbolic_trace(SumOver(1)), [], None)
    assert adapter.check(h) is None
    adapter.insert(h, (b"serialized engine", ["x"], ["y"]))
    assert adapter.check(h) == (b"serialized engine", ["x"], ["y"])
    entry = maintenance.entries(cache.local.store)[0]
    assert entry.manifest is not None and entry.manifest.key["kind"] == "torch_tensorrt_engine"
    assert entry.manifest.versions["tensorrt"] == "10.15.1-stub"
    # A tampered blob is never unpickled: the adapter reports a miss.
    store = cache.local.store
    name = next(n for n in store.listdir(f"entries/{h}") if n.startswith("blob-"))
    store.write(f"entries/{h}/{name}", b"\x80\x04evil")
    assert adapter.check(h) is None
    assert events.counts[("refused", "local", "size")] + events.counts[("refused", "local", "digest")] == 1
