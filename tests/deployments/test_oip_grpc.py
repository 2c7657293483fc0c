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
            f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else None,
            f.containing_oneof.name if f.containing_oneof else None,
        )
        for f in descriptor.fields
    }
    return fields, {n.name: _shape(n) for n in descriptor.nested_types}


# Messages of which warmserve declares only the fields it fills: each of those is tritonclient's own.
PARTIAL = {"ModelConfig", "ModelInput", "ModelOutput", "ModelDynamicBatching", "ModelParameter", "ModelStatistics"}


def test_the_messages_are_the_ones_tritonclient_was_generated_from() -> None:
    from google.protobuf import descriptor_pool
    from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: F401 - they fill the default pool

    for name in (n for n in oip_grpc.MESSAGES if "." not in n):
        ours = _shape(oip_grpc.POOL.FindMessageTypeByName(f"inference.{name}"))
        theirs = _shape(descriptor_pool.Default().FindMessageTypeByName(f"inference.{name}"))
        if name in PARTIAL:
            assert {f: theirs[0][f] for f in ours[0]} == ours[0], name
        else:
            assert ours == theirs, name
    for enum, values in oip_grpc.ENUMS.items():
        theirs_enum = descriptor_pool.Default().FindEnumTypeByName(f"inference.{enum}")
        assert values == [(v.name, v.number) for v in theirs_enum.values]
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


def _two_inputs() -> bytes:
    """A request of two raw inputs with every other kind of top-level field set, as tritonclient sends it."""
    from tritonclient.grpc import service_pb2

    theirs = service_pb2.ModelInferRequest(model_name="m", model_version="2", id="7")
    theirs.parameters["priority"].int64_param = 3
    theirs.inputs.add(name="input_ids", datatype="INT64", shape=[2, 3])
    theirs.inputs.add(name="attention_mask", datatype="INT64", shape=[2, 3])
    theirs.outputs.add(name="last_hidden_state")
    theirs.raw_input_contents.extend([np.arange(6, dtype=np.int64).tobytes(), np.ones(6, np.int64).tobytes()])
    return bytes(theirs.SerializeToString())


def test_the_infer_reader_hands_over_views_of_the_received_bytes() -> None:
    data = _two_inputs()
    request = oip_grpc.read_infer_request(data)
    parsed = oip_grpc.ModelInferRequest.FromString(data)
    assert [bytes(r) for r in request.raw_input_contents] == list(parsed.raw_input_contents)
    assert all(r.obj is data for r in request.raw_input_contents), "tensor bytes copied out of the request"
    for field in ("model_name", "model_version", "id", "inputs", "outputs", "parameters"):
        assert getattr(request, field) == getattr(parsed, field), field
    ids, mask = oip_grpc.parse_infer(request, limit=2**20)
    assert ids.tolist() == [[0, 1, 2], [3, 4, 5]] and mask.tolist() == [[1] * 3] * 2
    # Serve's proxy pickles the request on its way to a replica: the replica reads the same bytes again.
    again = pickle.loads(pickle.dumps(request))
    assert [bytes(r) for r in again.raw_input_contents] == list(parsed.raw_input_contents)
    assert again.inputs == parsed.inputs
    # The reader is what the gRPC server decodes ModelInfer with.
    server = type("Server", (), {"add_generic_rpc_handlers": lambda self, h: setattr(self, "h", h)})()
    oip_grpc.add_inference_service(object.__new__(type("S", (), dict.fromkeys(oip_grpc.METHODS))), server)
    handlers = server.h[0]._method_handlers  # type: ignore[attr-defined]
    assert handlers[f"/{oip_grpc.SERVICE}/ModelInfer"].request_deserializer is oip_grpc.read_infer_request


def test_the_infer_reader_leaves_damaged_bytes_to_protobufs_errors() -> None:
    from google.protobuf.message import DecodeError

    data = _two_inputs()
    for damaged in (data[:-5], data[:2], b"\x3a\xff\xff\xff\xff\x0f", b"\xff"):
        with pytest.raises(DecodeError):
            oip_grpc.ModelInferRequest.FromString(damaged)
        with pytest.raises(DecodeError):
            oip_grpc.read_infer_request(damaged)
    # An unknown field is kept, as protobuf keeps it; a group is protobuf's to read.
    unknown = data + b"\xa0\x06\x01"  # field 100, varint 1
    assert oip_grpc.read_infer_request(unknown).model_name == "m"
    group = b"\x0a\x01m" + b"\xa3\x06\xa4\x06"  # model_name, then an empty group 100
    assert oip_grpc.read_infer_request(group).model_name == "m"
    assert oip_grpc.read_infer_request(b"").raw_input_contents == []


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


def test_the_model_configuration_reads_as_tritonclients() -> None:
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    from warmserve.deployments import triton
    from warmserve.serve.batching import OutputSpec
    from warmserve.serve.spec import InputSpec, parse_inputs

    tensors, dims, _ = parse_inputs("input_ids:int64[seq=16:128]<30522 attention_mask:int64[seq]")
    spec = InputSpec(min_batch=1, max_batch=32, tensors=tensors, dims=dims)
    doc = triton.model_config(
        "enc",
        spec,
        [OutputSpec("last_hidden_state", "float16", ("seq", 128)), OutputSpec("pooler_output", "float32", (128,))],
        backend="aoti",
        batch_wait_timeout_s=0.002,
        max_batch_size=8,
        parameters={"weights_version": "v1"},
    )
    ours = oip_grpc.model_config(doc)
    theirs = service_pb2.ModelConfigResponse.FromString(ours.SerializeToString()).config
    assert json_format.MessageToDict(theirs, preserving_proto_field_name=True) == {
        "name": "enc",
        "platform": "warmserve_aoti",
        "backend": "warmserve",
        "max_batch_size": 32,  # rows a request may carry: the engine's largest batch
        "input": [
            {"name": "input_ids", "data_type": "TYPE_INT64", "dims": ["-1"]},
            {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": ["-1"]},
        ],
        "output": [
            {"name": "last_hidden_state", "data_type": "TYPE_FP16", "dims": ["-1", "128"]},
            {"name": "pooler_output", "data_type": "TYPE_FP32", "dims": ["128"]},
        ],
        "dynamic_batching": {"preferred_batch_size": [8], "max_queue_delay_microseconds": "2000"},
        "parameters": {"weights_version": {"string_value": "v1"}},
    }


def test_statistics_count_rows_calls_and_times_and_read_as_tritonclients() -> None:
    from tritonclient.grpc import service_pb2

    from warmserve.deployments.triton import ModelStats

    stats = ModelStats()
    stats.batch(rows=3, queued=[0.001, 0.002], run=0.01)
    stats.request(0.012, ok=True, rows=1)
    stats.request(0.013, ok=True, rows=2)
    stats.request(0.5, ok=False)
    doc = stats.doc("m", "v1")
    (theirs,) = service_pb2.ModelStatisticsResponse.FromString(
        oip_grpc.model_statistics(doc).SerializeToString()
    ).model_stats
    assert (theirs.name, theirs.version, theirs.inference_count, theirs.execution_count) == ("m", "v1", 3, 1)
    s = theirs.inference_stats
    assert (s.success.count, s.success.ns) == (2, 25_000_000)
    assert (s.fail.count, s.queue.count, s.queue.ns) == (1, 2, 3_000_000)
    assert (s.compute_infer.count, s.compute_infer.ns) == (2, 20_000_000)  # each request adds its call's time
    assert [(b.batch_size, b.compute_infer.count) for b in theirs.batch_stats] == [(3, 1)]
