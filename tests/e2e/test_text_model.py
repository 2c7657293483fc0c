"""A text encoder end to end on a real Ray cluster: INT64 token ids and an attention mask of mixed lengths over
OIP HTTP and gRPC, one build for two replicas, answers equal to eager at each request's own length, a rollout
that refits it in place."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from tests.e2e.cluster import RayCluster
from tests.e2e.helpers import rollout
from warmserve.serve.text import TINY, TextEncoder, signature
from warmserve.serve.weights import demo_weights, save_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ENCODER = {
    "model": "warmserve.serve.text:tiny_encoder",
    "inputs": signature(TINY, 64),
    "batch": "1:8",
    "backend": "aoti",
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.02,
}


def tokens(n: int, rows: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + n)
    return rng.integers(0, TINY.vocab_size, (rows, n), dtype=np.int64), np.ones((rows, n), dtype=np.int64)


def eager(state: dict[str, torch.Tensor], ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    model = TextEncoder(TINY).eval()
    model.load_state_dict(state)
    with torch.inference_mode():
        out = model(torch.from_numpy(ids), torch.from_numpy(mask))
    return {k: v.numpy() for k, v in out.items()}


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and float(np.abs(got - want).max() / np.abs(want).max()) < 1e-3


def test_text_encoder_mixed_lengths_http_grpc_and_rollout(cluster: RayCluster, tmp_path: Path) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    states = [demo_weights(TextEncoder(TINY), seed=s) for s in (1, 2)]
    for i, state in enumerate(states, 1):
        save_weights(state, tmp_path / f"v{i}.safetensors")
    args = {**ENCODER, "cache_dir": str(tmp_path / "c"), "weights": str(tmp_path / "v1.safetensors")}
    dep = {"num_replicas": 2, "user_config": {"weights": None, "weights_version": "v1"}}
    cluster.deploy(cluster.config(args, dep))
    outcomes = sorted(s["start"]["outcome"] for s in cluster.replica_statuses(2).values())
    assert outcomes[0] == "built" and outcomes[1] in ("local-hit", "waited"), outcomes  # one build for both

    client = th.InferenceServerClient(cluster.http.removeprefix("http://"))
    meta = client.get_model_metadata("tiny_encoder")
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    ]
    assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [
        ("last_hidden_state", [-1, -1, 128]),
        ("pooler_output", [-1, 128]),
    ]

    def ask_http(n: int, version_state: dict[str, torch.Tensor] = states[0]) -> tuple[str, bool]:
        ids, mask = tokens(n, rows=1 + n % 3)
        inputs = [
            th.InferInput("input_ids", list(ids.shape), "INT64"),
            th.InferInput("attention_mask", list(mask.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(ids, binary_data=n % 2 == 0)
        inputs[1].set_data_from_numpy(mask, binary_data=n % 2 == 0)
        result = th.InferenceServerClient(cluster.http.removeprefix("http://")).infer("tiny_encoder", inputs)
        want = eager(version_state, ids, mask)
        version = result.get_response()["model_version"]
        ok = all(close(result.as_numpy(k), want[k]) for k in want)
        return version, ok

    lengths = [3, 17, 64, 40, 9, 33, 1, 50] * 3  # sent at once: they share batches, padded to a bucket
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask_http, lengths))
    assert all(ok for _, ok in answers) and {v for v, _ in answers} == {"v1"}, answers

    # gRPC, asking for one output only
    ids, mask = tokens(21, rows=2)
    g = tg.InferenceServerClient(f"127.0.0.1:{cluster.grpc_port}")
    inputs = [tg.InferInput("attention_mask", [2, 21], "INT64"), tg.InferInput("input_ids", [2, 21], "INT64")]
    inputs[0].set_data_from_numpy(mask)  # by name, in any order
    inputs[1].set_data_from_numpy(ids)
    result = g.infer("tiny_encoder", inputs, outputs=[tg.InferRequestedOutput("pooler_output")])
    assert result.as_numpy("last_hidden_state") is None
    assert close(result.as_numpy("pooler_output"), eager(states[0], ids, mask)["pooler_output"])

    # Mistakes are 400s that say what is wrong; the replicas keep serving.
    url = f"{cluster.http}/v2/models/tiny_encoder/infer"

    def post(named: dict[str, np.ndarray], **extra: object) -> requests.Response:
        inputs = [
            {"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.flatten().tolist()}
            for k, v in named.items()
        ]
        return requests.post(url, json={"inputs": inputs, **extra}, timeout=30)

    ids, mask = tokens(8)
    for named, extra, said in [
        ({"input_ids": ids}, {}, "missing attention_mask"),
        ({"input_ids": ids, "attention_mask": mask, "x": mask}, {}, "unknown x"),
        ({"input_ids": ids, "attention_mask": mask[:, :5]}, {}, "seq is 5, but another input has seq 8"),
        ({"input_ids": tokens(65)[0], "attention_mask": tokens(65)[1]}, {}, "seq from 1 to 64"),
        ({"input_ids": ids + TINY.vocab_size, "attention_mask": mask}, {}, "values must lie in"),
        ({"input_ids": ids, "attention_mask": mask}, {"outputs": [{"name": "logits"}]}, "unknown output"),
    ]:
        r = post(named, **extra)
        assert r.status_code == 400 and said in r.json()["error"], (said, r.status_code, r.text)

    # A rollout refits the encoder in place; answers follow the new weights.
    done = rollout(cluster, tmp_path / "v2.safetensors", "v2")
    assert done.returncode == 0, done.stderr
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda n: ask_http(n, states[1]), lengths[:8]))
    assert all(ok and v == "v2" for v, ok in after), after
    statuses = cluster.replica_statuses(2)
    assert all(s["unexpected_compiles"] == 0 and s["weights_version"] == "v2" for s in statuses.values()), statuses
