"""GPU suite. Runs on a CUDA host; the `tensorrt` tests need TensorRT + torch-tensorrt as well:

    python -m pytest tests/gpu                 # everything the host can run
    python -m pytest tests/gpu -m tensorrt     # the TensorRT path only (e.g. in the GPU Docker image)

Both are skipped (and reported as such) on machines without a GPU or without TensorRT.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from warmserve.cache import CacheConfig, maintenance
from warmserve.serve.model import build_model
from warmserve.serve.spec import InputSpec, ModelSpec
from warmserve.serve.weights import demo_weights
from warmserve.serve.worker import StartReport, Worker

pytestmark = pytest.mark.gpu
SPEC = ModelSpec(model="torchvision:resnet18", input=InputSpec(shape=(3, 224, 224), min_batch=1, max_batch=32))


def eager(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = build_model(SPEC.model)
    model.load_state_dict(state)
    with torch.inference_mode():
        return model.cuda()(x.cuda()).float().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def lifecycle(backend: str, tmp_path: Path) -> StartReport:
    config = CacheConfig.load(environ={}, cache_dir=tmp_path / "cache")
    cold = Worker(SPEC, backend=backend, device="cuda", cache_config=config).start()
    assert cold.outcome == "built"
    warm_worker = Worker(SPEC, backend=backend, device="cuda", cache_config=config)
    warm = warm_worker.start()
    assert warm.outcome == "local-hit" and warm.key == cold.key
    assert warm.seconds < cold.seconds

    state = demo_weights(build_model(SPEC.model), seed=3)
    x = torch.randn(5, 3, 224, 224)  # a batch size never used to trace
    old = warm_worker.infer(x)
    stop, seen = threading.Event(), []

    def load() -> None:
        while not stop.is_set():
            seen.append(warm_worker.infer_versioned(x))

    t = threading.Thread(target=load)
    t.start()
    report = warm_worker.swap_weights(state, "v2")
    stop.set()
    t.join()
    assert report.ok, report.error
    new = eager(state, x)
    assert rel(warm_worker.infer(x), new) < 1e-2
    for out, version in seen:
        assert rel(out, old if version == "v1" else new) < 1e-2
    # Many threads at once, each with its own batch size: every answer is its own (CUDA graphs replay
    # into shared static buffers; the engine must copy each output out before the next replay).
    inputs = {n: torch.randn(n, 3, 224, 224) for n in (1, 3, 8, 32)}
    want = {n: eager(state, xi) for n, xi in inputs.items()}
    errors: list[str] = []

    def client(n: int) -> None:
        for _ in range(10):
            if rel(warm_worker.infer(inputs[n]), want[n]) >= 1e-2:
                errors.append(f"batch {n}: wrong answer")

    threads = [threading.Thread(target=client, args=(n,)) for n in inputs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    bad = {**state, "fc.bias": torch.full((1000,), float("nan"))}
    assert not warm_worker.swap_weights(bad, "bad").ok and warm_worker.version == "v2"
    # Every batch size of the range (each padded to its CUDA-graph bucket where the backend records them)
    # answers like eager, and nothing traced or compiled since the worker was ready.
    for n in range(1, 33):
        xi = torch.randn(n, 3, 224, 224)
        assert rel(warm_worker.infer(xi), eager(state, xi)) < 1e-2, n
    assert warm_worker.fence is not None and warm_worker.fence.unexpected == 0
    return warm


def test_aoti_lifecycle_on_cuda(tmp_path: Path) -> None:
    """The default GPU backend: a compiler proven before the build, CUDA graphs per batch bucket."""
    warm = lifecycle("aoti", tmp_path)
    assert warm.build["cxx_checked"] and warm.build["cuda_graphs"]
    assert warm.steps["prepare"] < 5.0, warm.steps  # recording graphs costs milliseconds, never a compile


def test_inductor_lifecycle_on_cuda(tmp_path: Path) -> None:
    lifecycle("inductor", tmp_path)


def test_auto_picks_aoti_on_cuda_without_tensorrt(tmp_path: Path) -> None:
    from warmserve.serve.backends.tensorrt import TensorRTBackend

    if TensorRTBackend.unavailable(torch.device("cuda")) is None:
        pytest.skip("TensorRT is here: auto picks it")
    config = CacheConfig.load(environ={}, cache_dir=tmp_path / "cache")
    assert Worker(SPEC, device="cuda", cache_config=config).backend.name == "aoti"


@pytest.mark.tensorrt
def test_tensorrt_lifecycle(tmp_path: Path) -> None:
    """Compile, cache, warm start, refit (checked against eager), hot swap, bad weights refused."""
    lifecycle("tensorrt", tmp_path)


@pytest.mark.tensorrt
def test_tensorrt_engines_land_in_warmserve_cache(tmp_path: Path) -> None:
    config = CacheConfig.load(environ={}, cache_dir=tmp_path / "cache")
    Worker(SPEC, backend="tensorrt", device="cuda", cache_config=config).start()
    from warmserve.cache import EngineCache

    entries = maintenance.entries(EngineCache.from_config(config).local.store)
    kinds = {e.manifest.key.get("kind") for e in entries if e.manifest}
    assert "torch_tensorrt_engine" in kinds  # per-subgraph engines through the adapter
    assert any(e.manifest and e.manifest.backend == "tensorrt" for e in entries)  # the whole-model artifact


def test_the_device_opens_on_a_thread_of_its_own_while_the_weights_are_read() -> None:
    """A start creates the CUDA context beside reading the weights (0.41 -> 0.32 s alone on an H100): in a fresh
    process, the thread leaves torch's CUDA initialised for the worker's first copy."""
    code = (
        "import torch\n"
        "from warmserve.serve.worker import open_device\n"
        "assert not torch.cuda.is_initialized()\n"
        "thread = open_device(torch.device('cuda'))\n"
        "assert thread is not None and thread.name == 'open-device'\n"
        "thread.join(60)\n"
        "assert not thread.is_alive() and torch.cuda.is_initialized()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
