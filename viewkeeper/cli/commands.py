"""The commands other than ``run``: rebuild, status, check, deadletters, demo (and the config
loading they share)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from viewkeeper.cli.common import _app
from viewkeeper.cli.failures import Failure, _one_line, explain_failure
from viewkeeper.cli.run import probe_redis_tls

log = logging.getLogger("viewkeeper.cli")


# --- commands ---------------------------------------------------------------------------
def cmd_rebuild(args: argparse.Namespace) -> int:
    from viewkeeper.projection.registry import ViewLoadError
    from viewkeeper.runtime.rebuild import HandshakeTimeout, changelog_refusal

    app = _app(args)
    if args.all:
        views = list(app.registry)
    else:
        views = [app.registry.get(name) for name in args.views]
        named = [v.name for v in views if v.changelog]
        if named:
            raise ViewLoadError(changelog_refusal(named))
        for table in args.table:
            found = app.registry.by_table(table)
            if not found:
                raise ViewLoadError(f"--table {table}: no loaded view reads table {table!r}")
            views += [v for v in found if v not in views]
    for view in [v for v in views if v.changelog]:
        print(f"view {view.name}: a change-log view, skipped (nothing to rebuild)")
        views.remove(view)
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
        taken = app.claim(take_over=tuple(v.name for v in views) if args.take_over else ())
        _take_over(app, taken, args.take_over_grace)
        report = app.rebuild(views, settings, sys.stdout)
    except HandshakeTimeout as exc:
        print(f"viewkeeper: {exc}", file=sys.stderr)
        return 1
    finally:
        app.close()
    return 0 if report.dead_lettered == 0 else 1


def _take_over(app: Any, taken: list[Any], grace: float) -> None:
    """The namespaces just claimed from another deployment: give its daemons ``grace``
    seconds to notice (a Redis script refuses their next write at once; OpenSearch ones
    check every few seconds) and stop, then delete what they wrote."""
    if not taken:
        return
    for t in taken:
        print(f"view {t.view}: taken over from {t.previous.describe()}")
    if grace > 0:
        print(f"waiting {grace:g}s for the other deployment's daemons to stop writing")
        time.sleep(grace)
    for t in taken:
        view = app.registry.get(t.view)
        n = app.namespaces.sink_of(view).wipe(view)
        print(f"view {t.view}: deleted {n} entries the other deployment wrote")


def _check_store(app: Any) -> None:
    """Validate the coordination table without creating it (read-only commands)."""
    check: Callable[[], None] | None = getattr(app.store, "check", None)
    if check is not None:
        check()


def cmd_status(args: argparse.Namespace) -> int:
    from viewkeeper.ops.status import collect, format_table

    app = _app(args)
    _check_store(app)
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
            print(f"  dynamodb table {table}: FAILED: {_failure_line(exc)}")
            failures += 1
    try:
        app.store.ensure()
        print(f"  coordination table {app.config.coordination.table}: ok")
    except Exception as exc:
        print(f"  coordination table {app.config.coordination.table}: FAILED: {_failure_line(exc)}")
        failures += 1
    # Each connection on its own: one that is down must not hide the state of the others.
    for kind in ("redis", "opensearch"):
        for name in sorted(app.registry.connections(kind)):
            try:
                where, claims = _check_connection(app, kind, name)
                print(f"  {kind} {name}: ok ({where})")
                for line in claims:
                    print(f"    {line}")
            except Exception as exc:
                print(f"  {kind} {name}: FAILED: {_failure_line(exc)}")
                failures += 1
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 0 if not failures else 1


def _failure_line(exc: BaseException) -> str:
    explained = explain_failure(exc)
    if explained is not None:
        return explained[0]
    log.debug("check failed", exc_info=True)
    return _one_line(f"{type(exc).__name__}: {exc}")


def _check_connection(app: Any, kind: str, name: str) -> tuple[str, list[str]]:
    """Build one connection's sink on its own, reach it, prepare its views and read their
    claims (another deployment's namespace fails the check, NamespaceOwned); return where it
    is (for Redis, and in which mode it was reached: ``standalone`` or ``cluster, N
    masters``) and a line per view. (App.sinks builds every sink at once: the first failure
    would stop it.)

    A Redis in cluster mode without ``cluster: true`` is refused by the standalone sink's
    ping, and ``cluster: true`` on a standalone Redis by the cluster client (it asks for the
    cluster's slots as it is built); each says which way to set ``cluster``."""
    from viewkeeper.runtime.namespaces import NamespaceOwned, Namespaces
    from viewkeeper.sinks.connect import cluster_masters, describe_target

    views = [v for v in app.registry if (v.kind, v.connection) == (kind, name)]
    client: Any = None
    if kind == "redis":
        rconf = app.config.redis[name]
        where = describe_target(rconf.url)
        probe_redis_tls(name, rconf)
        if rconf.cluster:
            client = app.redis_cluster_client(name)
    else:
        where = ", ".join(describe_target(h) for h in app.config.opensearch[name].hosts)
    try:
        sink = app.build_sink(kind, name, client=client)
    except BaseException:
        if client is not None:
            client.close()
        raise
    try:
        sink.ping()
        if kind == "redis":
            # the standalone sink's ping refuses a server in cluster mode
            cluster = client is not None
            mode = f"cluster, {cluster_masters(client)} masters" if cluster else "standalone"
            where = f"{where}, {mode}"
        sink.prepare(views)
        spaces = Namespaces(
            app.registry,
            {(kind, name): sink},
            app.store,
            {v.table: app.owner(v.table) for v in views},
        )
        claims = [(view.name, *spaces.inspect(view, sink)) for view in views]
    finally:
        for closing in (sink, client):
            try:
                if closing is not None:
                    closing.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing %s %s: %s", kind, name, exc)
    refused = [text for _, ok, text in claims if not ok]
    if refused:
        raise NamespaceOwned("; ".join(refused))
    return where, [f"view {v}: {text}" for v, _, text in claims]


def cmd_deadletters(args: argparse.Namespace) -> int:
    from viewkeeper.runtime.deadletters import drop, expired, format_deadletters, replay

    app = _app(args)
    _check_store(app)
    retention = app.config.tombstones.retention_hours * 3600
    if args.action == "list":
        dls = app.store.list_deadletters()
        if args.json:
            print(
                json.dumps(
                    [dataclasses.asdict(d) | {"expired": expired(d, retention)} for d in dls],
                    indent=2,
                    default=str,
                )
            )
        else:
            print(format_deadletters(dls, retention))
        return 0
    if args.action == "drop":
        if not args.id and not args.expired:
            raise Failure("deadletters drop: name the dead letters (--id ID) or use --expired")
        n = drop(app.store, ids=args.id, expired_only=args.expired, retention=retention)
        print(f"dropped {n} dead letter(s)")
        return 0
    try:
        app.claim()
        report = replay(
            app.store,
            app.pipeline(),
            app.key_names,
            set(args.id) if args.id else None,
            retention=retention,
        )
    finally:
        app.close()
    print(
        f"replayed {report.replayed}: applied {report.applied}, stale {report.stale}, "
        f"failed again {report.failed_again}; skipped {report.skipped}"
    )
    for note in report.notes:
        print(f"  skipped {note}")
    return 0 if report.failed_again == 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from viewkeeper.ops.demo import run_demo

    return run_demo(
        redis_url=args.redis_url,
        opensearch_url=args.opensearch_url,
        pace=args.pace,
        keep=args.keep,
        redis_cluster=args.redis_cluster,
    )
