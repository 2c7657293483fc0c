"""Where one client's time goes: `warmserve run --replicas 1` at one client, split by hop.

python bench/latency_split.py                                  # resnet18, Serve's defaults and two variants
python bench/latency_split.py --variant same-thread:RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0

For each variant (a set of environment variables for `warmserve run`): one client's closed loop of 1-row FP32
requests, over HTTP and gRPC, once through the ingress (HAProxy) and once straight to the replica's own port (the
one HAProxy forwards to), each for --seconds (``--spy``: py-spy samples the replica meanwhile, see bench/serve_throughput.py); and from the replica's statistics over the same requests, its time
from a request's arrival in the batcher to its answer, and the engine call's own part of that. Then the engine
in this process at batch 1 (a cache hit of the same engine). So: ingress = through HAProxy - straight; replica
(Serve, uvicorn or gRPC, parsing, encoding) = straight - batcher; batcher = its wait and thread hop; engine.
Writes bench/results/latency-split-<device>[-tag].{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATHS = ("http", "http-straight", "grpc", "grpc-straight")
VARIANTS = [
    "default:",
    "same-thread:RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0",
    "throughput:RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
]


def replica_ports() -> tuple[str | None, str | None]:
    """The replica's own HTTP and gRPC addresses, from the configuration of the HAProxy that forwards to it."""
    from warmserve.deployments.ports import serve_haproxies

    http = grpc = None
    for h in serve_haproxies():
        if not h.config or not h.config.exists():
            continue
        backend = ""
        for line in h.config.read_text().splitlines():
            words = line.split()
            if words[:1] == ["backend"]:
                backend = words[1]
            elif words[:1] == ["server"] and len(words) > 2 and words[1].startswith("SERVE_REPLICA"):
                if backend.startswith("grpc"):
                    grpc = grpc or words[2]
                else:
                    http = http or words[2]
    return http, grpc


def stats(base: str, name: str) -> dict[str, int]:
    import requests

    doc = requests.get(f"{base}/v2/models/{name}/stats", timeout=10).json()["model_stats"][0]
    s = doc["inference_stats"]
    return {
        "n": s["success"]["count"],
        "success_ns": s["success"]["ns"],
        "queue_ns": s["queue"]["ns"],
        "compute_ns": s["compute_infer"]["ns"],
    }


def measure(
    base: str, name: str, shape: list[int], grpc_target: str, seconds: float, rows: int = 1, spy: bool = False
) -> dict[str, Any]:
    from bench.serve_throughput import Spy, load, requests_for

    http_direct, grpc_direct = replica_ports()
    host = base.removeprefix("http://")
    b, g = ("b1", "grpc1") if rows == 1 else ("rows32", "grpc32")
    paths = {
        "http": (host, b),
        "http-straight": (http_direct, b),
        "grpc": (grpc_target, g),
        "grpc-straight": (grpc_direct, g),
    }
    out: dict[str, Any] = {"replica_http": http_direct, "replica_grpc": grpc_direct, "rows": rows}
    for label, (target, workload) in paths.items():
        if target is None:
            out[label] = {"error": "no replica port found in HAProxy's configuration"}
            continue
        url, body, headers, _ = requests_for(f"http://{target}", name, shape, target)[workload]
        if label.startswith("http"):
            url = f"http://{target}/v2/models/{name}/infer"
        before = stats(base, name)
        with Spy(seconds, enabled=spy) as spied:
            point = load(url, body, headers, 1, 1, seconds)
        after = stats(base, name)
        if spied.profile:
            point["profile"] = spied.profile
        n = after["n"] - before["n"]
        if n:  # the one replica answered them all, the load's ramp included
            point["batcher_ms"] = (after["success_ns"] - before["success_ns"]) / n / 1e6
            point["queue_ms"] = (after["queue_ns"] - before["queue_ns"]) / n / 1e6
            point["call_ms"] = (after["compute_ns"] - before["compute_ns"]) / n / 1e6
        out[label] = point
        print(
            f"  {label:14} p50 {point['p50_ms']:6.2f} ms p99 {point['p99_ms']:6.2f} ms failed {point['failed']}"
            + (f" | in the batcher {point['batcher_ms']:.2f} ms, engine call {point['call_ms']:.2f}" if n else ""),
            flush=True,
        )
        if spied.profile:
            print(spied.summary(), flush=True)
    return out


def main() -> int:
    from bench.common import cache_named, host_facts, ready_line, warmserve_run, write_results
    from bench.perf_analyzer import engine_ms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", help=f"NAME:VAR=V,VAR=V (default: {' '.join(VARIANTS)})")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rows", type=lambda s: [int(r) for r in s.split(",")], default=[1], help="1, 32 or 1,32")
    ap.add_argument("--run-args", default="", help="more options for `warmserve run`")
    ap.add_argument("--cache-dir", help="engine cache (default: a temp dir, so the first variant builds)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--spy", action="store_true", help="py-spy on the replica while it holds the GIL, per path")
    args = ap.parse_args()

    import requests
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="warmserve-split-"))
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    run_args = ["--json", "--replicas", "1", "--cache-dir", str(cache_dir), *shlex.split(args.run_args)]
    results: dict[str, Any] = {"device": device, "run_args": run_args[1:], "variants": []}
    for variant in args.variant or VARIANTS:
        label, _, spec = variant.partition(":")
        env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        home = work / f"home-{label}"
        home.mkdir()
        print(f"{label} {env}", flush=True)
        with warmserve_run(run_args, home, timeout=1800, env=env) as service:
            ready = ready_line(service)
            base = ready["ready"]
            grpc_target = f"{base.removeprefix('http://').rsplit(':', 1)[0]}:{ready['grpc_port']}"
            name = str(ready.get("model", "resnet18")).rpartition(":")[2]
            shape = requests.get(f"{base}/v2/models/{name}", timeout=10).json()["inputs"][0]["shape"][1:]
            for rows in args.rows:
                point = measure(base, name, shape, grpc_target, args.seconds, rows, args.spy)
                results["variants"].append({"label": label, "env": env, "ready_s": service.ready_s, **point})
    if "--model" not in args.run_args:  # the default model: its engine is in the cache the service used
        results["engine_b1"] = engine_ms("torchvision:resnet18", cache_dir, device)
        print(f"engine in process at batch 1: p50 {results['engine_b1']['p50_ms']:.2f} ms", flush=True)
    results["host"] = host_facts()
    results = cache_named(results, cache_dir)
    write_results(
        ROOT / args.out, f"latency-split-{device}" + (f"-{args.tag}" if args.tag else ""), results, markdown(results)
    )
    print(markdown(results))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# One client's time, split by hop: `warmserve run {' '.join(r['run_args'])}` ({r['device']})",
        "",
        "p50 of one client's closed loop of 1-row FP32 requests; straight = to the replica's own port, not through "
        "HAProxy; batcher = the replica's own mean time from a request's arrival in its batcher to its answer, "
        "engine call = the call's mean (thread hop included), both from its statistics over the same requests.",
        "",
        "| variant | rows | path | p50 ms | p99 ms | in the batcher ms | engine call ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in r["variants"]:
        env = " ".join(f"{k}={val}" for k, val in v["env"].items()) or "warmserve run's defaults"
        for path in PATHS:
            p = v.get(path, {})
            if "p50_ms" not in p:
                lines.append(f"| {v['label']} ({env}) | {v['rows']} | {path} | {p.get('error', '-')} | | | |")
                continue
            lines.append(
                f"| {v['label']} ({env}) | {v['rows']} | {path} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | "
                f"{p.get('batcher_ms', float('nan')):.2f} | {p.get('call_ms', float('nan')):.2f} |"
            )
    spied = [(v, path) for v in r["variants"] for path in PATHS if "gil_busy" in v.get(path, {}).get("profile", {})]
    if spied:
        lines += [
            "",
            "py-spy on the replica while a thread held the GIL (`--spy`): the frames most samples were in.",
            "",
        ]
    for v, path in spied:
        p = v[path]["profile"]
        cores = " ".join(f"{c:.2f}" for c in p["replica_cores"])
        lines.append(f"- {v['label']}, {v['rows']} row(s), {path}: replica {cores} cores, GIL busy {p['gil_busy']:.0%}")
        lines += [f"  - `{line.strip()}`" for line in p["own"][:6]]
    if "engine_b1" in r:
        e = r["engine_b1"]
        lines += ["", f"The engine in process at batch 1: p50 {e['p50_ms']:.2f} ms, p99 {e['p99_ms']:.2f} ms."]
    lines += ["", f"Host: {r['host']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
