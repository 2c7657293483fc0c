"""warmserve on a real local Ray Serve cluster: time-to-ready of the first and a second replica, HTTP
throughput with Serve's batching against the same engine called in-process, and request latency during a
weight rollout against steady state.

python bench/serve_bench.py [--model torchvision:resnet18] [--backend aoti] [--device cpu] [--out bench/results]

Clients send requests of ``--request-batch`` rows (1 by default) with the binary tensor extension, as
tritonclient does. The in-process
baseline calls the same Worker at the batch size Serve forms (``--max-batch``) in a loop.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Load, build_env  # noqa: E402
from tests.e2e.cluster import RayCluster  # noqa: E402
from warmserve.deployments.rollout import rollout  # noqa: E402
from warmserve.serve.model import build_model  # noqa: E402
from warmserve.serve.spec import ModelSpec  # noqa: E402
from warmserve.serve.weights import demo_weights, save_weights  # noqa: E402
from warmserve.serve.worker import Worker  # noqa: E402


def add_ray_serve_env(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--ray-serve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Ray Serve setting for the cluster, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (repeatable)",
    )


def serve_env(pairs: list[str]) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` from the command line -> environment for every Ray process."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--ray-serve-env wants NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1e3 if values else float("nan")


def in_process(args: argparse.Namespace, cache_dir: Path, weights: Path) -> dict[str, Any]:
    """Throughput of the engine called directly at Serve's batch size, and its batch-1 latency."""
    spec = ModelSpec.from_mapping({"model": args.model, "weights": str(weights), "batch": f"1:{args.max_batch}"})
    from warmserve.cache import CacheConfig

    torch.set_num_threads(args.replica_cpus)
    worker = Worker(spec, backend=args.backend, device=args.device, cache_config=CacheConfig.load(cache_dir=cache_dir))
    report = worker.start()
    x = spec.input.example(batch=args.max_batch, device=worker.device)
    for _ in range(3):
        worker.infer(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        worker.infer(x)
        if worker.device.type == "cuda":
            torch.cuda.synchronize()
        n += args.max_batch
    items_per_s = n / (time.perf_counter() - t0)
    one = spec.input.example(batch=1, device=worker.device)
    lat = []
    for _ in range(30):
        t = time.perf_counter()
        worker.infer(one)
        if worker.device.type == "cuda":
            torch.cuda.synchronize()
        lat.append(time.perf_counter() - t)
    out = {"start": report.to_dict(), "items_per_s": items_per_s, "b1_p50_ms": pct(lat, 50)}
    del worker
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=8, help="Serve's max_batch_size and the in-process batch")
    ap.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    ap.add_argument("--request-batch", type=int, default=1, help="rows per HTTP request")
    ap.add_argument("--seconds", type=float, default=20, help="length of each measured phase")
    ap.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray node")
    ap.add_argument(
        "--replica-cpus",
        type=int,
        default=min(torch.get_num_threads(), 4),
        help="num_cpus per replica (its torch threads); the in-process baseline uses as many threads",
    )
    ap.add_argument("--out", default="bench/results")
    add_ray_serve_env(ap)
    args = ap.parse_args()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
        "max_batch": args.max_batch,
        "clients": args.clients,
        "replica_cpus": args.replica_cpus,
        "request_batch": args.request_batch,
        "ray_serve_env": args.ray_serve_env,
    }
    if args.device == "cuda":
        result["machine"] += f", {torch.cuda.get_device_name()}"
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        cache_dir = tmpdir / "cache"
        model = build_model(args.model)
        v1, v2 = tmpdir / "v1.safetensors", tmpdir / "v2.safetensors"
        save_weights(demo_weights(model, seed=1), v1)
        save_weights(demo_weights(model, seed=2), v2)
        del model

        # The Serve cluster comes first: its first replica builds the engine cold.
        env = build_env(tmpdir / "inductor")
        keep = {k: env[k] for k in ("WARMSERVE_SIGNING_KEY", "TORCHINDUCTOR_CACHE_DIR")}
        cluster = RayCluster(tmpdir / "ray", env={**keep, **serve_env(args.ray_serve_env)})
        cluster.start(num_cpus=args.cpus)
        try:
            app = {
                "model": args.model,
                "backend": args.backend,
                "device": args.device,
                "cache_dir": str(cache_dir),
                "weights": str(v1),
                "batch": f"1:{args.max_batch}",
                "max_batch_size": args.max_batch,
                "batch_wait_timeout_s": 0.01,
            }
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus: the replica's torch uses that many threads.
            actor: dict[str, Any] = {"num_cpus": args.replica_cpus}
            if args.device == "cuda":
                actor["num_gpus"] = 0.25
            dep = {
                "num_replicas": 1,
                "ray_actor_options": actor,
                "user_config": {"weights": None, "weights_version": "v1"},
            }
            t0 = time.perf_counter()
            cluster.deploy(cluster.config(app, dep), timeout=900)
            result["first_deploy_s"] = time.perf_counter() - t0
            first = cluster.replica_statuses(1)
            result["first_replica"] = next(iter(first.values()))["start"]
            name = args.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
            url = f"{cluster.http}/v2/models/{name}/infer"
            shape = [
                int(d)
                for d in requests.get(f"{cluster.http}/v2/models/{name}", timeout=30).json()["inputs"][0]["shape"][1:]
            ]
            x = np.random.default_rng(0).standard_normal((args.request_batch, *shape), dtype=np.float32)

            # HTTP throughput, one replica.
            with Load(url, x, args.clients) as load:
                time.sleep(3)  # ramp up
                t0 = time.monotonic()
                time.sleep(args.seconds)
                t1 = time.monotonic()
            done = load.between(t0, t1)
            calls = items = 0.0
            for sample in cluster.metrics().get("ray_warmserve_inference_seconds", []):
                if sample.name.endswith("_count"):
                    calls += sample.value
            for sample in cluster.metrics().get("ray_warmserve_inference_items", []):
                items += sample.value
            result["http"] = {
                "items_per_s": len(done) * args.request_batch / (t1 - t0),
                "p50_ms": pct(done, 50),
                "p99_ms": pct(done, 99),
                "failures": len(load.failures),
                "mean_batch": items / calls if calls else None,  # rows per engine call (Serve's batching)
            }

            # A second replica (warm, from this node's cache), then steady load and a rollout under it.
            t0 = time.perf_counter()
            cluster.deploy(cluster.config(app, {**dep, "num_replicas": 2}), timeout=900)
            cluster.wait_running("warmserve", timeout=900, replicas=2)
            result["scale_to_2_s"] = time.perf_counter() - t0
            statuses = cluster.replica_statuses(2)
            result["second_replica"] = next(s for p, s in statuses.items() if p not in first)["start"]
            with Load(url, x, args.clients) as load:
                time.sleep(3)
                s0 = time.monotonic()
                time.sleep(args.seconds)
                r0 = time.monotonic()
                report = rollout(cluster.dashboard, str(v2), "v2", http=cluster.http, wait_s=600)
                r1 = time.monotonic()
                time.sleep(2)
            steady, during = load.between(s0, r0), load.between(r0, r1)
            result["rollout"] = {
                "seconds": r1 - r0,
                "replicas": report["replicas"],
                "steady_p50_ms": pct(steady, 50),
                "steady_p99_ms": pct(steady, 99),
                "during_p50_ms": pct(during, 50),
                "during_p99_ms": pct(during, 99),
                "during_requests": len(during),
                "failures": len(load.failures),
                "failure_samples": load.failures[:3],
                "versions_after": sorted({v for start, _, v in load.records if start > r1}),
            }
        finally:
            cluster.stop()
        # In-process, on the engine the cluster built (a local hit), with the cluster gone.
        result["in_process"] = in_process(args, cache_dir, v1)
    result["http_vs_in_process"] = result["http"]["items_per_s"] / result["in_process"]["items_per_s"]
    ro = result["rollout"]
    result["rollout_p99_ratio"] = ro["during_p99_ms"] / ro["steady_p99_ms"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-{args.device}-{args.backend}" + (f"-rows{args.request_batch}" if args.request_batch > 1 else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    ro, h, ip = r["rollout"], r["http"], r["in_process"]
    f, s = r["first_replica"], r["second_replica"]
    return "\n".join(
        [
            f"# warmserve on Ray Serve — {r['date']}",
            "",
            f"{r['machine']}; replicas and the in-process baseline use {r['replica_cpus']} torch threads;"
            f" {r['model']} via {r['backend']} on {r['device']}; Serve batches up to {r['max_batch']},"
            f" {r['clients']} HTTP clients sending binary requests of {r['request_batch']} row(s).",
            "",
            "| measure | value | ratio / target |",
            "|---|---|---|",
            f"| first replica ready ({f['outcome']}) | {f['seconds']:.2f} s | |",
            f"| second replica ready ({s['outcome']}) | {s['seconds']:.2f} s | {s['seconds'] / f['seconds']:.1%} of first |",
            f"| in-process, batch {r['max_batch']} | {ip['items_per_s']:.1f} items/s | |",
            f"| HTTP, 1 replica, Serve batching | {h['items_per_s']:.1f} items/s (p50 {h['p50_ms']:.0f} ms,"
            f" p99 {h['p99_ms']:.0f} ms, mean batch {h['mean_batch'] or 0:.1f}, {h['failures']} failed) | {r['http_vs_in_process']:.0%} of in-process (target >= 80%) |",
            f"| steady, 2 replicas | p50 {ro['steady_p50_ms']:.0f} ms, p99 {ro['steady_p99_ms']:.0f} ms | |",
            f"| during rollout ({ro['seconds']:.1f} s, {ro['during_requests']} requests) | p50 {ro['during_p50_ms']:.0f} ms,"
            f" p99 {ro['during_p99_ms']:.0f} ms, {ro['failures']} failed | p99 {r['rollout_p99_ratio']:.2f}x steady (target <= 2x) |",
            "",
        ]
    )


if __name__ == "__main__":
    main()
