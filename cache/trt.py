"""Torch-TensorRT's engine-cache interface on top of warmserve's tiers.

``torch_tensorrt`` is imported only when ``engine_cache_adapter`` is called, so this module loads on any
host. The upstream key ignores GPU, TensorRT and torch-tensorrt versions and node arguments (two
subgraphs that differ only in ``sum(dim=1)`` vs ``sum(dim=2)`` collide); ``get_hash`` adds them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from warmserve.cache.engine_cache import EngineCache
from warmserve.cache.keys import CacheKey
from warmserve.cache.manifest import Provenance

if TYPE_CHECKING:
    import torch
    from torch_tensorrt.dynamo._engine_cache import BaseEngineCache

logger = logging.getLogger(__name__)


def node_arguments_digest(gm: torch.fx.GraphModule) -> str:
    """sha256 over every node's op, target, args and kwargs (node references by position, not by name)."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}

    def norm(value: Any) -> Any:
        if hasattr(value, "op") and value in index:
            return f"%{index[value]}"
        if isinstance(value, list | tuple):
            return [norm(v) for v in value]
        if isinstance(value, dict):
            return {str(k): norm(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        return repr(value)

    h = hashlib.sha256()
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
        h.update(repr((node.op, str(target), norm(node.args), norm(node.kwargs))).encode())
    return h.hexdigest()


def platform_doc() -> dict[str, Any]:
    """GPU architecture and the versions an engine plan is tied to."""
    import tensorrt
    import torch
    import torch_tensorrt

    gpu: dict[str, Any] = {"type": "cpu"}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = {"type": "cuda", "name": torch.cuda.get_device_name(), "sm": f"{major}.{minor}"}
    return {
        "gpu": gpu,
        "tensorrt": str(tensorrt.__version__),
        "torch_tensorrt": str(torch_tensorrt.__version__),
        "torch": str(torch.__version__),
    }


def engine_cache_adapter(cache: EngineCache, extra: Mapping[str, Any] | None = None) -> BaseEngineCache:
    """A ``BaseEngineCache`` that stores Torch-TensorRT's per-subgraph engines in ``cache``.

    Pass it as ``custom_engine_cache=`` to ``torch_tensorrt.dynamo.compile`` together with
    ``immutable_weights=False, cache_built_engines=True, reuse_cached_engines=True``.
    ``extra`` joins every key (e.g. the model's input spec or a deployment's name).
    """
    from torch_tensorrt.dynamo._engine_cache import BaseEngineCache

    platform = platform_doc()

    class WarmserveEngineCache(BaseEngineCache):  # type: ignore[misc]
        def __init__(self) -> None:
            self.cache = cache
            self._keys: dict[str, CacheKey] = {}

        # Upstream calls this on the instance (engine_cache.get_hash(...)), so the override is honoured.
        def get_hash(  # type: ignore[override]
            self, gm: torch.fx.GraphModule, input_specs: Sequence[Any], settings: Any
        ) -> str:
            key = CacheKey.from_doc(
                {
                    "kind": "torch_tensorrt_engine",
                    "upstream": BaseEngineCache.get_hash(gm, input_specs, settings),
                    "node_args": node_arguments_digest(gm),
                    "platform": platform,
                    "extra": dict(extra or {}),
                }
            )
            self._keys[key.id] = key
            return key.id

        def _key(self, hash: str) -> CacheKey:
            return self._keys.get(hash) or CacheKey.from_doc({"kind": "torch_tensorrt_engine", "hash": hash})

        def save(self, hash: str, blob: bytes, *args: Any, **kwargs: Any) -> None:
            self.cache.put(self._key(hash), blob, Provenance("tensorrt-engine", platform))

        def load(self, hash: str, *args: Any, **kwargs: Any) -> bytes | None:
            found = self.cache.get(self._key(hash))
            return None if found is None else found[0]

    return WarmserveEngineCache()
