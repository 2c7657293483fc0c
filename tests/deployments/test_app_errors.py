"""What a client reads when a request is wrong: the app's own words, never a Python object's repr."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from deployments.app import decode_image
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
