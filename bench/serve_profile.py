"""Where an HTTP request's time goes: one replica under constant load, sampled with py-spy (replica and
Serve proxy) and top, plus the engine-call count and mean batch from warmserve's metrics.

    python bench/serve_profile.py [--model torchvision:resnet18] [--backend aoti] [--device cpu]

Needs py-spy on PATH (``pip install py-spy``). Prints req/s, p50, mean batch, CPU per process and the
hottest frames of each process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Load  # noqa: E402
from bench.serve_bench import add_ray_serve_env, serve_env  # noqa: E402
from tests.e2e.cluster import RayCluster  # noqa: E402

SPY = ["py-spy", "record", "--rate", "200", "--format", "raw", "--nonblocking"]


def frames(raw: Path, n: int = 16) -> tuple[list[str], list[str], int]:
    """From a py-spy raw file (``frame;frame;... count`` per stack): the ``n`` frames where most samples were
    taken (own), the ``n`` frames most samples passed through (inclusive), and the number of samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        own[stack.split(";")[-1] or "(native)"] += int(count)
        for frame in set(stack.split(";")):
            inclusive[frame] += int(count)

    def share(counter: Counter[str]) -> list[str]:
        return [f"{c / total:6.1%}  {frame[:150]}" for frame, c in counter.most_common(n)] if total else []

    return share(own), share(inclusive), total


def hottest(raw: Path, n: int = 12) -> list[str]:
    """The frames where most samples were taken."""
    return frames(raw, n)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--input-shape", default=None, help="C,H,W when the model does not say")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--replica-cpus", type=int, default=1)
    ap.add_argument("--batch-wait", type=float, default=0.01, help="Serve's batch_wait_timeout_s")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--max-ongoing", type=int, default=None, help="the deployment's max_ongoing_requests")
    add_ray_serve_env(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RayCluster(Path(tmp) / "ray", env=serve_env(args.ray_serve_env))
        cluster.start(num_cpus=8)
        try:
            app: dict[str, Any] = {
                "model": args.model,
                "backend": args.backend,
                "device": args.device,
                "cache_dir": str(Path(tmp) / "cache"),
                "batch": "1:8",
                "max_batch_size": 8,
                "batch_wait_timeout_s": args.batch_wait,
            }
            if args.input_shape:
                app["input_shape"] = args.input_shape
            actor: dict[str, Any] = {"num_cpus": args.replica_cpus}
            if args.device == "cuda":
                actor["num_gpus"] = 0.25
            dep: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": actor}
            if args.max_ongoing:
                dep["max_ongoing_requests"] = args.max_ongoing
            cluster.deploy(cluster.config(app, dep), timeout=900)
            replica = requests.get(f"{cluster.http}/v1/status", timeout=30).json()["replica_pid"]
            proxy = int(subprocess.run(["pgrep", "-f", "ProxyActor"], capture_output=True, text=True).stdout.split()[0])
            name = args.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
            meta = requests.get(f"{cluster.http}/v2/models/{name}", timeout=30).json()
            x = np.random.default_rng(0).standard_normal((1, *meta["inputs"][0]["shape"][1:]), dtype=np.float32)
            with Load(f"{cluster.http}/v2/models/{name}/infer", x, args.clients) as load:
                time.sleep(3)
                before = cluster.metrics()
                t0 = time.monotonic()
                spies = [
                    subprocess.Popen(
                        [*SPY, "-p", str(pid), "-d", str(int(args.seconds)), "-o", str(Path(tmp) / f"{what}.txt")],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for what, pid in (("replica", replica), ("proxy", proxy))
                ]
                top = subprocess.run(["top", "-b", "-n", "2", "-d", "2", "-w", "160"], capture_output=True, text=True)
                for spy in spies:
                    spy.wait()
                t1 = time.monotonic()
                after = cluster.metrics()
        finally:
            cluster.stop()
        done = load.between(t0, t1)

        def total(metrics: dict[str, list[Any]], family: str, suffix: str = "") -> float:
            return sum(s.value for s in metrics.get(family, []) if s.name.endswith(suffix))

        calls = total(after, "ray_warmserve_inference_seconds", "_count") - total(
            before, "ray_warmserve_inference_seconds", "_count"
        )
        engine_s = total(after, "ray_warmserve_inference_seconds", "_sum") - total(
            before, "ray_warmserve_inference_seconds", "_sum"
        )
        items = total(after, "ray_warmserve_inference_items") - total(before, "ray_warmserve_inference_items")
        print(f"{len(done) / (t1 - t0):.1f} req/s, p50 {np.median(done) * 1e3:.1f} ms, {len(load.failures)} failed")
        if calls:
            print(
                f"engine: {calls / (t1 - t0):.1f} calls/s, mean batch {items / calls:.2f},"
                f" {engine_s / calls * 1e3:.2f} ms per call, busy {engine_s / (t1 - t0):.0%} of the time"
            )
        last = top.stdout.split("\ntop - ")[-1].splitlines()
        print("\n".join(line for line in last[:14] if line.strip()))
        for what in ("replica", "proxy"):
            print(f"\n{what} (pid {replica if what == 'replica' else proxy}), hottest frames:")
            print("\n".join(hottest(Path(tmp) / f"{what}.txt")))


if __name__ == "__main__":
    main()
