"""Signatures beyond one float image: the inputs' form and its errors, request checks, padding to a bucket and
cutting back, outputs by name, precision in the key, and a text encoder through the worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.serve.conftest import tiny_spec
from warmserve.cache import CacheConfig
from warmserve.serve.backends.base import flatten
from warmserve.serve.batching import OutputSpec, check_request, cut, pad_to, run_requests
from warmserve.serve.errors import InputError, ModelSpecError
from warmserve.serve.model import build_model
from warmserve.serve.settings import Settings
from warmserve.serve.spec import InputSpec, ModelSpec, parse_inputs
from warmserve.serve.text import TINY, TextEncoder, signature
from warmserve.serve.weights import demo_weights
from warmserve.serve.worker import Worker, output_specs

TEXT = signature(TINY, 64)


def text_spec(**kw: object) -> ModelSpec:
    tensors, dims, _ = parse_inputs(TEXT)
    sig = InputSpec(min_batch=1, max_batch=8, tensors=tensors, dims=dims)
    return ModelSpec(**{"model": "warmserve.serve.text:tiny_encoder", "input": sig, **kw})  # type: ignore[arg-type]


def test_the_inputs_form() -> None:
    tensors, dims, _ = parse_inputs("input_ids:INT64[seq=16:128]<30522; attention_mask:long[seq] pixel:fp16[3,8,8]")
    assert [(t.name, t.dtype, t.shape, t.bound) for t in tensors] == [
        ("input_ids", "int64", ("seq",), 30522),
        ("attention_mask", "int64", ("seq",), None),
        ("pixel", "float16", (3, 8, 8), None),
    ]
    assert dims == {"seq": (16, 128)}
    sig = InputSpec(tensors=tensors, dims=dims)
    assert sig.padded and sig.buckets("seq") == [16, 32, 64, 128] and sig.text().startswith("input_ids:int64[seq=16:")
    assert parse_inputs(sig.text()) == (tensors, dims, {})  # the form reads back
    for bad, said in [
        ("input_ids", "cannot read"),
        ("x:int8[4]", "dtype must be one of"),
        ("x:float32[seq]", "need a range"),
        ("x:float32[seq=8:4]", "1 <= MIN <= MAX"),
        ("x:float32[4] x:float32[4]", "names must differ"),
        ("x:float32[s=1:4] y:float32[s=2:4]", "two ranges"),
        ("x:float32[4]<10", "integer inputs only"),
        ("x:int64[4] junk", "cannot read 'junk'"),
        ("x:int64[4?]", "neither a size nor a name"),
        ("x:int64[seq=1:128/8]", r"multiples of it, got seq=1:128/8: write seq=8:128/8 \(a dimension padded by"),
        ("x:int64[seq=5:100/8]", "write seq=8:96/8 .*; lengths above 96 are then refused"),
        ("x:int64[seq=9:15/8]", "holds no multiple of its step"),
        ("x:int64[seq=8:128/]", "must look like seq=16:128"),
        ("x:int64[seq=8:128/0]", "step must be 1 or more"),
        ("x:int64[s=8:16/8] y:int64[s=8:16]", "two ranges, s=8:16/8 and s=8:16"),
        ("x:int64[seq=8:128/eight]", "seq=8:128/8 for multiples of 8"),
    ]:
        with pytest.raises(ValueError, match=said):
            tensors, dims, _ = parse_inputs(bad)
            InputSpec(tensors=tensors, dims=dims)


def test_settings_take_inputs_and_outputs_by_option_and_by_file() -> None:
    settings = Settings.load(args={"inputs": [TEXT], "outputs": "hidden, pooled", "model": "a.b:c"}, environ={})
    assert settings.model.input.names == ["input_ids", "attention_mask"] and settings.model.outputs == (
        "hidden",
        "pooled",
    )
    with pytest.raises(ValueError, match="either inputs or input_shape"):
        Settings.load(args={"inputs": TEXT, "input_shape": "3,8,8"}, environ={})
    with pytest.raises(ValueError, match=r"args\.inputs: cannot read"):
        Settings.load(args={"inputs": "ids"}, environ={})
    single = Settings.load(args={}, environ={}).model.input  # the default: one image input, as before
    assert single.names == ["input__0"] and single.doc() == {
        "shape": [3, 224, 224],
        "dtype": "float32",
        "batch": [1, 32],
    }


def test_request_checks_say_what_is_wrong() -> None:
    sig = text_spec().input
    ids, mask = torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    assert len(check_request(sig, [ids.int(), mask])) == 2  # INT32 ids are taken too
    for xs, said in [
        ([ids], "takes 2 input"),
        ([ids, mask[:1]], "batch of 1 rows"),
        ([ids, mask[:, :4]], "seq is 4, but another input has seq 8"),
        ([torch.randint(0, 1000, (1, 65)), torch.ones(1, 65, dtype=torch.int64)], "seq from 1 to 64"),
        ([ids + 1000, mask], r"values must lie in \[0, 1000\)"),
        ([-ids - 1, mask], "values must lie in"),
        ([ids.float(), mask], "expected dtype int64, got float32"),
        ([ids[0], mask], r"expected shape \[batch, seq\]"),
        ([ids, "mask"], "expected a tensor"),
    ]:
        with pytest.raises(InputError, match=said):
            check_request(sig, xs)


def test_padding_to_a_bucket_and_cutting_back() -> None:
    sig = text_spec().input
    specs = [OutputSpec("h", "float32", ("seq", 4)), OutputSpec("p", "float32", (4,))]
    calls: list[tuple[int, ...]] = []

    def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        ids, mask = xs
        calls.append(tuple(ids.shape))
        h = (ids * mask).float()[..., None].expand(*ids.shape, 4)
        return [h, h.sum(1)]

    reqs = [[torch.full((r, n), n), torch.ones(r, n, dtype=torch.int64)] for r, n in [(1, 3), (2, 17), (1, 9)]]
    answers = run_requests(sig, specs, reqs, run)
    assert calls == [(4, 32)]  # one call, padded to the bucket that holds 17
    for (r, n), (h, p) in zip([(1, 3), (2, 17), (1, 9)], answers, strict=True):
        assert h.shape == (r, n, 4) and bool((h == n).all()) and bool((p == n * n).all())
    assert pad_to(sig, reqs[0], {"seq": 8})[1].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    assert cut([torch.zeros(3, 8, 4)], specs[:1], 2, {"seq": 5})[0].shape == (2, 5, 4)

    # Without a mask, padding would change answers: requests of one length share a call, each at its length.
    tensors, dims, _ = parse_inputs("ids:int64[seq=1:64]")
    plain = InputSpec(min_batch=1, max_batch=8, tensors=tensors, dims=dims)
    calls.clear()
    answers = run_requests(plain, specs, [[r[0]] for r in reqs + reqs[:1]], lambda xs: run([xs[0], xs[0] * 0 + 1]))
    assert sorted(calls) == [(1, 9), (2, 3), (2, 17)] and [a[0].shape[1] for a in answers] == [3, 17, 9, 3]


def test_outputs_are_named_and_shaped_from_a_meta_run() -> None:
    assert output_specs(text_spec()) == [
        OutputSpec("last_hidden_state", "float32", ("seq", 128)),
        OutputSpec("pooler_output", "float32", (128,)),
    ]
    assert [o.name for o in output_specs(text_spec(outputs=("h", "p")))] == ["h", "p"]
    assert output_specs(tiny_spec(precision="bf16")) == [OutputSpec("output__0", "float32", (10,))]
    with pytest.raises(
        ModelSpecError, match=r"outputs: 1 name\(s\) given, but .* returns 2 \(last_hidden_state, pooler_output\)"
    ):
        output_specs(text_spec(outputs=("h",)))
    with pytest.raises(ModelSpecError, match="does not take the inputs declared"):
        tensors, dims, _ = parse_inputs("a:float32[3,16,16] b:float32[3,16,16] c:float32[4]")
        output_specs(tiny_spec(input=InputSpec(tensors=tensors, dims=dims)))
    nested = flatten({"a": torch.zeros(1), "b": (torch.zeros(1), {"c": torch.zeros(1)}), "d": None})
    assert [n for n, _ in nested] == ["a", "b.0", "b.1.c"]
    assert [n for n, _ in flatten((torch.zeros(1), torch.zeros(1)))] == ["output__0", "output__1"]


def test_precision_and_signature_are_in_the_key(cache_config: CacheConfig) -> None:
    keys = {
        Worker(spec, backend="aoti", cache_config=cache_config).key_for(build_model(spec.model, meta=True)).id
        for spec in (tiny_spec(), tiny_spec(precision="fp16"), tiny_spec(precision="bf16"))
    }
    assert len(keys) == 3
    one = Worker(text_spec(), backend="aoti", cache_config=cache_config)
    tensors, dims, _ = parse_inputs(signature(TINY, 32))
    other = Worker(
        text_spec(input=InputSpec(min_batch=1, max_batch=8, tensors=tensors, dims=dims)),
        backend="aoti",
        cache_config=cache_config,
    )
    model = build_model("warmserve.serve.text:tiny_encoder", meta=True)
    assert one.key_for(model).id != other.key_for(model).id


@pytest.mark.slow
def test_text_encoder_builds_warm_starts_serves_mixed_lengths_and_swaps(tmp_path: Path) -> None:
    config = CacheConfig.load(environ={}, cache_dir=tmp_path)
    spec = text_spec()
    assert Worker(spec, backend="aoti", cache_config=config).start().outcome == "built"
    worker = Worker(spec, backend="aoti", cache_config=config)
    report = worker.start()
    assert report.outcome == "local-hit" and report.probe_error is not None and report.probe_error < 1e-4
    eager = TextEncoder(TINY).eval()
    eager.load_state_dict(demo_weights(TextEncoder(TINY), seed=0))
    g = torch.Generator().manual_seed(0)
    requests = [
        worker.check_inputs([torch.randint(0, 1000, (r, n), generator=g), torch.ones(r, n, dtype=torch.int64)])
        for r, n in [(1, 5), (3, 64), (2, 17), (1, 1)]
    ]

    def unpadded(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(eager(*xs).values())

    answers, version = worker.run_requests(requests)
    for xs, got in zip(requests, answers, strict=True):
        for a, w in zip(got, unpadded(xs), strict=True):
            assert a.shape == w.shape and float((a - w).abs().max() / w.abs().max()) < 1e-4
    new = demo_weights(TextEncoder(TINY), seed=9)
    assert worker.swap_weights(new, "v2").ok
    eager.load_state_dict(new)
    outs, version = worker.run(requests[1])
    assert version == "v2" and float((outs[0] - unpadded(requests[1])[0]).abs().max()) < 1e-3
    assert worker.fence is not None and worker.fence.unexpected == 0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_the_cpu_where_it_runs(precision: str, cache_config: CacheConfig) -> None:
    """Eager serves both half precisions on this CPU; a compiled engine's are covered in tests/gpu."""
    worker = Worker(tiny_spec(precision=precision), backend="eager", cache_config=cache_config)
    worker.start()
    out = worker.infer(torch.randn(3, 3, 16, 16))
    assert out.dtype == torch.float32 and out.shape == (3, 10)


def test_a_tuple_of_outputs_from_one_input(cache_config: CacheConfig) -> None:
    spec = tiny_spec(model="tests.serve.models:two_heads")
    assert output_specs(spec) == [
        OutputSpec("output__0", "float32", (10,)),
        OutputSpec("output__1", "float32", (4, 16, 16)),
    ]
    worker = Worker(spec, backend="eager", cache_config=cache_config)
    worker.start()
    outs, _ = worker.run(worker.check_inputs([torch.randn(3, 3, 16, 16)]))
    assert [tuple(o.shape) for o in outs] == [(3, 10), (3, 4, 16, 16)]
    assert worker.infer(torch.randn(2, 3, 16, 16)).shape == (2, 10)  # infer: the first output


def test_only_a_masked_dimension_is_padded(cache_config: CacheConfig) -> None:
    tensors, dims, _ = parse_inputs("feats:float32[frames=4:32,8] ids:int64[seq=4:32]<16 attention_mask:int64[seq]")
    spec = ModelSpec(
        model="tests.serve.models:frames", input=InputSpec(min_batch=1, max_batch=8, tensors=tensors, dims=dims)
    )
    assert spec.input.padded_dims == ["seq"]
    assert output_specs(spec) == [
        OutputSpec("frames", "float32", ("frames", 4)),
        OutputSpec("tokens", "float32", ("seq", 4)),
        OutputSpec("pooled", "float32", (4,)),
    ]
    worker = Worker(spec, backend="eager", cache_config=cache_config)
    worker.start()

    def request(n_frames: int, n_tokens: int) -> list[torch.Tensor]:
        return [
            torch.randn(1, n_frames, 8),
            torch.randint(0, 16, (1, n_tokens)),
            torch.ones(1, n_tokens, dtype=torch.int64),
        ]

    with pytest.raises(InputError, match="frames is 2; this model takes frames from 4 to 32"):
        worker.check_inputs(request(2, 8))
    requests = [worker.check_inputs(request(f, t)) for f, t in [(5, 2), (5, 9), (7, 3)]]  # seq 2 < 4: padded
    answers, _ = worker.run_requests(requests)
    model = worker._require_model()
    for xs, got in zip(requests, answers, strict=True):
        with torch.inference_mode():
            want = list(model(*xs).values())
        for a, w in zip(got, want, strict=True):
            assert a.shape == w.shape and torch.allclose(a, w, atol=1e-5)


def test_narrow_ranges_and_fixed_lengths() -> None:
    tensors, dims, _ = parse_inputs("ids:int64[seq=8:8]<1000 attention_mask:int64[seq]")
    fixed = text_spec(input=InputSpec(min_batch=1, max_batch=8, tensors=tensors, dims=dims))
    # a fixed padded length: outputs still follow seq, so a shorter request is cut back to its own length
    assert output_specs(fixed)[0] == OutputSpec("last_hidden_state", "float32", ("seq", 128))
    tensors, dims, _ = parse_inputs("ids:int64[seq=1:2] attention_mask:int64[seq]")
    with pytest.raises(ValueError, match="no size to trace with"):
        InputSpec(min_batch=1, max_batch=32, tensors=tensors, dims=dims).example_sizes()


def test_a_model_that_fails_on_sizes_it_was_declared_for_says_so_in_one_line(cache_config: CacheConfig) -> None:
    """A forward that fails at a size the declaration allows, or a length export cannot keep dynamic (transformers'
    BERT with SDPA takes multiples of 8 only): a `ModelSpecError` naming the sizes, or torch.export's own
    suggestion, and `warmserve build` says it in one line with exit 2 instead of a traceback."""
    tensors, dims, _ = parse_inputs("ids:int64[seq=1:64]<16")
    sig = InputSpec(min_batch=1, max_batch=4, tensors=tensors, dims=dims)
    odd = ModelSpec(model="tests.serve.models:odd_lengths_only", input=sig)
    said = r"fails on inputs the declaration allows \(ids:int64\[seq=1:64\]<16; at batch \d, seq \d+\): RuntimeError"
    with pytest.raises(ModelSpecError, match=said + ": no even lengths here"):
        output_specs(odd, lambda xs: build_model(odd.model)(*xs))

    def out_of_memory(xs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # the device's trouble, not the declaration's: raised as it is
        output_specs(odd, out_of_memory)
    chunks = ModelSpec(model="tests.serve.models:chunks", input=sig)
    with pytest.raises(ModelSpecError, match=r"does not export for every size declared .* suggests .*seq = 8\*_seq"):
        Worker(chunks, backend="aoti", cache_config=cache_config).start()
    argv = [sys.executable, "-m", "warmserve.deployments.cli", "build", chunks.model, "--inputs", sig.text()]
    argv += ["--batch", "1:4", "--backend", "aoti", "--device", "cpu", "--cache-dir", str(cache_config.cache_dir)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1].startswith("error: the model does not export for every size declared")


def test_exports_suggested_fixes_on_one_line() -> None:
    from warmserve.serve.backends.export import suggested_fixes

    class Violation(RuntimeError):
        error_type = "UserErrorType.CONSTRAINT_VIOLATION"

    head = "Constraints violated (seq)!\n  - not all values...\n"
    said = head + "Suggested fixes:\n  _seq = Dim('_seq')\n  seq = 8*_seq\n\nMore."
    assert suggested_fixes(Violation(said)) == "_seq = Dim('_seq'); seq = 8*_seq"
    assert suggested_fixes(Violation(head)) == "no fix (it says: Constraints violated (seq)!)"
    assert suggested_fixes(RuntimeError("another export error")) is None  # raised as it is
    from warmserve.serve.backends.export import step_hint

    tensors, dims, _ = parse_inputs("ids:int64[seq=1:100] attention_mask:int64[seq]")
    sig = InputSpec(tensors=tensors, dims=dims)
    assert step_hint(sig, "_seq = Dim('_seq'); seq = 8*_seq") == " (seq=8:96/8)"  # the declaration that says it
    assert step_hint(sig, "seq = 77") == "" and step_hint(sig, "other = 8*_other") == ""


def test_a_step_declares_a_length_in_multiples(cache_config: CacheConfig) -> None:
    """``seq=8:64/8``: what export asks of transformers' BERT on CUDA (SDPA takes a length in multiples of 8).
    The tests' model here takes only multiples of 8 on any device: without the step it is refused in one line;
    with it, it builds through aoti, and requests of any length up to 64 are padded to a bucket of multiples of 8
    and answered as eager answers at that bucket."""
    tensors, dims, steps = parse_inputs("ids:int64[seq=8:64/8]<16 attention_mask:int64[seq]")
    assert steps == {"seq": 8} and dims == {"seq": (8, 64)}
    sig = InputSpec(min_batch=1, max_batch=4, tensors=tensors, dims=dims, steps=steps)
    assert sig.buckets("seq") == [8, 16, 32, 64] and sig.example_sizes()["seq"] % 8 == 0
    assert parse_inputs(sig.text()) == (tensors, dims, steps) and "seq=8:64/8" in sig.text()
    assert sig.doc()["steps"] == {"seq": 8} and "steps" not in InputSpec(tensors=tensors, dims=dims).doc()
    narrow = InputSpec(tensors=tensors, dims={"seq": (8, 24)}, steps=steps)
    assert narrow.buckets("seq") == [8, 16, 24]  # powers of two and the ends, each a multiple of the step
    wide_batch = InputSpec(min_batch=16, max_batch=32, tensors=tensors, dims={"seq": (8, 16)}, steps=steps)
    assert wide_batch.example_sizes() == {"seq": 8}  # below the middle: 16 is the batch's
    fixed = InputSpec(tensors=tensors, dims={"seq": (8, 8)}, steps=steps)
    assert fixed.steps == {} and fixed.doc() == InputSpec(tensors=tensors, dims={"seq": (8, 8)}).doc()

    unstepped = ModelSpec(model="tests.serve.models:eights", input=InputSpec(tensors=tensors, dims=dims))
    with pytest.raises(ModelSpecError, match="fails on inputs the declaration allows"):
        Worker(unstepped, backend="aoti", cache_config=cache_config).start()
    spec = ModelSpec(model="tests.serve.models:eights", input=sig)
    worker = Worker(spec, backend="aoti", cache_config=cache_config)
    report = worker.start()
    assert report.outcome == "built" and report.probe_error is not None and report.probe_error < 1e-5
    eager = build_model(spec.model)
    eager.load_state_dict(worker._state)
    for n in (5, 13, 64):
        ids, mask = torch.randint(0, 16, (2, n)), torch.ones(2, n, dtype=torch.int64)
        (got,), _ = worker.run(worker.check_inputs([ids, mask]))
        bucket = n + -n % 8
        with torch.inference_mode():
            want = eager(F.pad(ids, (0, bucket - n)), F.pad(mask, (0, bucket - n)))[:, :n]
        assert got.shape == (2, n, 4) and torch.allclose(got, want, atol=1e-5)

    no_mask = InputSpec(tensors=tensors[:1], dims=dims, steps=steps)  # not padded: a length must be a multiple
    assert check_request(no_mask, [torch.zeros(1, 16, dtype=torch.int64)])[0].shape == (1, 16)
    with pytest.raises(InputError, match="ids: seq is 13; this model takes seq in multiples of 8 only"):
        check_request(no_mask, [torch.zeros(1, 13, dtype=torch.int64)])


def test_non_persistent_buffers_reach_an_aoti_engine_at_start_and_at_each_swap(cache_config: CacheConfig) -> None:
    """transformers' BERT keeps ``position_ids`` and ``token_type_ids`` out of its state dict; an AOTInductor
    package keeps every constant out. The refit takes them from the module, so a start and a swap both serve."""
    tensors, dims, _ = parse_inputs("ids:int64[seq=1:16]<16")
    spec = ModelSpec(
        model="tests.serve.models:positions", input=InputSpec(min_batch=1, max_batch=4, tensors=tensors, dims=dims)
    )
    worker = Worker(spec, backend="aoti", cache_config=cache_config)
    report = worker.start()  # verified against eager: it failed with "weights lack 2 constant(s)" before
    assert report.outcome == "built" and report.probe_error is not None and report.probe_error < 1e-5
    module, live = worker.model, worker._state
    assert module is not None and live is not None  # the module built for its buffers shares the weights
    assert all(p.data_ptr() == live[name].data_ptr() for name, p in module.named_parameters())
    eager = build_model(spec.model)
    new = demo_weights(eager, seed=3)
    assert worker.swap_weights(new, "v2").ok
    eager.load_state_dict(new)
    ids = torch.randint(0, 16, (3, 9))
    (got,), version = worker.run(worker.check_inputs([ids]))
    with torch.inference_mode():
        assert version == "v2" and torch.allclose(got, eager(ids), atol=1e-5)
