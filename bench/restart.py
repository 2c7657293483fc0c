"""Stop under load, start again at once: `warmserve run` --cycles times on the same ports.

python bench/restart.py                                # the default `warmserve run`, 10 cycles
python bench/restart.py --cycles 3 --run-args "--replicas 2"

Each cycle starts `warmserve run` (the engine cache warm after the first), puts one-row requests on it over HTTP
and gRPC for --seconds, sends SIGTERM while they run, and times the exit; then counts what of it is still alive
(any process naming its Ray temp dir: Ray, its workers, Serve's HAProxy) and whether its ports are free, and the
next cycle starts at once. Writes bench/results/restart-<device>[-tag].{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
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


def leftovers(marker: str) -> list[str]:
    """Live processes whose command line names ``marker``: pid and the start of the command line."""
    from tests.e2e.cluster import ray_processes

    left = []
    for pid in ray_processes(marker):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            left.append(f"{pid} {cmd[:120]}")
    return left


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def load(
    http: str,
    grpc_target: str,
    name: str,
    shape: list[int],
    stop: threading.Event,
    counts: dict[str, int],
    errors: list[str],
) -> None:
    """One HTTP and one gRPC client in a loop until ``stop``; answers and failures counted (failures are
    expected once the stop begins)."""
    import numpy as np
    import requests
    import tritonclient.grpc as tg

    from bench.common import binary_request

    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    body, headers = binary_request(x)
    # A subchannel of its own: gRPC shares one per target across a process, so a new client would inherit the
    # last cycle's, still backing off after that service stopped, and fail with its "Connection refused".
    client = tg.InferenceServerClient(grpc_target, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    inp = tg.InferInput("input__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    session = requests.Session()
    while not stop.is_set():
        for kind in ("http", "grpc"):
            try:
                if kind == "http":
                    session.post(
                        f"{http}/v2/models/{name}/infer", data=body, headers=headers, timeout=5
                    ).raise_for_status()
                else:
                    client.infer(name, [inp], client_timeout=5)
                counts[kind] += 1
            except Exception as e:
                counts["failed"] += 1
                errors.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
    client.close()


def cycle(args: argparse.Namespace, work: Path, k: int) -> dict[str, Any]:
    import requests

    from bench.common import ready_line, warmserve_run

    home = work / f"home{k}"
    home.mkdir()
    raytmp = tempfile.mkdtemp(prefix="wsr", dir="/tmp")  # short: Ray's socket paths live under it
    run_args = ["--json", "--cache-dir", args.cache_dir or str(work / "cache"), *shlex.split(args.run_args)]
    row: dict[str, Any] = {"cycle": k}
    stop = threading.Event()
    counts = {"http": 0, "grpc": 0, "failed": 0}
    errors: list[str] = []
    try:
        with warmserve_run(run_args, home, timeout=1800, env={"RAY_TMPDIR": raytmp}) as service:
            row.update(started=True, ready_s=service.ready_s)
            ready = ready_line(service)
            base = ready["ready"]
            grpc_target = f"{base.removeprefix('http://').rsplit(':', 1)[0]}:{ready['grpc_port']}"
            name = str(ready.get("model", "resnet18")).rpartition(":")[2]
            shape = requests.get(f"{base}/v2/models/{name}", timeout=10).json()["inputs"][0]["shape"][1:]
            loader = threading.Thread(
                target=load, args=(base, grpc_target, name, shape, stop, counts, errors), daemon=True
            )
            loader.start()
            time.sleep(args.seconds)
            answered, failures_before_stop = dict(counts), list(errors)
            t1 = time.monotonic()
        # leaving the block sent SIGTERM and waited for the exit
    except RuntimeError as e:  # it did not become ready: warmserve_run's message has the log's tail
        if row.get("started"):
            raise
        row.update(started=False, exit_code=None, log=str(e)[-2000:])
        return row
    row.update(stop_s=time.monotonic() - t1, exit_code=service.exit_code)
    stop.set()
    loader.join(30)
    row.update(
        answered_before_stop=answered,
        failures_before_stop=failures_before_stop[:5],
        left=leftovers(raytmp),
        ports_free={p: port_free(p) for p in (int(base.rsplit(":", 1)[1]), int(ready["grpc_port"]))},
        controller_timeout="failed to shut down" in service.log.read_text(),
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0, help="load before each stop")
    ap.add_argument("--run-args", default="", help="options for `warmserve run` (default: none)")
    ap.add_argument("--cache-dir", help="engine cache (default: a temp dir, so the first cycle builds)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="warmserve-restart-"))
    from bench.common import host_facts, write_results

    stem = f"restart-{device}" + (f"-{args.tag}" if args.tag else "")
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for k in range(1, args.cycles + 1):
        row = cycle(args, work, k)
        rows.append(row)
        ok = row["started"] and row["exit_code"] == 0 and not row["left"] and all(row["ports_free"].values())
        row["ok"] = ok
        print(
            f"cycle {k}: "
            + (
                f"ready {row['ready_s']:.1f} s, stop {row['stop_s']:.1f} s, exit {row['exit_code']}, "
                f"left {len(row['left'])}, ports free {all(row['ports_free'].values())}, answered {row['answered_before_stop']}"
                if row["started"]
                else f"did not start (exit {row['exit_code']}): {row['log'][-400:]}"
            ),
            flush=True,
        )
        results = {"device": device, "run_args": shlex.split(args.run_args), "cycles": rows, "host": host_facts()}
        write_results(ROOT / args.out, stem, results, markdown(results))  # after each cycle: a cut run keeps them
        if not row["started"]:
            break
    print(markdown(results))
    return 0 if all(r.get("ok") for r in rows) and len(rows) == args.cycles else 1


def markdown(r: dict[str, Any]) -> str:
    good = sum(bool(c.get("ok")) for c in r["cycles"])
    lines = [
        f"# Stop under load and start again at once: `warmserve run {' '.join(r['run_args'])}` ({r['device']})",
        "",
        f"{good} of {len(r['cycles'])} cycles started, stopped with exit 0 and left no process and no port behind.",
        "",
        "| cycle | ready s | stop s | exit | processes left | ports free | answered before the stop (HTTP, gRPC, failed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in r["cycles"]:
        if not c["started"]:
            lines.append(f"| {c['cycle']} | did not start | | {c['exit_code']} | | | |")
            continue
        a = c["answered_before_stop"]
        lines.append(
            f"| {c['cycle']} | {c['ready_s']:.1f} | {c['stop_s']:.1f} | {c['exit_code']} | {len(c['left'])} | "
            f"{all(c['ports_free'].values())} | {a['http']}, {a['grpc']}, {a['failed']} |"
        )
    lines += ["", f"Host: {r['host']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
