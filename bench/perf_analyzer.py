"""Triton's own perf_analyzer against `warmserve run`, beside bench/'s load generator at the same points.

python bench/perf_analyzer.py                      # the default `warmserve run` (resnet18), HTTP and gRPC
python bench/perf_analyzer.py --concurrency 1,8,64 --run-args "--replicas 4"

One `warmserve run` in a fresh HOME (its engine cache under --cache-dir, so a second run is a warm start). For
each protocol and concurrency: perf_analyzer (PyPI ``perf-analyzer``; it needs glibc >= 2.38) at batch 1, and
bench/serve_throughput.py's own closed-loop load of the same one-row FP32 request, each for --seconds. Then, at
--compare-clients, one-row and 32-row requests over HTTP and gRPC (is gRPC as fast as HTTP?), and at one client the
end-to-end latency next to the engine's own at batch 1 (the same engine, a cache hit, called in this process).
With --watch, HAProxy's server states and the host's memory during the run; with --logs, what Serve and Ray
logged (without answered requests) in one archive. Writes bench/results/perf-analyzer-<device>[-tag].{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib(pid: int) -> int:
    """A process's resident set (MiB); 0 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss_mib(pid: int) -> int:
    """The resident sets of a process and all its descendants added up (MiB). pip's `perf_analyzer` is a Python
    script that runs the real binary as its child: the script's own resident set is 15 MiB whatever the binary's."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss_mib(p)
        todo += parents.get(p, [])
    return total


def _exit_on_hangup_or_term() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP raise SystemExit (so `finally` blocks run) in the main thread; the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def leave(sig: int, frame: Any) -> None:
        raise SystemExit(128 + sig)

    return {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}


def available_mib() -> int:
    """The host's available memory (MiB)."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["MemAvailable"].split()[0]) >> 10


def gib(text: str) -> float:
    """A positive number of GiB, for --pa-memory."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text!r}")
    return value


def perf_analyzer(
    binary: str,
    model: str,
    target: str,
    protocol: str,
    clients: int,
    seconds: float,
    timeout: float = 600,
    memory_mib: int | None = None,
) -> dict[str, Any]:
    """One perf_analyzer run at ``clients`` concurrent requests of batch 1: infer/s and latencies (ms), and its
    own peak resident set. perf_analyzer 2.60 grows by about one request's input for every request it sends
    (602 KB for resnet18's FP32 row: 129 GB in 55 s at 64 clients on an H100), until the kernel and Ray's memory
    monitor kill the server's processes; a run past ``memory_mib`` is stopped and reported instead."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        cmd = [
            binary,
            "-m",
            model,
            "-u",
            target,
            "-i",
            protocol,
            "-b",
            "1",
            "--concurrency-range",
            f"{clients}:{clients}",
            "--measurement-interval",
            str(int(seconds * 1000)),
            "-f",
            str(report),
        ]
        limit = memory_mib if memory_mib is not None else available_mib() // 2
        log = Path(tmp) / "pa.log"
        t0, peak, stopped = time.monotonic(), 0, ""
        with log.open("w") as out:
            # A session of its own: stopping it stops the binary too, not only pip's script in front of it. Out of
            # this script's process group, a SIGTERM or SIGHUP meant for the group no longer reaches it: while it
            # runs, those end this script through the `finally` below, which stops it.
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            previous = _exit_on_hangup_or_term()
            try:
                while p.poll() is None:
                    peak = max(peak, tree_rss_mib(p.pid))
                    if peak > limit:
                        stopped = f"(stopped: the binary and its script held {peak} MiB, past {limit} MiB)"
                    elif time.monotonic() - t0 > timeout:
                        stopped = f"(stopped after {timeout:.0f} s)"
                    if stopped:
                        break
                    time.sleep(0.25)
            finally:  # stopped, or this script interrupted: nothing of it outlives the point
                if p.poll() is None:  # (once reaped, its id could be another process's)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        wall = time.monotonic() - t0
        if stopped or p.returncode != 0 or not report.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-6:]
            output = [*tail, stopped] if stopped else tail
            return {"ok": False, "exit_code": p.returncode, "output": output, "wall_s": wall, "peak_rss_mib": peak}
        (row,) = list(csv.DictReader(io.StringIO(report.read_text())))
    return {
        "ok": True,
        "peak_rss_mib": peak,
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
        "wall_s": wall,
        "command": shlex.join([Path(binary).name, *cmd[1:-2]]),
    }


def memory_facts() -> dict[str, Any]:
    """The host's available memory and the largest resident sets among Ray's worker processes (MiB)."""
    rss: list[tuple[int, str]] = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith("ray::") or "haproxy" in title:
                rss.append((rss_mib(int(proc.name)), title[:40]))
        except (OSError, ValueError, IndexError):
            continue
    rss.sort(reverse=True)
    return {
        "available_mib": available_mib(),
        "ray_rss_mib": sum(r for r, _ in rss),
        "largest": [f"{name} {r}" for r, name in rss[:3]],
    }


def keep_logs(raytmp: str, archive: Path, cache_dir: Path) -> None:
    """Serve's logs of the run without the lines of answered requests, and what Ray's raylet, GCS and workers
    said about processes that died or memory, in one archive; this machine's paths (Ray's temp dir, the engine
    cache, the checkout, Python's packages) are written RAYTMP, CACHE, . and SITE."""
    import site
    import tarfile

    paths = [(raytmp, "RAYTMP"), (str(cache_dir.absolute()), "CACHE"), (str(ROOT), ".")]
    paths += [(d, "SITE") for d in [*site.getsitepackages(), *sys.path] if d.startswith("/") and "-packages" in d]
    paths += [(d, "SITE") for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d.startswith("/")]

    def scrub(line: str) -> str:
        for path, name in sorted(paths, key=lambda p: -len(p[0])):
            line = line.replace(path, name)
        return line

    logs = Path(raytmp) / "ray" / "session_latest" / "logs"
    answered = ("CALL warmserve OK", " 200 ")
    telling = ("memory", "kill", "oom", "died", "exit", "sigsegv", "signal", "fatal", "unexpected")
    with tarfile.open(archive, "w:gz") as tar:

        def add(name: str, lines: list[str]) -> None:
            data = "\n".join(scrub(x) for x in lines[-2000:]).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for path in sorted(logs.glob("serve/*.log")):
            add(
                f"serve/{path.name}",
                [x for x in path.read_text(errors="replace").splitlines() if not any(a in x for a in answered)],
            )
        for path in [*logs.glob("raylet*.out"), *logs.glob("gcs_server*.out"), *logs.glob("worker-*.err")]:
            lines = path.read_text(errors="replace").splitlines()
            add(
                f"ray/{path.name}", [x for x in lines if "state-dump" not in x and any(w in x.lower() for w in telling)]
            )


def engine_ms(model: str, cache_dir: Path, device: str, batch: int = 1, calls: int = 300) -> dict[str, Any]:
    """The served engine (a cache hit) called in this process at ``batch``: median and p99 ms per call, host in
    and host out, as a replica's call is."""
    from warmserve.cache import CacheConfig
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.worker import Worker

    spec = ModelSpec.from_mapping({"model": model})
    worker = Worker(spec, backend="auto", device=device, cache_config=CacheConfig.load(cache_dir=cache_dir))
    report = worker.start()
    x = spec.input.example(batch=batch)
    for _ in range(20):
        worker.infer(x)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        worker.infer(x)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * len(times)) - 1], "start": report.outcome}


def main() -> int:
    from bench.common import cache_named, host_facts, ready_line, warmserve_run, write_results
    from bench.serve_throughput import load, requests_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,64", help="perf_analyzer's and bench's points")
    ap.add_argument("--compare-clients", default="1,64", help="clients of the HTTP-against-gRPC comparison")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point (perf_analyzer's window)")
    ap.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)))
    ap.add_argument("--run-args", default="", help="options for `warmserve run` (default: none)")
    ap.add_argument("--cache-dir", help="engine cache (default: a temp dir, so the first run builds)")
    ap.add_argument("--perf-analyzer", default=shutil.which("perf_analyzer") or "perf_analyzer")
    ap.add_argument("--protocols", default="http,grpc", help="perf_analyzer's protocols ('' for none)")
    ap.add_argument("--workloads", default="b1,grpc1,rows32,grpc32", help="of the HTTP-against-gRPC comparison")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for `warmserve run`")
    ap.add_argument("--pa-timeout", type=float, default=600, help="seconds before a perf_analyzer run is stopped")
    ap.add_argument(
        "--pa-memory",
        type=gib,
        help="GiB of memory (the binary's and its script's) at which a perf_analyzer run is stopped (default: half "
        "the memory available at the start of each run; it keeps about one input per request sent)",
    )
    ap.add_argument("--watch", action="store_true", help="record HAProxy's server states and the host's memory")
    ap.add_argument("--logs", help="after the run, keep what Serve and Ray logged (not answered requests) in this .tgz")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="warmserve-pa-"))
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    home = work / "home"
    home.mkdir()
    run_args = ["--json", "--cache-dir", str(cache_dir), *shlex.split(args.run_args)]
    results: dict[str, Any] = {"device": device, "run_args": run_args[3:], "points": [], "compare": []}
    env = dict(e.split("=", 1) for e in args.env)
    results["env"] = env
    results["host"] = host_facts()
    stem = f"perf-analyzer-{device}" + (f"-{args.tag}" if args.tag else "")

    def save() -> None:  # after every point: a run cut short keeps what it measured
        named = cache_named(results, cache_dir)
        write_results(ROOT / args.out, stem, named, markdown(named))

    raytmp = tempfile.mkdtemp(prefix="wspa", dir="/tmp")  # short: Ray's socket paths live under it
    now_at = {"label": "start"}
    stop_watch = threading.Event()

    def watch() -> None:  # each change of HAProxy's server states, and the host's memory every 5 s
        from bench.haproxy_watch import server_states

        states, last, t0 = results.setdefault("states", []), None, time.monotonic()
        memory = results.setdefault("memory", [])
        while not stop_watch.wait(1.0):
            t = round(time.monotonic() - t0, 1)
            try:
                now = server_states()
            except Exception as e:  # an admin socket that answered nothing, say: recorded, and watched on
                now = {f"no states: {type(e).__name__}: {e}"[:120]: 1}
            if now != last:
                states.append({"t": t, "point": now_at["label"], "servers": now})
                last = now
            if not memory or t - memory[-1]["t"] >= 5:
                memory.append({"t": t, "point": now_at["label"], **memory_facts()})

    try:
        with warmserve_run(run_args, home, timeout=1800, env={**env, "RAY_TMPDIR": raytmp}) as service:
            ready = ready_line(service)
            results["ready_s"] = service.ready_s
            results["start"] = ready.get("start")
            base = ready["ready"]
            host = base.removeprefix("http://")
            grpc_target = f"{host.rsplit(':', 1)[0]}:{ready['grpc_port']}"
            import requests

            name = str(ready.get("model", "resnet18")).rpartition(":")[2]
            meta = requests.get(f"{base}/v2/models/{name}", timeout=10).json()
            shape = meta["inputs"][0]["shape"][1:]
            bodies = requests_for(base, name, shape, grpc_target)
            print(f"ready in {service.ready_s:.0f}s: {ready.get('model')} via {ready.get('backend')}", flush=True)
            watcher = threading.Thread(target=watch, daemon=True)
            if args.watch:
                watcher.start()
            for protocol in filter(None, args.protocols.split(",")):
                target = host if protocol == "http" else grpc_target
                url, body, headers, _ = bodies["b1" if protocol == "http" else "grpc1"]
                for clients in (int(c) for c in args.concurrency.split(",")):
                    now_at["label"] = f"perf_analyzer {protocol} c={clients}"
                    pa = perf_analyzer(
                        args.perf_analyzer,
                        name,
                        target,
                        protocol,
                        clients,
                        args.seconds,
                        args.pa_timeout,
                        None if args.pa_memory is None else int(args.pa_memory * 1024),
                    )
                    now_at["label"] = f"bench {protocol} c={clients}"
                    own = load(url, body, headers, clients, args.client_procs, args.seconds)
                    point = {"protocol": protocol, "clients": clients, "perf_analyzer": pa, "bench": own}
                    results["points"].append(point)
                    save()
                    ratio = pa["infer_per_s"] / own["requests_per_s"] if pa["ok"] and own["requests_per_s"] else None
                    pa_text = f"{pa['infer_per_s']:9.1f}/s p50 {pa['p50_ms']:6.2f} ms" if pa["ok"] else f"FAILED {pa}"
                    print(
                        f"{protocol:4} c={clients:<3} perf_analyzer {pa_text} | bench {own['requests_per_s']:9.1f}/s "
                        f"p50 {own['p50_ms']:6.2f} ms failed {own['failed']}"
                        + (f" | ratio {ratio:.2f}" if ratio else ""),
                        flush=True,
                    )
            for workload in filter(None, args.workloads.split(",")):
                url, body, headers, rows = bodies[workload]
                for clients in (int(c) for c in args.compare_clients.split(",")):
                    now_at["label"] = f"{workload} c={clients}"
                    own = load(url, body, headers, clients, args.client_procs, args.seconds)
                    own.update(workload=workload, clients=clients, items_per_s=own["requests_per_s"] * rows)
                    results["compare"].append(own)
                    save()
                    print(
                        f"{workload:6} c={clients:<3} {own['items_per_s']:9.1f} items/s p50 {own['p50_ms']:7.2f} ms "
                        f"p99 {own['p99_ms']:7.2f} ms failed {own['failed']}",
                        flush=True,
                    )
            stop_watch.set()
            if watcher.is_alive():
                watcher.join()
    finally:
        stop_watch.set()
        if args.logs:  # a run that failed is the one whose logs are wanted
            keep_logs(raytmp, Path(args.logs), cache_dir)
        shutil.rmtree(raytmp, ignore_errors=True)
    results["exit_code"] = service.exit_code
    if not args.run_args:  # the default model: its engine is in the cache the service used
        results["engine_b1"] = engine_ms("torchvision:resnet18", cache_dir, device)
    save()
    print(markdown(results))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# perf_analyzer against `warmserve run {' '.join(r['run_args'])}` ({r['device']})"
        + "".join(f" {k}={v}" for k, v in r.get("env", {}).items()),
        "",
        f"Ready in {r.get('ready_s', 0):.0f} s. Batch 1, FP32, one window of each point; bench = bench/'s own "
        "closed-loop load generator at the same point.",
    ]
    if r["points"]:
        lines += [
            "",
            "| protocol | clients | perf_analyzer infer/s | p50 ms | p99 ms | its peak RSS MiB | bench req/s | "
            "p50 ms | p99 ms | ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for p in r["points"]:
        pa, own = p["perf_analyzer"], p["bench"]
        if pa["ok"]:
            ratio = pa["infer_per_s"] / own["requests_per_s"] if own["requests_per_s"] else float("nan")
            head = f"{pa['infer_per_s']:.1f} | {pa['p50_ms']:.2f} | {pa['p99_ms']:.2f}"
        else:
            said = [line.strip() for line in pa["output"] if line.strip()]  # its error, or why bench stopped it
            ratio, head = float("nan"), f"failed: {(said or ['no output'])[-1][:160].replace('|', '/')} | | "
        lines.append(
            f"| {p['protocol']} | {p['clients']} | {head} | {pa.get('peak_rss_mib', '')} | "
            f"{own['requests_per_s']:.1f} | "
            f"{own['p50_ms']:.2f} | {own['p99_ms']:.2f} | {ratio:.2f} |"
            + (f" bench: {own['failed']} failed" if own["failed"] else "")
        )
    lines += [
        "",
        "| workload | clients | items/s | p50 ms | p99 ms | p99/p50 | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in r["compare"]:
        lines.append(
            f"| {c['workload']} | {c['clients']} | {c['items_per_s']:.1f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
            f"{c['p99_ms'] / c['p50_ms']:.1f} | {c['failed']} |"
        )
    if r.get("states"):
        lines += [
            "",
            "HAProxy's servers by backend and state, at each change (seconds from the watch's start, just after ready):",
            "",
        ]
        lines += ["| second | during | servers |", "|---|---|---|"]
        for s in r["states"]:
            servers = ", ".join(f"{k} {v}" for k, v in sorted(s["servers"].items()))
            lines.append(f"| {s['t']} | {s['point']} | {servers} |")
    if r.get("memory"):
        lines += [
            "",
            "The host's available memory, and the resident sets of Ray's worker processes and HAProxy added up (MiB; the "
            "libraries they share count in each), every 5 s:",
            "",
        ]
        lines += ["| second | during | available | Ray's RSS | largest |", "|---|---|---|---|---|"]
        for m in r["memory"]:
            lines.append(
                f"| {m['t']} | {m['point']} | {m['available_mib']} | {m['ray_rss_mib']} | {', '.join(m['largest'])} |"
            )
    e = r.get("engine_b1") or {}
    if e:
        lines += [
            "",
            f"Engine at batch 1 in process: p50 {e['p50_ms']:.2f} ms, p99 {e['p99_ms']:.2f} ms ({e['start']}).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
