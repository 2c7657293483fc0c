"""The gRPC codec against tritonclient's generated messages: the same wire format, the same checks as HTTP."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch

from warmserve.deployments import oip_grpc
from warmserve.deployments.errors import BodyTooLarge
from warmserve.serve.errors import InputError


def _shape(descriptor: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = {
        f.name: (
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type else None,
            f.containing_oneof.name if f.containing_oneof else None,
        )
        for f in descriptor.fields
    }
    return fields, {n.name: _shape(n) for n in descriptor.nested_types}


def test_the_messages_are_the_ones_tritonclient_was_generated_from() -> None:
    from tritonclient.grpc import service_pb2

    for name in (n for n in oip_grpc.MESSAGES if "." not in n):
        ours = oip_grpc.POOL.FindMessageTypeByName(f"inference.{name}")
        assert _shape(ours) == _shape(service_pb2.DESCRIPTOR.message_types_by_name[name]), name
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours_service = oip_grpc.POOL.FindServiceByName(oip_grpc.SERVICE)
    for method in ours_service.methods:
        assert theirs.methods_by_name[method.name].input_type.full_name == method.input_type.full_name


def _request(x: np.ndarray, datatype: str) -> Any:
    import tritonclient.grpc as tg
    from tritonclient.grpc import service_pb2

    inp = tg.InferInput("input__0", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    theirs = service_pb2.ModelInferRequest(model_name="m", id="7")
    theirs.inputs.extend([inp._get_tensor()])
    theirs.raw_input_contents.append(inp._get_content())
    return oip_grpc.ModelInferRequest.FromString(theirs.SerializeToString())


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "UINT8", "INT64"])
def test_a_tritonclient_request_decodes_to_its_tensor(datatype: str) -> None:
    from warmserve.deployments.oip import DATATYPES

    x = (np.arange(24).reshape(2, 3, 4) % 200).astype(DATATYPES[datatype][0])
    request = _request(x, datatype)
    (tensor,) = oip_grpc.parse_infer(request, limit=2**20)
    assert np.array_equal(tensor.numpy(), x)
    # Serve's proxy pickles the request on its way to a replica
    assert pickle.loads(pickle.dumps(request)) == request


def test_the_response_is_what_tritonclient_reads() -> None:
    import tritonclient.grpc as tg
    from tritonclient.grpc import service_pb2

    out = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    ours = oip_grpc.infer_response("m", "v3", "7", {"output__0": out})
    result = tg.InferResult(service_pb2.ModelInferResponse.FromString(ours.SerializeToString()))
    assert np.array_equal(result.as_numpy("output__0"), out.numpy())
    assert result.get_response().model_version == "v3" and result.get_response().id == "7"


def _typed(shape: list[int], datatype: str, **contents: Any) -> Any:
    request = oip_grpc.ModelInferRequest(model_name="m")
    item = request.inputs.add(name="input__0", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(item.contents, field).extend(values)
    return request


def test_typed_contents_are_checked_like_json_data() -> None:
    (tensor,) = oip_grpc.parse_infer(_typed([2, 2], "UINT8", uint_contents=[0, 1, 254, 255]), limit=2**20)
    assert tensor.dtype == torch.uint8 and tensor.tolist() == [[0, 1], [254, 255]]
    with pytest.raises(InputError, match="out of the range of UINT8"):  # not wrapped around to 44
        oip_grpc.parse_infer(_typed([1], "UINT8", uint_contents=[300]), limit=2**20)
    with pytest.raises(InputError, match="has 1 values but shape"):
        oip_grpc.parse_infer(_typed([2, 2], "FP32", fp32_contents=[0.5]), limit=2**20)
    with pytest.raises(InputError, match="as raw_input_contents"):
        oip_grpc.parse_infer(_typed([1], "FP16"), limit=2**20)
    with pytest.raises(InputError, match="not supported"):
        oip_grpc.parse_infer(_typed([1], "BYTES", bytes_contents=[b"x"]), limit=2**20)
    with pytest.raises(InputError, match="no inputs"):
        oip_grpc.parse_infer(oip_grpc.ModelInferRequest(model_name="m"), limit=2**20)


def test_raw_contents_are_checked_against_shapes_and_the_size_limit() -> None:
    request = _request(np.zeros((4, 4), np.float32), "FP32")
    with pytest.raises(BodyTooLarge, match="64 bytes"):
        oip_grpc.parse_infer(request, limit=63)
    request.raw_input_contents[0] = request.raw_input_contents[0][:60]
    with pytest.raises(InputError, match="60 bytes of data do not match shape"):
        oip_grpc.parse_infer(request, limit=2**20)
    request.raw_input_contents.append(b"")
    with pytest.raises(InputError, match="2 raw_input_contents for 1 inputs"):
        oip_grpc.parse_infer(request, limit=2**20)
