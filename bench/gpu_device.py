"""The GPU run: every compiled backend through the whole cycle on one CUDA device, in one process tree.

    python bench/gpu_device.py [--model torchvision:resnet18] [--backends aoti,inductor] [--compileall] [--out DIR]

Per backend: a cold replica (a fresh process, empty warmserve and Inductor caches: build, then the first
answer), warm replicas (fresh processes, empty Inductor cache: only warmserve's cache helps), each timed from
the process's own start to its first answer and split by phase; then in this process a warm start, a refit
with new weights checked against eager, and engine latency vs eager at batch 1 and 32 in interleaved rounds
(median and spread of both). With ``--compileall`` the first backend's warm replica runs once on the image as
it is, then again after byte-compiling site-packages (what the Dockerfile does). A backend whose process
crashes is reported with its signal, not hidden. Writes gpu.json and gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build_env, run_json  # noqa: E402

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def replica(model: str, backend: str, cache_dir: Path, inductor_dir: Path, timeout: float) -> dict[str, Any]:
    """bench/replica_start.py in a fresh process: its JSON, or why it failed."""
    cmd = [sys.executable, str(ROOT / "bench" / "replica_start.py"), model, backend, str(cache_dir), "--device", DEVICE]
    r = run_json(cmd, build_env(inductor_dir), timeout)
    logged = r.pop("logged", [])
    if r["ok"]:
        r["log"] = [line for line in logged if "serve." in line or "cache." in line][-12:]
    return r


def progress(backend: str, what: str, result: dict[str, Any]) -> None:
    """One line per replica as it finishes (a run cut short still tells where the time went)."""
    steps = (result.get("report") or {}).get("steps")
    line = (
        f"[{time.strftime('%H:%M:%S')}] {backend} {what}: first answer {result.get('first_answer_s')} s, steps {steps}"
    )
    print(line if result.get("ok") else f"{line}; FAILED {result.get('error')} {result.get('stderr', '')[-600:]}")
    for entry in result.get("log", []):
        print(f"    {entry[:220]}")
    sys.stdout.flush()


def compileall() -> float:
    """Byte-compile site-packages (the image forbids writing .pyc at import time); seconds it took."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", sysconfig.get_paths()["purelib"], str(ROOT)],
        capture_output=True,
        timeout=900,
    )
    return time.perf_counter() - t0


def latency_rounds(fns: dict[str, Any], x: torch.Tensor, rounds: int = 7, iters: int = 50) -> dict[str, Any]:
    """ms per call for each fn, in interleaved rounds: median, min and max over the rounds."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(5):
                fn(x)
        sync()
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn(x)
                sync()
                out[name].append((time.perf_counter() - t0) / iters * 1e3)
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in out.items()}


def cycle(model: str, backend: str, tmp: Path, timeout: float, pyc_first: bool) -> dict[str, Any]:
    from warmserve.cache import CacheConfig
    from warmserve.serve.model import build_model
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.weights import demo_weights
    from warmserve.serve.worker import Worker

    cache_dir = tmp / f"cache-{backend}"
    row: dict[str, Any] = {"backend": backend}
    row["cold"] = replica(model, backend, cache_dir, tmp / f"ind-{backend}-cold", timeout)
    progress(backend, "cold", row["cold"])
    if not row["cold"]["ok"]:
        return row
    warm = []
    if pyc_first:
        warm.append(
            {"pyc": "as the image is", **replica(model, backend, cache_dir, tmp / f"ind-{backend}-w0", timeout)}
        )
        progress(backend, "warm, no .pyc", warm[-1])
        row["compileall_s"] = compileall()
    for i in (1, 2):
        warm.append({"pyc": "compiled", **replica(model, backend, cache_dir, tmp / f"ind-{backend}-w{i}", timeout)})
        progress(backend, "warm", warm[-1])
    row["warm"] = warm
    if not all(w["ok"] for w in warm):
        return row
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"ind-{backend}-in-process")
    spec = ModelSpec(model=model)
    config = CacheConfig.load(cache_dir=cache_dir)
    worker = Worker(spec, backend=backend, device=DEVICE, cache_config=config)
    row["in_process_start"] = worker.start().to_dict()
    eager = Worker(spec, backend="eager", device=DEVICE, cache_config=config)
    eager.start()
    new = demo_weights(build_model(model, meta=True), seed=7)
    swap = worker.swap_weights(new, "v2")
    eager.swap_weights(new, "v2")
    row["swap"] = swap.to_dict()
    lat = {}
    for b in (1, 32):
        x = spec.input.example(batch=b, device=DEVICE)
        live, base_live = worker._live.engine, eager._live.engine  # type: ignore[union-attr]

        def compiled(x: torch.Tensor, e: Any = live) -> torch.Tensor:  # engines take and return lists
            return e([x])[0]

        def base(x: torch.Tensor, e: Any = base_live) -> torch.Tensor:
            return e([x])[0]

        times = latency_rounds({"compiled": compiled, "eager": base}, x)
        with torch.inference_mode():
            got, want = compiled(x).float(), base(x).float()
        lat[b] = {
            **times,
            "speedup": times["eager"]["median"] / times["compiled"]["median"],
            "rel_err_vs_eager_after_refit": float((got - want).abs().max() / want.abs().max()),
        }
    row["latency"] = lat
    row["unexpected_compiles"] = worker.fence.unexpected if worker.fence else None
    return row


def _ms(t: dict[str, float]) -> str:
    return f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})"


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        f"# GPU run — {result['date']}, {env['gpu']}, torch {env['torch']}, Python {env['python']}",
        "",
        f"Model {result['model']}, batch 1..32, fp32. Replica = a fresh process, timed from its own start to its "
        "first answer. Latency: ms per engine call, median (min-max) of 7 interleaved rounds of 50 calls.",
        "",
        "| backend | cold replica s (build s) | warm replica s | warm/cold | engine warm start s (of build) | "
        "refit s | b1 ms | b1 eager ms | b1 speed-up | b32 ms | b32 eager ms | b32 speed-up | compiles after ready |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["backends"]:
        cold, warm = row.get("cold", {}), row.get("warm", [])
        if not cold.get("ok") or not warm or not all(w.get("ok") for w in warm):
            bad = cold if not cold.get("ok") else next(w for w in warm if not w.get("ok"))
            lines.append(f"| {row['backend']} | failed: {bad.get('error')} | | | | | | | | | | | |")
            continue
        best = min((w for w in warm if w["pyc"] == "compiled"), key=lambda w: w["first_answer_s"])
        cold_engine = cold["report"]["seconds"]
        refit = row["swap"]["steps"].get("refit") or row["swap"]["steps"].get("exclusive") or 0.0
        lat = row["latency"]
        lines.append(
            f"| {row['backend']} | {cold['first_answer_s']:.1f} ({cold['report']['steps'].get('cache', 0):.1f}) | "
            f"{best['first_answer_s']:.2f} | {best['first_answer_s'] / cold['first_answer_s']:.1%} | "
            f"{best['report']['seconds']:.3f} ({best['report']['seconds'] / cold_engine:.1%}) | {refit:.4f} | "
            f"{_ms(lat[1]['compiled'])} | {_ms(lat[1]['eager'])} | {lat[1]['speedup']:.2f} | "
            f"{_ms(lat[32]['compiled'])} | {_ms(lat[32]['eager'])} | {lat[32]['speedup']:.2f} | "
            f"{row.get('unexpected_compiles')} |"
        )
    for row in result["backends"]:
        build = (row.get("cold", {}).get("report") or {}).get("build") or {}
        if build.get("cxx"):
            rejected = "; ".join(f"{k}: {v}" for k, v in build.get("cxx_rejected", {}).items()) or "none"
            lines += [
                "",
                f"{row['backend']}: C++ compiler {build['cxx']} ({build['cxx_version']}); rejected: {rejected}",
            ]
    lines += ["", "Warm replicas, phase by phase (seconds):", ""]
    lines += [
        "| backend | .pyc | first answer | imports | model | weights | engine | verify |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["backends"]:
        for w in row.get("warm", []):
            if w.get("ok"):
                p = w["report"]["phases"]
                lines.append(
                    f"| {row['backend']} | {w['pyc']} | {w['first_answer_s']:.2f} | {p.get('imports', 0):.2f} | "
                    f"{p['model']:.2f} | {p['weights']:.2f} | {p['engine']:.3f} | {p['verify']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--backends", default="aoti,inductor")
    ap.add_argument("--compileall", action="store_true", help="byte-compile site-packages after the first warm run")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (to try it)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "cpus": os.cpu_count(),
            "cxx_env": os.environ.get("CXX"),
        },
        "backends": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, backend in enumerate(args.backends.split(",")):
            t0 = time.perf_counter()
            try:
                row = cycle(args.model, backend, Path(tmp), args.timeout, pyc_first=args.compileall and i == 0)
            except Exception as e:  # report and go on to the next backend
                row = {"backend": backend, "cold": {"ok": False, "error": f"{type(e).__name__}: {e}"}}
            row["stage_s"] = time.perf_counter() - t0
            result["backends"].append(row)
            print(json.dumps(row, default=str)[:4000], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(anonymise(json.dumps(result, indent=1, default=str)))
    (out / "gpu.md").write_text(anonymise(markdown(result)))
    print(markdown(result))


def anonymise(text: str) -> str:
    """Results name no paths of the machine they ran on: temp dirs, $CXX and the system compiler by role."""
    cxx = os.environ.get("CXX")
    if cxx:
        text = text.replace(cxx, "$CXX")
    text = re.sub(r"/usr/bin/(g\+\+|c\+\+|clang\+\+)", r"\1 (system)", text)
    return re.sub(re.escape(tempfile.gettempdir()) + r"/[\w./-]+", "$TMP", text)


if __name__ == "__main__":
    main()
