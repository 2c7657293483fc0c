"""The C++ compiler is proven before AOTInductor builds with it, and nothing compiles once a worker is ready."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
import torch
import torch._inductor.config

from tests.serve.conftest import tiny_spec
from warmserve.cache import CacheConfig
from warmserve.serve import toolchain
from warmserve.serve.errors import BackendUnavailable
from warmserve.serve.metrics import Metrics, PrometheusSink
from warmserve.serve.model import build_model
from warmserve.serve.weights import demo_weights
from warmserve.serve.worker import Worker


def wrapper(path: Path, body: str) -> str:
    """An executable that stands in for g++ (answering --version like it, as the broken ones do)."""
    path.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then exec g++ --version; fi\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def crashing_compiler(tmp_path: Path) -> str:
    """Builds what g++ builds, plus a constructor that aborts the process that loads the library: a package
    that builds fine and kills its loader, as the statically linked libstdc++ of one real image does."""
    (tmp_path / "boom.c").write_text(
        "#include <stdlib.h>\n__attribute__((constructor)) static void boom(void) { abort(); }\n"
    )
    subprocess.run(["gcc", "-fPIC", "-c", str(tmp_path / "boom.c"), "-o", str(tmp_path / "boom.o")], check=True)
    body = f'case " $* " in *" -shared "*) exec g++ "$@" {tmp_path / "boom.o"};; esac\nexec g++ "$@"'
    return wrapper(tmp_path / "crash-g++", body)


def test_a_compiler_whose_packages_crash_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_config: CacheConfig
) -> None:
    bad = crashing_compiler(tmp_path)
    monkeypatch.setenv("CXX", bad)
    worker = Worker(tiny_spec(), backend="aoti", cache_config=cache_config)
    report = worker.start()
    assert report.outcome == "built" and report.backend == "aoti"
    assert report.build["cxx_checked"] and report.build["cxx"] != bad
    assert "crashed the process that loaded it (SIGABRT)" in report.build["cxx_rejected"][bad]
    # The key names the compiler that passed, and the engine it built answers like eager.
    state = demo_weights(build_model("tests.serve.models:tiny_cnn"))
    model = build_model("tests.serve.models:tiny_cnn")
    model.load_state_dict(state)
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(worker.infer(x), model(x), rtol=1e-4, atol=1e-5)

    # The verdict is kept for the node: the next start keys by the good compiler and probes nothing.
    def no_probe(*args: object) -> str:
        raise AssertionError("probed again")

    monkeypatch.setattr(toolchain, "probe", no_probe)
    again = Worker(tiny_spec(), backend="aoti", cache_config=cache_config).start()
    assert again.outcome == "local-hit" and again.key == report.key


def test_compilers_that_fail_or_link_statically_are_named_with_the_reason(tmp_path: Path) -> None:
    failing = wrapper(tmp_path / "bad-g++", 'echo "bad-g++: licence expired" >&2; exit 1')
    problem = toolchain.probe(failing)
    assert problem is not None and "building a tiny shared library failed: bad-g++: licence expired" in problem
    static = wrapper(tmp_path / "static-g++", 'exec g++ "$@" -static-libstdc++ -static-libgcc')
    problem = toolchain.probe(static)
    assert problem is not None and "link libstdc++ statically" in problem
    assert toolchain.probe("g++") is None


def test_no_working_compiler_auto_falls_back_and_aoti_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_config: CacheConfig
) -> None:
    failing = wrapper(tmp_path / "bad-g++", "exit 1")
    monkeypatch.setattr(toolchain, "candidates", lambda environ=None: [failing])
    with pytest.raises(BackendUnavailable, match=r"none does \(.*bad-g\+\+: building a tiny shared library failed"):
        Worker(tiny_spec(), backend="aoti", cache_config=cache_config).start()
    # A failure is not kept: a compiler that works later (disk space freed, g++ installed) is found then.
    assert toolchain.Toolchain(cache_config.cache_dir).kept() is None
    # On the CPU Inductor compiles C++ too: with no compiler that works, auto ends on eager, and says why.
    report = Worker(tiny_spec(), backend="auto", cache_config=cache_config).start()
    assert report.backend == "eager" and report.outcome == "uncached"
    assert report.fallback and report.fallback.startswith("aoti: Inductor's C++ needs a compiler")
    assert "; inductor: Inductor's C++ needs a compiler" in report.fallback


@pytest.mark.parametrize("backend", ["aoti", "inductor"])
def test_nothing_compiles_after_ready(backend: str, cache_config: CacheConfig) -> None:
    """Every batch size the engine takes, a batch larger than its range, and a hot swap: no trace, no compile."""
    sink = PrometheusSink()
    worker = Worker(tiny_spec(), backend=backend, cache_config=cache_config, metrics=Metrics(sink))
    worker.start()
    assert worker.fence is not None
    for batch in range(1, 12):
        worker.infer(torch.randn(batch, 3, 16, 16))
    assert worker.swap_weights(demo_weights(build_model("tests.serve.models:tiny_cnn"), seed=5), "v2").ok
    worker.infer(torch.randn(3, 3, 16, 16))
    assert worker.fence.unexpected == 0
    assert "warmserve_unexpected_compiles_total{" not in sink.exposition().decode()

    # The fence is real: a compile in this process after ready is counted and named.
    fresh = eval(f"lambda t: t * {len(backend)} + 1")  # a code object Dynamo has never seen
    torch.compile(fresh)(torch.randn(4))
    worker.infer(torch.randn(2, 3, 16, 16))
    assert worker.fence.unexpected >= 1
    assert f'warmserve_unexpected_compiles_total{{backend="{backend}"}}' in sink.exposition().decode()
