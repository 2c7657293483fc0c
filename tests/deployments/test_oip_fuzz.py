"""The Open Inference Protocol codec under generated input: client mistakes are InputError, nothing else."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.deployments import oip
from warmserve.serve.errors import InputError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
inputs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.text(max_size=5), st.integers()),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=4), st.text(max_size=3)),
        "datatype": st.sampled_from(["FP32", "FP16", "INT64", "INT32", "INT8", "UINT8", "BF16", "STRING", "fp32", ""]),
        "data": json_values,
        "parameters": st.one_of(st.none(), st.fixed_dictionaries({"binary_data_size": st.integers(-4, 64)})),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.text(max_size=6)))
def test_arbitrary_bytes(body: bytes, header: str | None) -> None:
    with contextlib.suppress(InputError):
        oip.parse_request(body, header)


@settings(max_examples=400, deadline=None)
@given(st.lists(inputs, max_size=3), json_values, st.binary(max_size=64), st.booleans())
def test_structured_requests(items: list[dict], outputs: object, tail: bytes, binary: bool) -> None:
    head = json.dumps({"inputs": items, "outputs": outputs}).encode()
    body, header = (head + tail, str(len(head))) if binary else (head, None)
    try:
        req = oip.parse_request(body, header)
    except InputError:
        return
    for t, item in zip(req.tensors, req.inputs, strict=True):
        assert list(t.shape) == item["shape"]


def test_roundtrip_json_and_binary() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    doc = {"inputs": [{"name": "in", "shape": [2, 3, 4], "datatype": "FP32", "data": x.flatten().tolist()}]}
    req = oip.parse_request(json.dumps(doc).encode(), None)
    assert torch.equal(req.tensors[0], torch.from_numpy(x)) and not req.binary_output
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {"name": "in", "shape": [2, 3, 4], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "out", "parameters": {"binary_data": True}}],
        }
    ).encode()
    req = oip.parse_request(head + raw, str(len(head)))
    assert torch.equal(req.tensors[0], torch.from_numpy(x)) and req.binary_output
    body, headers = oip.encode_response("m", "v1", "id-1", {"out": req.tensors[0]}, binary=True)
    n = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(raw) and body[n:] == raw


def test_integers_a_datatype_cannot_hold_are_client_errors() -> None:
    for datatype, value in (("UINT8", 300), ("UINT8", -1), ("INT8", 128), ("INT32", 2**40)):
        doc = {"inputs": [{"name": "in", "shape": [1], "datatype": datatype, "data": [value]}]}
        with pytest.raises(InputError, match=f"out of the range of {datatype}"):
            oip.parse_request(json.dumps(doc).encode(), None)
