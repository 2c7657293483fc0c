"""Open Inference Protocol v2 (KServe v2 / Triton REST) tensors: JSON and the binary-data extension."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from warmserve.serve.errors import InputError

# Protocol datatype <-> numpy/torch
DATATYPES: dict[str, tuple[Any, torch.dtype]] = {
    "FP32": (np.float32, torch.float32),
    "FP16": (np.float16, torch.float16),
    "FP64": (np.float64, torch.float64),
    "INT64": (np.int64, torch.int64),
    "INT32": (np.int32, torch.int32),
    "INT8": (np.int8, torch.int8),
    "UINT8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: its bits travel as 16-bit words
}
TORCH_TO_DATATYPE = {v[1]: k for k, v in DATATYPES.items()}
HEADER_LENGTH = "inference-header-content-length"


# OpenAPI descriptions of the wire format, for /docs and for clients generated from /openapi.json.
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": sorted(DATATYPES)},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array", "description": "row-major values (nested lists are flattened)"},
    },
}
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            },
        },
    },
}
INFER_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": {**_TENSOR, "required": ["name", "shape", "datatype"]}},
    },
}


@dataclass
class InferRequest:
    id: str | None
    inputs: list[dict[str, Any]]
    tensors: list[torch.Tensor]
    outputs: list[dict[str, Any]]
    binary_output: bool


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse a v2 infer request; with ``Inference-Header-Content-Length`` the tensors follow the JSON."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError as e:
            raise InputError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from e
        if not 0 < n <= len(body):
            raise InputError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        head, rest = body[:n], memoryview(body)[n:]
    else:
        head, rest = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"request body is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InputError('request must be a JSON object with a non-empty "inputs" list')
    tensors = []
    offset = 0
    for i, item in enumerate(doc["inputs"]):
        if not isinstance(item, dict):
            raise InputError(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not isinstance(shape, list) or not isinstance(datatype, str):
            raise InputError(f"inputs[{i}] needs name (string), shape (list) and datatype (string)")
        where = f"inputs[{i}]"
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            np_dtype, count = check_header(where, shape, datatype)
            if not isinstance(size, int) or size != count * np.dtype(np_dtype).itemsize:
                raise InputError(f"{where}: binary_data_size {size} does not match shape {shape} of {datatype}")
            if offset + size > len(rest):
                raise InputError(f"{where}: body ends before its {size} bytes of binary data")
            tensors.append(tensor_from_bytes(where, rest[offset : offset + size], shape, datatype))
            offset += size
        else:
            if "data" not in item:
                raise InputError(f"{where} has no data")
            tensors.append(tensor_from_values(where, item["data"], shape, datatype))
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise InputError('"outputs" must be a list')
    params = doc.get("parameters") or {}
    binary = bool(isinstance(params, dict) and params.get("binary_data_output")) or any(
        isinstance(o, dict) and isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")
        for o in outputs
    )
    return InferRequest(doc.get("id"), doc["inputs"], tensors, outputs, binary)


def encode_response(
    model: str, version: str, request_id: str | None, outputs: dict[str, torch.Tensor], binary: bool
) -> tuple[bytes, dict[str, str]]:
    """The v2 response body and extra headers (binary outputs follow the JSON header)."""
    items, blobs = [], []
    for name, tensor in outputs.items():
        t = tensor.detach().cpu().contiguous()
        item: dict[str, Any] = {"name": name, "shape": list(t.shape), "datatype": TORCH_TO_DATATYPE[t.dtype]}
        if binary:
            raw = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = (t.float() if t.dtype == torch.bfloat16 else t).flatten().tolist()
        items.append(item)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def check_header(where: str, shape: Any, datatype: str) -> tuple[Any, int]:
    """The numpy dtype and element count of a tensor header, or an InputError naming ``where``."""
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(f"{where}.shape must be non-negative integers, got {list(shape)}")
    if datatype not in DATATYPES:
        raise InputError(f"{where}.datatype {datatype!r} is not supported; use one of {sorted(DATATYPES)}")
    return DATATYPES[datatype][0], math.prod(shape)


def tensor_from_bytes(where: str, raw: bytes | memoryview, shape: Any, datatype: str) -> torch.Tensor:
    """A tensor from its row-major bytes (the binary extension, gRPC's raw contents), size checked."""
    np_dtype, count = check_header(where, shape, datatype)
    if len(raw) != count * np.dtype(np_dtype).itemsize:
        raise InputError(f"{where}: {len(raw)} bytes of data do not match shape {list(shape)} of {datatype}")
    t = torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).reshape(list(shape)).copy())
    return t.view(torch.bfloat16) if datatype == "BF16" else t


def tensor_from_values(where: str, values: Any, shape: Any, datatype: str) -> torch.Tensor:
    """A tensor from a list of numbers (JSON ``data``, gRPC's typed contents), range and count checked."""
    np_dtype, count = check_header(where, shape, datatype)
    if datatype == "BF16":  # values as numbers: read as FP32, rounded to bfloat16
        return tensor_from_values(where, values, shape, "FP32").to(torch.bfloat16)
    try:
        with np.errstate(over="raise", invalid="raise"):
            array = np.asarray(values, dtype=np_dtype)
    except (FloatingPointError, OverflowError) as e:  # FP16 overflow; an integer a type cannot hold
        raise InputError(f"{where} holds values out of the range of {datatype}") from e
    except (TypeError, ValueError) as e:
        raise InputError(f"{where} data is not a list of {datatype} numbers: {e}") from e
    if array.size != count:
        raise InputError(f"{where} has {array.size} values but shape {list(shape)} needs {count}")
    return torch.from_numpy(array.reshape(list(shape)).copy())
