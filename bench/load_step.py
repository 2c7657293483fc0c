"""A load step against the default `warmserve run`: few clients, then many, and how the autoscaler follows.

    python bench/load_step.py                                   # empty cache: the first replica builds
    python bench/load_step.py --cache-dir /tmp/c                # run twice: the second run starts warm
    python bench/load_step.py --few 2 --many 64 --protocol grpc --run-args "--model torchvision:resnet18"

Each second: answers and failures. Each replica: when it first answered (seconds after the step) and its own start
report (outcome, phases), sampled from `/v1/status` through the ingress. The time to full capacity is the step to
the last replica's first answer. Writes bench/results/load-step-DEVICE[-TAG].{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import re
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clients(
    proc: int,
    procs: int,
    args: dict[str, Any],
    t0: float,
    out: Any,
) -> None:
    """Client process ``proc`` of ``procs``: its share of the clients, each started at its time, all stopped at
    the end; per-second answers and failures (by the wall clock, relative to ``t0``) go to ``out``."""
    import numpy as np

    from bench.common import binary_request

    x = np.random.default_rng(proc).standard_normal((1, *args["shape"]), dtype=np.float32)
    seconds = int(args["step_at"] + args["after"]) + 1
    ok, failed = [0] * seconds, [0] * seconds
    latency = [0.0] * seconds
    errors: list[str] = []
    end = t0 + args["step_at"] + args["after"]

    def client(start: float) -> None:
        time.sleep(max(0.0, start - time.time()))
        if args["protocol"] == "grpc":
            import tritonclient.grpc as tg

            g = tg.InferenceServerClient(args["grpc"], channel_args=[("grpc.use_local_subchannel_pool", 1)])
            inp = tg.InferInput(args["input"], list(x.shape), "FP32")
            inp.set_data_from_numpy(x)

            def once() -> None:
                g.infer(args["name"], [inp], client_timeout=30)

        else:
            import requests

            session = requests.Session()
            body, headers = binary_request(x)
            url = f"{args['http']}/v2/models/{args['name']}/infer"

            def once() -> None:
                session.post(url, data=body, headers=headers, timeout=30).raise_for_status()

        while (now := time.time()) < end:
            try:
                once()
                done = time.time()
                ok[min(int(done - t0), seconds - 1)] += 1
                latency[min(int(done - t0), seconds - 1)] += done - now
            except Exception as e:
                failed[min(int(time.time() - t0), seconds - 1)] += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    starts = [t0 if i < args["few"] else t0 + args["step_at"] for i in range(proc, args["many"], procs)]
    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args["step_at"] + args["after"] + 60)
    out.put({"ok": ok, "failed": failed, "latency": latency, "errors": errors})


def sample_replicas(http: str, t0: float, until: float, seen: dict[int, dict[str, Any]], misses: list[str]) -> None:
    """Every replica that answers `/v1/status`: when it first did (seconds since ``t0``) and its start report.
    A sample that fails is kept in ``misses`` (the report counts them), not dropped."""
    import requests

    session = requests.Session()
    while time.time() < until:
        try:
            s = session.get(f"{http}/v1/status", timeout=10).json()
            pid = int(s["replica_pid"])
            if pid not in seen:
                seen[pid] = {
                    "first_answer_s": round(time.time() - t0, 2),
                    "replica": s.get("replica"),
                    "start": s.get("start"),
                    "process": s.get("process"),  # wall clock: process start, the app's import, constructor
                }
        except (requests.RequestException, ValueError, KeyError) as e:
            misses.append(f"{round(time.time() - t0, 2)} s: {type(e).__name__}: {str(e)[:200]}")
        time.sleep(0.05)


LOG_LINE = re.compile(r"^[A-Z]+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")


def serve_timeline(raytmp: str, step: float) -> dict[str, Any]:
    """From Serve's own logs, in seconds after the step (wall clock ``step``): the controller's upscaling
    decisions and, per replica, when the controller started it, when its constructor began and ended, when
    the controller counted it running, and its first inference request."""
    logs = Path(raytmp) / "ray" / "session_latest" / "logs" / "serve"

    def lines(path: Path) -> Any:
        for line in path.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if m:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - step
                yield round(t, 2), m.group(2)

    upscales: list[list[Any]] = []
    replicas: dict[str, dict[str, float]] = {}
    for path in sorted(logs.glob("controller_*.log")):
        for t, text in lines(path):
            if m := re.search(r"Upscaling .* from (\d+) to (\d+) replicas", text):
                upscales.append([t, int(m.group(1)), int(m.group(2))])
            elif m := re.search(r"Starting Replica\(id='(\w+)'", text):
                replicas.setdefault(m.group(1), {})["started"] = t
            elif m := re.search(r"Replica\(id='(\w+)'.*started successfully", text):
                replicas.setdefault(m.group(1), {})["running"] = t
    for path in sorted(logs.glob("replica_*.log")):
        rid = path.stem.rsplit("_", 1)[-1]
        rep = replicas.setdefault(rid, {})
        for t, text in lines(path):
            if "Started initializing replica" in text:
                rep.setdefault("init_begun", t)
            elif "Finished initializing replica" in text:
                rep.setdefault("init_done", t)
            elif "/infer 200" in text or "ModelInfer OK" in text:
                rep.setdefault("first_request", t)
                break
    return {"upscales": upscales, "replicas": replicas}


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Load step against `{''.join(f'{k}={v} ' for k, v in r.get('env', {}).items())}warmserve run "
        f"{r['run_args']}` ({r['device']}, cache {r['cache']})",
        "",
        f"{r['few']} {r['protocol']} clients, then {r['many']} from second {r['step_at']:g}; "
        f"{r['after']:g} s after the step. Layout: {r['layout']}",
        "",
        f"- Failed requests: {r['failed_before']} before the step, {r['failed_after']} after it "
        f"({r.get('status_samples_failed', 0)} `/v1/status` samples failed).",
        f"- Replicas answering: {r['replicas_before']} before the step, {len(r['replicas'])} in all; the last "
        f"first answered {r['to_full_capacity_s']} s after the step.",
        f"- Answers per second: {r['rate_before']:.0f} before the step, {r['rate_end']:.0f} in its last seconds (up to 10).",
        "",
        "| replica pid | first answer, s after the step | start outcome | start s | phases |",
        "|---|---|---|---|---|",
    ]
    for pid, rep in sorted(r["replicas"].items(), key=lambda kv: kv[1]["first_answer_s"]):
        start = rep.get("start") or {}
        phases = ", ".join(f"{k} {v:.2f}" for k, v in (start.get("phases") or {}).items() if v is not None)
        lines.append(
            f"| {pid} | {rep['first_answer_s'] - r['step_at']:.1f} | {start.get('outcome')} | "
            f"{start.get('total_seconds')} | {phases} |"
        )
    timeline = r.get("serve_timeline") or {}
    if timeline.get("replicas"):
        ups = "; ".join(f"{a} -> {b} at {t:.1f} s" for t, a, b in timeline["upscales"]) or "none"
        lines += [
            "",
            f"Serve's logs, seconds after the step. Upscaling decisions: {ups}.",
            "",
            "Its process's start, and its import of warmserve's app, are the replica's own (`/v1/status`): a "
            "process older than Serve's start of it was an idle Ray worker.",
            "",
            "| replica | controller starts it | process started | app import begins | app imported "
            "| constructor begins | constructor ends | counted running | first request |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        own = {rep.get("replica"): rep.get("process") or {} for rep in r["replicas"].values()}
        step = r.get("step_wall")
        cells = ("started", "process_started", "app_import_began", "app_imported", "init_begun", "init_done")
        for rid, rep in sorted(timeline["replicas"].items(), key=lambda kv: kv[1].get("started", -1e9)):
            times = dict(rep)
            for key, wall in own.get(rid, {}).items():
                if key in cells and step is not None and wall is not None:  # Serve's log has the constructor
                    times[key] = wall - step
            row = (*cells, "running", "first_request")
            lines.append(f"| {rid} | " + " | ".join(f"{times[c]:.1f}" if c in times else "" for c in row) + " |")
    lines += ["", "| second | answers | failures | mean latency ms |", "|---|---|---|---|"]
    for s, (ok, failed, lat) in enumerate(zip(r["ok"], r["failed"], r["latency_ms"], strict=True)):
        lines.append(f"| {s} | {ok} | {failed} | {lat:.1f} |")
    lines += ["", f"Host: {r['host']}", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    whole = len(r["ok"]) - 1  # the last second is cut short by the end of the load
    ax.plot(range(whole), r["ok"][:whole], label="answers/s")
    ax.plot(range(whole), r["failed"][:whole], label="failures/s", color="red")
    ax.axvline(r["step_at"], color="grey", linestyle="--", label=f"{r['few']} -> {r['many']} clients")
    arrivals = sorted(max(0.0, rep["first_answer_s"]) for rep in r["replicas"].values())
    twin = ax.twinx()
    twin.step([0, *arrivals, whole], [0, *range(1, len(arrivals) + 1), len(arrivals)], where="post", color="green")
    twin.set_ylabel("replicas answering", color="green")
    ax.set_xlabel("seconds")
    ax.set_ylabel("per second")
    ax.set_title(f"load step over {r['protocol']}, {r['device']}, cache {r['cache']}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def replot(path: str) -> None:
    """The PNG again from a result's JSON: `python -c "from bench.load_step import replot; replot('X.json')"`."""
    plot(json.loads(Path(path).read_text()), Path(path).with_suffix(".png"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--few", type=int, default=2, help="clients before the step (default 2)")
    ap.add_argument("--many", type=int, default=0, help="clients after it (default: 64 on a GPU, 8 on a CPU)")
    ap.add_argument("--step-at", type=float, default=15.0, help="seconds of the few clients (default 15)")
    ap.add_argument("--after", type=float, default=60.0, help="seconds of load after the step (default 60)")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--run-args", default="", help="options for `warmserve run` (default: none)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for `warmserve run` (repeatable)")
    ap.add_argument("--cache-dir", help="engine cache (default: a new temp dir, so the first replica builds)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import requests
    import torch

    from bench.common import cache_named, host_facts, ready_line, warmserve_run, write_results

    device = "cuda" if torch.cuda.is_available() else "cpu"
    many = args.many or (64 if device == "cuda" else 8)
    work = Path(tempfile.mkdtemp(prefix="load-step-"))
    cache = Path(args.cache_dir or work / "cache")
    state = "warm" if cache.is_dir() and any(cache.iterdir()) else "empty"
    home = work / "home"
    home.mkdir()
    raytmp = tempfile.mkdtemp(prefix="wsl", dir="/tmp")  # short: Ray's socket paths live under it
    run_args = ["--json", "--cache-dir", str(cache), *shlex.split(args.run_args)]
    env = dict(item.split("=", 1) for item in args.env)
    with warmserve_run(run_args, home, timeout=1800, env={**env, "RAY_TMPDIR": raytmp}) as service:
        ready = ready_line(service)
        layout = next((line for line in service.log.read_text().splitlines() if "ingress" in line), "")
        http = ready["ready"]
        name = str(ready.get("model", "resnet18")).rpartition(":")[2]
        meta = requests.get(f"{http}/v2/models/{name}", timeout=10).json()
        spec = {
            "shape": meta["inputs"][0]["shape"][1:],
            "input": meta["inputs"][0]["name"],
            "name": name,
            "http": http,
            "grpc": f"{http.removeprefix('http://').rsplit(':', 1)[0]}:{ready['grpc_port']}",
            "protocol": args.protocol,
            "few": args.few,
            "many": many,
            "step_at": args.step_at,
            "after": args.after,
        }
        t0 = time.time() + 2  # the client processes start first
        queue: Any = mp.get_context("spawn").Queue()
        procs = [
            mp.get_context("spawn").Process(target=clients, args=(p, args.client_procs, spec, t0, queue))
            for p in range(args.client_procs)
        ]
        for p in procs:
            p.start()
        seen: dict[int, dict[str, Any]] = {}
        misses: list[str] = []
        sampler = threading.Thread(
            target=sample_replicas, args=(http, t0, t0 + args.step_at + args.after, seen, misses), daemon=True
        )
        sampler.start()
        parts = [queue.get(timeout=args.step_at + args.after + 120) for _ in procs]
        for p in procs:
            p.join(30)
        sampler.join(30)
    seconds = len(parts[0]["ok"])
    ok = [sum(p["ok"][s] for p in parts) for s in range(seconds)]
    failed = [sum(p["failed"][s] for p in parts) for s in range(seconds)]
    lat = [1000 * sum(p["latency"][s] for p in parts) / ok[s] if ok[s] else 0.0 for s in range(seconds)]
    step = int(args.step_at)
    tail = max(1, min(10, int(args.after) - 1))  # the whole seconds at the end of the load, at most 10
    before = [rep for rep in seen.values() if rep["first_answer_s"] < args.step_at]
    last = max((rep["first_answer_s"] for rep in seen.values()), default=args.step_at)
    results = {
        "device": device,
        "run_args": args.run_args,
        "env": env,
        "layout": layout.split("warmserve: ", 1)[-1],
        "cache": state,
        "protocol": args.protocol,
        "few": args.few,
        "many": many,
        "step_at": args.step_at,
        "after": args.after,
        "ready_s": service.ready_s,
        "exit_code": service.exit_code,
        "ok": ok,
        "failed": failed,
        "latency_ms": lat,
        "failed_before": sum(failed[:step]),
        "failed_after": sum(failed[step:]),
        "errors": [e for p in parts for e in p["errors"]][:10],
        "status_samples_failed": len(misses),
        "status_sample_errors": misses[:5],
        "replicas_before": len(before),
        "replicas": {str(pid): rep for pid, rep in seen.items()},
        "to_full_capacity_s": round(max(0.0, last - args.step_at), 1),
        "rate_before": sum(ok[2:step]) / max(1, step - 2),
        "rate_end": sum(ok[-1 - tail : -1]) / tail,
        "host": host_facts(),
        "step_wall": t0 + args.step_at,
        "serve_timeline": serve_timeline(raytmp, t0 + args.step_at),
    }
    results = cache_named(results, cache)
    stem = f"load-step-{device}" + (f"-{args.tag}" if args.tag else "")
    out = ROOT / args.out
    write_results(out, stem, results, markdown(results))
    plot(results, out / f"{stem}.png")
    print(markdown(results))
    return 0 if results["failed_before"] + results["failed_after"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
