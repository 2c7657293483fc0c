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

from warmserve.cache import cli as cache_cli
from warmserve.deployments.host import INGRESSES


def parser(cache_only: bool = False) -> argparse.ArgumentParser:
    """The root parser. ``cache_only`` leaves out the commands that need torch, so that
    `warmserve cache ...` starts in a fraction of a second."""
    p = argparse.ArgumentParser(
        prog="warmserve",
        description="Serve PyTorch models on Ray Serve with a shared warm-start engine cache.",
        epilog="Exit codes, every command: 0 done; 1 a check failed (a refused rollout, a bad cache entry, an engine "
        "that does not match eager); 2 usage or configuration (a wrong model, weights or option); 3 something "
        "unreachable or refusing (a store, the Ray dashboard, its token). An error is one line on stderr, and with "
        '--json also one JSON line on stdout: {"error": ..., "exit_code": ...}.',
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_cli.add_parser(sub)
    if not cache_only:
        from warmserve.serve import cli as serve_cli

        serve_cli.add_parser(sub)
        add_run_parser(sub)
        add_rollout_parser(sub)
    return p


DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the HTTP service on Ray Serve (starts a local Ray unless RAY_ADDRESS is set)",
        description="Run deployments/config.yaml (or --config) on Ray Serve, after applying the options "
        "below. With no options: resnet18 with seeded demo weights (random labels), the best backend here, a "
        "local cache directory. Mistakes (model, weights, backend, port, cache trust) are reported before Ray "
        "starts; a deployment that fails anyway ends the command with its reason (exit 1).",
        epilog="A setting comes from its option, else the config's application args (same names, with _), else "
        "its variable, else its default. After `warmserve rollout`, a restart serves the last rolled-out weights "
        "(recorded under the cache directory) unless --weights or --no-resume is given. " + _environment_help(),
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: the embedded one)")
    from warmserve.cache.config import add_options
    from warmserve.serve.settings import SETTINGS

    add_options(p, SETTINGS, "run")
    p.add_argument(
        "--replicas",
        type=_positive,
        metavar="N",
        help="fixed replica count (default: the config's autoscaling, from min_replicas up to as many as fit: on a "
        "GPU host 3 replicas per 4 cores, at most 12 per GPU, sharing it; on a CPU one per num_cpus cores)",
    )
    p.add_argument(
        "--ingress",
        choices=INGRESSES,
        default="auto",
        help="HTTP ingress of a local Ray: haproxy (Ray Serve's HAProxy, straight to the replicas' own HTTP "
        "servers), serve (Serve's Python proxy), auto (default: haproxy where Ray Serve's HAProxy is installed, "
        "as ray[serve] installs it on Linux; else serve)",
    )
    p.add_argument("--host", help="HTTP host (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    p.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="gRPC port of the Open Inference Protocol, as tritonclient.grpc speaks it (default from the config: "
        "8001; 0 turns gRPC off)",
    )
    p.add_argument("--no-resume", action="store_true", help="serve the config's weights, not the last rollout's")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="check the model, weights and signature, print the effective config and exit",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="once ready, print one JSON line on stdout (url, model, backend, weights, start report); an error "
        "is one JSON line too",
    )
    p.set_defaults(func=run_service)


def _environment_help() -> str:
    from warmserve.cache.config import environment_help
    from warmserve.serve.settings import SETTINGS

    return environment_help(SETTINGS)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def effective_config(args: argparse.Namespace) -> tuple[dict[str, Any], list[str], str]:
    """The config `warmserve run` deploys, what to tell the operator (the weights it resumed or did not, the
    layout it chose for this host) and the ingress."""
    from warmserve.cache.config import given
    from warmserve.deployments import host
    from warmserve.deployments.runner import app_entry, bind_weights, effective_config, load_config, ray_address
    from warmserve.serve.settings import SETTINGS

    overrides = given(args, SETTINGS)
    config = effective_config(load_config(args.config), overrides)
    app = app_entry(config)
    if args.weights or args.weights_version:
        for dep in app.get("deployments", []):
            uc = dep.setdefault("user_config", {})
            uc["weights"] = app["args"].get("weights")
            uc["weights_version"] = app["args"].get("weights_version", "v1")
            for stale in ("weights_sha256", "signature"):
                uc.pop(stale, None)
    note = bind_weights(config, explicit=bool(args.weights), resume=not args.no_resume)
    ingress, source = args.ingress, "--ingress haproxy"
    if ingress == "auto" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") in ("0", "1"):  # the operator's choice
        ingress = "haproxy" if os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" else "serve"
        source = "RAY_SERVE_ENABLE_HA_PROXY=1"
    device = str(app["args"].get("device") or "auto")
    layout = host.plan(
        config,
        gpus=0 if device == "cpu" else _gpus(),
        cpus=host.host_cpus(),
        ingress=ingress,
        replicas=args.replicas,
        haproxy=host.haproxy_binary(),
        joining=ray_address()[0] is not None,
        ingress_source=source,
    )
    layout.apply(config)
    http = config.setdefault("http_options", {})
    if args.host:
        http["host"] = args.host
    if args.port:
        http["port"] = args.port
    if args.grpc_port is not None:
        config.setdefault("grpc_options", {})["port"] = args.grpc_port
    return config, [n for n in (note, layout.why) if n], layout.ingress


def _gpus() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def run_service(args: argparse.Namespace) -> int:
    import yaml

    from warmserve.deployments import runner

    config, notes, ingress = effective_config(args)
    if args.print_config:
        # What a replica would fail on wherever it runs (model, weights, signature), checked as `run` checks it;
        # not this machine's ports and devices: a config printed here may be deployed elsewhere.
        runner.preflight(config, local=False)
        for note in notes:
            print(f"# {note}")
        print(yaml.safe_dump(config, sort_keys=False))
        return 0
    return runner.serve(config, verbose=args.verbose > 0, ingress=ingress, notes=notes, json_lines=args.json)


def add_rollout_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rollout",
        help="deploy new weights to every live replica (refit in place, no restart, no rebuild)",
        description="Change the weights in the running application's user_config through the Ray dashboard's "
        "Serve REST API (with Ray's token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); every "
        "replica validates, refits, checks against eager and switches atomically. The weights are pinned by "
        "their sha256 and a version label names one content. If any replica refuses the weights, the previous "
        "config is restored, so replicas started later serve the last good version too.",
        epilog="Exit codes: 0 every replica serves the new weights; 1 refused or not finished (previous config "
        "restored); 2 usage (e.g. a version label reused for other weights); 3 the dashboard is unreachable or "
        "refuses Ray's token.",
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
        "--sha256",
        metavar="HEX",
        help="the weights' sha256, when this machine cannot read --weights (default: read the file and hash it)",
    )
    p.add_argument(
        "--http",
        metavar="URL",
        help="the service's URL, to confirm what each replica serves (default: the cluster's own HTTP address; "
        "'' waits for Serve only)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON line on stdout (status, version, sha256, replicas); an error too",
    )
    p.set_defaults(func=run_rollout)


def run_rollout(args: argparse.Namespace) -> int:
    import signal

    from warmserve.deployments.auth import TOKEN_ENV
    from warmserve.deployments.rollout import rollout

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # `kill` restores the previous config, as Ctrl-C does

    signal.signal(signal.SIGTERM, interrupt)
    try:
        result = rollout(
            args.address,
            args.weights,
            args.version,
            app=args.app,
            deployment=args.deployment,
            wait_s=args.wait,
            http=args.http or None,
            sha256=args.sha256,
            check=args.http != "",
            token=os.environ.get(TOKEN_ENV) or None,  # the replicas' admin token, where it is set
        )
    except KeyboardInterrupt:
        print("error: interrupted before the rollout began; nothing was changed", file=sys.stderr)
        return 1
    if result["status"] == "unchanged":
        print(f"warmserve: {result['version']} with these weights is already what the config serves", file=sys.stderr)
    else:
        print(f"warmserve: {result['replicas']} replica(s) serve {result['version']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


def _peer_tier(config: Any) -> Any:
    from warmserve.deployments.peers import listing

    return listing(config)


def exit_code(e: BaseException) -> int | None:
    """The exit status of an error that ends a command (see the root parser's epilog): the error's own
    ``exit_code``, else that of the most specific class in its MRO listed below; None for anything else, a bug,
    which keeps its traceback."""
    from warmserve.cache import errors as cache
    from warmserve.serve import errors as serve

    own = getattr(e, "exit_code", None)
    if isinstance(own, int):
        return own
    requests = sys.modules.get("requests")  # loaded by whatever made the HTTP call
    if requests is not None and isinstance(e, requests.RequestException):
        return 3
    codes: dict[type[BaseException], int] = {
        cache.StoreUnavailable: 3,
        ConnectionError: 3,
        cache.UntrustedCache: 2,
        cache.InvalidKey: 2,
        cache.UnknownStore: 2,
        FileNotFoundError: 2,  # a path the operator gave
        cache.CacheError: 1,  # a corrupt entry, a build waited for in vain
        serve.RefitError: 1,
        serve.WarmserveError: 2,  # model, weights, backend, input: what the operator gave
        ValueError: 2,
    }
    return next((codes[c] for c in type(e).__mro__ if c in codes), None)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)
    args = parser(cache_only=command == "cache").parse_args(words)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cache_cli.run(args, peers=_peer_tier) if args.command == "cache" else int(args.func(args))
    except Exception as e:  # the one error boundary of every command
        code = exit_code(e)
        if code is None:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "exit_code": code}))
        print(f"error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
