"""What a client reads when a request is wrong: the app's own words, never a Python object's repr."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from deployments.app import decode_image, normalise_pixels, takes_pixels
from serve.errors import InputError


def test_undecodable_images_say_what_to_send() -> None:
    with pytest.raises(InputError) as e:
        decode_image(b"# README\nnot an image", (3, 16, 16))
    text = str(e.value)
    assert "not an image format warmserve reads" in text and "JPEG or PNG" in text
    assert "BytesIO" not in text and "0x" not in text
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png, "PNG")
    with pytest.raises(InputError, match="truncated or corrupt"):
        decode_image(png.getvalue()[:60], (3, 16, 16))
    assert decode_image(png.getvalue(), (3, 16, 16)).shape == (3, 16, 16)


def test_pixels_are_normalised_as_a_photo_is() -> None:
    png = io.BytesIO()
    Image.new("RGB", (20, 16), (255, 128, 0)).save(png, "PNG")
    pixels = decode_image(png.getvalue(), (3, 16, 16))
    assert pixels.dtype == torch.uint8 and pixels[:, 0, 0].tolist() == [255, 128, 0]
    x = normalise_pixels(pixels.unsqueeze(0), torch.float32)
    want = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert x.dtype == torch.float32 and torch.allclose(x[0, :, 5, 7], want)
    assert normalise_pixels(pixels, torch.float16).dtype == torch.float16


def test_only_image_models_take_pixels() -> None:
    assert takes_pixels((3, 224, 224), torch.float32) and takes_pixels((3, 16, 16), torch.float16)
    assert not takes_pixels((1, 28, 28), torch.float32)  # one channel: no RGB pixels
    assert not takes_pixels((3, 16, 16), torch.int64)
    assert not takes_pixels((10,), torch.float32)


def test_errors_map_to_statuses_by_their_most_specific_class() -> None:
    """HTTP and gRPC statuses come from the exception's MRO: a subclass of two mapped errors gets its first
    base's status, and anything unmapped is a server fault."""
    import grpc

    from deployments.app import client_error, grpc_status
    from deployments.errors import BodyTooLarge, ModelNotFound

    class TooLargeInput(BodyTooLarge, InputError):
        pass

    class MissingInput(ModelNotFound, InputError):
        pass

    assert client_error(TooLargeInput("x")) == (413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert client_error(MissingInput("x")) == (404, grpc.StatusCode.NOT_FOUND)
    assert client_error(InputError("x")) == (400, grpc.StatusCode.INVALID_ARGUMENT)
    assert client_error(RuntimeError("x")) is None
    assert grpc_status(RuntimeError("boom")) == (grpc.StatusCode.INTERNAL, "internal error: RuntimeError")
