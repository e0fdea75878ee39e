"""The ``viewkeeper`` command: run, rebuild, status, check, deadletters, demo.

Exit codes: 0 success, 1 a runtime failure (a service, a rebuild handshake), 2 bad arguments,
78 (EX_CONFIG) a bad config file or view module, or a coordination table that cannot be used
as configured — the unit file's RestartPreventExitStatus=78 keeps systemd from restarting into
the same mistake.

Failures are reported as one line on stderr, ``viewkeeper: <what> at <host:port>: <why>;
<fix>``, never as a traceback (the traceback is logged at DEBUG level, so
``logging.level: DEBUG`` shows it) and never with a secret in it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from viewkeeper import __version__
from viewkeeper.cli.commands import (
    _take_over,
    cmd_check,
    cmd_deadletters,
    cmd_demo,
    cmd_rebuild,
    cmd_status,
)
from viewkeeper.cli.failures import EX_CONFIG, EX_FAILURE, Failure, explain_failure
from viewkeeper.cli.run import cmd_run, probe_redis_tls, serve_metrics

__all__ = [
    "EX_CONFIG",
    "EX_FAILURE",
    "Failure",
    "_take_over",
    "build_parser",
    "explain_failure",
    "main",
    "probe_redis_tls",
    "serve_metrics",
]

log = logging.getLogger("viewkeeper.cli")


CONFIG_HELP = "the YAML config file (default: $VIEWKEEPER_CONFIG or ./viewkeeper.yaml)"


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=os.environ.get("VIEWKEEPER_CONFIG", "viewkeeper.yaml"),
        help=CONFIG_HELP,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viewkeeper",
        description="Keep Redis caches and OpenSearch indexes exactly in sync with DynamoDB "
        "Streams, through views declared as Python functions.",
    )
    parser.add_argument("--version", action="version", version=f"viewkeeper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "run",
        help="run the daemon: lease shards, apply records to the views",
        description="Run the daemon. Start-up checks the metrics port (one taken by "
        "another process is a warning: the daemon runs without metrics), the coordination "
        "table and the source tables' streams; the first that cannot be used ends the "
        "process with one line naming it and the fix: exit 1 for a service that cannot be "
        "reached (under systemd, Restart=on-failure starts it again), 78 for a config or "
        "coordination table that cannot work. A Redis or OpenSearch that is down is logged "
        "and waited for, at start as later: its batches retry with the checkpoint held "
        "until it is back (with --until-caught-up it fails at once instead). SIGTERM/SIGINT "
        "drain: no new leases, the batch in flight is applied and checkpointed, leases are "
        "released; a second signal exits at once.",
    )
    _config_arg(p)
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit 0 once every shard is read to its end (tests, batch use; one process)",
    )
    p.add_argument(
        "--processes",
        default=None,
        metavar="N",
        help="processes on this host (a number, or auto: one per usable core; default: "
        "worker.processes, 1). More than one: this process supervises N children that share "
        "the shards through the leases, serves their metrics on one endpoint and speaks "
        "sd_notify for them",
    )
    # set by the parent of `--processes N` in its children; not for people
    p.add_argument("--child-of", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-index", type=int, default=0, help=argparse.SUPPRESS)

    p = sub.add_parser(
        "rebuild",
        help="rebuild views from a full table scan, live",
        description="Raise the views' generation, wait for every live worker "
        "to acknowledge it, scan the table in parallel segments and write every "
        "item, then retract what older generations still own.",
    )
    p.add_argument("views", nargs="*", metavar="VIEW", help="view names to rebuild")
    _config_arg(p)
    p.add_argument(
        "--table",
        action="append",
        default=[],
        help="rebuild every view of this table (repeatable; change-log views are skipped)",
    )
    p.add_argument(
        "--all", action="store_true", help="rebuild every view (change-log views are skipped)"
    )
    p.add_argument("--segments", type=int, default=4, help="parallel scan segments (default 4)")
    p.add_argument(
        "--max-items-per-second",
        type=float,
        default=None,
        help="read-capacity guard for the scan (default: unlimited)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for workers to acknowledge (default 60)",
    )
    p.add_argument(
        "--take-over",
        action="store_true",
        help="claim these views' namespaces from the deployment that wrote them (another "
        "table or coordination table), delete what it wrote there, and rebuild",
    )
    p.add_argument(
        "--take-over-grace",
        type=float,
        default=60.0,
        help="seconds the other deployment's daemons get to notice a take-over and stop "
        "writing before its data is deleted (default 60)",
    )

    p = sub.add_parser("status", help="per shard: owner, state, lag, checkpoint")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("check", help="validate the config, import views, reach every service")
    _config_arg(p)
    p.add_argument(
        "--offline", action="store_true", help="only validate the config and import the views"
    )

    p = sub.add_parser("deadletters", help="list, replay or drop records that could not be applied")
    dsub = p.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    d = dsub.add_parser("list", help="list dead letters (EXPIRED: too old to replay)")
    _config_arg(d)
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d = dsub.add_parser(
        "replay",
        help="apply dead letters again at the generation they were read with (stale ones are "
        "discarded; those older than the tombstone retention are refused)",
    )
    _config_arg(d)
    d.add_argument("--id", action="append", default=None, help="replay only this id")
    d = dsub.add_parser("drop", help="remove dead letters (after a rebuild made them moot)")
    _config_arg(d)
    d.add_argument("--id", action="append", default=[], help="remove this id")
    d.add_argument(
        "--expired", action="store_true", help="remove those older than the tombstone retention"
    )

    p = sub.add_parser(
        "demo",
        help="a self-contained demo: local DynamoDB, views updating",
        description="Start a local DynamoDB with a stream (moto, in-process), "
        "fakeredis unless --redis-url is given, write, change and delete sample "
        "orders, and show the views following along. On a Redis or OpenSearch of yours it "
        "writes only names of its own (keys 'viewkeeper-demo:...', indexes "
        "'viewkeeper-demo-...'), removes what an earlier demo left there first, and "
        "removes them at the end unless --keep.",
    )
    p.add_argument("--redis-url", help="use this Redis instead of fakeredis")
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis-url is a node of a Redis Cluster: use the cluster sink (as cluster: true "
        "does in a config)",
    )
    p.add_argument(
        "--opensearch-url", help="also keep an OpenSearch index (e.g. http://127.0.0.1:9200)"
    )
    p.add_argument(
        "--pace",
        type=float,
        default=0.6,
        help="seconds between demo steps (default 0.6; 0 for tests)",
    )
    p.add_argument("--keep", action="store_true", help="leave the demo's keys and indexes in place")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from viewkeeper.config import ConfigError
    from viewkeeper.projection.registry import ViewLoadError

    try:
        handler = _COMMANDS[args.command]
        return handler(args)
    except (ConfigError, ViewLoadError) as exc:
        print(f"viewkeeper: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        explained = explain_failure(exc)
        if explained is None:
            raise  # a bug: the traceback is what is needed
        message, code = explained
        log.debug("%s", message, exc_info=True)  # the traceback, at DEBUG level only
        print(f"viewkeeper: {message}", file=sys.stderr)
        return code


_COMMANDS = {
    "run": cmd_run,
    "rebuild": cmd_rebuild,
    "status": cmd_status,
    "check": cmd_check,
    "deadletters": cmd_deadletters,
    "demo": cmd_demo,
}
