"""The `warmserve` command: cache maintenance, prewarming builds, running the service, rolling out weights."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cache import cli as cache_cli
from serve import cli as serve_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmserve",
        description="Serve PyTorch models on Ray Serve with a shared warm-start engine cache.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "cache":
        return cache_cli.run(args)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
