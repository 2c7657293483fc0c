"""Static checks that run with the test suite: ruff, mypy, and the TensorRT backend against real sources.

torch_tensorrt cannot be imported here (no TensorRT), so the backend is checked two ways against the
torch-tensorrt 2.11 and 2.14 sources that .ci/run downloads (WARMSERVE_TTRT_SOURCES, colon-separated):
mypy with those sources on MYPYPATH, and a parse of the functions whose upstream signatures hide behind
untyped decorators or ``**kwargs`` (where a misspelt keyword would be silently dropped at run time).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from warmserve.serve.backends.tensorrt import COMPILE_SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_ruff_clean() -> None:
    out = run(sys.executable, "-m", "ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One incremental cache for this module's mypy runs: the torch-tensorrt runs reuse the analysis of torch
    from the first (15 s each on two cores otherwise). mypy checks each cached module's path and hash, so a
    module read from other torch-tensorrt sources is analysed again."""
    return str(tmp_path_factory.mktemp("mypy-cache"))


def test_mypy_clean(mypy_cache: str) -> None:
    out = run(sys.executable, "-m", "mypy", "--cache-dir", mypy_cache)
    assert out.returncode == 0, out.stdout + out.stderr


def test_code_imports_the_rooms_by_their_package_names() -> None:
    """``warmserve.serve``, never ``serve``: a module imported under both names would load twice, with two copies
    of its state (and ``serve`` is also Ray's)."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    bare = []
    for f in files:
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bare += [f"{f}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("cache", "serve", "deployments")]
    assert not bare, bare


def ttrt_sources() -> list[Path]:
    raw = os.environ.get("WARMSERVE_TTRT_SOURCES", "")
    return [Path(p) for p in raw.split(":") if p]


needs_sources = pytest.mark.skipif(
    not ttrt_sources(), reason="set WARMSERVE_TTRT_SOURCES (bash .ci/run does) to torch-tensorrt source trees"
)


def params_of(path: Path, func: str) -> set[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            a = node.args
            return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    raise AssertionError(f"{func} not found in {path}")


def dataclass_fields(path: Path, cls: str) -> set[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError(f"{cls} not found in {path}")


@needs_sources
@pytest.mark.parametrize("source", ttrt_sources(), ids=lambda p: p.name)
def test_mypy_against_torch_tensorrt_sources(source: Path, mypy_cache: str) -> None:
    assert (source / "torch_tensorrt" / "dynamo" / "_compiler.py").exists(), source
    env = {**os.environ, "MYPYPATH": str(source.resolve())}
    out = run(
        sys.executable,
        "-m",
        "mypy",
        "--cache-dir",
        mypy_cache,
        "cache/trt.py",
        "serve/backends/tensorrt.py",
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_sources
@pytest.mark.parametrize("source", ttrt_sources(), ids=lambda p: p.name)
def test_every_keyword_we_pass_exists_upstream(source: Path) -> None:
    pkg = source / "torch_tensorrt"
    compile_params = params_of(pkg / "dynamo" / "_compiler.py", "compile")
    settings = dataclass_fields(pkg / "dynamo" / "_settings.py", "CompilationSettings")
    ours = set(COMPILE_SETTINGS) | {"custom_engine_cache", "arg_inputs", "device"}
    assert ours <= compile_params | settings, ours - compile_params - settings
    # Caching only works with refittable engines: these must be real parameters, not swallowed kwargs.
    assert {"immutable_weights", "cache_built_engines", "reuse_cached_engines", "custom_engine_cache"} <= compile_params
    refit = params_of(pkg / "dynamo" / "_refit.py", "refit_module_weights")
    assert {"arg_inputs", "verify_output", "in_place"} <= refit
    assert {"output_format", "arg_inputs"} <= params_of(pkg / "_compile.py", "save")
    assert {"gm", "input_specs", "settings"} <= params_of(pkg / "dynamo" / "_engine_cache.py", "get_hash")
