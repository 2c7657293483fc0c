"""Where a photo's decoding time goes on a GPU host: nvJPEG, the resize on the device (with and without
antialiasing), and on the host PIL's decode with PIL's resize (before) or torch's (now), per image, for examples/cat.jpg (or --image).

    python bench/decode_probe.py [--image photo.jpg] [--size 224]

Prints one line per step: milliseconds per image, as wall time with the device synchronised.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_image(step: Callable[[], object], images: int, seconds: float = 1.0) -> float:
    """Milliseconds per image of ``step`` (which handles ``images`` images), after a warm-up."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        torch.cuda.synchronize()
        n += 1
    return (time.perf_counter() - t0) / n / images * 1e3


def _pil_decode(data: bytes) -> object:
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _pil_resize(data: bytes, size: int) -> object:
    """What decode_image did before it resized with torch: PIL's bicubic resize, then the centre crop."""
    img: Any = _pil_decode(data)
    scale = max(size / img.height, size / img.width)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(ROOT / "examples" / "cat.jpg"))
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from warmserve.deployments.app import decode_each, decode_image

    torch.set_num_threads(1)  # as in a replica, whose torch threads Ray sets to its num_cpus
    data = Path(args.image).read_bytes()
    shape = (3, args.size, args.size)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dev = torch.device("cuda")
    img = decode_jpeg(raw, mode=ImageReadMode.RGB, device=dev)
    h, w = img.shape[-2:]
    scale = max(args.size / h, args.size / w)
    size = [max(args.size, round(h * scale)), max(args.size, round(w * scale))]
    print(f"{args.image}: {w}x{h}, {len(data)} bytes, resized to {size[1]}x{size[0]}")
    steps: list[tuple[str, Callable[[], object], int]] = [
        ("nvJPEG decode, 1 image", lambda: decode_jpeg([raw], mode=ImageReadMode.RGB, device=dev), 1),
        ("nvJPEG decode, batch of 32", lambda: decode_jpeg([raw] * 32, mode=ImageReadMode.RGB, device=dev), 32),
        ("resize bicubic antialias (GPU)", lambda: F.resize(img, size, InterpolationMode.BICUBIC, antialias=True), 1),
        ("resize bilinear antialias (GPU)", lambda: F.resize(img, size, InterpolationMode.BILINEAR, antialias=True), 1),
        (
            "resize bicubic, no antialias (GPU)",
            lambda: F.resize(img, size, InterpolationMode.BICUBIC, antialias=False),
            1,
        ),
        ("decode_each, 1 image", lambda: decode_each([data], shape, dev), 1),
        ("decode_each, batch of 32", lambda: decode_each([data] * 32, shape, dev), 32),
        ("PIL decode only (host)", lambda: _pil_decode(data), 1),
        ("PIL decode + PIL resize + crop (host, before)", lambda: _pil_resize(data, args.size), 1),
        ("decode_image: PIL decode, torch resize (host)", lambda: decode_image(data, shape), 1),
    ]
    for name, step, images in steps:
        print(f"{name:45} {per_image(step, images):8.3f} ms/image", flush=True)


if __name__ == "__main__":
    main()
