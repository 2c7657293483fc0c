"""Warm start, refit and inference on one machine, in one run: cold build vs warm start vs refit, backends vs eager.

    python bench/warm_start.py [--model torchvision:resnet18] [--backend aoti] [--out bench/results]

Each start runs in a fresh process (`warmserve build --json`) with an empty Inductor cache, so the cold
number is honest. Writes <out>/warm_start-<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build_command, build_env, must, run_build  # noqa: E402


def build(model: str, backend: str, cache_dir: str, inductor_dir: str, extra: list[str]) -> dict:
    return must(run_build(build_command(model, backend, cache_dir, extra=extra), build_env(inductor_dir)))


def latency(fn, x: torch.Tensor, warmup: int = 5, iters: int = 30) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--batch", default="1:32")
    ap.add_argument("--input-shape", default="3,224,224")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    extra = ["--batch", args.batch, "--input-shape", args.input_shape]

    from warmserve.cache import CacheConfig
    from warmserve.serve.spec import InputSpec, ModelSpec, parse_batch, parse_shape
    from warmserve.serve.weights import demo_weights
    from warmserve.serve.worker import Worker

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, inductor = f"{tmp}/cache", f"{tmp}/inductor"
        cold = build(args.model, args.backend, cache_dir, inductor, extra)
        # A second process, and an empty Inductor cache: only warmserve's cache helps it.
        warm = build(args.model, args.backend, cache_dir, f"{tmp}/inductor-2", extra)

        lo, hi = parse_batch(args.batch)
        spec = ModelSpec(
            model=args.model, input=InputSpec(shape=parse_shape(args.input_shape), min_batch=lo, max_batch=hi)
        )
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{tmp}/inductor-3"
        worker = Worker(spec, backend=args.backend, cache_config=CacheConfig.load(cache_dir=cache_dir))
        worker.start()
        eager = Worker(spec, backend="eager", cache_config=CacheConfig.load(cache_dir=cache_dir))
        eager.start()
        assert worker.model is not None
        new = demo_weights(worker.model, seed=7)
        swap = worker.swap_weights(new, "v2")
        rows = {}
        for b in sorted({1, hi}):
            x = spec.input.example(batch=b)
            rows[b] = {"compiled_s": latency(worker.infer, x), "eager_s": latency(eager.infer, x)}

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "model": args.model,
        "backend": args.backend,
        "cold_build_s": cold["seconds"],
        "warm_start_s": warm["seconds"],
        "warm_over_cold": warm["seconds"] / cold["seconds"],
        "cold_steps": cold["steps"],
        "warm_steps": warm["steps"],
        "warm_outcome": warm["outcome"],
        "cold_process_s": cold["process_seconds"],
        "warm_process_s": warm["process_seconds"],
        "swap_s": swap.seconds,
        "swap_steps": swap.steps,
        "swap_ok": swap.ok,
        "rebuild_over_refit": cold["steps"]["cache"] / max(swap.steps.get("refit", swap.seconds), 1e-9),
        "latency": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"warm_start-{args.model.replace(':', '-')}-{args.backend}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    md = [
        f"# {args.model} via {args.backend} — {result['date']}, {result['machine']}",
        "",
        "| measure | seconds |",
        "|---|---|",
        f"| cold build (fingerprint → refitted engine) | {cold['seconds']:.2f} |",
        f"| warm start, second process ({warm['outcome']}) | {warm['seconds']:.3f} |",
        f"| warm / cold | {result['warm_over_cold']:.2%} |",
        f"| hot swap total (load standby + refit + verify + switch) | {swap.seconds:.3f} |",
        f"| refit alone | {swap.steps.get('refit', float('nan')):.4f} |",
        f"| rebuild / refit | {result['rebuild_over_refit']:.0f}x |",
        "",
        "| batch | compiled s | eager s | eager / compiled |",
        "|---|---|---|---|",
        *[
            f"| {b} | {r['compiled_s']:.4f} | {r['eager_s']:.4f} | {r['eager_s'] / r['compiled_s']:.2f}x |"
            for b, r in rows.items()
        ],
    ]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
