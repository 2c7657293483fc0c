from __future__ import annotations

import pytest
import torch


def tensorrt_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from warmserve.serve.backends.tensorrt import TensorRTBackend

    return TensorRTBackend.unavailable(torch.device("cuda"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_reason = None if torch.cuda.is_available() else "no CUDA GPU"
    trt_reason = tensorrt_missing()
    for item in items:
        if "tensorrt" in item.keywords and trt_reason:
            item.add_marker(pytest.mark.skip(reason=f"TensorRT suite: {trt_reason}"))
        elif "gpu" in item.keywords and gpu_reason:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
