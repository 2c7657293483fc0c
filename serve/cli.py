"""`warmserve build`: prewarm the engine cache for a model (compile once, or confirm a hit) and report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from warmserve.cache import cli as cache_cli
from warmserve.serve import backends
from warmserve.serve.metrics import Metrics, PrometheusSink
from warmserve.serve.progress import Progress
from warmserve.serve.spec import InputSpec, ModelSpec, parse_batch, parse_shape

logger = logging.getLogger(__name__)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        metavar="URI",
        help="safetensors or torch state dict: a path or fsspec URL "
        "(default: seeded demo weights written once under the cache dir)",
    )
    p.add_argument("--weights-version", default="v1", metavar="V", help="label of these weights (default v1)")
    p.add_argument("--input-shape", default="3,224,224", metavar="C,H,W", help="input shape without batch")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="input dtype")
    p.add_argument("--batch", default="1:32", metavar="MIN:MAX", help="batch sizes the engine supports (1:32)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="serving precision")
    p.add_argument(
        "--backend",
        default="auto",
        choices=backends.NAMES,
        help="auto = tensorrt on a GPU with TensorRT, else the fastest that runs here",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    cache_cli.add_cache_options(p)


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    lo, hi = parse_batch(args.batch)
    return ModelSpec(
        model=args.model,
        weights=args.weights,
        input=InputSpec(shape=parse_shape(args.input_shape), dtype=args.dtype, min_batch=lo, max_batch=hi),
        precision=args.precision,
        weights_version=args.weights_version,
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="prewarm the engine cache for a model",
        description="Compile MODEL through a backend into the engine cache (or confirm it is already there), "
        "load it, refit the weights and check the result against eager PyTorch.",
        epilog="MODEL is torchvision:<name> (e.g. torchvision:resnet18) or package.module:factory.",
    )
    p.add_argument("model", metavar="MODEL")
    add_model_options(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the start report as one JSON line (key, outcome, backend, seconds...)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with eager after the refit")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on PORT while running")
    p.add_argument("--pushgateway", metavar="URL", help="push metrics to this Prometheus Pushgateway when done")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from warmserve.cache.config import CacheConfig
    from warmserve.serve.worker import Worker

    sink = PrometheusSink()
    if args.metrics_port:
        import prometheus_client

        prometheus_client.start_http_server(args.metrics_port, addr="127.0.0.1", registry=sink.registry)
    spec = spec_from_args(args)  # errors end the command at its one boundary (warmserve.deployments.cli)
    config = CacheConfig.load(cache_dir=args.cache_dir, shared_url=args.shared_cache)
    worker = Worker(
        spec,
        backend=args.backend,
        device=args.device,
        cache_config=config,
        metrics=Metrics(sink),
        verify=not args.no_verify,
    )
    what = f"preparing {spec.model} ({worker.backend.name} on {worker.device})"
    with Progress(what, stream=sys.stderr):
        report = worker.start()
    if args.pushgateway:
        import prometheus_client

        try:
            prometheus_client.push_to_gateway(args.pushgateway, job="warmserve_build", registry=sink.registry)
        except OSError as e:
            print(f"warning: could not push metrics to {args.pushgateway}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        steps = ", ".join(f"{k} {v:.2f}s" for k, v in report.steps.items())
        print(f"{report.outcome}: {report.model} via {report.backend} on {report.device} in {report.seconds:.2f}s")
        print(f"  key {report.key}\n  steps: {steps}")
    return 0
