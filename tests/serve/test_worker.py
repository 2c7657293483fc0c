"""The worker on real compilers: warm start from the cache, refit correctness, keys, hot swap under load."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.serve.conftest import tiny_spec
from warmserve.cache import CacheConfig
from warmserve.serve.errors import BackendUnavailable, InputError
from warmserve.serve.metrics import Metrics, PrometheusSink
from warmserve.serve.model import build_model
from warmserve.serve.spec import InputSpec
from warmserve.serve.weights import demo_weights, save_weights
from warmserve.serve.worker import Worker


def eager_output(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = build_model("tests.serve.models:tiny_cnn")
    model.load_state_dict(state)
    with torch.inference_mode():
        return model(x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def aoti_cache(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> CacheConfig:
    """A cache holding the tiny model's AOTI artifact, built once for this module."""
    config = CacheConfig.load(environ={}, cache_dir=tmp_path_factory.mktemp("aoti-cache"))
    report = Worker(tiny_spec(), backend="aoti", cache_config=config).start()
    assert report.outcome == "built"
    return config


def test_second_process_warm_starts_from_the_cache(aoti_cache: CacheConfig, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "warmserve.deployments.cli",
            "build",
            "tests.serve.models:tiny_cnn",
            "--backend",
            "aoti",
            "--input-shape",
            "3,16,16",
            "--batch",
            "1:8",
            "--cache-dir",
            str(aoti_cache.cache_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cold")},
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1, out.stdout  # one JSON line, as documented
    report = json.loads(out.stdout)
    assert report["outcome"] == "local-hit" and report["backend"] == "aoti"
    assert {"key", "seconds", "steps"} <= set(report)
    assert report["probe_error"] < 1e-5


def test_refit_matches_eager_with_new_weights(aoti_cache: CacheConfig, tmp_path: Path) -> None:
    state = demo_weights(build_model("tests.serve.models:tiny_cnn"), seed=42)
    save_weights(state, tmp_path / "new.safetensors")
    worker = Worker(tiny_spec(weights=str(tmp_path / "new.safetensors")), backend="aoti", cache_config=aoti_cache)
    report = worker.start()
    assert report.outcome == "local-hit"  # same architecture, other weights: hit + refit, no compile
    for batch in (1, 5):  # 5 was never seen at export (which traced batch 2)
        x = torch.randn(batch, 3, 16, 16)
        assert rel_err(worker.infer(x), eager_output(state, x)) < 1e-5


def test_keys_change_with_architecture_and_batch_range(aoti_cache: CacheConfig) -> None:
    base = Worker(tiny_spec(), backend="aoti", cache_config=aoti_cache)
    model = build_model("tests.serve.models:tiny_cnn")
    other_weights = build_model("tests.serve.models:tiny_cnn")
    assert base.key_for(model) == base.key_for(other_weights)
    wide = Worker(tiny_spec(model="tests.serve.models:tiny_cnn_wide"), backend="aoti", cache_config=aoti_cache)
    assert wide.key_for(build_model("tests.serve.models:tiny_cnn_wide")).id != base.key_for(model).id
    batch = Worker(
        tiny_spec(input=InputSpec(shape=(3, 16, 16), min_batch=1, max_batch=16)),
        backend="aoti",
        cache_config=aoti_cache,
    )
    assert batch.key_for(model).id != base.key_for(model).id
    eager = Worker(tiny_spec(), backend="eager", cache_config=aoti_cache)
    assert eager.key_for(model).id != base.key_for(model).id


def test_bad_requests_are_input_errors(aoti_cache: CacheConfig) -> None:
    worker = Worker(tiny_spec(), backend="aoti", cache_config=aoti_cache)
    worker.start()
    for bad, match in [
        (torch.zeros(2, 3, 8, 8), "shape"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.float64), "dtype"),
        (torch.zeros(0, 3, 16, 16), "empty"),
        ([1, 2], "tensor"),
    ]:
        with pytest.raises(InputError, match=match):
            worker.infer(bad)  # type: ignore[arg-type]
    assert worker.infer(torch.randn(19, 3, 16, 16)).shape == (19, 10)  # split into engine-sized chunks


def test_unknown_or_unavailable_backend_is_a_clear_error(cache_config: CacheConfig) -> None:
    with pytest.raises(BackendUnavailable, match="choose one of"):
        Worker(tiny_spec(), backend="onnx", cache_config=cache_config)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        Worker(tiny_spec(), backend="tensorrt", cache_config=cache_config)


@pytest.mark.parametrize("backend", ["aoti", "inductor", "eager"])
def test_hot_swap_under_concurrent_inference(backend: str, aoti_cache: CacheConfig, tmp_path: Path) -> None:
    sink = PrometheusSink()
    config = aoti_cache if backend == "aoti" else CacheConfig.load(environ={}, cache_dir=tmp_path / "c")
    worker = Worker(tiny_spec(), backend=backend, cache_config=config, metrics=Metrics(sink))
    worker.start()
    assert worker.model is not None
    x = torch.randn(4, 3, 16, 16)
    old = worker.infer(x)
    new_state = demo_weights(build_model("tests.serve.models:tiny_cnn"), seed=99)
    new = eager_output(new_state, x)

    seen: list[tuple[torch.Tensor, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            seen.append(worker.infer_versioned(x))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # Bad weights first: each is refused and the old version keeps serving.
        bad = [
            {k: v for k, v in new_state.items() if k != "conv.weight"},
            {**new_state, "head.weight": torch.zeros(3, 3)},
            {**new_state, "head.bias": torch.full((10,), float("nan"))},
        ]
        for b in bad:
            report = worker.swap_weights(b, "bad")
            assert not report.ok and report.version == "v1" and report.error
        report = worker.swap_weights(new_state, "v2")
        assert report.ok, report.error
        assert worker.version == "v2"
        for _ in range(20):
            seen.append(worker.infer_versioned(x))
    finally:
        stop.set()
        for t in threads:
            t.join()
    versions = {v for _, v in seen}
    assert versions <= {"v1", "v2"} and "v2" in versions
    for out, version in seen:
        want = old if version == "v1" else new
        assert rel_err(out, want) < 1e-4, (version, rel_err(out, old), rel_err(out, new))
    text = sink.exposition().decode()
    assert 'warmserve_weight_swaps_total{result="rejected"} 3.0' in text
    assert 'warmserve_weight_swaps_total{result="ok"} 1.0' in text
    assert 'warmserve_weights_version_info{version="v2"} 1.0' in text


def _aoti_mappings() -> int:
    """Mappings of AOTInductor libraries in this process (the loader extracts each into a temp dir)."""
    return sum("aotinductor" in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_swaps_reuse_the_engine_they_replace(aoti_cache: CacheConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two engines for the life of a worker: the one a swap replaces is the next swap's standby. A load per
    swap mapped another copy of the engine's library every time (AOTInductor never unloads one)."""
    worker = Worker(tiny_spec(), backend="aoti", cache_config=aoti_cache)
    worker.start()
    loads: list[int] = []
    real = worker.backend.load
    monkeypatch.setattr(worker.backend, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    x = torch.randn(3, 3, 16, 16)
    model = build_model("tests.serve.models:tiny_cnn")
    after_two = 0
    for seed in range(2, 8):
        state = demo_weights(model, seed=seed)
        report = worker.swap_weights(state, f"v{seed}")
        assert report.ok, report.error
        assert rel_err(worker.infer(x), eager_output(state, x)) < 1e-5, seed
        if seed == 3:
            after_two = _aoti_mappings()
    assert loads == [1]  # the first swap's standby; every later swap refits the engine it replaced
    assert _aoti_mappings() == after_two


def test_metrics_record_the_warm_start_path(aoti_cache: CacheConfig) -> None:
    sink = PrometheusSink()
    Worker(tiny_spec(), backend="aoti", cache_config=aoti_cache, metrics=Metrics(sink)).start()
    text = sink.exposition().decode()
    assert 'warmserve_engine_cache_hits_total{backend="aoti",tier="local"} 1.0' in text
    assert 'warmserve_warm_start_seconds_count{outcome="local-hit"} 1.0' in text
    assert "warmserve_engine_load_seconds_bucket" in text


def test_a_cpu_worker_opens_no_device_thread() -> None:
    from warmserve.serve.worker import open_device

    assert open_device(torch.device("cpu")) is None


# A replica-like process: loads the cached engine, says so, then waits for a line on stdin and leaves as Ray's
# workers do (os._exit: no destructors, so torch's loader leaves its package directory behind).
LOAD_AND_LEAVE = """
import os, sys, threading
from tests.serve.conftest import tiny_spec
from warmserve.cache import CacheConfig
from warmserve.serve.worker import Worker
worker = Worker(tiny_spec(), backend="aoti", cache_config=CacheConfig.load(environ={}, cache_dir=sys.argv[1]))
worker.start()
for thread in threading.enumerate():  # its own sweep, done before the test ages the directories
    if thread.name == "aoti-sweep":
        thread.join()
print("loaded", flush=True)
sys.stdin.readline()
os._exit(0)
"""


def test_package_directories_that_ended_processes_left_are_swept(aoti_cache: CacheConfig, tmp_path: Path) -> None:
    import os
    import time

    from warmserve.serve.backends.aoti import sweep_extracted

    tmp = tmp_path / "t"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-c", LOAD_AND_LEAVE, str(aoti_cache.cache_dir)]

    def started() -> subprocess.Popen[str]:
        p = subprocess.Popen(cmd, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline().strip() == "loaded"
        return p

    def extracted() -> set[Path]:
        return set(tmp.glob("aotinductor_*"))

    gone = started()
    (left,) = extracted()
    gone.communicate("\n", timeout=60)  # exits without destructors
    assert left.is_dir(), "the loader removed its directory after all: nothing to sweep"
    live = started()
    try:
        (in_use,) = extracted() - {left}
        young = tmp / "aotinductor_young"  # as if a process were extracting right now
        young.mkdir()
        old = time.time() - 3600
        for d in (left, in_use):
            os.utime(d, (old, old))
        link = tmp_path / "link"  # TMPDIR through a link: the maps name the real path
        link.symlink_to(tmp)
        assert sweep_extracted(str(link)) == [str(link / left.name)]
        assert extracted() == {in_use, young}, "a live engine's directory or a fresh one was removed"
        live.communicate("\n", timeout=60)
    finally:
        live.kill()
        live.communicate()
    assert sweep_extracted(str(tmp)) == [str(in_use)]
    assert extracted() == {young}
