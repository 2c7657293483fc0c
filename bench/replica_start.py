"""One replica-like process: start Python, warm-start (or build) the worker, answer one request. Prints JSON.

    python bench/replica_start.py MODEL BACKEND CACHE_DIR [--device cuda]

``first_answer_s`` runs from the process's own start (the kernel's clock, so interpreter start-up and every
import count) to the first answer; the worker's start report splits it into phases (imports, model,
weights, engine, verify). A Ray Serve replica adds Ray's worker start-up on top (bench/serve_bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("backend")
    ap.add_argument("cache_dir")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    from warmserve.cache.config import CacheConfig
    from warmserve.serve.spec import ModelSpec
    from warmserve.serve.worker import Worker, process_age

    spec = ModelSpec(model=args.model)
    worker = Worker(
        spec, backend=args.backend, device=args.device, cache_config=CacheConfig.load(cache_dir=args.cache_dir)
    )
    report = worker.start()
    out = worker.infer(spec.input.example(batch=1))
    first = process_age()
    print(
        json.dumps(
            {
                "first_answer_s": first,
                "outputs": list(out.shape),
                "unexpected_compiles": worker.fence.unexpected if worker.fence else None,
                "report": report.to_dict(),
            }
        )
    )


if __name__ == "__main__":
    main()
