"""Model facts: a start from the cache builds no module (nor imports torchvision) once a start here recorded them.

The in-process tests give the tiny test model a code identity (facts are kept only for torchvision models,
whose code is identified without importing it); one test starts a real torchvision model in fresh processes.
"""

from __future__ import annotations

import json
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
def test_weights_no_start_verified_here_are_checked_against_eager(
    cache: CacheConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start(cache)
    save_weights(demo_weights(build_model(TINY), seed=11), tmp_path / "w.safetensors")
    answers = lambda: sorted((Path(cache.cache_dir) / "facts").glob("*-answer-*"))  # noqa: E731
    assert len(answers()) == 1
    calls = Forbidden(monkeypatch)
    worker = start(cache, weights=str(tmp_path / "w.safetensors"))
    assert calls.calls == ["materialise", "build_model"]  # eager's module (materialise builds it), for its answer
    assert len(answers()) == 2  # eager's answer for these weights, recorded for the next start
    assert worker.report is not None and worker.report.probe_error is not None


@pytest.mark.usefixtures("identified")
def test_weights_handed_over_in_memory_record_no_answer(cache: CacheConfig) -> None:
    """A digest given with in-memory weights is the caller's word, not read from a file: nothing is recorded."""
    worker = start(cache)
    answers = lambda: sorted((Path(cache.cache_dir) / "facts").glob("*-answer-*"))  # noqa: E731
    before = answers()
    report = worker.swap_weights(demo_weights(build_model(TINY), seed=8), "v2", sha256="ef" * 32)
    assert report.ok, report.error
    assert answers() == before


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
def test_an_engine_missing_from_the_cache_is_built_from_the_facts_too(
    cache: CacheConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Facts recorded, the entry gone (evicted, another cache): the start builds the module and the engine."""
    start(cache)
    other = CacheConfig.load(environ={}, cache_dir=tmp_path / "other")
    (Path(other.cache_dir) / "facts").mkdir(parents=True)
    for f in (Path(cache.cache_dir) / "facts").iterdir():
        (Path(other.cache_dir) / "facts" / f.name).write_bytes(f.read_bytes())
    calls = Forbidden(monkeypatch)
    worker = start(other)
    assert calls.calls == ["materialise", "build_model"]  # the module for the build only, no eager answer
    assert worker.report is not None and worker.report.outcome == "built"
    assert worker.report.probe_error is not None and worker.report.probe_error < 1e-5


@pytest.mark.usefixtures("identified")
def test_a_recorded_answer_the_engine_disagrees_with_is_replaced_by_eagers(
    cache: CacheConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale record (recorded with other CUDA libraries, say) costs one eager answer, never a failed start."""
    start(cache)
    (answer,) = (Path(cache.cache_dir) / "facts").glob("*-answer-*")
    from safetensors.torch import load, save

    good = answer.read_bytes()
    answer.write_bytes(save({k: v + 1.0 for k, v in load(good).items()}))
    worker = start(cache)
    assert worker.report is not None and worker.report.probe_error is not None and worker.report.probe_error < 1e-5
    assert "asking eager PyTorch" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(load(answer.read_bytes()).values(), load(good).values(), strict=True))


def test_an_engine_that_disagrees_with_eager_still_fails_the_start(
    cache: CacheConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(facts, "code_identity", lambda model: {"test": model})
    start(cache)
    real = worker_module.Worker._reference
    monkeypatch.setattr(worker_module.Worker, "_reference", lambda *a: [t + 1.0 for t in real(*a)])
    for f in (Path(cache.cache_dir) / "facts").glob("*-answer-*"):
        f.unlink()
    with pytest.raises(RefitError, match="disagrees with eager"):
        start(cache)


def test_facts_are_kept_only_where_the_code_is_known_without_importing_it() -> None:
    assert code_identity(TINY) is None  # a factory of your own: built at every start
    found = code_identity("torchvision:resnet18")
    assert found is not None and set(found) == {"torch", "torchvision"}
    assert torch.__version__.startswith(found["torch"]["version"])
    assert not FactsStore(Path("unused"), {"model": TINY}, "code").enabled
    assert not FactsStore(Path("unused"), {"model": "torchvision:resnet18"}, None).enabled  # sources unreadable


def test_every_part_of_a_spec_names_other_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facts, "code_identity", lambda model: {"test": model})
    base = {"model": TINY, "precision": "fp32", "input": {"shape": [3, 16, 16]}, "outputs": []}
    ids = {FactsStore(Path("x"), base, "code").id}
    for change in ({"precision": "fp16"}, {"input": {"shape": [3, 32, 32]}}, {"outputs": ["logits"]}):
        ids.add(FactsStore(Path("x"), {**base, **change}, "code").id)
    ids.add(FactsStore(Path("x"), base, "other code").id)
    monkeypatch.setattr(facts, "code_identity", lambda model: {"test": model, "torchvision": "another"})
    ids.add(FactsStore(Path("x"), base, "code").id)
    assert len(ids) == 6


def test_signed_facts_refuse_unsigned_and_forged_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facts, "code_identity", lambda model: {"test": model})
    spec = {"model": TINY}
    model = build_model(TINY)
    known = ModelFacts({"class": "x"}, expected_tensors(model), [OutputSpec("output__0", "float32", (10,))], ["a"])
    FactsStore(tmp_path, spec, "code").save(known)
    assert FactsStore(tmp_path, spec, "code").load() == known
    key = b"k" * 32
    signed = FactsStore(tmp_path, spec, "code", signing_key=key)
    assert signed.load() is None  # unsigned
    signed.save(known)
    assert signed.load() == known
    assert FactsStore(tmp_path, spec, "code", signing_key=b"other" * 8).load() is None  # another key
    assert FactsStore(tmp_path, spec, "other code").load() is None  # recorded by other code: another id
    path = tmp_path / f"{signed.id}.json"
    doc = json.loads(path.read_text())
    doc["facts"]["labels"] = ["b"]
    path.write_text(json.dumps(doc))
    assert signed.load() is None  # tampered with
    signed.save(known)
    other = FactsStore(tmp_path, {"model": TINY + "_wide"}, "code", signing_key=key)
    (tmp_path / f"{other.id}.json").write_bytes(path.read_bytes())
    assert other.load() is None  # a signed file copied under another identity

    probe, answer = [torch.ones(1, 3)], [torch.arange(4.0)]
    signed.save_reference("ab" * 32, {"type": "cpu"}, probe, answer)
    got = signed.reference("ab" * 32, {"type": "cpu"}, probe)
    assert got is not None and torch.equal(got[0], answer[0])
    assert (
        FactsStore(tmp_path, spec, "code", signing_key=b"other" * 8).reference("ab" * 32, {"type": "cpu"}, probe)
        is None
    )
    (recorded,) = tmp_path.glob("*-answer-*.safetensors")
    signed.save_reference("cd" * 32, {"type": "cpu"}, probe, [torch.zeros(4)])
    (copied,) = set(tmp_path.glob("*-answer-*.safetensors")) - {recorded}
    copied.write_bytes(recorded.read_bytes())
    copied.with_suffix(".sig").write_bytes(recorded.with_suffix(".sig").read_bytes())
    assert signed.reference("cd" * 32, {"type": "cpu"}, probe) is None  # another file's answer and signature
    copied.with_suffix(".sig").write_bytes(b"\xff\xfe")
    assert signed.reference("cd" * 32, {"type": "cpu"}, probe) is None  # a corrupt signature is a miss


def test_demo_weights_from_recorded_facts_equal_the_modules() -> None:
    """A start from facts writes the same demo weights as one that built the module (its names in order)."""
    model = build_model(TINY)
    known = ModelFacts({}, expected_tensors(model), [], [])
    recorded = ModelFacts.from_doc(json.loads(json.dumps(known.doc())))
    from_facts, from_module = demo_weights(recorded.expected, seed=3), demo_weights(model, seed=3)
    assert list(from_facts) == list(model.state_dict())
    assert all(torch.equal(from_facts[k], from_module[k]) for k in from_facts)


def test_the_fence_reads_no_counters_from_a_module_still_being_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision imports Dynamo after ready (nvJPEG's start, a swap's eager answer); a request's fence check
    meanwhile finds its module without counters, and counts nothing."""
    import types

    from warmserve.serve.fence import compile_counts

    monkeypatch.setitem(sys.modules, "torch._dynamo.utils", types.ModuleType("torch._dynamo.utils"))
    assert compile_counts() == (0, 0)


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
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    assert runs[0]["outcome"] == "built" and runs[0]["imported"] == ["torch._dynamo", "torchvision"]
    assert runs[1]["outcome"] == "local-hit" and runs[1]["imported"] == [], runs[1]
    assert runs[1]["labels"] == runs[0]["labels"] == ["tench", "goldfish"]  # torchvision's ImageNet names
