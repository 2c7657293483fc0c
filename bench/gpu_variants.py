"""Why compiled is (or is not) >= 1.5x eager on the GPU: throughput of eager and torch.compile variants at
batch 1 and 32 (fp32 with PyTorch's default cuDNN settings, fp16 channels-last, CUDA graphs), plus a torch.profiler split of GPU time by
kernel kind for eager and Inductor at batch 32.

    python bench/gpu_variants.py [--model torchvision:resnet18] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from warmserve.serve.model import build_model  # noqa: E402
from warmserve.serve.weights import demo_weights  # noqa: E402


def items_per_s(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, seconds: float = 3.0) -> float:
    with torch.inference_mode():
        for _ in range(10):
            fn(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                fn(x)
            torch.cuda.synchronize()
            n += 10
        return n * x.shape[0] / (time.perf_counter() - t0)


def kind(name: str) -> str:
    n = name.lower()
    if "conv" in n or "implicit" in n or "xmma" in n or "cudnn" in n or "sm90_" in n or "cutlass" in n:
        return "convolution"
    if "gemm" in n or "matmul" in n:
        return "gemm"
    if "triton" in n:
        return "fused (triton)"
    return "other elementwise / pooling"


def gpu_split(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> dict[str, float]:
    """Share of GPU kernel time by kind, over 20 calls."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn(x)
            torch.cuda.synchronize()
    by: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t and e.key and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            by[kind(e.key)] += t
    total = sum(by.values()) or 1.0
    out = {k: round(v / total, 3) for k, v in sorted(by.items())}
    out["gpu_ms_per_call"] = round(total / 20 / 1e3, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    base = build_model(args.model)
    state = demo_weights(base, seed=0)
    rows: dict[str, dict[str, float]] = {}
    profiles: dict[str, dict[str, float]] = {}

    def model(dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.nn.Module:
        m = build_model(args.model)
        m.load_state_dict(state, assign=True)
        m = m.to(dev, dtype).eval()
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def run(name: str, fn: Callable[[torch.Tensor], Any], dtype: torch.dtype, cl: bool) -> None:
        row = {}
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            row[f"b{batch}"] = round(items_per_s(fn, x), 1)
        rows[name] = row
        print(name, row, flush=True)
        if name in ("eager fp32", "inductor fp32"):
            x = torch.randn(32, 3, 224, 224, device=dev)
            profiles[name] = gpu_split(fn, x)

    torch.backends.cudnn.benchmark = True
    variants: list[tuple[str, dict[str, Any], torch.dtype, bool]] = [
        # name, torch.compile kwargs (eager: unused), dtype, channels_last
        ("eager fp32", {}, torch.float32, False),
        ("inductor fp32", {"mode": "default"}, torch.float32, False),
        ("inductor fp32 cudagraphs", {"mode": "reduce-overhead"}, torch.float32, False),
        ("eager fp16 channels-last", {}, torch.float16, True),
        ("inductor fp16 channels-last", {"mode": "default"}, torch.float16, True),
        ("inductor fp16 channels-last cudagraphs", {"mode": "reduce-overhead"}, torch.float16, True),
    ]
    for name, kw, dtype, cl in variants:
        eager = name.startswith("eager")
        try:
            torch._dynamo.reset()
            m = model(dtype, cl)
            run(name, m if eager else torch.compile(m, **kw), dtype, cl)
        except Exception as e:  # one failing variant must not hide the others
            rows[name] = {"error": repr(e)[:300]}  # type: ignore[dict-item]
            print(name, "failed:", repr(e)[:300], flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": args.model,
        "items_per_s": rows,
        "gpu_time_split_b32": profiles,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-variants.json").write_text(json.dumps(result, indent=1))
    e = rows["eager fp32"]
    lines = [
        f"# Compiled vs eager on {result['device']} (torch {result['torch']}, {args.model})",
        "",
        "| variant | batch 1 items/s | x eager fp32 | batch 32 items/s | x eager fp32 |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:80]} | | | |")  # type: ignore[index]
            continue
        lines.append(
            f"| {name} | {row['b1']:.0f} | {row['b1'] / e['b1']:.2f} | {row['b32']:.0f} | {row['b32'] / e['b32']:.2f} |"
        )
    lines += ["", "GPU time by kernel kind at batch 32 (torch.profiler, 20 calls):", ""]
    for name, split in profiles.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in split.items()))
    (out / "gpu-variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
