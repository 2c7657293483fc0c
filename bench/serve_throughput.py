"""Serving throughput through warmserve's HTTP endpoint, side by side with the engine in process.

python bench/serve_throughput.py --device cuda --modes proxy:1,proxy:4,haproxy:4 --concurrency 1,16,64,256

Each mode is a fresh local Ray cluster on the same engine cache (the first one builds, the rest load):
``proxy:N`` is Serve's own HTTP proxy in front of N replicas, ``haproxy:N`` is Ray Serve's HAProxy ingress
(``RAY_SERVE_ENABLE_HA_PROXY=1``: requests go from HAProxy straight to the replicas' own HTTP servers, no
Python proxy in between). On a GPU the N replicas share it (``num_gpus`` 1/N). ``litserve:N`` is the same
engine (the same cache, a hit) behind LitServe instead, N workers on the device with LitServe's own batching
(bench/litserve_app.py); it starts one server per endpoint the workloads use, so that no idle workers poll
(and ``--check-clients`` repeats the busiest point of each).

Workloads, each at every concurrency: OIP binary requests of one row (``b1``) and of 32 rows (``rows32``), as
tritonclient sends them, the same as UINT8 RGB pixels (``u8``, ``u8rows32``: a quarter of the bytes), and
``jpeg``: ``/v1/classify`` with a real photo (examples/cat.jpg), ``jpeg8``: eight of them in one multipart
request, and ``grpc1``, ``grpc32``: the OIP's ModelInfer over gRPC with 1 and 32 FP32 rows (the request
tritonclient.grpc builds, sent as bytes; LitServe answers neither of the last three). The load comes from ``--client-procs``
processes, each an asyncio loop of aiohttp clients, so that the load generator is not what limits;
``--check-clients`` repeats the point with the most requests/s with twice the processes to show it.
The ceiling is the same engine called in process at batch 32 (``--ceiling-batch``). With matplotlib, a PNG of
items/s against clients (bench/plot.py) is written next to the JSON and Markdown.

``--spy`` profiles each warmserve point: py-spy samples one replica while it holds the GIL (the share of samples
is how busy its GIL was), and the CPU seconds of every replica and HAProxy process, and of the whole host, are read
from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JPEG = ROOT / "examples" / "cat.jpg"
ENDPOINTS = {
    "b1": "oip",
    "rows32": "oip",
    "u8": "oip",
    "u8rows32": "oip",
    "jpeg": "classify",
    "jpeg8": "classify",
    "grpc1": "grpc",
    "grpc32": "grpc",
}
LITSERVE_WORKLOADS = {"b1", "rows32", "u8", "u8rows32", "jpeg"}  # what bench/litserve_app.py answers
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SPY_RATE = 250  # py-spy samples per second


Body = bytes | list[tuple[bytes, dict[str, str]]]  # one request, or several that take turns


def oip_binary(rows: int, shape: list[int], pixels: bool = False) -> tuple[bytes, dict[str, str]]:
    """A binary OIP request of ``rows`` rows: FP32 values, or UINT8 RGB pixels (a quarter of the bytes)."""
    from bench.common import binary_request

    rng = np.random.default_rng(0)
    if pixels:
        return binary_request(rng.integers(0, 256, (rows, *shape), dtype=np.uint8))
    return binary_request(rng.standard_normal((rows, *shape), dtype=np.float32))


def oip_grpc(rows: int, shape: list[int], name: str) -> bytes:
    """A serialised gRPC ModelInferRequest of ``rows`` FP32 rows, as tritonclient.grpc builds it."""
    import tritonclient.grpc as tg
    from tritonclient.grpc import service_pb2

    x = np.random.default_rng(0).standard_normal((rows, *shape), dtype=np.float32)
    inp = tg.InferInput("input__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    request = service_pb2.ModelInferRequest(model_name=name)
    request.inputs.extend([inp._get_tensor()])
    request.raw_input_contents.append(inp._get_content())
    return bytes(request.SerializeToString())


def multipart(files: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart form of ``files``, as ``curl -F`` sends several images to /v1/classify."""
    import requests

    prepared = requests.Request(
        "POST", "http://x/", files=[("image", (f"{i}.jpg", f, "image/jpeg")) for i, f in enumerate(files)]
    ).prepare()
    body = prepared.body or b""
    return body.encode() if isinstance(body, str) else body, {"content-type": prepared.headers["content-type"]}


async def _closed_loop(send: Any, clients: int, t0: float, t1: float) -> tuple[list[float], list[str]]:
    """``clients`` loops awaiting ``send()`` back to back until ``t1``: the latencies of the calls started
    inside [t0, t1) and their failures (counted, never stopping the load)."""
    lat: list[float] = []
    failed: list[str] = []

    async def one() -> None:
        while True:
            start = time.time()
            if start >= t1:
                return
            try:
                await send()
                if start >= t0:
                    lat.append(time.time() - start)
            except Exception as e:
                if start >= t0:
                    failed.append(repr(e)[:200])

    await asyncio.gather(*(one() for _ in range(clients)))
    return lat, failed


def _client_proc(url: str, body: Body, headers: dict[str, str], clients: int, t0: float, t1: float, out: Any) -> None:
    """One load process: ``clients`` concurrent requests back to back until ``t1``; latencies of those
    started inside [t0, t1) and the failures, sent back through ``out``. A ``grpc://host:port`` URL calls
    ModelInfer over gRPC (one channel, the pre-serialised request as bytes: the client does no protobuf work).
    ``body`` may be a list of (body, headers): the requests take turns (requests of mixed lengths, say)."""
    turns = itertools.cycle(body if isinstance(body, list) else [(body, headers)])

    async def http() -> tuple[list[float], list[str]]:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=clients, force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def send() -> None:
                data, head = next(turns)
                async with session.post(url, data=data, headers=head) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")

            return await _closed_loop(send, clients, t0, t1)

    async def grpc_calls() -> tuple[list[float], list[str]]:
        import grpc

        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        async with grpc.aio.insecure_channel(url.removeprefix("grpc://"), options=options) as channel:
            call = channel.unary_unary(MODEL_INFER)

            async def send() -> None:
                await call(next(turns)[0], timeout=120)

            return await _closed_loop(send, clients, t0, t1)

    out.send(asyncio.run(grpc_calls() if url.startswith("grpc://") else http()))
    out.close()


def load(url: str, body: Body, headers: dict[str, str], clients: int, procs: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent requests spread over ``procs`` processes; throughput and latency over ``seconds``
    after a 3 s ramp."""
    procs = max(1, min(procs, clients))
    ctx = mp.get_context("spawn")
    t0 = time.time() + 3.0  # process start and ramp
    t1 = t0 + seconds
    pipes, workers = [], []
    for k in range(procs):
        n = clients // procs + (1 if k < clients % procs else 0)
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_proc, args=(url, body, headers, n, t0, t1, send), daemon=True)
        p.start()
        pipes.append(recv)
        workers.append(p)
    lat: list[float] = []
    failed: list[str] = []
    for recv, p in zip(pipes, workers, strict=True):
        if not recv.poll(seconds + 180):
            p.kill()
            raise RuntimeError(f"a load process (exit code {p.exitcode}) sent no results")
        got_lat, got_failed = recv.recv()
        lat += got_lat
        failed += got_failed
    for p in workers:
        p.join(30)
    a = np.asarray(lat) * 1e3 if lat else np.asarray([np.nan])
    return {
        "requests_per_s": len(lat) / seconds,
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "failed": len(failed),
        "failure_samples": failed[:3],
    }


def in_process(
    model: str, backend: str, device: str, cache_dir: Path, weights: Path, batch: int, seconds: float, threads: int
) -> dict[str, Any]:
    """The ceiling: the same engine (a local cache hit) called in a loop at ``batch``, on the CPU with as many
    torch threads as one replica has."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)

    from warmserve.cache import CacheConfig
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.worker import Worker

    spec = ModelSpec.from_mapping({"model": model, "weights": str(weights), "batch": f"1:{batch}"})
    worker = Worker(spec, backend=backend, device=device, cache_config=CacheConfig.load(cache_dir=cache_dir))
    report = worker.start()
    x = spec.input.example(batch=batch)  # on the host, as a request's rows arrive
    for _ in range(5):
        worker.infer(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        worker.infer(x)  # returns host outputs: the device is synchronised
        n += batch
    result = {"items_per_s": n / (time.perf_counter() - t0), "batch": batch, "start": report.outcome}
    if device == "cpu":
        result["threads"] = threads
    del worker
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def requests_for(
    base: str, name: str, shape: list[int], grpc_target: str | None = None
) -> dict[str, tuple[str, bytes, dict[str, str], int]]:
    """Each workload's (URL, body, headers, rows per request) on a server at ``base`` (gRPC at ``grpc_target``)."""
    infer = f"{base}/v2/models/{name}/infer"
    bodies = {
        "b1": (infer, *oip_binary(1, shape), 1),
        "rows32": (infer, *oip_binary(32, shape), 32),
        "u8": (infer, *oip_binary(1, shape, pixels=True), 1),
        "u8rows32": (infer, *oip_binary(32, shape, pixels=True), 32),
        "jpeg": (f"{base}/v1/classify", JPEG.read_bytes(), {"content-type": "image/jpeg"}, 1),
        "jpeg8": (f"{base}/v1/classify", *multipart([JPEG.read_bytes()] * 8), 8),
    }
    if grpc_target:
        bodies["grpc1"] = (f"grpc://{grpc_target}", oip_grpc(1, shape, name), {}, 1)
        bodies["grpc32"] = (f"grpc://{grpc_target}", oip_grpc(32, shape, name), {}, 32)
    return bodies


def measure(
    label: str, base: str, name: str, shape: list[int], workloads: list[str], args: Any, grpc_target: str | None = None
) -> list[dict[str, Any]]:
    """Every workload at every concurrency against the server at ``base``, then (``--check-clients``) the
    point with the most requests/s again with twice the client processes."""
    points: list[dict[str, Any]] = []
    bodies = requests_for(base, name, shape, grpc_target)
    busiest: tuple[float, Any] = (0.0, None)
    for workload in workloads:
        url, body, headers, rows = bodies[workload]
        for clients in (int(c) for c in args.concurrency.split(",")):
            with Spy(args.seconds, enabled=args.spy and not label.startswith("litserve")) as spy:
                point = load(url, body, headers, clients, args.client_procs, args.seconds)
            if spy.profile:
                point["profile"] = spy.profile
            point.update(mode=label, workload=workload, clients=clients, items_per_s=point["requests_per_s"] * rows)
            points.append(point)
            print(
                f"{label:10} {workload:7} c={clients:<4} {point['items_per_s']:9.1f} items/s "
                f"p50 {point['p50_ms']:7.1f} ms p99 {point['p99_ms']:7.1f} ms failed {point['failed']}",
                flush=True,
            )
            if spy.profile:
                print(spy.summary(), flush=True)
            if point["requests_per_s"] > busiest[0]:  # the point that asks most of the clients
                busiest = (point["requests_per_s"], (url, body, headers, rows, workload, clients))
    if args.check_clients and busiest[1]:
        url, body, headers, rows, workload, clients = busiest[1]
        point = load(url, body, headers, clients, args.client_procs * 2, args.seconds)
        point.update(
            mode=label,
            workload=workload,
            clients=clients,
            items_per_s=point["requests_per_s"] * rows,
            client_procs=args.client_procs * 2,
        )
        points.append(point)
        print(
            f"{label:10} {workload:7} c={clients:<4} with {args.client_procs * 2} client processes: "
            f"{point['items_per_s']:.1f} items/s",
            flush=True,
        )
    return points


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy (all cores, neither idle nor waiting on I/O) since boot."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _pids(pattern: str, full: bool = True) -> list[int]:
    import subprocess

    found = subprocess.run(["pgrep", *(["-f"] if full else []), pattern], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in found if int(p) != os.getpid())


class Spy:
    """During one point (from the end of `load`'s 3 s ramp): py-spy on the first replica, sampling only while a
    thread holds the GIL, and the CPU time of each replica and HAProxy process."""

    def __init__(self, seconds: float, enabled: bool) -> None:
        self.seconds = seconds
        self.enabled = enabled
        self.profile: dict[str, Any] = {}

    def __enter__(self) -> Spy:
        import subprocess

        if not self.enabled:
            return self
        self.replicas = _pids("ServeReplica:warmserve")
        self.haproxy = _pids("haproxy", full=False)
        if not self.replicas:
            return self
        self.raw = Path(tempfile.mkstemp(prefix="spy-", suffix=".txt")[1])
        d = max(1, int(self.seconds) - 1)
        cmd = f"sleep 3.3; exec py-spy record --gil --nonblocking --rate {SPY_RATE} --format raw -d {d} "
        cmd += f"-p {self.replicas[0]} -o {self.raw}"
        self.proc = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.duration = d
        self.cpu0 = {p: _cpu_seconds(p) for p in self.replicas + self.haproxy}
        self.host0 = _host_busy_seconds()
        self.smi = None
        if shutil.which("nvidia-smi"):  # the GPU's busy share, every 200 ms
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self.smi = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled or not self.replicas:
            return
        wall = time.monotonic() - self.t0
        cpu = {p: (_cpu_seconds(p) - c) / wall for p, c in self.cpu0.items()}
        host = (_host_busy_seconds() - self.host0) / wall
        _, err = self.proc.communicate(timeout=60)
        replica_cpu = [cpu[p] for p in self.replicas]
        self.profile = {
            "replica_cores": [round(c, 2) for c in replica_cpu],
            "haproxy_cores": round(sum(cpu[p] for p in self.haproxy), 2),
            "host_cores": round(host, 2),  # every process on the host, the load generator's included
        }
        if self.smi:
            self.smi.terminate()
            busy = [float(v) for v in self.smi.communicate()[0].split()[16:-2]]  # the 3 s ramp and the tail left out
            if busy:
                self.profile["gpu_busy"] = round(sum(busy) / len(busy) / 100, 3)
        from bench.serve_profile import frames

        try:
            own, inclusive, samples = frames(self.raw)
        except OSError:
            self.profile["error"] = err.decode()[-300:]
            return
        finally:
            self.raw.unlink(missing_ok=True)
        self.profile["gil_busy"] = round(samples / (SPY_RATE * self.duration), 3)
        self.profile["own"] = own
        self.profile["inclusive"] = inclusive

    def summary(self) -> str:
        p = self.profile
        if "gil_busy" not in p:
            return f"  spy: {p.get('error', 'no samples')}"
        cores = " ".join(f"{c:.2f}" for c in p["replica_cores"])
        gpu = f", GPU busy {p['gpu_busy']:.0%}" if "gpu_busy" in p else ""
        host = f", host {p['host_cores']:.1f} of {os.cpu_count()} cores busy" if "host_cores" in p else ""
        lines = [
            f"  replica CPU cores [{cores}], HAProxy {p['haproxy_cores']:.2f}{host}{gpu}; GIL busy {p['gil_busy']:.0%}"
        ]
        lines += [f"    own {line}" for line in p["own"][:8]]
        lines += [f"    in  {line}" for line in p["inclusive"][:16]]
        return "\n".join(lines)


@contextlib.contextmanager
def ray_serve(
    mode: str, replicas: int, args: Any, tmpdir: Path, cache_dir: Path, weights: Path
) -> Iterator[tuple[str, str]]:
    """A fresh local Ray cluster serving warmserve with ``replicas`` replicas behind ``mode``'s ingress; yields
    its HTTP address and its gRPC target once every replica is ready."""
    import requests

    from tests.e2e.cluster import RayCluster

    env = {
        "WARMSERVE_CACHE_DIR": str(cache_dir),
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == "haproxy" else "0",
    }
    cluster = RayCluster(tmpdir / f"ray-{mode}-{replicas}", env=env)
    cluster.start(num_cpus=os.cpu_count() or 2)
    try:
        app = {
            "model": args.model,
            "backend": args.backend,
            "device": args.device,
            "cache_dir": str(cache_dir),
            "weights": str(weights),
            "batch": f"1:{args.max_batch}",
            "max_batch_size": args.max_batch,
            "batch_wait_timeout_s": args.batch_wait,
        }
        actor: dict[str, Any] = {"num_cpus": args.replica_cpus}
        if args.device.startswith("cuda"):
            actor["num_gpus"] = math.floor(10_000 / replicas) / 10_000  # all fit in Ray's steps
        t = time.perf_counter()
        cluster.deploy(cluster.config(app, {"num_replicas": replicas, "ray_actor_options": actor}), timeout=900)
        cluster.wait_running("warmserve", timeout=900, replicas=replicas)
        ready = time.perf_counter() - t
        name = args.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        meta = requests.get(f"{cluster.http}/v2/models/{name}", timeout=30).json()
        outcome = meta["parameters"]["start"]["outcome"]
        print(f"{mode}:{replicas}: {replicas} replica(s) ready in {ready:.1f}s ({outcome})", flush=True)
        yield cluster.http, f"127.0.0.1:{cluster.grpc_port}"
    finally:
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="proxy:1,haproxy:1", help="comma-separated proxy:N / haproxy:N / litserve:N")
    ap.add_argument("--workloads", default="b1,rows32,jpeg")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    ap.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 4)))
    ap.add_argument("--check-clients", action="store_true", help="repeat the busiest point with 2x processes")
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus per replica (its torch threads)")
    ap.add_argument("--max-batch", type=int, default=32, help="the engine's largest batch and the servers' batch")
    ap.add_argument("--batch-wait", type=float, default=0.002, help="Serve's and LitServe's batch wait, seconds")
    ap.add_argument("--ceiling-batch", type=int, default=32)
    ap.add_argument("--cache-dir", help="engine cache to keep between runs (default: a temp dir)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="added to the result files' names")
    ap.add_argument("--spy", action="store_true", help="profile each warmserve point with py-spy (on PATH)")
    args = ap.parse_args()

    from tests.servers import free_port
    from warmserve.serve.model import build_model
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.weights import demo_weights, save_weights

    modes = [(m.split(":")[0], int(m.split(":")[1])) for m in args.modes.split(",")]
    unknown = sorted({m for m, _ in modes} - {"proxy", "haproxy", "litserve"})
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}: use proxy:N, haproxy:N or litserve:N")
    workloads = args.workloads.split(",")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
        "client_procs": args.client_procs,
        "replica_cpus": args.replica_cpus,
        "max_batch": args.max_batch,
        "batch_wait_s": args.batch_wait,
        "seconds": args.seconds,
        "points": [],
    }
    if any(m == "litserve" for m, _ in modes):
        from importlib.metadata import version

        result["litserve"] = version("litserve")
    try:
        import torch

        result["machine"] += f", torch {torch.__version__}"
        if args.device.startswith("cuda"):
            result["machine"] += f", {torch.cuda.get_device_name()}"
    except Exception:  # pragma: no cover - the bench still runs
        pass
    name = args.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    shape = list(ModelSpec.from_mapping({"model": args.model}).input.shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        cache_dir = Path(args.cache_dir) if args.cache_dir else tmpdir / "cache"
        weights = tmpdir / "v1.safetensors"
        save_weights(demo_weights(build_model(args.model), seed=1), weights)
        for mode, replicas in modes:
            label = f"{mode}:{replicas}"
            if mode != "litserve":
                with ray_serve(mode, replicas, args, tmpdir, cache_dir, weights) as (base, grpc_target):
                    result["points"] += measure(label, base, name, shape, workloads, args, grpc_target)
                continue
            from bench.litserve_app import litserve_server

            options = ["--model", args.model, "--weights", str(weights), "--backend", args.backend]
            options += ["--device", args.device.split(":")[0], "--cache-dir", str(cache_dir)]
            options += ["--max-batch", str(args.max_batch), "--batch-wait", str(args.batch_wait)]
            options += ["--threads", str(max(1, int(args.replica_cpus)))]
            served = [w for w in workloads if w in LITSERVE_WORKLOADS]
            for endpoint in dict.fromkeys(ENDPOINTS[w] for w in served):  # one server per endpoint, in order
                port = free_port()
                t = time.perf_counter()
                with litserve_server(endpoint, replicas, port, tmpdir / f"lit-{replicas}", options) as starts:
                    outcomes = ", ".join(sorted({s["outcome"] for s in starts}))
                    print(
                        f"{label} {endpoint}: {len(starts)} worker(s) ready in {time.perf_counter() - t:.1f}s "
                        f"({outcomes})",
                        flush=True,
                    )
                    mine = [w for w in served if ENDPOINTS[w] == endpoint]
                    result["points"] += measure(label, f"http://127.0.0.1:{port}", name, shape, mine, args)
        result["in_process"] = in_process(
            args.model,
            args.backend,
            args.device,
            cache_dir,
            weights,
            args.ceiling_batch,
            args.seconds,
            max(1, int(args.replica_cpus)),
        )
        print(f"in process, batch {args.ceiling_batch}: {result['in_process']['items_per_s']:.1f} items/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput-{args.device.split(':')[0]}-{args.backend}" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no matplotlib: no plot (pip install -e '.[bench]')")
    else:
        from bench.plot import plot

        plot(result, out / f"{stem}.png")
        print(f"plot: {out / f'{stem}.png'}")


def markdown(r: dict[str, Any]) -> str:
    ceiling = r["in_process"]["items_per_s"]
    lines = [
        f"# warmserve HTTP throughput — {r['date']}",
        "",
        f"{r['machine']}; {r['model']} via {r['backend']} on {r['device']}; {r['client_procs']} client processes;"
        f" {r['seconds']:.0f} s per point. Ceiling: the engine in process at batch {r['in_process']['batch']}"
        + (f" with {r['in_process']['threads']} torch thread(s)" if "threads" in r["in_process"] else "")
        + ","
        f" {ceiling:.0f} items/s.",
        "",
        *(
            [
                f"`litserve:N`: LitServe {r['litserve']}, N workers and N HTTP server processes, one server per"
                f" endpoint; batches of up to {r.get('max_batch', '?')} requests (a request keeps its rows"
                f" together) after waiting up to {r.get('batch_wait_s', '?')} s, as Serve batches in the other modes.",
                "",
            ]
            if "litserve" in r
            else []
        ),
        "| mode | workload | clients | items/s | % of ceiling | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["points"]:
        extra = f" ({p['client_procs']} procs)" if "client_procs" in p else ""
        lines.append(
            f"| {p['mode']} | {p['workload']} | {p['clients']}{extra} | {p['items_per_s']:.0f} | "
            f"{p['items_per_s'] / ceiling:.1%} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['failed']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
