"""HAProxy's view of the replicas under load: does any drop out?

python bench/haproxy_watch.py                                                   # Serve's defaults
python bench/haproxy_watch.py --env RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0

One `warmserve run` (its engine cache under --cache-dir), then --clients closed-loop one-row HTTP requests for
--seconds (bench/serve_throughput.py's load). Every second, each server's state in each backend of Serve's
HAProxy, read from its admin socket (`show stat`). Afterwards, from the replicas' own access logs: answers per
second and per status code. Written for the question a run of 2026-12-03 left open: with user code on each
replica's own event loop, every replica dropped out of HAProxy at 64 perf_analyzer clients
(bench/results/perf-analyzer-cuda-h200-same-thread.md). Writes bench/results/haproxy-watch-<device>[-tag].{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import re
import shlex
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ACCESS = re.compile(r"^\S+ \S+ (\d\d:\d\d:\d\d),\d+ .*/infer (\d{3}) ")


def admin_sockets() -> list[str]:
    """The admin sockets of the Serve HAProxies running here, from their configurations."""
    from warmserve.deployments.ports import serve_haproxies

    found = []
    for h in serve_haproxies():
        if h.config and h.config.exists():
            for line in h.config.read_text().splitlines():
                words = line.split()
                if words[:2] == ["stats", "socket"] and words[2] not in found:
                    found.append(words[2])
    return found


def server_states() -> dict[str, int]:
    """How many servers are in each state, per backend: {"http-...: UP": 12, ...}."""
    counts: collections.Counter[str] = collections.Counter()
    for path in admin_sockets():
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(path)
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError as e:
            counts[f"socket error: {e}"] += 1
            continue
        lines = data.decode(errors="replace").splitlines()
        head = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(head, line.split(","), strict=False))
            if row.get("svname") not in (None, "FRONTEND", "BACKEND"):
                counts[f"{row['pxname']}: {row.get('status', '?')}"] += 1
    return dict(counts)


def access_log(raytmp: str) -> dict[str, Any]:
    """Answers per wall-clock second and per status code, from every replica's log."""
    per_second: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    logs = Path(raytmp) / "ray" / "session_latest" / "logs" / "serve"
    for path in logs.glob("replica_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if m := ACCESS.match(line):
                per_second[m.group(1)] += 1
                codes[m.group(2)] += 1
    return {
        "per_second": dict(sorted(per_second.items())),
        "codes": dict(codes),
        "replica_logs": len(list(logs.glob("replica_*.log"))),
    }


def main() -> int:
    from bench.common import host_facts, ready_line, warmserve_run, write_results
    from bench.serve_throughput import load, requests_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--run-args", default="", help="options for `warmserve run` (default: none)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for `warmserve run`")
    ap.add_argument("--cache-dir", help="engine cache (default: a temp dir, so the first replica builds)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="warmserve-hw-"))
    raytmp = tempfile.mkdtemp(prefix="wsw", dir="/tmp")  # short: Ray's socket paths live under it
    home = work / "home"
    home.mkdir()
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    run_args = ["--json", "--cache-dir", str(cache_dir), *shlex.split(args.run_args)]
    env = dict(e.split("=", 1) for e in args.env)
    r: dict[str, Any] = {"device": device, "run_args": run_args[3:], "env": env, "clients": args.clients}
    r["host"] = host_facts()
    with warmserve_run(run_args, home, timeout=1800, env={**env, "RAY_TMPDIR": raytmp}) as service:
        ready = ready_line(service)
        r["ready_s"] = service.ready_s
        base = ready["ready"]
        name = str(ready.get("model", "resnet18")).rpartition(":")[2]
        import requests

        shape = requests.get(f"{base}/v2/models/{name}", timeout=10).json()["inputs"][0]["shape"][1:]
        url, body, headers, _ = requests_for(base, name, shape, f"127.0.0.1:{ready['grpc_port']}")["b1"]
        result: dict[str, Any] = {}
        loader = threading.Thread(
            target=lambda: result.update(load(url, body, headers, args.clients, args.client_procs, args.seconds))
        )
        t0 = time.time()
        loader.start()
        states = []
        while loader.is_alive():
            states.append({"t": round(time.time() - t0, 1), "servers": server_states()})
            time.sleep(1)
        loader.join()
        r["load"], r["states"] = result, states
    r["exit_code"] = service.exit_code
    r["answers"] = access_log(raytmp)
    stem = f"haproxy-watch-{device}" + (f"-{args.tag}" if args.tag else "")
    write_results(ROOT / args.out, stem, r, markdown(r))
    print(markdown(r))
    return 0


def markdown(r: dict[str, Any]) -> str:
    env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "Serve's defaults"
    load, answers = r["load"], r["answers"]
    not_up = sorted({k for s in r["states"] for k in s["servers"] if not k.endswith(": UP")})
    lines = [
        f"# HAProxy's view of the replicas under load: `warmserve run {' '.join(r['run_args'])}` ({r['device']}, {env})",
        "",
        f"{r['clients']} HTTP clients, one-row requests; ready in {r['ready_s']:.0f} s.",
        "",
        f"- bench's load: {load.get('requests_per_s', 0):.1f} req/s, p50 {load.get('p50_ms', 0):.2f} ms, "
        f"p99 {load.get('p99_ms', 0):.2f} ms, {load.get('failed', '?')} failed",
        f"- the replicas' answers by status: {answers['codes']} ({answers['replica_logs']} replica logs)",
        f"- states other than UP seen: {', '.join(not_up) or 'none'} (`UP 1/2` is a server still passing its "
        "first health checks)",
        "",
        "Each second's states, where they changed:",
        "",
        "| second | servers by backend and state |",
        "|---|---|",
    ]
    last = None
    for s in r["states"]:
        if s["servers"] != last:
            lines.append(f"| {s['t']} | {', '.join(f'{k} {v}' for k, v in sorted(s['servers'].items()))} |")
            last = s["servers"]
    lines += ["", "Answers per wall-clock second, all replicas: " + " ".join(map(str, answers["per_second"].values()))]
    lines += ["", f"Host: {r['host']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
