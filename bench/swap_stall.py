"""How long requests wait while weights are swapped: request latency under load, steady and during swaps.

    python bench/swap_stall.py [--backend aoti] [--device cuda] [--swaps 3] [--out DIR]

Two client threads send batch-1 requests to one worker without pause; after a steady stretch the weights are
swapped a few times. Prints the steady p50/p99/max, the slowest request that overlapped a swap, and each
swap's steps (for aoti on CUDA: warm_up runs beside the live engine; prepare, the CUDA-graph captures, is the
only part requests wait for, with the switch). Writes swap-stall.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()

    from warmserve.cache import CacheConfig
    from warmserve.serve.model import build_model
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.weights import demo_weights
    from warmserve.serve.worker import Worker

    spec = ModelSpec(model=args.model)
    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(spec, backend=args.backend, device=args.device, cache_config=CacheConfig.load(cache_dir=tmp))
        worker.start()
        x = spec.input.example(batch=1)
        calls: list[tuple[float, float]] = []  # (start, seconds)
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                worker.infer(x)
                calls.append((t0, time.perf_counter() - t0))

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(3)
        swaps: list[dict[str, Any]] = []
        for i in range(args.swaps):
            state = demo_weights(build_model(args.model, meta=True), seed=100 + i)
            t0 = time.perf_counter()
            report = worker.swap_weights(state, f"v{i + 2}")
            swaps.append({"start": t0, "end": time.perf_counter(), "ok": report.ok, "steps": report.steps})
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
    during = [s for start, s in calls if any(w["start"] <= start + s and start <= w["end"] for w in swaps)]
    steady = sorted(s for start, s in calls if start < swaps[0]["start"])
    result = {
        "backend": args.backend,
        "device": args.device,
        "steady_ms": {
            "p50": statistics.median(steady) * 1e3,
            "p99": steady[int(0.99 * (len(steady) - 1))] * 1e3,
            "max": steady[-1] * 1e3,
            "n": len(steady),
        },
        "during_swaps_max_ms": max(during) * 1e3 if during else None,
        "requests_during_swaps": len(during),
        "swaps": [{"ok": w["ok"], "steps": w["steps"]} for w in swaps],
        "unexpected_compiles": worker.fence.unexpected if worker.fence else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "swap-stall.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
