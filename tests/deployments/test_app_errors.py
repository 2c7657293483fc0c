"""What a client reads when a request is wrong: the app's own words, never a Python object's repr."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from warmserve.deployments.app import decode_image, normalise_pixels, takes_pixels
from warmserve.serve.errors import InputError


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
    assert takes_pixels((3, 16, 16), torch.float32) and not takes_pixels((3, -1, -1), torch.float32)  # a dynamic size


def test_photos_are_resized_as_pil_resizes_them() -> None:
    """decode_image resizes with torch (bicubic, antialiased: the same function the GPU path uses), so its
    pixels stay within rounding of PIL's own bicubic resize and centre crop, for shapes that shrink and grow."""
    import numpy as np

    photo = Image.open(Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").convert("RGB")  # 451 x 300
    grey = Image.radial_gradient("L").convert("RGB")  # 256 x 256, upscaled below
    for img, (h, w), resized in [
        (photo, (224, 224), (337, 224)),
        (photo, (64, 96), (96, 64)),
        (grey, (300, 280), (300, 300)),
    ]:
        data = io.BytesIO()
        img.save(data, "PNG")
        left, top = (resized[0] - w) // 2, (resized[1] - h) // 2
        want = np.asarray(img.resize(resized, Image.Resampling.BICUBIC).crop((left, top, left + w, top + h)), int)
        got = decode_image(data.getvalue(), (3, h, w))
        assert got.shape == (3, h, w) and got.is_contiguous()
        diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - want)
        assert diff.max() <= 2 and (diff > 1).mean() < 1e-4  # rounding: 6 of 252,000 values differ by 2


def test_photos_are_resized_as_torchvision_resizes_them() -> None:
    """resize_crop is torchvision's bicubic antialiased resize done with torch alone (importing torchvision
    costs a replica seconds): the same pixels, shrinking and growing."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from warmserve.deployments.app import resize_crop

    g = torch.Generator().manual_seed(0)
    for (height, width), (h, w) in [((480, 640), (224, 224)), ((100, 90), (224, 224)), ((300, 500), (32, 48))]:
        img = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)
        scale = max(h / height, w / width)
        size = [max(h, round(height * scale)), max(w, round(width * scale))]
        want = F.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        assert torch.equal(resize_crop(img, h, w), want[:, top : top + h, left : left + w])


def test_only_image_models_take_pixels() -> None:
    assert takes_pixels((3, 224, 224), torch.float32) and takes_pixels((3, 16, 16), torch.float16)
    assert not takes_pixels((1, 28, 28), torch.float32)  # one channel: no RGB pixels
    assert not takes_pixels((3, 16, 16), torch.int64)
    assert not takes_pixels((10,), torch.float32)


def test_errors_map_to_statuses_by_their_most_specific_class() -> None:
    """HTTP and gRPC statuses come from the exception's MRO: a subclass of two mapped errors gets its first
    base's status, and anything unmapped is a server fault."""
    import grpc

    from warmserve.deployments.app import client_error, grpc_status
    from warmserve.deployments.errors import BodyTooLarge, ModelNotFound

    class TooLargeInput(BodyTooLarge, InputError):
        pass

    class MissingInput(ModelNotFound, InputError):
        pass

    assert client_error(TooLargeInput("x")) == (413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert client_error(MissingInput("x")) == (404, grpc.StatusCode.NOT_FOUND)
    assert client_error(InputError("x")) == (400, grpc.StatusCode.INVALID_ARGUMENT)
    assert client_error(RuntimeError("x")) is None
    assert grpc_status(RuntimeError("boom")) == (grpc.StatusCode.INTERNAL, "internal error: RuntimeError")
