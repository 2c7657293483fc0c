"""Half precision and text signatures on CUDA: each precision builds, warm-starts, hot-swaps and serves; the
encoder batches mixed lengths with CUDA graphs per (batch, length) bucket and compiles nothing after ready."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from warmserve.cache import CacheConfig
from warmserve.serve.model import build_model
from warmserve.serve.spec import InputSpec, ModelSpec, parse_inputs
from warmserve.serve.text import TINY, signature
from warmserve.serve.weights import demo_weights
from warmserve.serve.worker import Worker

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
IMAGE = InputSpec(shape=(3, 32, 32), min_batch=1, max_batch=8)


def cycle(spec: ModelSpec, backend: str, cache_dir: Path) -> Worker:
    """Build, warm-start a second worker from the cache, hot-swap it: the warm worker."""
    config = CacheConfig.load(environ={}, cache_dir=cache_dir)
    assert Worker(spec, backend=backend, device="cuda", cache_config=config).start().outcome == "built"
    worker = Worker(spec, backend=backend, device="cuda", cache_config=config)
    assert worker.start().outcome == "local-hit"
    report = worker.swap_weights(demo_weights(build_model(spec.model, meta=True), seed=3), "v2")
    assert report.ok, report.error
    return worker


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["aoti", "inductor"])
def test_half_precisions_build_warm_start_swap_and_serve(backend: str, precision: str, tmp_path: Path) -> None:
    spec = ModelSpec(model="tests.serve.models:tiny_cnn", input=IMAGE, precision=precision)
    worker = cycle(spec, backend, tmp_path)
    eager = Worker(spec, backend="eager", device="cuda", cache_config=CacheConfig.load(environ={}, cache_dir=tmp_path))
    eager.start()
    eager.swap_weights(demo_weights(build_model(spec.model, meta=True), seed=3), "v2")
    x = torch.randn(5, 3, 32, 32)
    got, want = worker.infer(x), eager.infer(x)
    assert got.dtype == torch.float32
    assert float((got - want).abs().max() / want.abs().max()) < spec.tolerance
    assert worker.fence is not None and worker.fence.unexpected == 0


def test_encoder_mixed_lengths_on_cuda_graphs(tmp_path: Path) -> None:
    tensors, dims, _ = parse_inputs(signature(TINY, 64))
    spec = ModelSpec(
        model="warmserve.serve.text:tiny_encoder",
        input=InputSpec(min_batch=1, max_batch=8, tensors=tensors, dims=dims),
        precision="fp16",
    )
    worker = cycle(spec, "aoti", tmp_path)
    engine = worker._live.engine  # type: ignore[union-attr]
    assert len(engine._graphs) == len(spec.input.buckets("seq"))  # type: ignore[attr-defined]
    eager = Worker(spec, backend="eager", device="cuda", cache_config=CacheConfig.load(environ={}, cache_dir=tmp_path))
    eager.start()
    eager.swap_weights(demo_weights(build_model(spec.model, meta=True), seed=3), "v2")
    g = torch.Generator().manual_seed(0)
    requests = [
        worker.check_inputs([torch.randint(0, 1000, (2, n), generator=g), torch.ones(2, n, dtype=torch.int64)])
        for n in (3, 17, 64, 40)
    ]
    answers, version = worker.run_requests(requests)
    assert version == "v2"
    for request, answer in zip(requests, answers, strict=True):
        want = eager.run(request)[0]
        assert [tuple(a.shape) for a in answer] == [tuple(w.shape) for w in want]
        for a, w in zip(answer, want, strict=True):
            assert float((a.cpu() - w.cpu()).abs().max() / w.abs().max()) < spec.tolerance
    assert worker.fence is not None and worker.fence.unexpected == 0


@pytest.mark.parametrize(
    ("seq", "lengths"),
    [("seq=32:32", (5, 32)), ("seq=8:64/8", (5, 13, 64))],
    ids=["fixed", "multiples-of-8"],
)
def test_transformers_bert_at_a_padded_length(seq: str, lengths: tuple[int, ...], tmp_path: Path) -> None:
    """transformers' own BERT through AOTInductor: its non-persistent buffers reach every refit, and requests
    are padded to the declared length (or the bucket of multiples of 8 that holds them: SDPA on CUDA exports a
    dynamic length only as 8 * n) and cut back."""
    pytest.importorskip("transformers")
    tensors, dims, steps = parse_inputs(f"input_ids:int64[{seq}]<100 attention_mask:int64[seq]")
    spec = ModelSpec(
        model="tests.serve.models:tiny_hf_bert",
        input=InputSpec(min_batch=1, max_batch=4, tensors=tensors, dims=dims, steps=steps),
    )
    worker = cycle(spec, "aoti", tmp_path)
    eager = build_model(spec.model).cuda()
    eager.load_state_dict(demo_weights(build_model(spec.model, meta=True), seed=3))
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        ids, mask = torch.randint(0, 100, (2, n), generator=g), torch.ones(2, n, dtype=torch.int64)
        (answer,), version = worker.run_requests([worker.check_inputs([ids, mask])])
        with torch.inference_mode():
            want = eager(ids.cuda(), mask.cuda())
        assert version == "v2" and answer[0].shape == (2, n, 32)
        for a, w in zip(answer, [want.last_hidden_state, want.pooler_output], strict=True):
            assert float((a.cpu() - w.cpu()).abs().max() / w.abs().max()) < spec.tolerance
    assert worker.fence is not None and worker.fence.unexpected == 0
