"""Precisions and text signatures on one device: resnet18 in fp32/fp16/bf16, a BERT-like encoder of mixed lengths.

    python bench/signatures.py resnet  [--device cuda] [--backend aoti] [--out DIR]
    python bench/signatures.py encoder [--model warmserve.serve.text:base_encoder] [--precision fp16] [--http]

``resnet``: per precision, a build into an empty cache (and an empty Inductor cache), a warm start of a second
worker from that cache in the same process, a hot swap, the engine's ms per batch of 1 and 32 against eager
fp32 and eager in the same precision (median and spread of interleaved rounds), and top-1 agreement with eager
fp32 on 256 random images.

``encoder``: a build and a warm start as above, ms per batch of 32 at several lengths against eager, requests of
mixed lengths through the worker (padded to a bucket, as a replica batches them: the engine in process), and
with ``--http`` the same requests over OIP HTTP against `warmserve run` (binary tensors, ``--clients``
concurrent). Writes signatures-<part>.json and .md under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import warmserve_run  # noqa: E402
from bench.gpu_device import anonymise  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rounds(fns: dict[str, Callable[..., Any]], device: str, n: int = 7, iters: int = 30) -> dict[str, dict[str, float]]:
    """ms per call of each fn in interleaved rounds: median, min, max."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(3):
                fn()
        sync(device)
        for _ in range(n):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync(device)
                out[k].append((time.perf_counter() - t0) / iters * 1e3)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in out.items()}


def ms(t: dict[str, float]) -> str:
    return f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})"


def worker_for(spec: Any, backend: str, device: str, cache_dir: Path) -> Any:
    from warmserve.cache import CacheConfig
    from warmserve.serve.worker import Worker

    return Worker(spec, backend=backend, device=device, cache_config=CacheConfig.load(environ={}, cache_dir=cache_dir))


def build_and_warm(spec: Any, backend: str, device: str, tmp: Path) -> tuple[Any, dict[str, Any]]:
    """A build into an empty cache, then a second worker's warm start from it: (the warm worker, the figures)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tempfile.mkdtemp(dir=tmp, prefix="inductor-"))
    cache = Path(tempfile.mkdtemp(dir=tmp, prefix="cache-"))
    cold = worker_for(spec, backend, device, cache)
    built = cold.start()
    del cold
    warm = worker_for(spec, backend, device, cache)
    again = warm.start()
    row = {
        "build_outcome": built.outcome,
        "build_s": built.seconds,
        "build_steps": built.steps,
        "warm_outcome": again.outcome,
        "warm_s": again.seconds,
        "warm_steps": again.steps,
        "warm_of_build": again.seconds / built.seconds,
        "probe_error": again.probe_error,
        "cache_dir": str(cache),
    }
    return warm, row


def resnet(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from warmserve.serve.model import build_model
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.weights import demo_weights

    dev = args.device
    base = ModelSpec(model="torchvision:resnet18")
    eager32 = worker_for(base, "eager", dev, tmp / "eager")
    eager32.start()
    images = torch.randn(256, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    want = torch.cat([eager32.infer(images[i : i + 32]) for i in range(0, 256, 32)]).argmax(1)
    rows = []
    for precision in args.precisions.split(","):
        spec = ModelSpec(model="torchvision:resnet18", precision=precision)
        t0 = time.perf_counter()
        try:
            worker, row = build_and_warm(spec, args.backend, dev, tmp)
        except Exception as e:  # report, go on with the next precision
            rows.append({"precision": precision, "error": f"{type(e).__name__}: {e}"[:600]})
            print(rows[-1], flush=True)
            continue
        eager = worker_for(spec, "eager", dev, tmp / "eager")
        eager.start()
        swap = worker.swap_weights(demo_weights(build_model(spec.model, meta=True), seed=7), "v2")
        eager.swap_weights(demo_weights(build_model(spec.model, meta=True), seed=7), "v2")
        row.update(precision=precision, swap_ok=swap.ok, swap_error=swap.error, swap_steps=swap.steps)
        eng, e_same, e32 = worker._live.engine, eager._live.engine, eager32._live.engine
        for b in (1, 32):
            x32 = (torch.randn(b, 3, 224, 224, device=dev),)
            xp = tuple(x.to(spec.torch_dtype) for x in x32)
            fns = {
                "engine": lambda xp=xp, f=eng: f(xp),
                "eager": lambda xp=xp, f=e_same: f(xp),
                "eager_fp32": lambda x=x32, f=e32: f(x),
            }
            row[f"b{b}"] = rounds(fns, dev)
        # top-1 against eager fp32 on the first weights: a fresh worker of this precision from the cache
        first = worker_for(spec, args.backend, dev, Path(worker.cache_config.cache_dir))
        first.start()
        got = torch.cat([first.infer(images[i : i + 32]) for i in range(0, 256, 32)]).argmax(1)
        row["top1_agreement"] = float((got == want).float().mean())
        row["unexpected_compiles"] = worker.fence.unexpected if worker.fence else None
        row["stage_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row, default=str)[:1500], flush=True)
        del worker, eager, first
        torch.cuda.empty_cache() if dev.startswith("cuda") else None
    lines = [
        f"resnet18 {args.backend}, batch 1..32, {args.device}. ms per engine call: median (min-max) of 7 interleaved "
        "rounds of 30. Warm start: a second worker from the cache in the same process (fingerprint to a refitted, "
        "verified engine).",
        "",
        "| precision | build s | warm start s (of build) | b1 ms | b1 eager same | b32 ms | b32 eager same | "
        "b32 eager fp32 | vs eager fp32 | vs eager same | top-1 vs fp32 | swap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | failed: {r['error'][:200]} |" + " |" * 10)
            continue
        b32 = r["b32"]
        lines.append(
            f"| {r['precision']} | {r['build_s']:.1f} | {r['warm_s']:.3f} ({r['warm_of_build']:.2%}) | "
            f"{ms(r['b1']['engine'])} | {ms(r['b1']['eager'])} | {ms(b32['engine'])} | {ms(b32['eager'])} | "
            f"{ms(b32['eager_fp32'])} | {b32['eager_fp32']['median'] / b32['engine']['median']:.2f}x | "
            f"{b32['eager']['median'] / b32['engine']['median']:.2f}x | {r['top1_agreement']:.1%} | "
            f"{'ok' if r['swap_ok'] else r['swap_error']} |"
        )
    return {"rows": rows, "markdown": "\n".join(lines)}


def token_requests(n: int, lengths: list[int], vocab: int, rows: int = 1, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        out.append([ids, torch.ones(rows, length, dtype=torch.int64)])
    return out


def oip_tokens(ids: torch.Tensor, mask: torch.Tensor) -> tuple[bytes, dict[str, str]]:
    tensors = [("input_ids", ids.numpy()), ("attention_mask", mask.numpy())]
    head = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": "INT64", "parameters": {"binary_data_size": a.nbytes}}
                for n, a in tensors
            ],
            "outputs": [{"name": "pooler_output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"}
    return head + b"".join(a.tobytes() for _, a in tensors), headers


def encoder(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from warmserve.serve.spec import InputSpec, ModelSpec, parse_batch, parse_inputs

    dev = args.device
    tensors, dims, steps = parse_inputs(args.inputs)
    lo, hi = parse_batch(args.batch)
    sig = InputSpec(min_batch=lo, max_batch=hi, tensors=tensors, dims=dims, steps=steps)
    spec = ModelSpec(model=args.model, input=sig, precision=args.precision)
    vocab = tensors[0].bound or 1000
    worker, row = build_and_warm(spec, args.backend, dev, tmp)
    print(json.dumps(row, default=str), flush=True)
    eager = worker_for(spec, "eager", dev, tmp / "eager")
    eager.start()
    eager32 = worker_for(ModelSpec(model=args.model, input=sig), "eager", dev, tmp / "eager")
    eager32.start()
    eng, e_same, e32 = worker._live.engine, eager._live.engine, eager32._live.engine
    seq_lo, seq_hi = next(iter(dims.values()))
    lat = {}
    for length in sorted({seq_lo, (seq_lo + seq_hi) // 2 // 16 * 16 or seq_lo, seq_hi}):
        xs = [t.to(dev) for t in token_requests(1, [length], vocab, rows=hi)[0]]
        fns = {"engine": lambda xs=xs: eng(xs), "eager": lambda xs=xs: e_same(xs), "eager_fp32": lambda xs=xs: e32(xs)}
        lat[length] = rounds(fns, dev)
    row["latency_b32"] = lat
    # requests of mixed lengths, one row each, batched as a replica batches them (max_batch_size of them)
    lengths = [17, 40, 64, 90, 128, 23, 100, 55][: max(1, len(range(seq_lo, seq_hi + 1)))]
    lengths = [min(max(n, seq_lo), seq_hi) for n in lengths]
    reqs = token_requests(256, lengths, vocab)
    per_call = args.max_batch_size
    with torch.inference_mode():
        worker.run_requests(reqs[:per_call])
        t0 = time.perf_counter()
        for i in range(0, len(reqs), per_call):
            worker.run_requests(reqs[i : i + per_call])
        sync(dev)
        row["in_process_req_per_s"] = len(reqs) / (time.perf_counter() - t0)
    # answers equal eager at each request's own length (no padding) within the precision's tolerance
    errs = []
    for r in reqs[:16]:
        got = worker.run(r)[0][0]
        want = eager32.run(r)[0][0]
        errs.append(float((got - want).abs().max() / want.abs().max()))
    row["max_rel_err_vs_eager_fp32_unpadded"] = max(errs)
    row["unexpected_compiles"] = worker.fence.unexpected if worker.fence else None
    del worker, eager, eager32
    if args.http:
        row["http"] = over_http(args, spec, lengths, vocab, tmp, row["cache_dir"])
    lines = [
        f"{args.model} {args.backend} {args.precision}, inputs `{args.inputs}`, batch {args.batch}, {dev}.",
        "",
        f"build {row['build_s']:.1f} s; warm start {row['warm_s']:.3f} s ({row['warm_of_build']:.2%} of the build); "
        f"compiles after ready: {row['unexpected_compiles']}; max relative error against eager fp32 at each request's "
        f"own length: {row['max_rel_err_vs_eager_fp32_unpadded']:.2e}",
        "",
        f"| length | batch {hi} engine ms | eager same ms | eager fp32 ms | vs eager fp32 |",
        "|---|---|---|---|---|",
    ]
    for length, t in lat.items():
        lines.append(
            f"| {length} | {ms(t['engine'])} | {ms(t['eager'])} | {ms(t['eager_fp32'])} | "
            f"{t['eager_fp32']['median'] / t['engine']['median']:.2f}x |"
        )
    lines += [
        "",
        f"mixed lengths {lengths}, one row per request, {per_call} per engine call in process: "
        f"{row['in_process_req_per_s']:.0f} req/s",
    ]
    if "http" in row and "requests_per_s" in row["http"]:
        h = row["http"]
        lines.append(
            f"over OIP HTTP (`warmserve run`, {h['clients']} clients): {h['requests_per_s']:.0f} req/s, p50 "
            f"{h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, {h['failed']} failed: "
            f"{h['requests_per_s'] / row['in_process_req_per_s']:.0%} of in process"
        )
    elif "http" in row:
        lines.append(f"over HTTP: {row['http']}")
    return {"row": row, "markdown": "\n".join(lines)}


def over_http(
    args: argparse.Namespace, spec: Any, lengths: list[int], vocab: int, tmp: Path, cache_dir: str
) -> dict[str, Any]:
    """`warmserve run` serving the encoder; mixed-length binary OIP requests from ``--clients`` clients."""
    import requests

    from bench.serve_throughput import load

    home = Path(tempfile.mkdtemp(dir=tmp, prefix="home-"))
    cmd = ["--model", args.model, "--inputs", args.inputs, "--batch", args.batch, "--precision", args.precision]
    cmd += ["--backend", args.backend, "--device", args.device, "--replicas", str(args.replicas)]
    cmd += ["--max-batch-size", str(args.max_batch_size)]
    cmd += ["--cache-dir", cache_dir]  # the engine built above: the service warm-starts
    try:
        with warmserve_run(cmd, home, args.ready_timeout) as service:
            result: dict[str, Any] = {"ready_s": service.ready_s}
            name = spec.name
            meta = requests.get(f"http://127.0.0.1:8000/v2/models/{name}", timeout=30).json()
            result["metadata"] = {"inputs": meta["inputs"], "outputs": meta["outputs"]}
            bodies = [oip_tokens(*r) for r in token_requests(64, lengths, vocab)]
            p = load(f"http://127.0.0.1:8000/v2/models/{name}/infer", bodies, {}, args.clients, 4, args.seconds)
            result.update(p, clients=args.clients)
            return result
    except RuntimeError as e:
        return {"error": "not ready", "log": anonymise(str(e)[-2500:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("resnet", "encoder"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--precisions", default="fp32,fp16,bf16", help="resnet: the precisions to run")
    ap.add_argument("--model", default="warmserve.serve.text:base_encoder", help="encoder: the model")
    ap.add_argument("--inputs", default="input_ids:int64[seq=16:128]<30522 attention_mask:int64[seq]")
    ap.add_argument("--batch", default="1:32")
    ap.add_argument("--precision", default="fp16", help="encoder: its precision")
    ap.add_argument("--max-batch-size", type=int, default=32, help="encoder: requests per batch")
    ap.add_argument("--http", action="store_true", help="encoder: also over HTTP through `warmserve run`")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--ready-timeout", type=float, default=400)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result = (resnet if args.part == "resnet" else encoder)(args, Path(tmp))
    result["env"] = env
    result["argv"] = sys.argv[1:]
    md = f"# {args.part} — {env['date']}, {env['device']}, torch {env['torch']}, Python {env['python']}\n\n"
    md += result.pop("markdown") + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"signatures-{args.part}.json").write_text(anonymise(json.dumps(result, indent=1, default=str)))
    (out / f"signatures-{args.part}.md").write_text(anonymise(md))
    print(md)


if __name__ == "__main__":
    main()
