"""End to end on a real local Ray cluster: HTTP protocol, warm replicas, scale-out, rollout, metrics."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from tests.e2e.cluster import ROOT, RayCluster
from tests.e2e.helpers import TINY, deploy_versions, infer, rollout
from warmserve.serve.model import build_model
from warmserve.serve.weights import demo_weights, save_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_http_protocol_and_errors(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    import tritonclient.http as th
    from PIL import Image

    cluster.deploy(cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1}))
    # The engine `warmserve build` compiled is the one the replica looks for: it starts without a build.
    assert requests.get(f"{cluster.http}/v1/status", timeout=30).json()["start"]["outcome"] == "local-hit"
    client = th.InferenceServerClient(cluster.http.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny_cnn")
    meta = client.get_model_metadata("tiny_cnn")
    assert meta["inputs"][0]["shape"] == [-1, 3, 16, 16] and meta["versions"] == ["v1"]
    # Triton's model configuration extension, as perf_analyzer reads it: the batch left out of dims.
    config = client.get_model_config("tiny_cnn")
    assert config["input"] == [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [3, 16, 16]}]
    assert config["output"] == [{"name": "output__0", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["max_batch_size"] == 8 and config["platform"] == "warmserve_aoti" and "dynamic_batching" in config
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16), dtype=np.float32)
    for binary in (True, False):  # the binary tensor extension and plain JSON, as tritonclient sends them
        inp = th.InferInput("input__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("tiny_cnn", [inp], outputs=[th.InferRequestedOutput("output__0", binary_data=binary)])
        assert result.as_numpy("output__0").shape == (3, 10)

    # An image model also takes UINT8 RGB pixels (a quarter of FP32's bytes), normalised in the replica as
    # /v1/classify normalises a photo: the same answer as the normalised floats sent as FP32.
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1), np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    floats = ((pixels / 255.0 - mean) / std).astype(np.float32)
    answers = []
    for array, datatype in ((pixels, "UINT8"), (floats, "FP32")):
        inp = th.InferInput("input__0", list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=True)
        answers.append(client.infer("tiny_cnn", [inp]).as_numpy("output__0"))
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-4, atol=1e-4)
    stats = client.get_inference_statistics("tiny_cnn")["model_stats"][0]  # the statistics extension
    assert stats["inference_count"] >= 3 + 3 + 2 + 2 and stats["inference_stats"]["success"]["count"] >= 4
    assert stats["execution_count"] >= 1 and stats["batch_stats"]

    # Pixels and floats sent at once share batches: each answer is still its own.
    def ask(k: int) -> np.ndarray:
        array, datatype = ((pixels, "UINT8"), (floats, "FP32"))[k % 2]
        inp = th.InferInput("input__0", list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=True)
        return (
            th.InferenceServerClient(cluster.http.removeprefix("http://"))
            .infer("tiny_cnn", [inp])
            .as_numpy("output__0")
        )

    with ThreadPoolExecutor(8) as pool:
        for got in pool.map(ask, range(32)):
            np.testing.assert_allclose(got, answers[1], rtol=1e-4, atol=1e-4)

    png = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(png, "PNG")
    top = requests.post(f"{cluster.http}/v1/classify?top_k=3", data=png.getvalue(), timeout=30).json()
    assert len(top["top_k"]) == 3 and top["top_k"][0]["score"] >= top["top_k"][1]["score"]

    # Several images in one request, as a multipart form: one batch, answered in order, each as if alone.
    other = io.BytesIO()
    Image.new("RGB", (40, 80), (200, 20, 90)).save(other, "PNG")
    photos = [("a", png.getvalue()), ("b", (ROOT / "examples" / "cat.jpg").read_bytes()), ("c", other.getvalue())]
    files = [("image", (name, data)) for name, data in photos]
    many = requests.post(f"{cluster.http}/v1/classify?top_k=3", files=files, timeout=30).json()
    assert [r["file"] for r in many["results"]] == ["a", "b", "c"] and many["weights_version"] == "v1"
    for (_, data), result in zip(photos, many["results"], strict=True):
        alone = requests.post(f"{cluster.http}/v1/classify?top_k=3", data=data, timeout=30).json()["top_k"]
        assert [t["index"] for t in result["top_k"]] == [t["index"] for t in alone]
        np.testing.assert_allclose([t["score"] for t in result["top_k"]], [t["score"] for t in alone], atol=1e-4)

    bad = [
        ("/v2/models/tiny_cnn/infer", b"{not json", 400),
        ("/v2/models/tiny_cnn/infer", b'{"inputs": []}', 400),
        (
            "/v2/models/tiny_cnn/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0]}]}',
            400,
        ),
        (
            "/v2/models/tiny_cnn/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]}',
            400,
        ),
        (
            "/v2/models/tiny_cnn/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "FP64", "data": [0]}]}',
            400,
        ),
        (  # pixels of the wrong size
            "/v2/models/tiny_cnn/infer",
            json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": [7] * 192}]}),
            400,
        ),
        (  # pixel values a byte cannot hold
            "/v2/models/tiny_cnn/infer",
            json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "UINT8", "data": [300] * 768}]}),
            400,
        ),
        ("/v2/models/other/infer", b"{}", 404),
        ("/v1/classify", b"\x89PNG but not really", 400),
        ("/v1/classify?top_k=0", png.getvalue(), 400),
        ("/v1/classify?top_k=x", png.getvalue(), 400),
        ("/v1/classify", b"x" * (65 * 2**20), 413),
    ]
    form = "multipart/form-data; boundary=b"
    bad_forms = [  # (body, content type): no files, too many files, a file that is no image, a broken form
        (b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\ntext\r\n--b--\r\n', form),
        _form([("image", (f"{i}.png", png.getvalue())) for i in range(65)]),
        _form([("image", ("ok.png", png.getvalue())), ("image", ("no.jpg", b"\xff\xd8\xffnot a jpeg"))]),
        (b"--b\r\nContent-Disposition: form-data; name=", form),
    ]
    for body, ctype in bad_forms:
        r = requests.post(f"{cluster.http}/v1/classify", data=body, headers={"content-type": ctype}, timeout=60)
        assert r.status_code == 400, (r.status_code, r.text[:200])
        assert r.json()["error"]
    assert (
        "file 'no.jpg'"
        in requests.post(
            f"{cluster.http}/v1/classify",
            files=[*files[:1], ("image", ("no.jpg", b"\xff\xd8\xffnot a jpeg"))],
            timeout=60,
        ).json()["error"]
    )
    for path, body, code in bad:
        r = requests.post(f"{cluster.http}{path}", data=body, timeout=60)
        assert r.status_code == code, (path, r.status_code, r.text[:200])
        assert r.json()["error"]
    assert client.is_model_ready("tiny_cnn")  # still serving


def _form(files: list[tuple[str, tuple[str, bytes]]]) -> tuple[bytes, str]:
    """A multipart form body and its content type, as requests would send ``files``."""
    prepared = requests.Request("POST", "http://x/", files=files).prepare()
    return bytes(prepared.body or b""), prepared.headers["content-type"]


def test_grpc_protocol_and_errors(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    """The Open Inference Protocol over gRPC through Serve's gRPC proxy, as tritonclient.grpc and a client
    generated from Triton's proto (tritonclient's own stub) speak it: the same answers as HTTP."""
    import grpc
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.grpc import model_config_pb2
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
    from tritonclient.utils import InferenceServerException

    cluster.deploy(cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1}))
    address = f"127.0.0.1:{cluster.grpc_port}"
    client = tg.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny_cnn")
    assert client.get_server_metadata().name == "warmserve"
    meta = client.get_model_metadata("tiny_cnn")
    assert list(meta.inputs[0].shape) == [-1, 3, 16, 16] and list(meta.versions) == ["v1"]
    config = client.get_model_config("tiny_cnn").config
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("input__0", "TYPE_FP32", [3, 16, 16])
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output__0", [10])] and config.max_batch_size == 8

    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16), dtype=np.float32)
    inp = tg.InferInput("input__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    answer = client.infer("tiny_cnn", [inp], request_id="r7")
    assert answer.get_response().model_version == "v1" and answer.get_response().id == "r7"
    http_inp = th.InferInput("input__0", list(x.shape), "FP32")
    http_inp.set_data_from_numpy(x)
    over_http = th.InferenceServerClient(cluster.http.removeprefix("http://")).infer("tiny_cnn", [http_inp])
    np.testing.assert_allclose(answer.as_numpy("output__0"), over_http.as_numpy("output__0"), rtol=1e-5, atol=1e-5)
    # Eight rows as JSON values (about 120 KB: the replica parses them on a thread): the answers of raw bytes.
    rows = np.random.default_rng(2).standard_normal((8, 3, 16, 16)).astype(np.float32)
    as_json, _ = infer(cluster, rows)
    raw = th.InferInput("input__0", list(rows.shape), "FP32")
    raw.set_data_from_numpy(rows)
    as_bytes = th.InferenceServerClient(cluster.http.removeprefix("http://")).infer("tiny_cnn", [raw])
    np.testing.assert_allclose(as_json, as_bytes.as_numpy("output__0"), rtol=1e-5, atol=1e-5)

    # UINT8 pixels, and values in the typed contents field instead of raw bytes: the same answers.
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1), np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    floats = ((pixels / 255.0 - mean) / std).astype(np.float32)
    inp = tg.InferInput("input__0", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    by_pixels = client.infer("tiny_cnn", [inp]).as_numpy("output__0")
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))

    def typed(model: str, shape: list[int], datatype: str, **contents: Any) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="input__0", datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents))
        return request

    response = stub.ModelInfer(typed("tiny_cnn", [2, 3, 16, 16], "FP32", fp32_contents=floats.ravel().tolist()))
    by_values = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(by_pixels, by_values, rtol=1e-4, atol=1e-4)

    with ThreadPoolExecutor(8) as pool:  # concurrent callers share batches; each gets its own answer
        inp = tg.InferInput("input__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for got in pool.map(lambda _: client.infer("tiny_cnn", [inp]).as_numpy("output__0"), range(24)):
            np.testing.assert_allclose(got, answer.as_numpy("output__0"), rtol=1e-5, atol=1e-5)

    raw_twice = typed("tiny_cnn", [1, 3, 16, 16], "FP32")
    raw_twice.raw_input_contents.extend([x[:1].tobytes(), x[:1].tobytes()])
    short = pb.ModelInferRequest(model_name="tiny_cnn")
    short.inputs.add(name="input__0", datatype="FP32", shape=[1, 3, 16, 16])
    short.raw_input_contents.append(x[:1].tobytes()[:100])
    bad = [
        (pb.ModelInferRequest(model_name="other"), grpc.StatusCode.NOT_FOUND),
        (pb.ModelInferRequest(model_name="tiny_cnn"), grpc.StatusCode.INVALID_ARGUMENT),  # no inputs
        (short, grpc.StatusCode.INVALID_ARGUMENT),  # fewer bytes than the shape needs
        (raw_twice, grpc.StatusCode.INVALID_ARGUMENT),  # raw contents for inputs that are not there
        (typed("tiny_cnn", [1, 3, 8, 8], "FP32", fp32_contents=[0.0] * 192), grpc.StatusCode.INVALID_ARGUMENT),
        (typed("tiny_cnn", [1, 3, 16, 16], "FP32", fp32_contents=[0.0]), grpc.StatusCode.INVALID_ARGUMENT),
        (typed("tiny_cnn", [1, 3, 16, 16], "UINT8", uint_contents=[300] * 768), grpc.StatusCode.INVALID_ARGUMENT),
        (typed("tiny_cnn", [1, 3, 16, 16], "FP16"), grpc.StatusCode.INVALID_ARGUMENT),  # FP16 only as raw bytes
        (typed("tiny_cnn", [1, 3, 16, 16], "BYTES", bytes_contents=[b"x"]), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in bad:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=60)
        assert caught.value.code() == code, (request.model_name, caught.value.code(), caught.value.details())
        assert caught.value.details()
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("other")
    assert client.get_inference_statistics("tiny_cnn").model_stats[0].inference_count >= 3 + 2 + 2 + 24 * 3
    assert client.is_model_ready("tiny_cnn")  # still serving


def test_second_replica_starts_warm_and_rays_endpoint_has_the_first_ones_metrics(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """The first replica builds and reports it on Ray's metrics endpoint; a second one starts from its engine."""
    from prometheus_client.parser import text_string_to_metric_families

    args = {**TINY, "cache_dir": str(tmp_path / "c")}
    cluster.deploy(cluster.config(args, {"num_replicas": 1}))
    first = cluster.replica_statuses(1)
    assert [s["start"]["outcome"] for s in first.values()] == ["built"]
    infer(cluster, np.zeros((1, 3, 16, 16), dtype=np.float32))
    (built,) = first.values()
    replica = built["replica"]
    deadline = time.monotonic() + 90
    found: dict[str, list[Any]] = {}
    mine: dict[str, list[Any]] = {}
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
        found = {f.name: f.samples for f in text_string_to_metric_families(text) if f.name.startswith("ray_warmserve")}
        # Earlier tests' replicas reported to the same agent: wait for this replica's own series.
        mine = {name: [s for s in samples if s.labels.get("replica") == replica] for name, samples in found.items()}
        if all(
            mine.get(name)
            for name in (
                "ray_warmserve_engine_cache_misses",
                "ray_warmserve_warm_start_seconds",
                "ray_warmserve_weights_version_info",
                "ray_warmserve_inference_seconds",
                "ray_warmserve_last_warm_start_seconds",
            )
        ):
            break
        time.sleep(1)
    assert mine.get("ray_warmserve_engine_cache_misses"), sorted(found)
    sample = mine["ray_warmserve_warm_start_seconds"][0]
    assert sample.labels["deployment"] == "WarmModel"
    versions = [s for s in mine["ray_warmserve_weights_version_info"] if s.value == 1]
    assert [s.labels["version"] for s in versions] == ["v1"]
    # The exact figures: the last start's seconds, as the replica measured them (histograms are bucketed).
    last = [s for s in mine["ray_warmserve_last_warm_start_seconds"] if s.labels["outcome"] == "built"]
    assert last and last[0].value == pytest.approx(built["start"]["total_seconds"], rel=1e-3)

    cluster.deploy(cluster.config(args, {"num_replicas": 2}))
    cluster.wait_running("warmserve", replicas=2)
    statuses = cluster.replica_statuses(2)
    second = [s for pid, s in statuses.items() if pid not in first]
    assert len(second) == 1 and second[0]["start"]["outcome"] == "local-hit", statuses
    assert "compile" not in second[0]["start"]["steps"]
    assert second[0]["start"]["seconds"] < built["start"]["seconds"] / 5


def test_rollout_under_load(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16), dtype=np.float32)
    (_, v2), want, before = deploy_versions(cluster, tmp_path, (11, 22), x, app={"cache_dir": str(warm_cache)})
    bad = dict(v2)
    bad["head.weight"] = torch.zeros(3, 3)
    save_weights(bad, tmp_path / "bad.safetensors")
    stop = threading.Event()
    results: list[tuple[np.ndarray, str]] = []
    failures: list[str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(infer(cluster, x))
            except Exception as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        done = rollout(cluster, tmp_path / "v2.safetensors", "v2")
        assert done.returncode == 0, done.stderr
        refused = rollout(cluster, tmp_path / "bad.safetensors", "v3")  # every replica refuses, keeps v2
        assert refused.returncode == 1 and "refused" in refused.stderr
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    versions = {v for _, v in results}
    assert versions <= {"v1", "v2"} and "v2" in versions
    for out, version in results:
        np.testing.assert_allclose(out, want[version], rtol=1e-4, atol=1e-5)
    after = cluster.replica_statuses(2)
    assert set(after) == set(before)  # the same processes: no restart
    assert all(s["weights_version"] == "v2" and s["start"] == before[pid]["start"] for pid, s in after.items())
    # Load with Serve's dynamic batches of every size, a swap and a refused swap: nothing compiled after ready.
    assert [s["unexpected_compiles"] for s in after.values()] == [0, 0]


def test_prometheus_reads_warmserve_metrics(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    """A real Prometheus scrapes Ray's metrics endpoint; warmserve's series come back through its query API."""
    from tests.servers import Prometheus, require

    require("prometheus", "apt-get install prometheus")  # before a cluster deploy that would be wasted
    prom = Prometheus(tmp_path / "prom", [f"127.0.0.1:{cluster.metrics_port}"])
    (tmp_path / "prom").mkdir()
    prom.start()
    try:
        cluster.deploy(cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1}))
        infer(cluster, np.zeros((2, 3, 16, 16), dtype=np.float32))
        # Earlier tests' replicas reported to the same agent: look for this one's series among them.
        deadline = time.monotonic() + 120
        paths: set[str] = set()
        versions: set[str] = set()
        while time.monotonic() < deadline and not ("local-hit" in paths and "v1" in versions):
            paths = {r["metric"]["outcome"] for r in prom.query("ray_warmserve_warm_start_seconds_count")}
            versions = {r["metric"]["version"] for r in prom.query("ray_warmserve_weights_version_info == 1")}
            time.sleep(2)
        assert "local-hit" in paths and "v1" in versions, (paths, versions)
    finally:
        prom.stop()


def test_admin_token_guards_rollout_and_status(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    model = build_model("tests.serve.models:tiny_cnn")
    save_weights(demo_weights(model, seed=31), tmp_path / "v2.safetensors")
    token = "s3cret-admin-token"
    options = {"num_cpus": 0.5, "runtime_env": {"env_vars": {"WARMSERVE_ADMIN_TOKEN": token}}}
    cluster.deploy(
        cluster.config(
            {**TINY, "cache_dir": str(warm_cache)},
            {
                "num_replicas": 1,
                "ray_actor_options": options,
                "user_config": {"weights": None, "weights_version": "v1"},
            },
        )
    )
    assert requests.get(f"{cluster.http}/v1/status", timeout=30).status_code == 401
    headers = {"authorization": f"Bearer {token}"}
    assert requests.get(f"{cluster.http}/v1/status", headers=headers, timeout=30).json()["weights_version"] == "v1"

    refused = rollout(cluster, tmp_path / "v2.safetensors", "v2", token=None)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "WARMSERVE_ADMIN_TOKEN" in refused.stderr
    status = requests.get(f"{cluster.http}/v1/status", headers=headers, timeout=30).json()
    assert status["weights_version"] == "v1" and "unsigned" in status["last_swap"]["error"]
    ok = rollout(cluster, tmp_path / "v2.safetensors", "v2", token=token)
    assert ok.returncode == 0, ok.stderr
    assert requests.get(f"{cluster.http}/v1/status", headers=headers, timeout=30).json()["weights_version"] == "v2"


def test_a_label_served_from_other_weights_is_never_reported_as_rolled_out(
    cluster: RayCluster, tmp_path: Path, warm_cache: Path
) -> None:
    """A config edited by hand (no digest recorded) serves file b as v2; rolling file a out as v2 must not
    exit 0: the replica refuses it (a label names one content), and the rollout says so and restores."""
    model = build_model("tests.serve.models:tiny_cnn")
    for name, seed in (("a", 51), ("b", 52)):
        save_weights(demo_weights(model, seed=seed), tmp_path / f"{name}.safetensors")
    user_config = {"weights": str(tmp_path / "b.safetensors"), "weights_version": "v2"}
    cluster.deploy(
        cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1, "user_config": user_config})
    )
    assert next(iter(cluster.replica_statuses(1).values()))["weights_version"] == "v2"
    out = rollout(cluster, tmp_path / "a.safetensors", "v2")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "a version label names one content" in out.stderr and "restored" in out.stderr
    status = next(iter(cluster.replica_statuses(1).values()))
    assert status["weights"] == str(tmp_path / "b.safetensors")


def test_a_live_replica_never_dies_for_refused_weights(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    """Deployed without a user_config, Serve never calls reconfigure at start-up: the first rollout reaches a
    replica that serves traffic already, and refused weights must leave it serving, not crash-loop it."""
    model = build_model("tests.serve.models:tiny_cnn")
    bad = demo_weights(model, seed=61)
    bad["head.bias"] = torch.full_like(bad["head.bias"], float("nan"))
    save_weights(bad, tmp_path / "bad.safetensors")
    save_weights(demo_weights(model, seed=62), tmp_path / "good.safetensors")
    cluster.deploy(cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1}))
    (pid,) = cluster.replica_statuses(1)
    refused = rollout(cluster, tmp_path / "bad.safetensors", "v2")
    assert refused.returncode == 1 and "NaN" in refused.stderr, refused.stderr
    assert rollout(cluster, tmp_path / "good.safetensors", "v3").returncode == 0
    after = cluster.replica_statuses(1)
    assert list(after) == [pid] and after[pid]["weights_version"] == "v3"  # the same process throughout


def test_a_slow_weights_read_never_stops_serving(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    """A replica reading new weights from a slow store keeps answering (the swap runs off the event loop);
    the label it started with cannot be rolled out again with other content."""
    import hashlib
    import os
    import subprocess
    import sys

    model = build_model("tests.serve.models:tiny_cnn")
    save_weights(demo_weights(model, seed=71), tmp_path / "v2.safetensors")
    save_weights(demo_weights(model, seed=72), tmp_path / "other.safetensors")
    payload = (tmp_path / "v2.safetensors").read_bytes()
    os.mkfifo(tmp_path / "slow.safetensors")  # a read that blocks until someone writes: the slowest store
    cluster.deploy(cluster.config({**TINY, "cache_dir": str(warm_cache)}, {"num_replicas": 1}))
    slow = str(tmp_path / "slow.safetensors")
    cmd = [sys.executable, "-m", "warmserve.deployments.cli", "rollout", "--weights", slow]
    cmd += ["--version", "v2", "--sha256", hashlib.sha256(payload).hexdigest(), "--address", cluster.dashboard]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **cluster.auth_env}
    )
    try:
        time.sleep(3)  # the replica is now blocked reading the pipe
        x = np.zeros((1, 3, 16, 16), dtype=np.float32)
        for _ in range(5):
            t0 = time.monotonic()
            _, version = infer(cluster, x)
            assert version == "v1" and time.monotonic() - t0 < 5
            assert requests.get(f"{cluster.http}/v2/health/ready", timeout=5).status_code == 200
        with open(tmp_path / "slow.safetensors", "wb") as pipe:
            pipe.write(payload)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert infer(cluster, x)[1] == "v2"
    reused = rollout(cluster, tmp_path / "other.safetensors", "v1")  # v1: the weights the replica started with
    assert reused.returncode == 1 and "names the weights this replica started with" in reused.stderr, reused.stderr
