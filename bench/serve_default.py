"""The service exactly as `warmserve run` starts it on this host (its own layout and ingress), under load.

python bench/serve_default.py [--seconds 8] [--concurrency 64] [--out DIR] [-- extra `warmserve run` arguments]

Starts `warmserve run` in a fresh HOME, waits for its ready line, sends OIP binary requests of 1 and 32 rows
and /v1/classify photos at ``--concurrency`` (bench/serve_throughput.py's load generator), then stops it with
SIGTERM and reports what it printed, the throughput and its exit code (Markdown, and JSON under ``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import warmserve_run  # noqa: E402
from bench.serve_throughput import JPEG, load, oip_binary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="torchvision:resnet18", help="passed to `warmserve run --model`")
    ap.add_argument("--out", help="write serve-default.{json,md} here")
    ap.add_argument("run_args", nargs="*", help="after --: more `warmserve run` arguments")
    args = ap.parse_args()
    name = args.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "points": []}
    home = Path(tempfile.mkdtemp(prefix="warmserve-home-"))
    service = None
    try:
        with warmserve_run(["--model", args.model, "--port", str(args.port), *args.run_args], home) as service:
            said = [line for line in service.log.read_text().splitlines() if line.startswith("warmserve:")]
            print("\n".join(said))
            print(f"ready {service.ready_s:.1f}s after the command started")
            result.update(said=said, ready_s=service.ready_s)
            base = f"http://127.0.0.1:{args.port}"
            meta = requests.get(f"{base}/v2/models/{name}", timeout=30).json()
            shape = [int(d) for d in meta["inputs"][0]["shape"][1:]]
            print("| workload | clients | items/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|---|")
            for workload, url, (body, headers), rows in [
                ("b1", f"{base}/v2/models/{name}/infer", oip_binary(1, shape), 1),
                ("rows32", f"{base}/v2/models/{name}/infer", oip_binary(32, shape), 32),
                ("jpeg", f"{base}/v1/classify", (JPEG.read_bytes(), {"content-type": "image/jpeg"}), 1),
            ]:
                p = load(url, body, headers, args.concurrency, args.client_procs, args.seconds)
                p.update(workload=workload, clients=args.concurrency, items_per_s=p["requests_per_s"] * rows)
                result["points"].append(p)  # type: ignore[attr-defined]
                print(
                    f"| {workload} | {args.concurrency} | {p['items_per_s']:.0f} | {p['p50_ms']:.1f} | "
                    f"{p['p99_ms']:.1f} | {p['failed']} |",
                    flush=True,
                )
    except RuntimeError as e:
        raise SystemExit(str(e)) from e
    finally:
        if service is not None:
            print(f"warmserve run exited {service.exit_code} after SIGTERM")
            result["exit_code"] = service.exit_code
        shutil.rmtree(home, ignore_errors=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "serve-default.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
