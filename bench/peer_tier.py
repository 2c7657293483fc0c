"""The peer tier on a local two-node Ray cluster: how a replica on node B gets its engine (built, from node A's
directory through Ray, from its own directory, from S3), a scale-out of 4 replicas over 2 nodes with no store,
and how soon a build is taken over when its builder is SIGKILLed.

python bench/peer_tier.py [--model torchvision:resnet18] [--backend aoti] [--device cpu] [--out bench/results]

Each start is one replica on node B (Ray resources pin it), timed from the deploy call to the application
RUNNING ("ready"), with the replica's own report beside it: its whole start, and the cache step alone (the
lookup and fetch, or the build). Both nodes run on this machine, each with its own cache directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.cluster import RayCluster  # noqa: E402
from tests.servers import seaweedfs  # noqa: E402


def start_on(
    cluster: RayCluster, args: dict[str, Any], node: str, replicas: int = 1, gpus: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """Deploy ``replicas`` replicas on ``node`` (any, if "") with a ``gpus`` share each, and wait until they
    serve: seconds, and their start reports."""
    options: dict[str, Any] = {"num_cpus": 0.5, "num_gpus": gpus}
    deployment = {
        "num_replicas": replicas,
        "ray_actor_options": {**options, "resources": {node: 1}} if node else options,
        **extra,
    }
    t0 = time.monotonic()
    cluster.deploy(cluster.config(args, deployment), timeout=600)
    cluster.wait_running("warmserve", timeout=600, replicas=replicas)
    ready = time.monotonic() - t0
    reports = [s["start"] for s in cluster.replica_statuses(replicas, timeout=120).values()]
    cluster.delete_all()
    return {"ready_s": round(ready, 2), "reports": reports}


def row(name: str, got: dict[str, Any]) -> dict[str, Any]:
    report = got["reports"][0]
    return {
        "case": name,
        "outcome": report["outcome"],
        "ready_s": got["ready_s"],
        "replica_start_s": round(report["total_seconds"], 2),
        "cache_s": round(report["steps"].get("cache", 0.0), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="peer-tier-cpu-resnet18")
    ap.add_argument("--no-s3", action="store_true", help="leave out the S3 case (no SeaweedFS on this machine)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPU share of each replica (both nodes see the GPUs)")
    ap.add_argument("--plot", type=Path, metavar="RESULT", help="only draw the plot of a result file, next to it")
    opts = ap.parse_args()
    if opts.plot:
        done = json.loads(opts.plot.read_text())
        opts.model, opts.backend, opts.device = done["model"], done["backend"], done["device"]
        plot(done["starts"], opts.plot.with_suffix(".png"), opts)
        return 0
    gpus = opts.num_gpus
    base = {"model": opts.model, "backend": opts.backend, "device": opts.device, "batch": "1:8"}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wspeer-") as tmp:
        work = Path(tmp)
        with seaweedfs(work / "s3") if not opts.no_s3 else contextlib.nullcontext() as s3:
            if s3 is not None:
                s3.make_bucket("warmserve")
            key = {"WARMSERVE_SIGNING_KEY": "bench-key"}
            cluster = RayCluster(work / "ray", env=key)
            cluster.start(num_cpus=2)
            try:
                cluster.add_node("node2", num_cpus=2)
                l1 = {n: cluster.workdir / n / "cache" for n in ("node1", "node2")}

                # node B builds; node A builds (the entry node B's next replica fetches); node B from node A;
                # node B from its own directory; node B from S3 (peer tier off, its directory emptied).
                rows.append(row("built", start_on(cluster, base, "node2", gpus=gpus)))
                shutil.rmtree(l1["node2"] / "entries")
                rows.append(row("built on node A", start_on(cluster, base, "node1", gpus=gpus)))
                rows.append(row("peer-hit", start_on(cluster, base, "node2", gpus=gpus)))
                rows.append(row("L1 hit", start_on(cluster, base, "node2", gpus=gpus)))
                if s3 is not None:
                    s3_args = {
                        **base,
                        "shared_cache": "s3://warmserve/peer-bench",
                        "storage_options": s3.storage_options(),
                        "peer_cache": False,
                    }
                    shutil.rmtree(l1["node1"] / "entries")
                    start_on(cluster, s3_args, "node1", gpus=gpus)  # builds again, and publishes to S3
                    shutil.rmtree(l1["node2"] / "entries")
                    rows.append(row("S3 hit", start_on(cluster, s3_args, "node2", gpus=gpus)))

                # Scale-out with no store: another key, empty directories, 4 replicas over 2 nodes.
                for d in l1.values():
                    shutil.rmtree(d / "entries", ignore_errors=True)
                scale_args = {**base, "batch": "1:4"}
                spread = {"max_replicas_per_node": 2}  # 4 replicas, 2 per node
                scale = start_on(cluster, scale_args, "", replicas=4, gpus=gpus, **spread)
                scale_outcomes = sorted(r["outcome"] for r in scale["reports"])

                # The builder SIGKILLed mid-build: seconds until the index hands the build to another replica
                # (the index names the builder: its cache server and pid).
                os.environ.update(cluster.auth_env)  # read by Ray when it is imported
                import ray

                from warmserve.deployments.peers import NAMESPACE, index

                ray.init(address=f"127.0.0.1:{cluster.gcs_port}", namespace=NAMESPACE, log_to_driver=False)
                kill_args = {**base, "batch": "1:2"}
                spread_one = {
                    "num_replicas": 2,
                    "max_replicas_per_node": 1,
                    "ray_actor_options": {"num_cpus": 0.5, "num_gpus": gpus},
                }
                cluster.deploy(cluster.config(kill_args, spread_one), wait=False)
                building: dict[str, str] = {}
                deadline = time.monotonic() + 600
                while not building and time.monotonic() < deadline:
                    building = ray.get(index().building.remote())
                    time.sleep(0.05)
                handed = None
                if building:
                    time.sleep(2.0)  # well into the build
                    ((key_id, first),) = building.items()
                    os.kill(int(first.rpartition(":")[2]), signal.SIGKILL)
                    killed = time.monotonic()
                    while handed is None and time.monotonic() - killed < 120:
                        if ray.get(index().building.remote()).get(key_id) not in (None, first):
                            handed = round(time.monotonic() - killed, 3)
                        time.sleep(0.02)
                ray.shutdown()
                cluster.wait_running("warmserve", timeout=600, replicas=2)
                kill_outcomes = sorted(s["start"]["outcome"] for s in cluster.replica_statuses(2).values())
                cluster.delete_all()
            finally:
                cluster.stop()

    by = {r["case"]: r for r in rows}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": opts.model,
        "backend": opts.backend,
        "device": opts.device,
        "starts": rows,
        "peer_vs_l1_ready": round(by["peer-hit"]["ready_s"] / by["L1 hit"]["ready_s"], 3),
        "peer_vs_l1_cache": round(by["peer-hit"]["cache_s"] / max(by["L1 hit"]["cache_s"], 1e-6), 2),
        "peer_cache_vs_build_cache": round(by["peer-hit"]["cache_s"] / by["built"]["cache_s"], 4),
        "scale_out_4_over_2_nodes": {"outcomes": scale_outcomes, "ready_s": scale["ready_s"]},
        "builder_killed": {"handed_over_s": handed, "outcomes": kill_outcomes},
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"{opts.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| case | outcome | ready (deploy → RUNNING) s | replica start s | cache step s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['outcome']} | {r['ready_s']} | {r['replica_start_s']} | {r['cache_s']} |")
    print(json.dumps({k: v for k, v in result.items() if k not in ("starts", "machine")}))
    try:
        plot(rows, opts.out / f"{opts.name}.png", opts)
    except ImportError:
        print("no matplotlib here: no plot (python bench/peer_tier.py --plot RESULT.json draws it elsewhere)")
    return 0


def plot(rows: list[dict[str, Any]], out: Path, opts: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["case"] != "built on node A"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    names = [r["case"] for r in shown]
    ax.barh(names, [r["ready_s"] for r in shown], color="#c6dbef", label="deploy → RUNNING")
    ax.barh(names, [r["replica_start_s"] for r in shown], color="#6baed6", label="the replica's own start")
    ax.barh(names, [r["cache_s"] for r in shown], color="#08519c", label="cache step (fetch or build)")
    for i, r in enumerate(shown):
        ax.text(r["ready_s"], i, f" {r['ready_s']:.1f}s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"A replica on node B: {opts.model} ({opts.backend}, {opts.device})", fontsize=10)
    fig.legend(fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
