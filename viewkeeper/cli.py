"""The ``viewkeeper`` command: run, rebuild, status, check, deadletters, demo.

Exit codes: 0 success, 1 a runtime failure (a service, a rebuild handshake), 2 bad arguments,
78 (EX_CONFIG) a bad config file or view module — the unit file's RestartPreventExitStatus=78
keeps systemd from restarting into the same mistake.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from viewkeeper import __version__

log = logging.getLogger("viewkeeper.cli")

EX_CONFIG = 78
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
        description="Run the daemon. SIGTERM/SIGINT drain: no new leases, the "
        "batch in flight is applied and checkpointed, leases are released; a "
        "second signal exits at once.",
    )
    _config_arg(p)
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit 0 once every shard is read to its end (tests, batch use)",
    )

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
        "--table", action="append", default=[], help="rebuild every view of this table (repeatable)"
    )
    p.add_argument("--all", action="store_true", help="rebuild every view")
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

    p = sub.add_parser("status", help="per shard: owner, state, lag, checkpoint")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("check", help="validate the config, import views, reach every service")
    _config_arg(p)
    p.add_argument(
        "--offline", action="store_true", help="only validate the config and import the views"
    )

    p = sub.add_parser("deadletters", help="list or replay records that could not be applied")
    dsub = p.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    d = dsub.add_parser("list", help="list dead letters")
    _config_arg(d)
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d = dsub.add_parser("replay", help="apply dead letters again (stale ones are discarded)")
    _config_arg(d)
    d.add_argument("--id", action="append", default=None, help="replay only this id")

    p = sub.add_parser(
        "demo",
        help="a self-contained demo: local DynamoDB, views updating",
        description="Start a local DynamoDB with a stream (moto, in-process), "
        "fakeredis unless --redis-url is given, write, change and delete sample "
        "orders, and show the views following along.",
    )
    p.add_argument("--redis-url", help="use this Redis instead of fakeredis")
    p.add_argument(
        "--opensearch-url", help="also keep an OpenSearch index (e.g. http://127.0.0.1:9200)"
    )
    p.add_argument(
        "--pace",
        type=float,
        default=0.6,
        help="seconds between demo steps (default 0.6; 0 for tests)",
    )
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


# --- commands ---------------------------------------------------------------------------
def _app(args: argparse.Namespace) -> Any:
    from viewkeeper.app import App
    from viewkeeper.ops.logs import setup_logging

    app = App.from_file(args.config)
    setup_logging(app.config.logging.format, app.config.logging.level)
    for warning in app.warnings:
        log.warning("%s", warning)
    return app


def cmd_run(args: argparse.Namespace) -> int:
    from viewkeeper.ops import metrics
    from viewkeeper.ops.sdnotify import Notifier, WatchdogThread

    app = _app(args)
    sup = app.supervisor()
    mconf = app.config.metrics
    if mconf.port is not None:
        metrics.serve(mconf.port, mconf.host)
        log.info("metrics on http://%s:%d/metrics", mconf.host, mconf.port)
    notifier = Notifier()
    signals = _install_signals(sup.request_stop)

    def status_line() -> str:
        shards, worst = sup.summary()
        return f"{shards} shards, worst lag {worst:.1f}s"

    draining = [False]

    def status_or_drain() -> str:
        if sup.stopping.is_set() and not draining[0]:
            draining[0] = True
            notifier.stopping("draining: finishing batches in flight, releasing leases")
        return status_line()

    watchdog: WatchdogThread | None = None
    if notifier.enabled:
        # WATCHDOG=1 only while the supervisor loop keeps turning (or is draining, which
        # TimeoutStopSec bounds); STATUS is refreshed even without WatchdogSec.
        watchdog = WatchdogThread(
            notifier, notifier.watchdog_interval() or 5.0, sup.healthy, status_or_drain
        )
    ready = [False]
    last_purge = [time.monotonic()]

    def on_tick(s: Any) -> None:
        if not ready[0]:
            ready[0] = True
            notifier.ready(status_line())
            if watchdog is not None:
                watchdog.start()
            log.info(
                "viewkeeper %s running as %s on tables %s",
                __version__,
                s.worker_id,
                ", ".join(app.tables),
            )
        if time.monotonic() - last_purge[0] > 3600:
            last_purge[0] = time.monotonic()
            _purge_tombstones(app)

    try:
        sup.run(until_caught_up=args.until_caught_up, on_tick=on_tick)
    finally:
        notifier.stopping("draining")
        if watchdog is not None:
            watchdog.stop()
        signals.restore()
        app.close()
    log.info("stopped cleanly")
    return 0


def _purge_tombstones(app: Any) -> None:
    cutoff = time.time() - app.config.tombstones.retention_hours * 3600
    for view in app.registry:
        try:
            n = app.pipeline().sink_for(view).purge_tombstones(view, cutoff)
            if n:
                log.info("purged %d tombstones of %s", n, view.name)
        except Exception as exc:
            log.warning("purging tombstones of %s failed: %s", view.name, exc)


class _Signals:
    """First SIGTERM/SIGINT: warm shutdown (drain). A duplicate within a second is ignored
    (systemd and a terminal may both send one). A later second signal exits at once."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self.first_at: float | None = None
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self.stop()  # sets events only
        elif now - self.first_at > 1.0:
            os._exit(1)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _install_signals(stop: Any) -> _Signals:
    sig = _Signals(stop)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, sig.handle)
    return sig


def cmd_rebuild(args: argparse.Namespace) -> int:
    from viewkeeper.projection.registry import ViewLoadError
    from viewkeeper.rebuild import HandshakeTimeout, rebuild

    app = _app(args)
    if args.all:
        views = list(app.registry)
    else:
        views = [app.registry.get(name) for name in args.views]
        for table in args.table:
            found = app.registry.by_table(table)
            if not found:
                raise ViewLoadError(f"--table {table}: no loaded view reads table {table!r}")
            views += [v for v in found if v not in views]
    if not views:
        raise ViewLoadError("name the views to rebuild (VIEW ...), or --table TABLE, or --all")
    if args.segments < 1:
        raise ViewLoadError(f"--segments {args.segments}: use 1 or more segments")
    settings = app.rebuild_settings(
        segments=args.segments,
        max_items_per_second=args.max_items_per_second,
        handshake_timeout=args.handshake_timeout,
    )
    try:
        report = rebuild(
            views, app.registry, app.client, app.store, app.pipeline, settings, out=sys.stdout
        )
    except HandshakeTimeout as exc:
        print(f"viewkeeper: {exc}", file=sys.stderr)
        return 1
    finally:
        app.close()
    return 0 if report.dead_lettered == 0 else 1


def cmd_status(args: argparse.Namespace) -> int:
    from viewkeeper.status import collect, format_table

    app = _app(args)
    data = collect(app.store, app.tables)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_table(data))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from viewkeeper.config import redacted

    app = _app(args)
    print(f"config {args.config}: ok")
    for view in app.registry:
        target = view.index if view.kind == "opensearch" else "keys"
        print(
            f"  view {view.name:<20} table {view.table:<16} {view.kind} {view.connection} "
            f"({target}) from {view.where}"
        )
    if args.offline:
        print(json.dumps(redacted(app.config), indent=2, default=str))
        return 0
    failures = 0
    for table in app.tables:
        try:
            info = app.client.describe_table(table)
            ok = info.stream_arn and info.stream_view_type in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES")
            print(
                f"  dynamodb table {table}: key {', '.join(info.key_names)}; stream "
                f"{info.stream_view_type or 'none'}"
                + ("" if ok else "  <-- needs a stream with NEW_AND_OLD_IMAGES")
            )
            failures += not ok
        except Exception as exc:
            print(f"  dynamodb table {table}: FAILED: {exc}")
            failures += 1
    try:
        app.store.ensure()
        print(f"  coordination table {app.config.coordination.table}: ok")
    except Exception as exc:
        print(f"  coordination table {app.config.coordination.table}: FAILED: {exc}")
        failures += 1
    try:
        for (kind, name), sink in app.sinks.items():
            sink.ping()
            print(f"  {kind} {name}: ok")
    except Exception as exc:
        print(f"  sink: FAILED: {exc}")
        failures += 1
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 0 if not failures else 1


def cmd_deadletters(args: argparse.Namespace) -> int:
    from viewkeeper.deadletters import format_deadletters, replay

    app = _app(args)
    if args.action == "list":
        dls = app.store.list_deadletters()
        if args.json:
            print(json.dumps([dataclasses.asdict(d) for d in dls], indent=2, default=str))
        else:
            print(format_deadletters(dls))
        return 0
    report = replay(app.store, app.pipeline(), app.key_names, set(args.id) if args.id else None)
    print(
        f"replayed {report.replayed}: applied {report.applied}, stale {report.stale}, "
        f"failed again {report.failed_again}; skipped {report.skipped} (scan items: re-run "
        "the rebuild)"
    )
    app.close()
    return 0 if report.failed_again == 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from viewkeeper.demo import run_demo

    return run_demo(redis_url=args.redis_url, opensearch_url=args.opensearch_url, pace=args.pace)


_COMMANDS = {
    "run": cmd_run,
    "rebuild": cmd_rebuild,
    "status": cmd_status,
    "check": cmd_check,
    "deadletters": cmd_deadletters,
    "demo": cmd_demo,
}

if __name__ == "__main__":
    sys.exit(main())
