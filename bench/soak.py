"""A soak: steady inference load on a real local Ray cluster, a weight rollout every few seconds, and the
replicas' memory sampled throughout. The goal: no failed request, RSS and GPU memory flat.

    python bench/soak.py [--minutes 10] [--rollout-every 30] [--clients 4] [--device cpu] [--out bench/results]

Two replicas of the e2e tests' tiny model (or ``--model``, ``--input-shape``: the tiny model's weights weigh
a few KB, too little for a leaked copy of them to show in RSS) start on ``v1``. Every ``--rollout-every`` seconds
`warmserve rollout`, run as an operator runs it, moves them to the next of ``--versions`` weight files,
cycling: file ``v<i>.safetensors`` always goes out as label ``v<i>`` (a label names one content, so a label
comes back only with its own file). Clients send binary OIP requests back to back; every answer must be a
200 that carries a version that was live while the request was in flight, with that version's outputs
(eager's, computed here). The replicas', the Serve controller's and the proxy's RSS (VmRSS), threads, open
files and memory mappings, and with nvidia-smi each replica's GPU memory, are sampled every
``--sample-every`` seconds and after every rollout; growth is measured from the sample after the
``--warmup-rollouts``-th rollout, once load and the first swaps have allocated what they keep.
tests/e2e/test_soak.py runs the same loop, shortened, in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.procs import MEASURES, Sampler, growth, serve_actors  # noqa: E402
from tests.e2e.cluster import RayCluster  # noqa: E402
from tests.e2e.helpers import TINY, deploy_versions, rollout  # noqa: E402

logger = logging.getLogger(__name__)


class Load(common.Load):
    """The load, each answer also checked against ``want`` (version label -> expected outputs): an answer
    from a version never rolled out, or with another version's outputs, is a failure."""

    def __init__(self, url: str, x: np.ndarray, clients: int, want: dict[str, np.ndarray]) -> None:
        super().__init__(url, x, clients)
        self.want = want

    def answer(self, r: requests.Response) -> str:
        version = super().answer(r)
        n = int(r.headers["Inference-Header-Content-Length"])
        out = json.loads(r.content[:n])["outputs"][0]
        got = np.frombuffer(r.content[n : n + out["parameters"]["binary_data_size"]], dtype=np.float32)
        want = self.want.get(version)
        if want is None:
            raise RuntimeError(f"answered as version {version!r}, which names none of the weights rolled out")
        # The replica's own check against eager (error relative to the largest output): far tighter than
        # the gap between two versions' answers (checked in `soak`), loose enough for a compiled engine's
        # reordered sums and a GPU's TF32 convolutions.
        if float(np.abs(got.reshape(out["shape"]) - want).max()) > 1e-3 * float(np.abs(want).max()):
            raise RuntimeError(f"answered as {version} with other outputs than {version}'s weights give")
        return version


@dataclass
class Rollout:
    label: str
    begin: float
    end: float
    ok: bool
    error: str = ""


def not_live(records: list[tuple[float, float, str]], rollouts: list[Rollout], first: str) -> list[str]:
    """Answers whose version was not live while they were in flight. A rollout's label may serve from the
    moment it began until the next rollout that confirmed another label ended (Serve swaps replicas one by
    one; a refused rollout is undone the same way); ``first``, the deployed label, until the first confirmed
    rollout ended."""
    windows = [(first, -math.inf, next((r.end for r in rollouts if r.ok), math.inf))]
    for k, r in enumerate(rollouts):
        windows.append((r.label, r.begin, next((later.end for later in rollouts[k + 1 :] if later.ok), math.inf)))
    bad = []
    for start, end, version in records:
        if not any(label == version and begin <= end and start <= until for label, begin, until in windows):
            bad.append(f"{version} answered a request in flight {start:.1f}-{end:.1f}s, when it was not live")
    return bad


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1e3 if values else float("nan")


def soak(
    cluster: RayCluster,
    workdir: Path,
    *,
    seconds: float,
    rollout_every: float,
    clients: int = 4,
    versions: int = 3,
    warmup_rollouts: int = 2,
    sample_every: float = 5.0,
    replicas: int = 2,
    app: dict[str, Any] | None = None,
    actor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Deploy ``replicas`` replicas on ``cluster`` serving v1, then ``seconds`` of load with a rollout every
    ``rollout_every`` seconds; the report (requests, failures, rollouts, memory samples and growth)."""
    if versions < 2:
        raise ValueError("versions must be at least 2: a rollout needs weights other than those served")
    settings = {**TINY, **(app or {})}
    shape = [int(d) for d in str(settings["input_shape"]).split(",")]
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    deployment: dict[str, Any] = {"num_replicas": replicas}
    if actor:
        deployment["ray_actor_options"] = actor
    t = time.monotonic()
    _, want, statuses = deploy_versions(
        cluster, workdir, tuple(range(1, versions + 1)), x, app=app, deployment=deployment, timeout=900
    )
    deploy_s = time.monotonic() - t
    gap = min(float(np.abs(a - b).max()) for a in want.values() for b in want.values() if a is not b)
    if gap < 1e-2:
        raise ValueError(f"two versions answer within {gap:g} of each other: the answers cannot tell them apart")
    pids = {f"replica {pid}": pid for pid in statuses}
    pids.update(serve_actors(cluster))
    logger.info("%d replicas ready in %.1fs: %s", replicas, deploy_s, sorted(pids))
    name = str(settings["model"]).rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    url = f"{cluster.http}/v2/models/{name}/infer"

    rollouts: list[Rollout] = []
    t0 = time.monotonic()
    sampler = Sampler(pids, t0)
    sampler.sample(0)
    done = 0
    base: int | None = None
    with Load(url, x, clients, want) as load:
        end = t0 + seconds
        next_rollout, next_sample = t0 + rollout_every, t0 + sample_every
        while (now := time.monotonic()) < end:
            if now >= next_rollout:
                label = f"v{(len(rollouts) + 1) % versions + 1}"  # v2, v3, ..., v1, v2, ...
                begin = time.monotonic()
                p = rollout(cluster, workdir / f"{label}.safetensors", label)
                r = Rollout(label, begin - t0, time.monotonic() - t0, p.returncode == 0, p.stderr[-500:].strip())
                rollouts.append(r)
                done += r.ok
                logger.info("rollout %s %s in %.1fs", label, "done" if r.ok else "REFUSED", r.end - r.begin)
                sampler.sample(done)
                if base is None and done == warmup_rollouts:
                    base = len(sampler.samples) - 1
                # A rollout slower than the period starts the next at once; it never starts two at a time.
                next_rollout = max(next_rollout + rollout_every, time.monotonic())
                next_sample = time.monotonic() + sample_every
                continue
            if now >= next_sample:
                sampler.sample(done)
                next_sample = max(next_sample + sample_every, now)
            time.sleep(max(0.0, min(next_rollout, next_sample, end) - time.monotonic()))
        sampler.sample(done)
    after = cluster.replica_statuses(replicas)

    starts = [(a - t0, a + s - t0, v) for a, s, v in load.records]
    failures = [(round(a - t0, 2), why) for a, why in load.failures]
    stale = not_live(starts, rollouts, "v1")
    latencies = [b - a for a, b, _ in starts]
    base = base if base is not None else 0
    seconds_per = [r.end - r.begin for r in rollouts]
    return {
        "seconds": seconds,
        "rollout_every": rollout_every,
        "clients": clients,
        "replicas": replicas,
        "versions": versions,
        "warmup_rollouts": warmup_rollouts,
        "deploy_s": round(deploy_s, 1),
        "replica_starts": {str(pid): s["start"] for pid, s in statuses.items()},
        "requests": len(starts) + len(failures),
        "failed": len(failures),
        "failure_samples": failures[:5],
        "not_live": len(stale),
        "not_live_samples": stale[:5],
        "requests_per_s": len(starts) / seconds,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
        "max_ms": max(latencies) * 1e3 if latencies else float("nan"),
        "answered_by": {v: sum(1 for *_, got in starts if got == v) for v in sorted(want)},
        "rollouts": {
            "done": done,
            "refused": len(rollouts) - done,
            "mean_s": float(np.mean(seconds_per)) if seconds_per else None,
            "max_s": max(seconds_per, default=None),
            "each": [vars(r) | {"begin": round(r.begin, 2), "end": round(r.end, 2)} for r in rollouts],
        },
        "replicas_replaced": sorted(set(after) ^ set(statuses)),
        "unexpected_compiles": {str(pid): s.get("unexpected_compiles") for pid, s in after.items()},
        "baseline_sample": base,
        **{key: growth(sampler.samples, key, base) for key in (*MEASURES, "gpu_mib")},
        "samples": sampler.samples,
    }


def markdown(r: dict[str, Any]) -> str:
    ro = r["rollouts"]
    lines = [
        f"# warmserve soak — {r['date']}",
        "",
        f"{r['machine']}; {r['model']} via {r['backend']} on {r['device']}; {r['replicas']} replicas, "
        f"{r['clients']} clients; {r['seconds'] / 60:.1f} min with a rollout every {r['rollout_every']:.0f} s "
        f"across {r['versions']} weight files.",
        "",
        "| requests | failed | answered by a version not live | requests/s | p50 ms | p99 ms | max ms |"
        " rollouts done | refused | rollout s (mean / max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['requests']} | {r['failed']} | {r['not_live']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} |"
        f" {r['p99_ms']:.1f} | {r['max_ms']:.0f} | {ro['done']} | {ro['refused']} |"
        f" {ro['mean_s'] or float('nan'):.1f} / {ro['max_s'] or float('nan'):.1f} |",
        "",
        f"Memory from the sample after rollout {r['warmup_rollouts']} (warm-up) to the last; MiB.",
        "",
        "| process | memory | first | after warm-up | end | max | growth | growth per rollout (KiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, what, to_mib in (("rss_kib", "RSS", 1 / 1024), ("gpu_mib", "GPU", 1.0)):
        for name, g in r[key].items():
            if "gone_at_sample" in g or "unseen" in g:
                why = "not seen by nvidia-smi" if "unseen" in g else f"gone at sample {g['gone_at_sample']}"
                lines.append(f"| {name} | {what} | {why} | | | | | |")
                continue
            per = g["growth_per_rollout"]
            lines.append(
                f"| {name} | {what} | {g['first'] * to_mib:.1f} | {g['start'] * to_mib:.1f} | {g['end'] * to_mib:.1f} |"
                f" {g['max'] * to_mib:.1f} | {g['growth'] * to_mib:+.1f} |"
                f" {'' if per is None else f'{per * to_mib * 1024:+.0f}'} |"
            )
    lines += [
        "",
        "Counts: first / after warm-up / end.",
        "",
        "| process | threads | open fds | memory mappings |",
        "|---|---|---|---|",
    ]
    for name in r["threads"]:
        cells = []
        for key in ("threads", "fds", "maps"):
            g = r[key][name]
            cells.append("gone" if "gone_at_sample" in g else f"{g['first']} / {g['start']} / {g['end']}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if r["failure_samples"] or r["not_live_samples"] or r["replicas_replaced"]:
        lines += ["", "Problems:", ""]
        lines += [f"- failed at {t:.1f} s: {why}" for t, why in r["failure_samples"]]
        lines += [f"- {why}" for why in r["not_live_samples"]]
        if r["replicas_replaced"]:
            lines.append(f"- replicas replaced during the run (pids): {r['replicas_replaced']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rollout-every", type=float, default=30.0, metavar="S")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--versions", type=int, default=3, help="weight files the rollouts cycle through")
    ap.add_argument("--warmup-rollouts", type=int, default=2, help="rollouts before the memory baseline")
    ap.add_argument("--sample-every", type=float, default=5.0, metavar="S")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--model", default=TINY["model"])
    ap.add_argument("--input-shape", default=TINY["input_shape"])
    ap.add_argument("--backend", default=TINY["backend"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--replica-cpus", type=float, default=0.5, help="num_cpus per replica")
    ap.add_argument("--cache-dir", help="engine cache to start from and keep (default: the replicas' own)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="added to the result files' names")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        result["machine"] += f", {torch.cuda.get_device_name()}"
    actor: dict[str, Any] = {"num_cpus": args.replica_cpus}
    if args.device.startswith("cuda"):
        actor["num_gpus"] = math.floor(10_000 / args.replicas) / 10_000  # all fit in Ray's steps
    app = {"model": args.model, "input_shape": args.input_shape, "backend": args.backend, "device": args.device}
    if args.cache_dir:
        app["cache_dir"] = args.cache_dir
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RayCluster(Path(tmp) / "ray").start(num_cpus=max(os.cpu_count() or 2, 4))
        try:
            result |= soak(
                cluster,
                Path(tmp),
                seconds=args.minutes * 60,
                rollout_every=args.rollout_every,
                clients=args.clients,
                versions=args.versions,
                warmup_rollouts=args.warmup_rollouts,
                sample_every=args.sample_every,
                replicas=args.replicas,
                app=app,
                actor=actor,
            )
        finally:
            cluster.stop()
        # The weights files live in this temp dir, a path of this machine's: written WEIGHTS in the results.
        result = json.loads(json.dumps(result).replace(json.dumps(tmp)[1:-1] + "/", "WEIGHTS/"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{args.device.split(':')[0]}" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
