"""The Open Inference Protocol over gRPC: KServe's ``grpc_predict_v2`` service, which ``tritonclient.grpc`` speaks.

The messages are built here from the protocol's field table into a descriptor pool of their own, so no code
generator runs and no generated module has to match the installed protobuf; the field numbers are the
protocol's (a test compares them with the ones tritonclient was generated from). Ray Serve's gRPC proxy
(``grpc_options.grpc_servicer_functions``) registers the service with :func:`add_inference_service` and calls
the ingress deployment's method of the same name as each RPC with the decoded request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from warmserve.deployments.errors import BodyTooLarge
from warmserve.deployments.oip import TORCH_TO_DATATYPE, check_header, tensor_from_bytes, tensor_from_values
from warmserve.serve.errors import InputError

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

# name, field number, type ("repeated T", "map<K,V>", a scalar or a message of this table)
MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "repeated string")],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse": [
        ("name", 1, "string"),
        ("versions", 2, "repeated string"),
        ("platform", 3, "string"),
        ("inputs", 4, "repeated ModelMetadataResponse.TensorMetadata"),
        ("outputs", 5, "repeated ModelMetadataResponse.TensorMetadata"),
    ],
    "ModelMetadataResponse.TensorMetadata": [
        ("name", 1, "string"),
        ("datatype", 2, "string"),
        ("shape", 3, "repeated int64"),
    ],
    "InferParameter": [  # one of these (ONEOFS)
        ("bool_param", 1, "bool"),
        ("int64_param", 2, "int64"),
        ("string_param", 3, "string"),
        ("double_param", 4, "double"),
        ("uint64_param", 5, "uint64"),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, "repeated bool"),
        ("int_contents", 2, "repeated int32"),
        ("int64_contents", 3, "repeated int64"),
        ("uint_contents", 4, "repeated uint32"),
        ("uint64_contents", 5, "repeated uint64"),
        ("fp32_contents", 6, "repeated float"),
        ("fp64_contents", 7, "repeated double"),
        ("bytes_contents", 8, "repeated bytes"),
    ],
    "ModelInferRequest": [
        ("model_name", 1, "string"),
        ("model_version", 2, "string"),
        ("id", 3, "string"),
        ("parameters", 4, "map<string,InferParameter>"),
        ("inputs", 5, "repeated ModelInferRequest.InferInputTensor"),
        ("outputs", 6, "repeated ModelInferRequest.InferRequestedOutputTensor"),
        ("raw_input_contents", 7, "repeated bytes"),
    ],
    "ModelInferRequest.InferInputTensor": [
        ("name", 1, "string"),
        ("datatype", 2, "string"),
        ("shape", 3, "repeated int64"),
        ("parameters", 4, "map<string,InferParameter>"),
        ("contents", 5, "InferTensorContents"),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, "string"),
        ("parameters", 2, "map<string,InferParameter>"),
    ],
    "ModelInferResponse": [
        ("model_name", 1, "string"),
        ("model_version", 2, "string"),
        ("id", 3, "string"),
        ("parameters", 4, "map<string,InferParameter>"),
        ("outputs", 5, "repeated ModelInferResponse.InferOutputTensor"),
        ("raw_output_contents", 6, "repeated bytes"),
    ],
    "ModelInferResponse.InferOutputTensor": [
        ("name", 1, "string"),
        ("datatype", 2, "string"),
        ("shape", 3, "repeated int64"),
        ("parameters", 4, "map<string,InferParameter>"),
        ("contents", 5, "InferTensorContents"),
    ],
    # Triton's model configuration extension (model_config.proto): the fields warmserve fills.
    "ModelConfigRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelConfigResponse": [("config", 1, "ModelConfig")],
    "ModelConfig": [
        ("name", 1, "string"),
        ("platform", 2, "string"),
        ("backend", 17, "string"),
        ("max_batch_size", 4, "int32"),
        ("input", 5, "repeated ModelInput"),
        ("output", 6, "repeated ModelOutput"),
        ("dynamic_batching", 11, "ModelDynamicBatching"),
        ("parameters", 14, "map<string,ModelParameter>"),
    ],
    "ModelInput": [("name", 1, "string"), ("data_type", 2, "DataType"), ("dims", 4, "repeated int64")],
    "ModelOutput": [("name", 1, "string"), ("data_type", 2, "DataType"), ("dims", 3, "repeated int64")],
    "ModelDynamicBatching": [
        ("preferred_batch_size", 1, "repeated int32"),
        ("max_queue_delay_microseconds", 2, "uint64"),
    ],
    "ModelParameter": [("string_value", 1, "string")],
    # The statistics extension (what perf_analyzer reads for its server-side figures).
    "ModelStatisticsRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelStatisticsResponse": [("model_stats", 1, "repeated ModelStatistics")],
    "ModelStatistics": [
        ("name", 1, "string"),
        ("version", 2, "string"),
        ("last_inference", 3, "uint64"),
        ("inference_count", 4, "uint64"),
        ("execution_count", 5, "uint64"),
        ("inference_stats", 6, "InferStatistics"),
        ("batch_stats", 7, "repeated InferBatchStatistics"),
    ],
    "InferStatistics": [
        (name, number, "StatisticDuration")
        for number, name in enumerate(
            ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"),
            start=1,
        )
    ],
    "StatisticDuration": [("count", 1, "uint64"), ("ns", 2, "uint64")],
    "InferBatchStatistics": [
        ("batch_size", 1, "uint64"),
        ("compute_input", 2, "StatisticDuration"),
        ("compute_infer", 3, "StatisticDuration"),
        ("compute_output", 4, "StatisticDuration"),
    ],
}
# Enums: name -> (value name, number); the protocol's datatypes in model configurations.
ENUMS: dict[str, list[tuple[str, int]]] = {
    "DataType": [
        (f"TYPE_{t}", n)
        for n, t in enumerate(
            "INVALID BOOL UINT8 UINT16 UINT32 UINT64 INT8 INT16 INT32 INT64 FP16 FP32 FP64 STRING BF16".split()  # noqa: SIM905
        )
    ]
}
# message -> its oneof and the fields in it (None: every field)
ONEOFS: dict[str, tuple[str, set[str] | None]] = {
    "InferParameter": ("parameter_choice", None),
    "ModelConfig": ("scheduling_choice", {"dynamic_batching"}),
}
# The RPCs warmserve answers: the health, metadata and inference calls of the protocol.
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
)

_F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
}
# Which typed contents field carries a datatype's values when a request sends no raw bytes.
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _typed(field: descriptor_pb2.FieldDescriptorProto, kind: str) -> None:
    if kind in SCALARS:
        field.type = SCALARS[kind]
    elif kind in ENUMS:
        field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{kind}"
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The protocol's messages and service as a .proto file would describe them."""
    fdp = descriptor_pb2.FileDescriptorProto(name="warmserve/grpc_predict_v2.proto", package=PACKAGE, syntax="proto3")
    for name, values in ENUMS.items():
        enum = fdp.enum_type.add(name=name)
        for value, number in values:
            enum.value.add(name=value, number=number)
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full, fields in MESSAGES.items():
        parent, _, name = full.rpartition(".")
        msg = (protos[parent].nested_type if parent else fdp.message_type).add(name=name)
        protos[full] = msg
        oneof, members = ONEOFS.get(full, (None, set()))
        if oneof:
            msg.oneof_decl.add(name=oneof)
        for fname, number, kind in fields:
            repeated = kind.startswith("repeated ")
            kind = kind.removeprefix("repeated ")
            label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            f = msg.field.add(name=fname, number=number, label=label)
            if kind.startswith("map<"):
                key, value = kind[4:-1].split(",")
                entry = msg.nested_type.add(name="".join(p.title() for p in fname.split("_")) + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=SCALARS[key])
                _typed(entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), value)
                f.label, f.type, f.type_name = _F.LABEL_REPEATED, _F.TYPE_MESSAGE, f".{PACKAGE}.{full}.{entry.name}"
            else:
                _typed(f, kind)
            if oneof and (members is None or fname in members):
                f.oneof_index = 0
    service = fdp.service.add(name=SERVICE.rpartition(".")[2])
    for method in METHODS:
        service.method.add(
            name=method, input_type=f".{PACKAGE}.{method}Request", output_type=f".{PACKAGE}.{method}Response"
        )
    return fdp


# A pool of its own: tritonclient's generated module defines the same names in the default pool.
POOL = descriptor_pool.DescriptorPool()
POOL.Add(file_descriptor())


def _message(name: str) -> Any:
    cls = message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
    cls.__module__ = __name__  # Serve pickles requests from its proxy to a replica: by this module's name
    return cls


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
ModelConfigRequest = _message("ModelConfigRequest")
ModelConfigResponse = _message("ModelConfigResponse")
ModelStatisticsRequest = _message("ModelStatisticsRequest")
ModelStatisticsResponse = _message("ModelStatisticsResponse")


RAW_INPUT_CONTENTS = 7  # ModelInferRequest's field number of raw_input_contents


class InferRequest:
    """A ``ModelInferRequest`` read by :func:`read_infer_request`: ``raw_input_contents`` is a list of
    memoryviews of the received bytes; every other field is the parsed message's."""

    __slots__ = ("_data", "_message", "raw_input_contents")

    def __init__(self, data: bytes, message: Any, raw: list[memoryview]) -> None:
        self._data, self._message, self.raw_input_contents = data, message, raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:  # Serve's proxy pickles the request to a replica
        return read_infer_request, (self._data,)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]  # IndexError past the end: a truncated message
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def read_infer_request(data: bytes) -> Any:
    """A ``ModelInferRequest`` whose tensor bytes are not copied out of ``data``.

    protobuf hands each ``raw_input_contents`` element over as a new bytes object, a copy of every tensor
    byte (19 MB for 32 rows of 3x224x224 FP32) on the replica's event loop. Here the top level of the wire
    format is walked instead: field 7's elements become views of ``data`` and the other fields (names,
    shapes, parameters: a few hundred bytes) are parsed by protobuf. Anything unusual at the top level
    (groups, a field that runs past the end) is left to protobuf's own parser and its errors."""
    try:
        raw: list[memoryview] = []
        rest: list[bytes] = []
        view, at, end = memoryview(data), 0, len(data)
        while at < end:
            start = at
            tag, at = _varint(data, at)
            kind = tag & 7
            if kind == 0:
                _, at = _varint(data, at)
            elif kind == 1:
                at += 8
            elif kind == 5:
                at += 4
            elif kind == 2:
                size, at = _varint(data, at)
                if tag >> 3 == RAW_INPUT_CONTENTS:
                    if at + size > end:
                        raise ValueError("truncated")
                    raw.append(view[at : at + size])
                    at += size
                    continue
                at += size
            else:
                raise ValueError(f"wire type {kind}")
            if at > end:
                raise ValueError("truncated")
            rest.append(data[start:at])
    except (IndexError, ValueError):
        return ModelInferRequest.FromString(data)
    return InferRequest(data, ModelInferRequest.FromString(b"".join(rest)), raw)


def add_inference_service(servicer: Any, server: Any) -> None:
    """Register ``GRPCInferenceService`` on ``server`` (the ``grpc_servicer_functions`` entry of Serve's
    ``grpc_options``): each RPC calls the servicer's method of the same name."""
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method),
            request_deserializer=(
                read_infer_request if method == "ModelInfer" else globals()[f"{method}Request"].FromString
            ),
            response_serializer=globals()[f"{method}Response"].SerializeToString,
        )
        for method in METHODS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62 looks these up first
        server.add_registered_method_handlers(SERVICE, handlers)


def parse_infer(request: Any, limit: int) -> list[torch.Tensor]:
    """The input tensors of a ``ModelInferRequest``: from ``raw_input_contents`` (what tritonclient sends),
    one per input in order, or from each input's typed ``contents``; at most ``limit`` bytes of raw data."""
    if not request.inputs:
        raise InputError("the request has no inputs")
    # Each access to an element of a repeated bytes field copies it into a new bytes object (upb): take each
    # once. Reading the length first, then the bytes, copied a 32-row FP32 input (19 MB) twice, and the first
    # copy held 51 % of the replica's GIL samples over gRPC at 32 rows (H100, latency-split-cuda-h100-spy).
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input")
    size = sum(len(r) for r in raw)
    if size > limit:
        raise BodyTooLarge(f"request of {size} bytes of tensor data exceeds the limit of {limit}")
    tensors = []
    for i, item in enumerate(request.inputs):
        where = f"inputs[{i}] ({item.name})"
        if raw:
            tensors.append(tensor_from_bytes(where, raw[i], list(item.shape), item.datatype))
            continue
        check_header(where, list(item.shape), item.datatype)
        field = CONTENTS.get(item.datatype)
        if field is None:
            raise InputError(f"{where}: send {item.datatype or 'this datatype'} as raw_input_contents")
        values = list(getattr(item.contents, field))  # a list: numpy would wrap a uint32 array into UINT8
        tensors.append(tensor_from_values(where, values, list(item.shape), item.datatype))
    return tensors


def infer_response(model: str, version: str, request_id: str, outputs: Mapping[str, torch.Tensor]) -> Any:
    """A ``ModelInferResponse`` with each output as raw little-endian bytes, as Triton answers."""
    response = ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, tensor in outputs.items():
        t = tensor.detach().cpu().contiguous()
        response.outputs.add(name=name, datatype=TORCH_TO_DATATYPE[t.dtype], shape=list(t.shape))
        response.raw_output_contents.append(
            (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        )
    return response


def model_config(config: Mapping[str, Any]) -> Any:
    """The HTTP model configuration document (`oip.model_config`) as a ``ModelConfigResponse``."""
    response = ModelConfigResponse()
    json_format.ParseDict(config, response.config)
    return response


def model_statistics(stats: Mapping[str, Any]) -> Any:
    """The HTTP statistics document (`oip.ModelStats.doc`) as a ``ModelStatisticsResponse``."""
    return json_format.ParseDict(stats, ModelStatisticsResponse())


def model_metadata(meta: Mapping[str, Any]) -> Any:
    """The HTTP metadata document (name, versions, platform, inputs, outputs) as a ``ModelMetadataResponse``."""
    response = ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for kind in ("inputs", "outputs"):
        for t in meta[kind]:
            getattr(response, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return response
