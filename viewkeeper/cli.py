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
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from viewkeeper import __version__

log = logging.getLogger("viewkeeper.cli")

EX_CONFIG = 78
EX_FAILURE = 1
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
        description="Run the daemon. Start-up checks the metrics port, the coordination "
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


# --- failures: one line each --------------------------------------------------------------
class Failure(Exception):
    """A failure the CLI has already put into words (one line, with the fix)."""

    def __init__(self, message: str, code: int = EX_FAILURE) -> None:
        super().__init__(message)
        self.code = code


# Where DynamoDB is, for messages (set by _app once the config is loaded).
_dynamodb_where = "DynamoDB"

_SERVICE_FIX = "check that the service is running and that the config points at it"
_AWS_CREDENTIALS_FIX = (
    "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, aws.profile or the "
    "instance role) and that their IAM policy allows viewkeeper's DynamoDB actions"
)


def _one_line(text: str) -> str:
    from viewkeeper.ops.logs import redact

    return redact(" ".join(str(text).split()))


def explain_failure(exc: BaseException) -> tuple[str, int] | None:
    """``(one line, exit code)`` for a runtime failure the operator can act on, or None for
    anything else (a bug, which keeps its traceback)."""
    from botocore import exceptions as boto

    from viewkeeper.coordination.dynamodb import CoordinationTableError
    from viewkeeper.runtime.namespaces import NamespaceOwned
    from viewkeeper.runtime.supervisor import StreamNotReadable, SupervisorFatal
    from viewkeeper.sinks.base import SinkError, SinkUnavailable
    from viewkeeper.stream.errors import StreamError

    if isinstance(exc, Failure):
        return _one_line(str(exc)), exc.code
    if isinstance(exc, CoordinationTableError):
        return _one_line(str(exc)), EX_CONFIG if exc.configuration else EX_FAILURE
    if isinstance(exc, NamespaceOwned | SupervisorFatal):
        return _one_line(str(exc)), EX_CONFIG  # fixed in the config (or by a take-over)
    if isinstance(exc, SinkUnavailable):
        return _one_line(sink_failure_text(exc)), EX_FAILURE
    if isinstance(exc, SinkError):
        return _one_line(str(exc)), EX_FAILURE
    if isinstance(exc, StreamNotReadable):
        return _one_line(str(exc)), EX_FAILURE
    if isinstance(exc, StreamError):
        return _one_line(_stream_failure_text(exc)), EX_FAILURE
    if isinstance(exc, boto.ClientError | boto.BotoCoreError):
        message, code = _botocore_failure_text(exc)
        return _one_line(message), code
    if isinstance(exc, OSError):
        return _one_line(_os_failure_text(exc)), EX_FAILURE
    return None


def sink_failure_text(exc: BaseException) -> str:
    """A sink's failure with the fix: its message names the sink and host:port."""
    text = str(exc)
    lowered = text.lower()
    if "authentication failed" in lowered:
        return text  # carries its own fix
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        return (
            f"{text}; the server's TLS certificate is not trusted: set ssl_ca_file (Redis) "
            "or ca_certs (OpenSearch) to the CA that signed it"
        )
    return f"{text.rstrip('. ')}; {_SERVICE_FIX}"


def _stream_failure_text(exc: BaseException) -> str:
    from viewkeeper.stream import errors

    where = _dynamodb_where
    if isinstance(exc, errors.ConnectionFailedError):
        return f"{where} cannot be reached: {exc}; {_SERVICE_FIX} (aws.endpoint_url, aws.region)"
    if isinstance(exc, errors.AccessDeniedError):
        return f"{where}: {exc}; {_AWS_CREDENTIALS_FIX}"
    if isinstance(exc, errors.ResourceNotFoundError):
        return (
            f"{where}: {exc}; create the table, or fix the views' table= or aws.region / "
            "aws.endpoint_url"
        )
    if isinstance(exc, errors.ThrottlingError | errors.ServiceError):
        return f"{where}: {exc}; a temporary failure of the service: start again later"
    return f"{where}: {exc}"


def _botocore_failure_text(exc: BaseException) -> tuple[str, int]:
    from botocore import exceptions as boto

    where = _dynamodb_where
    if isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "error"))
        text = f"{where}: {exc.operation_name} failed: {code}: {error.get('Message', '')}"
        if code in (
            "AccessDeniedException",
            "UnrecognizedClientException",
            "InvalidSignatureException",
            "ExpiredTokenException",
            "MissingAuthenticationTokenException",
        ):
            return f"{text}; {_AWS_CREDENTIALS_FIX}", EX_FAILURE
        if code == "ResourceNotFoundException":
            return f"{text}; check coordination.table and aws.region", EX_FAILURE
        if code == "ResourceInUseException":
            return (
                f"{text}; the coordination table is being created or changed (another "
                "viewkeeper starting at the same time?): start again in a few seconds",
                EX_FAILURE,
            )
        return f"{text}; start again later (logging.level: DEBUG shows the details)", EX_FAILURE
    if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
        return f"{where}: no usable AWS credentials ({exc}); {_AWS_CREDENTIALS_FIX}", EX_FAILURE
    if isinstance(exc, boto.ProfileNotFound):
        return f"aws.profile: {exc}; fix aws.profile or add the profile to ~/.aws", EX_CONFIG
    if isinstance(exc, boto.NoRegionError):
        return f"{where}: {exc}; set aws.region", EX_CONFIG
    kwargs = getattr(exc, "kwargs", None) or {}
    url = kwargs.get("endpoint_url")
    if url:
        where = f"DynamoDB at {_host_port(str(url))}"
    if isinstance(exc, boto.ConnectionError | boto.HTTPClientError):
        return (
            f"{where} cannot be reached ({exc}); {_SERVICE_FIX} (aws.endpoint_url, aws.region)",
            EX_FAILURE,
        )
    return f"{where}: {exc}", EX_FAILURE


def _os_failure_text(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or "no details"
    if exc.filename is not None:
        return f"{exc.filename}: {type(exc).__name__}: {reason}"
    return f"{type(exc).__name__}: {reason}"


def _host_port(url: str) -> str:
    """``host:port`` of an http(s) URL (80/443 when it names none); never user or password."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or "<no host>"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc`` (redis-py wraps it), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# --- commands ---------------------------------------------------------------------------
def _app(args: argparse.Namespace) -> Any:
    from viewkeeper.app import App
    from viewkeeper.ops.logs import setup_logging

    app = App.from_file(args.config)
    setup_logging(app.config.logging.format, app.config.logging.level)
    global _dynamodb_where
    aws = app.config.aws
    _dynamodb_where = (
        f"DynamoDB at {_host_port(aws.endpoint_url)}"
        if aws.endpoint_url
        else f"DynamoDB ({aws.region})"
    )
    for warning in app.warnings:
        log.warning("%s", warning)
    return app


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon.

    Start-up checks the metrics endpoint, the coordination table and every source table's
    stream before the first lease is taken; the first that cannot be used ends the process
    with one line naming it (exit 1, so systemd's Restart=on-failure tries again; 78 for a
    config or coordination table that cannot work). A Redis or OpenSearch that is down at
    start is logged as an error and waited for, as one that goes down later is: shards hold
    their checkpoints and retry, STATUS and the lag metrics show it, and a deploy during a
    cache restart does not leave the unit failed. With --until-caught-up (batch use) it
    fails at once instead.
    """
    from viewkeeper.ops.sdnotify import Notifier, WatchdogThread

    app = _app(args)
    app.wait_for_sinks = not args.until_caught_up
    try:
        mconf = app.config.metrics
        if mconf.port is not None:
            serve_metrics(mconf.host, mconf.port)
            log.info("metrics on http://%s:%d/metrics", mconf.host, mconf.port)
        _preflight(app)
        _claim_namespaces(app)
        if app.config.worker.on_sink_loss == "rebuild":
            app.enable_auto_rebuild()
        sup = app.supervisor()
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
    finally:
        app.close()
    log.info("stopped cleanly")
    return 0


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


def serve_metrics(host: str, port: int) -> None:
    """Start the Prometheus endpoint, or raise Failure naming host:port and the fix."""
    from viewkeeper.runtime import metrics

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        metrics.serve(port, host)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, socket.gaierror):
            fix = "set metrics.host to an address of this machine, like 127.0.0.1"
        elif exc.errno == errno.EADDRINUSE:
            fix = (
                "another process listens there (a viewkeeper still stopping?): stop it, "
                "choose another metrics.port, or set metrics.port: null to turn metrics off"
            )
        elif exc.errno == errno.EACCES:
            fix = "ports below 1024 need privileges: use a higher metrics.port, like 9464"
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "metrics.host is not an address of this machine: use 127.0.0.1 or 0.0.0.0"
        else:
            fix = "check metrics.host and metrics.port"
        raise Failure(f"metrics endpoint: cannot listen on {where} ({reason}); {fix}") from exc


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
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from viewkeeper.app import redis_client_for
    from viewkeeper.sinks.connect import describe_target

    client = redis_client_for(conn, retry=Retry(NoBackoff(), 0))
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


def cmd_rebuild(args: argparse.Namespace) -> int:
    from viewkeeper.projection.registry import ViewLoadError
    from viewkeeper.runtime.rebuild import HandshakeTimeout

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
    from viewkeeper.status import collect, format_table

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
    is and a line per view. (App.sinks builds every sink at once: the first failure would
    stop it.)"""
    from viewkeeper.runtime.namespaces import NamespaceOwned, Namespaces
    from viewkeeper.sinks.connect import describe_target

    views = [v for v in app.registry if (v.kind, v.connection) == (kind, name)]
    if kind == "redis":
        rconf = app.config.redis[name]
        where = describe_target(rconf.url)
        probe_redis_tls(name, rconf)
    else:
        where = ", ".join(describe_target(h) for h in app.config.opensearch[name].hosts)
    sink = app.build_sink(kind, name)
    try:
        sink.ping()
        sink.prepare(views)
        spaces = Namespaces(
            app.registry,
            {(kind, name): sink},
            app.store,
            {v.table: app.owner(v.table) for v in views},
        )
        claims = [(view.name, *spaces.inspect(view, sink)) for view in views]
    finally:
        try:
            sink.close()
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
    from viewkeeper.demo import run_demo

    return run_demo(
        redis_url=args.redis_url,
        opensearch_url=args.opensearch_url,
        pace=args.pace,
        keep=args.keep,
    )


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
