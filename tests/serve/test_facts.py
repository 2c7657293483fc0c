"""Model facts: a start from the cache builds no module (nor imports torchvision) once a start here recorded them.

The in-process tests give the tiny test model a code identity (facts are kept only for torchvision models,
whose code is identified without importing it); one test starts a real torchvision model in fresh processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import warmserve.serve.worker as worker_module
from tests.serve.conftest import TINY, tiny_spec
from warmserve.cache import CacheConfig
from warmserve.serve import facts
from warmserve.serve.batching import OutputSpec
from warmserve.serve.errors import RefitError
from warmserve.serve.facts import FactsStore, ModelFacts, code_identity
from warmserve.serve.model import build_model
from warmserve.serve.weights import demo_weights, expected_tensors, save_weights
from warmserve.serve.worker import Worker

pytestmark = pytest.mark.usefixtures("inductor_cache")


@pytest.fixture
def identified(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model's code counts as identified, as a torchvision model's is."""
    monkeypatch.setattr(facts, "code_identity", lambda model: {"test": model})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> CacheConfig:
    """A cache holding the tiny model's AOTI artifact, with no facts recorded yet (the model is not identified)."""
    config = CacheConfig.load(environ={}, cache_dir=tmp_path_factory.mktemp("facts-cache"))
    assert Worker(tiny_spec(), backend="aoti", cache_config=config).start().outcome == "built"
    assert not (Path(config.cache_dir) / "facts").exists()
    return config


@pytest.fixture
def cache(built: CacheConfig, tmp_path: Path) -> Iterator[CacheConfig]:
    """The built cache with facts of this test's own: each test starts with none recorded."""
    yield built
    for f in (Path(built.cache_dir) / "facts").glob("*"):
        f.unlink()


class Forbidden:
    """Counts calls to what a start from facts must not call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        real_build, real_materialise = worker_module.build_model, worker_module.materialise

        def build(*a: object, **kw: object) -> torch.nn.Module:
            self.calls.append("build_model")
            return real_build(*a, **kw)  # type: ignore[arg-type]

        def materialise(*a: object, **kw: object) -> torch.nn.Module:
            self.calls.append("materialise")
            return real_materialise(*a, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(worker_module, "build_model", build)
        monkeypatch.setattr(worker_module, "materialise", materialise)


def start(config: CacheConfig, **kw: object) -> Worker:
    worker = Worker(tiny_spec(**kw), backend="aoti", cache_config=config)
    worker.start()
    return worker


@pytest.mark.usefixtures("identified")
def test_a_start_from_recorded_facts_builds_no_module(cache: CacheConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    first = start(cache)
    assert first.report is not None and first.report.outcome == "local-hit"
    recorded = sorted(p.name for p in (Path(cache.cache_dir) / "facts").iterdir())
    assert len(recorded) == 2 and recorded[1].endswith(".json"), recorded  # the facts and eager's answer

    calls = Forbidden(monkeypatch)
    second = start(cache)
    assert calls.calls == []
    assert second.report is not None and second.report.outcome == "local-hit"
    assert second.report.key == first.report.key
    assert second.report.probe_error is not None and second.report.probe_error < 1e-5  # the recorded answer
    assert second.outputs == first.outputs and second.labels == first.labels
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(second.infer(x), first.infer(x))

    # A swap to weights no start has verified asks eager PyTorch: the module is built then, not before.
    state = demo_weights(build_model(TINY), seed=5)
    save_weights(state, Path(cache.cache_dir) / "new.safetensors")
    report = second.swap_weights(str(Path(cache.cache_dir) / "new.safetensors"), "v2")
    assert report.ok, report.error
    assert "materialise" in calls.calls
    model = build_model(TINY)
    model.load_state_dict(state)
    with torch.inference_mode():
        assert float((second.infer(x) - model(x)).abs().max()) < 1e-4
    assert second.model is not None  # the eager module has the weights now served
    assert all(torch.equal(v, state[k]) for k, v in second.model.state_dict().items())


@pytest.mark.usefixtures("identified")
def test_weights_no_start_verified_here_are_checked_against_eager(cache: CacheConfig, tmp_path: Path) -> None:
    start(cache)
    save_weights(demo_weights(build_model(TINY), seed=11), tmp_path / "w.safetensors")
    answers = lambda: sorted((Path(cache.cache_dir) / "facts").glob("*-answer-*"))  # noqa: E731
    assert len(answers()) == 1
    worker = start(cache, weights=str(tmp_path / "w.safetensors"))
    assert len(answers()) == 2  # eager's answer for these weights, recorded for the next start
    assert worker.report is not None and worker.report.probe_error is not None


@pytest.mark.usefixtures("identified")
def test_corrupt_facts_cost_a_module_build_and_are_recorded_again(
    cache: CacheConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    start(cache)
    directory = Path(cache.cache_dir) / "facts"
    (doc,) = directory.glob("*.json")
    (answer,) = directory.glob("*-answer-*")
    doc.write_text('{"facts": {"architecture": ')  # cut short
    answer.write_bytes(b"not safetensors")
    calls = Forbidden(monkeypatch)
    worker = start(cache)
    assert worker.report is not None and worker.report.outcome == "local-hit"
    assert "build_model" in calls.calls and "materialise" in calls.calls
    assert "unreadable" in caplog.text and "corrupt" in caplog.text
    assert json.loads(doc.read_text())["facts"]["labels"] == worker.labels  # recorded again, whole
    calls.calls.clear()
    start(cache)
    assert calls.calls == []


@pytest.mark.usefixtures("identified")
def test_an_engine_missing_from_the_cache_is_built_from_the_facts_too(cache: CacheConfig, tmp_path: Path) -> None:
    """Facts recorded, the entry gone (evicted, another cache): the start builds the module and the engine."""
    start(cache)
    other = CacheConfig.load(environ={}, cache_dir=tmp_path / "other")
    (Path(other.cache_dir) / "facts").mkdir(parents=True)
    for f in (Path(cache.cache_dir) / "facts").iterdir():
        (Path(other.cache_dir) / "facts" / f.name).write_bytes(f.read_bytes())
    worker = start(other)
    assert worker.report is not None and worker.report.outcome == "built"
    assert worker.report.probe_error is not None and worker.report.probe_error < 1e-5


@pytest.mark.usefixtures("identified")
def test_a_recorded_answer_the_engine_disagrees_with_fails_the_start(cache: CacheConfig) -> None:
    start(cache)
    (answer,) = (Path(cache.cache_dir) / "facts").glob("*-answer-*")
    from safetensors.torch import load, save

    tensors = load(answer.read_bytes())
    answer.write_bytes(save({k: v + 1.0 for k, v in tensors.items()}))
    with pytest.raises(RefitError, match="disagrees with eager"):
        start(cache)


def test_facts_are_kept_only_where_the_code_is_known_without_importing_it() -> None:
    assert code_identity(TINY) is None  # a factory of your own: built at every start
    found = code_identity("torchvision:resnet18")
    assert found is not None and set(found) == {"torch", "torchvision"}
    assert torch.__version__.startswith(found["torch"]["version"])
    assert not FactsStore(Path("unused"), {"model": TINY}, ()).enabled


def test_signed_facts_refuse_unsigned_and_forged_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facts, "code_identity", lambda model: {"test": model})
    spec = {"model": TINY}
    model = build_model(TINY)
    known = ModelFacts({"class": "x"}, expected_tensors(model), [OutputSpec("output__0", "float32", (10,))], ["a"])
    FactsStore(tmp_path, spec, ()).save(known)
    assert FactsStore(tmp_path, spec, ()).load() == known
    signed = FactsStore(tmp_path, spec, (), signing_key=b"k" * 32)
    assert signed.load() is None  # unsigned
    signed.save(known)
    assert signed.load() == known
    assert FactsStore(tmp_path, spec, (), signing_key=b"other" * 8).load() is None  # forged
    assert FactsStore(tmp_path, spec, ("other code",)).load() is None  # recorded by other code: another id
    probe, answer = [torch.ones(1, 3)], [torch.arange(4.0)]
    signed.save_reference("ab" * 32, {"type": "cpu"}, probe, answer)
    got = signed.reference("ab" * 32, {"type": "cpu"}, probe)
    assert got is not None and torch.equal(got[0], answer[0])
    assert FactsStore(tmp_path, spec, (), signing_key=b"other" * 8).reference("ab" * 32, {"type": "cpu"}, probe) is None
    assert signed.reference("cd" * 32, {"type": "cpu"}, probe) is None  # other weights
    assert signed.reference("ab" * 32, {"type": "cpu"}, [torch.zeros(1, 3)]) is None  # another probe


def test_demo_weights_from_the_facts_equal_the_modules() -> None:
    model = build_model(TINY)
    from_facts, from_module = demo_weights(expected_tensors(model), seed=3), demo_weights(model, seed=3)
    assert from_facts.keys() == from_module.keys()
    assert all(torch.equal(from_facts[k], from_module[k]) for k in from_facts)


def test_a_torchvision_model_warm_starts_without_importing_torchvision(tmp_path: Path) -> None:
    """Real processes: the first builds squeezenet1_1 (the smallest torchvision classifier) and records its
    facts; the second starts from the cache with neither torchvision nor Dynamo imported."""
    script = (
        "import json, sys\n"
        "from warmserve.cache import CacheConfig\n"
        "from warmserve.serve.spec import InputSpec, ModelSpec\n"
        "from warmserve.serve.worker import Worker\n"
        "spec = ModelSpec(model='torchvision:squeezenet1_1', input=InputSpec(shape=(3, 32, 32), max_batch=2))\n"
        "w = Worker(spec, backend='aoti', cache_config=CacheConfig.load(environ={}, cache_dir=sys.argv[1]))\n"
        "r = w.start()\n"
        "import torch\n"
        "w.infer(torch.rand(2, 3, 32, 32))\n"
        "print(json.dumps({'outcome': r.outcome, 'phases': r.phases, 'labels': w.labels[:2],\n"
        "    'imported': sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules)}))\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    assert runs[0]["outcome"] == "built" and runs[0]["imported"] == ["torch._dynamo", "torchvision"]
    assert runs[1]["outcome"] == "local-hit" and runs[1]["imported"] == [], runs[1]
    assert runs[1]["labels"] == runs[0]["labels"] == ["tench", "goldfish"]  # torchvision's ImageNet names
