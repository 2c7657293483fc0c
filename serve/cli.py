"""`warmserve build`: prewarm the engine cache for a model (compile once, or confirm a hit) and report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from warmserve.cache.config import add_options, environment_help, given
from warmserve.serve.metrics import Metrics, PrometheusSink
from warmserve.serve.progress import Progress
from warmserve.serve.settings import SETTINGS, Settings

logger = logging.getLogger(__name__)


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings the command line gives (`add_options`' options, the positional MODEL), then the
    environment's, then the defaults."""
    return Settings.load(options={**given(args, SETTINGS), "model": args.model})


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="prewarm the engine cache for a model",
        description="Compile MODEL through a backend into the engine cache (or confirm it is already there), "
        "load it, refit the weights and check the result against eager PyTorch.",
        epilog="MODEL is torchvision:<name> (e.g. torchvision:resnet18) or package.module:factory. "
        + environment_help(SETTINGS),
    )
    p.add_argument("model", metavar="MODEL", help="torchvision:<name> or package.module:factory")
    add_options(p, SETTINGS, "build")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the start report as one JSON line (key, outcome, backend, seconds...)",
    )
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on PORT while running")
    p.add_argument("--pushgateway", metavar="URL", help="push metrics to this Prometheus Pushgateway when done")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from warmserve.serve.worker import Worker

    sink = PrometheusSink()
    if args.metrics_port:
        import prometheus_client

        prometheus_client.start_http_server(args.metrics_port, addr="127.0.0.1", registry=sink.registry)
    settings = settings_from(args)  # errors end the command at its one boundary (warmserve.deployments.cli)
    spec = settings.model
    worker = Worker(
        spec,
        backend=settings.backend,
        device=settings.device,
        cache_config=settings.cache,
        metrics=Metrics(sink),
        verify=settings.verify,
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
