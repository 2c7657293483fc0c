"""The GPU run: every compiled backend through the whole cycle on one CUDA device, in one process tree.

    python bench/gpu_device.py [--model torchvision:resnet18] [--backends inductor,aoti] [--out DIR]

Per backend: cold build in a fresh process (empty warmserve cache, empty Inductor cache), warm start in a
second fresh process (empty Inductor cache: only warmserve's cache helps), then in this process a warm
start, a refit with new weights checked against eager, and engine latency vs eager at batch 1 and 32.
A backend whose process crashes is reported with its signal, not hidden. Writes gpu-<date>.json and .md.
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
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build_command, build_env, run_build  # noqa: E402


def build(model: str, backend: str, cache_dir: str, inductor_dir: str, timeout: float) -> dict[str, Any]:
    return run_build(build_command(model, backend, cache_dir, device="cuda"), build_env(inductor_dir), timeout)


def engine_latency(fn: Any, x: torch.Tensor, iters: int = 50) -> float:
    with torch.inference_mode():
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def cycle(model: str, backend: str, tmp: Path, timeout: float) -> dict[str, Any]:
    from cache import CacheConfig
    from serve.model import build_model
    from serve.spec import ModelSpec
    from serve.weights import demo_weights
    from serve.worker import Worker

    cache_dir = str(tmp / f"cache-{backend}")
    row: dict[str, Any] = {"backend": backend}
    row["cold"] = build(model, backend, cache_dir, str(tmp / f"ind-{backend}-1"), timeout)
    if not row["cold"]["ok"]:
        return row
    row["warm"] = build(model, backend, cache_dir, str(tmp / f"ind-{backend}-2"), timeout)
    if not row["warm"]["ok"]:
        return row
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"ind-{backend}-3")
    spec = ModelSpec(model=model)
    config = CacheConfig.load(cache_dir=cache_dir)
    worker = Worker(spec, backend=backend, device="cuda", cache_config=config)
    row["in_process_start"] = worker.start().to_dict()
    eager = Worker(spec, backend="eager", device="cuda", cache_config=config)
    eager.start()
    new = demo_weights(build_model(model, meta=True), seed=7)
    swap = worker.swap_weights(new, "v2")
    eager.swap_weights(new, "v2")
    row["swap"] = swap.to_dict()
    lat = {}
    for b in (1, 32):
        x = spec.input.example(batch=b, device="cuda")
        compiled = engine_latency(worker._live.engine, x)  # type: ignore[union-attr]
        base = engine_latency(eager._live.engine, x)  # type: ignore[union-attr]
        with torch.inference_mode():
            got = worker._live.engine(x).float()  # type: ignore[union-attr]
            want = eager._live.engine(x).float()  # type: ignore[union-attr]
        err = float((got - want).abs().max() / want.abs().max())
        lat[b] = {
            "compiled_ms": compiled * 1e3,
            "eager_ms": base * 1e3,
            "speedup": base / compiled,
            "rel_err_vs_eager_after_refit": err,
        }
    row["latency"] = lat
    return row


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        f"# GPU run — {result['date']}, {env['gpu']}, torch {env['torch']}, Python {env['python']}",
        "",
        f"Model {result['model']}, batch 1..32, fp32.",
        "",
        "| backend | cold build s | warm start s (2nd process) | warm/cold | refit s | rebuild/refit | "
        "b1 compiled ms | b1 eager ms | b32 compiled ms | b32 eager ms | b32 speedup | err after refit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["backends"]:
        cold, warm = row.get("cold", {}), row.get("warm", {})
        if not cold.get("ok") or not warm.get("ok"):
            bad = cold if not cold.get("ok") else warm
            lines.append(f"| {row['backend']} | {bad.get('error')} | | | | | | | | | | |")
            continue
        refit = row["swap"]["steps"].get("refit") or row["swap"]["steps"].get("exclusive") or row["swap"]["seconds"]
        lat = row["latency"]
        lines.append(
            f"| {row['backend']} | {cold['seconds']:.1f} | {warm['seconds']:.2f} ({warm['outcome']}) | "
            f"{warm['seconds'] / cold['seconds']:.1%} | {refit:.4f} | {cold['steps']['cache'] / refit:.0f}x | "
            f"{lat[1]['compiled_ms']:.2f} | {lat[1]['eager_ms']:.2f} | {lat[32]['compiled_ms']:.2f} | "
            f"{lat[32]['eager_ms']:.2f} | {lat[32]['speedup']:.2f}x | {lat[32]['rel_err_vs_eager_after_refit']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backends", default="inductor,aoti")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "cpus": os.cpu_count(),
        },
        "backends": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            t0 = time.perf_counter()
            try:
                row = cycle(args.model, backend, Path(tmp), args.timeout)
            except Exception as e:  # report and go on to the next backend
                row = {"backend": backend, "cold": {"ok": False, "error": f"{type(e).__name__}: {e}"}}
            row["stage_s"] = time.perf_counter() - t0
            result["backends"].append(row)
            print(json.dumps(row, default=str)[:3000], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
