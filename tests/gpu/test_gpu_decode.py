"""`/v1/classify`'s JPEG decoding on the GPU (nvJPEG) against PIL's on the host."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from warmserve.serve.errors import InputError

pytestmark = pytest.mark.gpu
CAT = Path(__file__).resolve().parents[2] / "examples" / "cat.jpg"


def _jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_jpegs_decode_on_the_gpu_as_pil_decodes_them() -> None:
    from warmserve.deployments.app import decode_image, decode_jpegs

    images = [CAT.read_bytes(), _jpeg(640, 480), _jpeg(300, 500)]
    gpu = decode_jpegs(images, (3, 224, 224), torch.device("cuda"))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8 and tuple(gpu.shape) == (3, 3, 224, 224)
    host = torch.stack([decode_image(b, (3, 224, 224)) for b in images])
    # nvJPEG's IDCT and torchvision's resampling round differently from libjpeg's and PIL's
    diff = (gpu.cpu().float() - host.float()).abs()
    assert float(diff.mean()) < 4.0, float(diff.mean())


def test_a_jpeg_nvjpeg_cannot_read_is_named_by_pil() -> None:
    from warmserve.deployments.app import decode_jpegs

    with pytest.raises(InputError, match=r"truncated or corrupt|not an image"):
        decode_jpegs([_jpeg(64, 64), b"\xff\xd8\xff" + b"junk" * 10], (3, 224, 224), torch.device("cuda"))


def test_a_bad_file_fails_alone_in_a_batch() -> None:
    from warmserve.deployments.app import decode_each

    bad = b"\xff\xd8\xff" + b"junk" * 10
    out = decode_each([_jpeg(64, 64), bad, _jpeg(80, 60)], (3, 224, 224), torch.device("cuda"))
    assert isinstance(out[1], InputError)
    assert all(isinstance(o, torch.Tensor) and tuple(o.shape) == (3, 224, 224) for o in (out[0], out[2]))


def test_a_gpu_replica_decodes_one_photo_on_the_host_and_several_with_nvjpeg() -> None:
    """Replicas take turns on a shared GPU: one small decode each costs more there than on a host core."""
    import asyncio
    from types import SimpleNamespace

    import warmserve.deployments.app as app

    replica = SimpleNamespace(  # what _decode reads of a replica
        settings=SimpleNamespace(model=SimpleNamespace(input=SimpleNamespace(shape=(3, 224, 224)))),
        worker=SimpleNamespace(device=torch.device("cuda")),
        _nvjpeg=threading.Lock(),
        _gpu_decoder=lambda: True,  # nvJPEG started up
    )
    decode = app.WarmModel.func_or_class._decode
    photos = [CAT.read_bytes(), _jpeg(640, 480)]
    one = asyncio.run(decode(replica, photos[:1]))
    several = asyncio.run(decode(replica, photos, ["a.jpg", "b.jpg"]))
    assert one.device.type == "cpu" and several.device.type == "cuda"
    assert tuple(one.shape) == (1, 3, 224, 224) and tuple(several.shape) == (2, 3, 224, 224)
    with pytest.raises(InputError, match=r"'b\.jpg'"):
        asyncio.run(decode(replica, [photos[0], b"\xff\xd8\xff" + b"junk" * 10], ["a.jpg", "b.jpg"]))


def test_nvjpeg_starts_up_off_the_request_path() -> None:
    """The first request of several JPEGs starts nvJPEG on a thread and is decoded by PIL meanwhile; once
    nvJPEG decoded a test photo, such requests are decoded on the GPU."""
    import asyncio
    from types import MethodType, SimpleNamespace

    import warmserve.deployments.app as app

    cls = app.WarmModel.func_or_class
    replica = SimpleNamespace(
        settings=SimpleNamespace(model=SimpleNamespace(input=SimpleNamespace(shape=(3, 224, 224)))),
        worker=SimpleNamespace(device=torch.device("cuda")),
        _nvjpeg=threading.Lock(),
        _nvjpeg_ready=threading.Event(),
        _nvjpeg_warming=False,
        _nvjpeg_start=threading.Lock(),
    )
    replica._gpu_decoder = MethodType(cls._gpu_decoder, replica)
    replica._warm_decoder = MethodType(cls._warm_decoder, replica)
    photos = [CAT.read_bytes(), _jpeg(640, 480)]
    first = asyncio.run(cls._decode(replica, photos))
    assert first.device.type == "cpu"
    assert replica._nvjpeg_ready.wait(120)
    assert asyncio.run(cls._decode(replica, photos)).device.type == "cuda"


def test_photos_resize_on_the_gpu_as_torchvision_resizes_them() -> None:
    """resize_crop does torchvision's bicubic resize with torch alone (no torchvision import): the same pixels."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from warmserve.deployments.app import resize_crop

    g = torch.Generator().manual_seed(0)
    for height, width in [(480, 640), (100, 90)]:
        img = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8).cuda()
        scale = max(224 / height, 224 / width)
        size = [max(224, round(height * scale)), max(224, round(width * scale))]
        want = F.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
        assert torch.equal(resize_crop(img, 224, 224), want[:, top : top + 224, left : left + 224])
