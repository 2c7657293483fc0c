"""The `warmserve` command: cache maintenance, prewarming builds, running the service, rolling out weights."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cache import cli as cache_cli


def parser(cache_only: bool = False) -> argparse.ArgumentParser:
    """The root parser. ``cache_only`` leaves out the commands that need torch, so that
    `warmserve cache ...` starts in a fraction of a second."""
    p = argparse.ArgumentParser(
        prog="warmserve",
        description="Serve PyTorch models on Ray Serve with a shared warm-start engine cache.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_cli.add_parser(sub)
    if not cache_only:
        from serve import cli as serve_cli

        serve_cli.add_parser(sub)
        add_run_parser(sub)
        add_rollout_parser(sub)
    return p


DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the HTTP service on Ray Serve (starts a local Ray unless RAY_ADDRESS is set)",
        description="Run deployments/config.yaml (or --config) with `serve run`, after applying the options "
        "below. With no options: resnet18 with demo weights, the best backend here, a local cache directory.",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: the embedded one)")
    p.add_argument("--model", help="torchvision:<name> or package.module:factory")
    p.add_argument("--weights", metavar="URI")
    p.add_argument("--weights-version", metavar="V")
    p.add_argument("--input-shape", metavar="C,H,W")
    p.add_argument("--batch", metavar="MIN:MAX")
    from serve import backends

    p.add_argument("--backend", choices=backends.NAMES)
    p.add_argument("--device")
    p.add_argument("--cache-dir", metavar="DIR")
    p.add_argument("--shared-cache", metavar="URL")
    p.add_argument("--replicas", type=int, metavar="N", help="fixed replica count instead of autoscaling")
    p.add_argument("--host", help="HTTP host (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.set_defaults(func=run_service)


def effective_config(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from deployments.settings import AppSettings

    config = yaml.safe_load(args.config.read_text())
    app = config["applications"][0]
    overrides = {
        "model": args.model,
        "weights": args.weights,
        "weights_version": args.weights_version,
        "input_shape": args.input_shape,
        "batch": args.batch,
        "backend": args.backend,
        "device": args.device,
        "cache_dir": args.cache_dir,
        "shared_cache": args.shared_cache,
    }
    app.setdefault("args", {}).update({k: v for k, v in overrides.items() if v is not None})
    AppSettings.from_mapping(app["args"])
    if args.weights or args.weights_version:
        for dep in app.get("deployments", []):
            uc = dep.setdefault("user_config", {})
            uc["weights"] = app["args"].get("weights")
            uc["weights_version"] = app["args"].get("weights_version", "v1")
    if _has_gpu():
        # A GPU fraction per replica, unless the config already asks for GPUs.
        for dep in app.get("deployments", []):
            dep.setdefault("ray_actor_options", {}).setdefault("num_gpus", 0.25)
    if args.replicas:
        for dep in app.get("deployments", []):
            dep.pop("autoscaling_config", None)
            dep["num_replicas"] = args.replicas
    http = config.setdefault("http_options", {})
    if args.host:
        http["host"] = args.host
    if args.port:
        http["port"] = args.port
    return dict(config)


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run_service(args: argparse.Namespace) -> int:
    import tempfile

    import yaml

    try:
        config = effective_config(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False))
        return 0
    http = config.get("http_options", {})
    print(
        f"warmserve: starting on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)} "
        "(first start compiles the model; later replicas start warm from the cache)",
        file=sys.stderr,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="warmserve-", delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    from ray.serve.scripts import cli as serve_cli

    serve_cli.main(["run", f.name], standalone_mode=True)
    return 0


def add_rollout_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rollout",
        help="deploy new weights to every live replica (refit in place, no restart, no rebuild)",
        description="Change the weights in the running application's user_config through the Ray dashboard's "
        "Serve REST API; every replica validates, refits, checks against eager and switches atomically. Bad "
        "weights are refused by each replica, which keeps serving the old version.",
    )
    p.add_argument("--weights", required=True, metavar="URI", help="path or fsspec URL every replica can read")
    p.add_argument("--version", required=True, metavar="V", help="label of the new weights (e.g. v2)")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"),
        help="Ray dashboard address (default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)",
    )
    p.add_argument("--app", default="warmserve")
    p.add_argument("--deployment", default="WarmModel")
    p.add_argument("--wait", type=float, default=300.0, metavar="S", help="seconds to wait for the update (300)")
    p.add_argument(
        "--http",
        default="http://127.0.0.1:8000",
        metavar="URL",
        help="the service's URL, to confirm each replica's version ('' to skip)",
    )
    p.set_defaults(func=run_rollout)


def run_rollout(args: argparse.Namespace) -> int:
    from deployments.rollout import RolloutError, rollout

    try:
        result = rollout(
            args.address,
            args.weights,
            args.version,
            app=args.app,
            deployment=args.deployment,
            wait_s=args.wait,
            http=args.http or None,
        )
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)
    args = parser(cache_only=command == "cache").parse_args(words)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "cache":
        return cache_cli.run(args)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
