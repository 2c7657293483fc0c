"""warmserve's benchmark: every number measured side by side in one run, written as JSON, Markdown and PNG plots.

    python bench/run.py [--model torchvision:resnet18] [--backend aoti] [--replicas 4] [--out bench/results]

1. Replica time-to-ready, each start in a fresh process with an empty Inductor cache: cold build, L1 hit,
   L2 hit (S3 on a local SeaweedFS), and the floor (reading the blob and the weights, nothing else).
2. Weight update: in-place refit vs a full rebuild.
3. Scale-out: N processes starting at once on an empty cache, with single-flight and with it switched off.
4. Inference latency, batch 1 and 32: each backend vs eager vs plain torch.compile (with its own caches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build_command, build_env  # noqa: E402


def build(
    model: str,
    backend: str,
    cache_dir: Path,
    inductor: Path,
    extra_env: dict[str, str] | None = None,
    shared: str | None = None,
    extra: list[str] | None = None,
) -> subprocess.Popen[str]:
    """Start a build in a fresh process (several may run at once: the scale-out measurement)."""
    return subprocess.Popen(
        build_command(model, backend, cache_dir, shared=shared, extra=extra or ()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=build_env(inductor, extra_env),
    )


def finish(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = p.communicate(timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"build failed ({p.returncode}): {err[-2000:]}")
    return json.loads(out)  # type: ignore[no-any-return]


# The floor: what any warm start must do at least (read the engine and the weights), timed like the
# starts themselves, i.e. after the imports.
FLOOR = """
import sys, time, glob
import torch
from safetensors.torch import load_file
t0 = time.perf_counter()
blob = open(glob.glob(sys.argv[1] + '/entries/*/blob-*')[0], 'rb').read()
weights = load_file(sys.argv[2])
print(time.perf_counter() - t0)
"""


def latency(fn: Any, x: torch.Tensor, iters: int = 30) -> float:
    with torch.inference_mode():
        for _ in range(5):
            fn(x)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
    return (time.perf_counter() - t0) / iters


def plots(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ready = result["time_to_ready"]
    names = ["cold build", "L1 hit", "L2 (S3) hit", "floor"]
    values = [ready["cold_s"], ready["l1_s"], ready["l2_s"], ready["floor_s"]]
    bars = ax.barh(names[::-1], values[::-1], color=["#999", "#4c9", "#49c", "#c94"][::-1])
    ax.bar_label(bars, fmt="%.2f s", padding=3)
    ax.set_xscale("log")
    ax.set_xlabel("seconds, fingerprint to a refitted, verified engine (log scale)")
    ax.set_title(f"Replica time-to-ready — {result['model']} via {result['backend']}")
    fig.tight_layout()
    fig.savefig(out / "time_to_ready.png", dpi=110)
    files.append("time_to_ready.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    so = result["scale_out"]
    bars = ax.barh(
        ["one build", f"{so['replicas']} replicas, single-flight", f"{so['replicas']} replicas, no single-flight"][
            ::-1
        ],
        [so["one_build_s"], so["single_flight_s"], so["no_single_flight_s"]][::-1],
        color=["#999", "#4c9", "#c66"][::-1],
    )
    ax.bar_label(bars, fmt="%.1f s", padding=3)
    ax.set_xlabel("seconds until every replica is ready")
    ax.set_title("Scale-out on an empty cache")
    fig.tight_layout()
    fig.savefig(out / "scale_out.png", dpi=110)
    files.append("scale_out.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    lat = result["latency_ms"]
    for ax, b in zip(axes, ("1", "32"), strict=True):
        names = list(lat[b])
        bars = ax.bar(names, [lat[b][n] for n in names], color="#49c")
        ax.bar_label(bars, fmt="%.1f", padding=2)
        ax.set_title(f"batch {b}: ms per call (lower is better)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    files.append("latency.png")
    plt.close("all")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    from tests.servers import seaweedfs
    from warmserve.cache import CacheConfig
    from warmserve.serve.model import build_model
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.weights import demo_weights
    from warmserve.serve.worker import Worker

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "backend": args.backend,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
    }
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        with seaweedfs(tmp / "weed") as s3:
            s3.make_bucket("bench")
            os.environ.update(s3.env())
            shared = "s3://bench/warmserve"
            t0 = time.perf_counter()
            cold = finish(build(args.model, args.backend, tmp / "node-a", tmp / "i1", shared=shared))
            cold_process_s = time.perf_counter() - t0  # process start to ready: what scale-out compares with
            l1 = finish(build(args.model, args.backend, tmp / "node-a", tmp / "i2", shared=shared))
            l1_lean = finish(
                build(args.model, args.backend, tmp / "node-a", tmp / "i4", shared=shared, extra=["--no-verify"])
            )
            l2 = finish(build(args.model, args.backend, tmp / "node-b", tmp / "i3", shared=shared))
        weights = next((tmp / "node-a" / "weights").glob("*.safetensors"))
        floor = float(
            subprocess.run(
                [sys.executable, "-c", FLOOR, str(tmp / "node-a"), str(weights)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert (l1["outcome"], l2["outcome"]) == ("local-hit", "shared-hit"), (l1["outcome"], l2["outcome"])
        result["time_to_ready"] = {
            "cold_s": cold["seconds"],
            "l1_s": l1["seconds"],
            "l2_s": l2["seconds"],
            "floor_s": floor,
            "cold_steps": cold["steps"],
            "l1_steps": l1["steps"],
            "l1_no_verify_s": l1_lean["seconds"],
            "l1_no_verify_steps": l1_lean["steps"],
            "l2_steps": l2["steps"],
        }

        # Scale-out: N replicas at once on an empty cache.
        scale: dict[str, Any] = {"replicas": args.replicas, "one_build_s": cold_process_s}
        for label, env in (("single_flight_s", {}), ("no_single_flight_s", {"WARMSERVE_SINGLE_FLIGHT": "0"})):
            t0 = time.perf_counter()
            procs = [
                build(args.model, args.backend, tmp / f"{label}-cache", tmp / f"{label}-i{i}", env)
                for i in range(args.replicas)
            ]
            reports = [finish(p) for p in procs]
            scale[label] = time.perf_counter() - t0
            scale[label.removesuffix("_s") + "_outcomes"] = sorted(r["outcome"] for r in reports)
        result["scale_out"] = scale

        # Refit vs rebuild, and inference latency.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "i-inproc")
        spec = ModelSpec(model=args.model)
        config = CacheConfig.load(cache_dir=tmp / "node-a")
        worker = Worker(spec, backend=args.backend, cache_config=config)
        worker.start()
        swap = worker.swap_weights(demo_weights(build_model(args.model, meta=True), seed=5), "v2")
        refit = swap.steps.get("refit", swap.steps.get("exclusive", swap.seconds))
        result["weight_update"] = {
            "refit_s": refit,
            "swap_total_s": swap.seconds,
            "rebuild_s": cold["seconds"],
            "rebuild_over_refit": cold["seconds"] / refit,
            "swap_steps": swap.steps,
        }
        runners: dict[str, Any] = {f"warmserve {args.backend}": worker.infer}
        eager = Worker(spec, backend="eager", cache_config=config)
        eager.start()
        runners["eager"] = eager.infer
        if args.backend != "inductor":
            ind = Worker(spec, backend="inductor", cache_config=config)
            ind.start()
            runners["warmserve inductor"] = ind.infer
        assert eager.model is not None
        plain = torch.compile(eager.model)
        runners["torch.compile"] = plain
        lat: dict[str, dict[str, float]] = {}
        for b in (1, 32):
            x = spec.input.example(batch=b)
            lat[str(b)] = {name: latency(fn, x) * 1e3 for name, fn in runners.items()}
        result["latency_ms"] = lat

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plots(result, out)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    r, s, w = result["time_to_ready"], result["scale_out"], result["weight_update"]
    md = [
        f"# warmserve benchmark — {result['date']}",
        "",
        f"{result['machine']}; {args.model} via {args.backend}.",
        "",
        "![time to ready](time_to_ready.png) ![scale-out](scale_out.png) ![latency](latency.png)",
        "",
        "| measure | value | ratio |",
        "|---|---|---|",
        f"| cold build | {r['cold_s']:.2f} s | 1 |",
        f"| warm start, L1 hit | {r['l1_s']:.3f} s | {r['l1_s'] / r['cold_s']:.1%} of cold, {r['l1_s'] / r['floor_s']:.1f}x floor |",
        f"| warm start, L1 hit, no eager check (`--no-verify`) | {r['l1_no_verify_s']:.3f} s |"
        f" {r['l1_no_verify_s'] / r['cold_s']:.1%} of cold, {r['l1_no_verify_s'] / r['floor_s']:.1f}x floor |",
        "| steps of the L1 warm start | " + ", ".join(f"{k} {v:.3f} s" for k, v in r["l1_steps"].items()) + " | |",
        f"| warm start, L2 (S3) hit | {r['l2_s']:.3f} s | {r['l2_s'] / r['cold_s']:.1%} of cold, {r['l2_s'] / r['floor_s']:.1f}x floor |",
        f"| floor: read blob + weights | {r['floor_s']:.3f} s | |",
        f"| refit | {w['refit_s']:.4f} s | rebuild / refit = {w['rebuild_over_refit']:.0f}x |",
        f"| one cold replica, process start to ready | {s['one_build_s']:.1f} s | |",
        f"| scale-out to {s['replicas']}, single-flight | {s['single_flight_s']:.1f} s | {s['single_flight_s'] / s['one_build_s']:.2f}x one build |",
        f"| scale-out to {s['replicas']}, no single-flight | {s['no_single_flight_s']:.1f} s | {s['no_single_flight_s'] / s['one_build_s']:.2f}x one build |",
        "",
        "| ms per call | " + " | ".join(lat["1"]) + " |",
        "|---|" + "---|" * len(lat["1"]),
        *[f"| batch {b} | " + " | ".join(f"{v:.1f}" for v in lat[b].values()) + " |" for b in lat],
    ]
    (out / "bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
