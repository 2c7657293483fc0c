"""Ray Serve on the GPU: one replica compiles, a second starts warm from the cache; HTTP latency.

python bench/gpu_serve.py [--backend inductor] [--out DIR]     (needs Ray installed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.cluster import RayCluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "backend": args.backend, "model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RayCluster(Path(tmp)).start(num_cpus=8)
        try:
            app_args = {"model": args.model, "backend": args.backend, "device": "cuda"}
            dep = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.25}}
            t0 = time.perf_counter()
            cluster.deploy(cluster.config(app_args, dep), timeout=400)
            result["first_deploy_s"] = time.perf_counter() - t0
            first = cluster.replica_statuses(1)
            result["first_replica"] = next(iter(first.values()))["start"]
            t0 = time.perf_counter()
            cluster.deploy(cluster.config(app_args, {**dep, "num_replicas": 2}), timeout=400)
            cluster.wait_running("warmserve", timeout=400, replicas=2)
            result["scale_to_2_s"] = time.perf_counter() - t0
            statuses = cluster.replica_statuses(2)
            result["second_replica"] = next(s for p, s in statuses.items() if p not in first)["start"]
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
            body = {
                "inputs": [
                    {"name": "input__0", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": x.flatten().tolist()}
                ]
            }
            lat = []
            for _ in range(30):
                t = time.perf_counter()
                r = requests.post(f"{cluster.http}/v2/models/resnet18/infer", json=body, timeout=60)
                r.raise_for_status()
                lat.append(time.perf_counter() - t)
            result["http_json_b1_p50_ms"] = statistics.median(lat[5:]) * 1e3
        finally:
            cluster.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_serve.json").write_text(json.dumps(result, indent=1))
    f, s = result["first_replica"], result["second_replica"]
    print(json.dumps(result, indent=1))
    print(
        f"first replica: {f['outcome']} in {f['seconds']:.1f}s; second replica: {s['outcome']} in "  # type: ignore[index]
        f"{s['seconds']:.1f}s"
    )  # type: ignore[index]


if __name__ == "__main__":
    main()
