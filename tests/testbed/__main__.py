"""``python -m tests.testbed {run -- CMD...|serve|build-opensearch [--force]}``."""

from __future__ import annotations

import argparse
import sys

from ._proc import ServiceError, log
from .launcher import run, serve
from .opensearch_node import build_classpath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description=(
            "Real Redis, a Redis Cluster, OpenSearch and moto on 127.0.0.1 for viewkeeper's tests."
        ),
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run_parser = sub.add_parser(
        "run", help="start the services, run CMD with their URLs in its env, stop them"
    )
    run_parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    sub.add_parser("serve", help="start the services and wait; prints export lines")
    build = sub.add_parser("build-opensearch", help="build .cache/opensearch only")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)

    try:
        if args.action == "run":
            command = list(args.command)
            if command[:1] == ["--"]:
                command = command[1:]
            return run(command)
        if args.action == "serve":
            return serve()
        print(build_classpath(force=args.force))
        return 0
    except ServiceError as exc:
        log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
