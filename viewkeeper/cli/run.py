"""``viewkeeper run``: the daemon's start-up checks, its signals, systemd notification and
metrics endpoint around the supervisor's loop."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from viewkeeper import __version__
from viewkeeper.cli.common import _app
from viewkeeper.cli.failures import Failure, _certificate_error

log = logging.getLogger("viewkeeper.cli")


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon.

    Start-up checks the metrics endpoint, the coordination table and every source table's
    stream before the first lease is taken. A metrics port another process holds (a second
    instance on this host) is one WARNING, and the daemon runs without an endpoint: never an
    exit that leaves shards unread. Otherwise the first that cannot be used ends the process
    with one line naming it (exit 1, so systemd's Restart=on-failure tries again; 78 for a
    config or coordination table that cannot work). A Redis or OpenSearch that is down at
    start is logged as an error and waited for, as one that goes down later is: shards hold
    their checkpoints and retry, STATUS and the lag metrics show it, and a deploy during a
    cache restart does not leave the unit failed. With --until-caught-up (batch use) it
    fails at once instead.
    """
    from viewkeeper.ops import processes
    from viewkeeper.ops.sdnotify import Notifier, WatchdogThread

    child = args.child_of is not None
    if child:
        processes.die_with_parent(args.child_of)  # first: a parent gone means stop
    app = _app(args)
    if child:
        processes.label_logs(args.child_index)
    count = 1 if child else _process_count(args, app.config.worker.processes)
    if count > 1:
        app.close()
        return processes.Parent(args.config, count, app.config.metrics, serve_metrics).run()
    app.wait_for_sinks = not args.until_caught_up
    try:
        mconf = app.config.metrics
        if mconf.port is not None and not child:  # a child's figures: its parent serves them
            try:
                serve_metrics(mconf.host, mconf.port)
                log.info("metrics on http://%s:%d/metrics", mconf.host, mconf.port)
            except PortTaken as exc:
                # a second instance on this host (or one still stopping): run without
                # metrics rather than leave shards unread
                log.warning("%s; running without a metrics endpoint", exc)
        _preflight(app)
        _claim_namespaces(app)
        if app.config.worker.on_sink_loss == "rebuild":
            app.enable_auto_rebuild()
        worker_id = app.config.worker.worker_id
        if child and worker_id:
            worker_id = f"{worker_id}-p{args.child_index}"  # ids must be unique
        sup = app.supervisor(worker_id=worker_id)
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
            if child and processes.parent_gone(args.child_of):
                # PR_SET_PDEATHSIG's fallback (another OS, or a parent gone before it was set)
                log.warning("parent process %d is gone; draining", args.child_of)
                s.request_stop()
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
    finally:
        app.close()
    log.info("stopped cleanly")
    return 0


def _process_count(args: argparse.Namespace, configured: int | str) -> int:
    """How many processes to run: ``--processes`` over ``worker.processes``; one with
    ``--until-caught-up`` (a batch run ends when its one process has read every shard)."""
    from viewkeeper.ops.processes import resolve

    if args.processes is None:
        return 1 if args.until_caught_up else resolve(configured)
    try:
        count = resolve(args.processes)
    except ValueError as exc:
        raise Failure(f"--processes {args.processes}: {exc}", 2) from None
    if count > 1 and args.until_caught_up:
        raise Failure(
            f"--processes {args.processes} with --until-caught-up: a batch run is one process "
            "(each child would wait for shards its siblings hold); drop one of them",
            2,
        )
    return count


def _claim_namespaces(app: Any) -> None:
    """Claim the views' sink namespaces (viewkeeper.runtime.namespaces) before the first lease: a
    namespace of another deployment ends the run (exit 78); a sink that is down is waited
    for like any sink the daemon needs (--until-caught-up fails at once instead)."""
    from viewkeeper.sinks.base import SinkUnavailable

    delay = 1.0
    while True:
        try:
            app.claim()
            return
        except SinkUnavailable as exc:
            if not app.wait_for_sinks:
                raise
            log.error("%s; waiting for it to claim the views' namespaces", exc)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def serve_metrics(
    host: str,
    port: int,
    multiprocess_dir: str | None = None,
    process_of: Callable[[str], str] | None = None,
) -> Any:
    """Start the Prometheus endpoint (the server), or raise Failure naming host:port and the
    fix. ``multiprocess_dir``: serve the children's figures (:mod:`viewkeeper.ops.processes`)."""
    from viewkeeper.runtime import metrics

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return metrics.serve(port, host, multiprocess_dir, process_of)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, socket.gaierror):
            fix = "set metrics.host to an address of this machine, like 127.0.0.1"
        elif exc.errno == errno.EADDRINUSE:
            raise PortTaken(
                f"metrics endpoint: cannot listen on {where} ({reason}): another process "
                "listens there (a second viewkeeper on this host, or one still stopping); "
                "give each instance its own metrics.port, run one instance with --processes N "
                "(one endpoint for all), or set metrics.port: null"
            ) from exc
        elif exc.errno == errno.EACCES:
            fix = "ports below 1024 need privileges: use a higher metrics.port, like 9464"
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "metrics.host is not an address of this machine: use 127.0.0.1 or 0.0.0.0"
        else:
            fix = "check metrics.host and metrics.port"
        raise Failure(f"metrics endpoint: cannot listen on {where} ({reason}); {fix}") from exc


class PortTaken(Failure):
    """The metrics port is taken: ``run`` warns once and runs without an endpoint."""


def _preflight(app: Any) -> None:
    """Everything `run` needs before its first lease, checked in order; the first failure
    raises (one line, see :func:`explain_failure`)."""
    from viewkeeper.runtime.supervisor import StreamNotReadable

    app.store.ensure()
    for table in app.tables:
        info = app.client.describe_table(table)  # a missing table: ResourceNotFoundError
        if not info.stream_arn or info.stream_view_type not in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES"):
            raise StreamNotReadable(
                f"table {table!r} streams {info.stream_view_type or 'nothing'}; views need "
                "the new image: enable DynamoDB Streams on it with view type "
                "NEW_AND_OLD_IMAGES (or NEW_IMAGE)"
            )
    for name in sorted(app.registry.connections("redis")):
        probe_redis_tls(name, app.config.redis[name])
    app.sinks  # noqa: B018 - builds, connects and prepares every sink


def probe_redis_tls(name: str, conn: Any) -> None:
    """One quick connection to a ``rediss://`` Redis: a certificate that does not verify is
    permanent (retrying cannot fix it), so it is reported at once with the fix, as Failure.
    Anything else is left to the sink, which retries what may be temporary."""
    if not conn.tls:
        return
    from viewkeeper.app import redis_client_for
    from viewkeeper.sinks.connect import describe_target

    client = redis_client_for(conn, retries=False)
    try:
        client.ping()
    except Exception as exc:
        cert = _certificate_error(exc)
        if cert is None:
            return
        reason = cert.verify_message or cert.reason or "unknown reason"
        if "mismatch" in str(reason).lower():
            fix = (
                f"connect with the name the certificate was issued for, or set "
                f"redis.{name}.ssl_check_hostname: false"
            )
        else:
            fix = (
                f"set redis.{name}.ssl_ca_file to the CA certificate that signed the "
                "server's certificate"
            )
        raise Failure(
            f"redis {name} at {describe_target(conn.url)}: TLS certificate verify failed: "
            f"{reason}; {fix}"
        ) from exc
    finally:
        client.close()


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
