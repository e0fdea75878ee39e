"""Start the services (unless given by env vars), run a command, stop what was started."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import FrameType

from ._proc import ServiceError, ServiceProcess, log, prune_stale
from .moto_server import MotoServer
from .opensearch_node import OpenSearchNode
from .redis_cluster import RedisClusterServer
from .redis_server import RedisServer, ensure_redis_server

ENV_REDIS = "VIEWKEEPER_TEST_REDIS_URL"
ENV_OPENSEARCH = "VIEWKEEPER_TEST_OPENSEARCH_URL"
ENV_DYNAMODB = "VIEWKEEPER_TEST_DYNAMODB_URL"
ENV_REDIS_CLUSTER = "VIEWKEEPER_TEST_REDIS_CLUSTER_URL"
# JSON: node ports/dirs and the control channel (address, token) of a cluster started by
# the launcher; set only when the launcher started the cluster (see redis_cluster.py).
ENV_REDIS_CLUSTER_CONTROL = "VIEWKEEPER_TEST_REDIS_CLUSTER_CONTROL"


@dataclass
class RunningServices:
    """What ``services()`` yields: the URLs and the servers it started itself.

    ``redis_cluster_control`` is the JSON for VIEWKEEPER_TEST_REDIS_CLUSTER_CONTROL: set when
    the cluster was started here (or passed through when the cluster URL was given with it).
    """

    redis_url: str
    opensearch_url: str
    dynamodb_url: str
    redis_cluster_url: str = ""
    redis_cluster_control: str = ""
    started: dict[str, ServiceProcess] = field(default_factory=dict)
    cluster: RedisClusterServer | None = None

    def env(self) -> dict[str, str]:
        env = {
            ENV_REDIS: self.redis_url,
            ENV_OPENSEARCH: self.opensearch_url,
            ENV_DYNAMODB: self.dynamodb_url,
            ENV_REDIS_CLUSTER: self.redis_cluster_url,
        }
        if self.redis_cluster_control:
            env[ENV_REDIS_CLUSTER_CONTROL] = self.redis_cluster_control
        return env


def _redis_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [ensure_redis_server(), "--version"], capture_output=True, text=True, check=False
        ).stdout
        for word in out.split():
            if word.startswith("v="):
                return word[2:]
    return "?"


def _moto_version() -> str:
    try:
        return metadata.version("moto")
    except metadata.PackageNotFoundError:
        return "?"


def _ready_line(name: str, version: str, server: ServiceProcess) -> None:
    seconds = server.start_seconds or 0.0
    log(f"{name} {version} ready at {server.url} in {seconds:.1f}s")


@contextlib.contextmanager
def services(
    env: Mapping[str, str] | None = None, quiet: bool = False
) -> Iterator[RunningServices]:
    """Start Redis, OpenSearch, moto and a Redis Cluster on loopback; yield their URLs; stop
    them on exit.

    A service whose env var (VIEWKEEPER_TEST_REDIS_URL, ..._OPENSEARCH_URL, ..._DYNAMODB_URL,
    ..._REDIS_CLUSTER_URL) is set to a non-empty value in ``env`` (default: os.environ) is not
    started: its URL is used as given (for the cluster, with the given ..._CONTROL, if any).
    Everything started here is stopped when the block exits, however it exits. OpenSearch
    boots in the background while the others start.
    """
    source = os.environ if env is None else env
    keys = (ENV_REDIS, ENV_OPENSEARCH, ENV_DYNAMODB, ENV_REDIS_CLUSTER)
    given = {key: source.get(key, "") for key in keys}
    started: dict[str, ServiceProcess] = {}
    cluster: RedisClusterServer | None = None
    prune_stale()
    try:
        node: OpenSearchNode | None = None
        if not given[ENV_OPENSEARCH]:
            node = OpenSearchNode()
            started["opensearch"] = node
            node.start(wait=False)  # builds the classpath first if needed
        elif not quiet:
            log(f"opensearch: using {ENV_OPENSEARCH}={given[ENV_OPENSEARCH]}")

        if not given[ENV_REDIS]:
            redis = RedisServer()
            started["redis"] = redis
            redis.start()
            if not quiet:
                _ready_line("redis", _redis_version(), redis)
        elif not quiet:
            log(f"redis: using {ENV_REDIS}={given[ENV_REDIS]}")

        if not given[ENV_DYNAMODB]:
            moto = MotoServer()
            started["moto"] = moto
            moto.start()
            if not quiet:
                _ready_line("moto", _moto_version(), moto)
        elif not quiet:
            log(f"moto: using {ENV_DYNAMODB}={given[ENV_DYNAMODB]}")

        cluster_control = source.get(ENV_REDIS_CLUSTER_CONTROL, "")
        if not given[ENV_REDIS_CLUSTER]:
            cluster = RedisClusterServer()
            cluster.start()
            cluster_control = cluster.serve_control()
            if not quiet:
                log(
                    f"redis-cluster {_redis_version()} ready at {cluster.url} "
                    f"(3 masters + 3 replicas, ports {','.join(map(str, cluster.ports()))}) "
                    f"in {cluster.start_seconds or 0.0:.1f}s"
                )
        elif not quiet:
            control = "with" if cluster_control else "without"
            log(
                f"redis-cluster: using {ENV_REDIS_CLUSTER}={given[ENV_REDIS_CLUSTER]} "
                f"({control} {ENV_REDIS_CLUSTER_CONTROL})"
            )

        if node is not None:
            node.wait_ready()
            if not quiet:
                rss = node.rss_bytes()
                extra = f", JVM RSS {rss / 2**20:.0f} MiB" if rss else ""
                log(
                    f"opensearch {node.version or '?'} ready at {node.url} "
                    f"in {node.start_seconds or 0.0:.1f}s{extra}"
                )

        yield RunningServices(
            redis_url=given[ENV_REDIS] or started["redis"].url,
            opensearch_url=given[ENV_OPENSEARCH] or started["opensearch"].url,
            dynamodb_url=given[ENV_DYNAMODB] or started["moto"].url,
            redis_cluster_url=given[ENV_REDIS_CLUSTER] or (cluster.url if cluster else ""),
            redis_cluster_control=cluster_control,
            started=started,
            cluster=cluster,
        )
    finally:
        # Stop in reverse order of cost; each close() is bounded (SIGKILL after a timeout).
        if cluster is not None:
            try:
                cluster.close()
            except Exception as exc:  # keep stopping the others
                log(f"stopping the redis cluster failed: {exc!r}")
        for server in reversed(list(started.values())):
            try:
                server.close()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {server.name} failed: {exc!r}")


class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _tty_delivers_sigint() -> bool:
    """True when a Ctrl-C on our terminal also reached the child (same foreground group)."""
    for stream in (sys.stdin, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    return False


def run(command: Sequence[str]) -> int:
    """Start the services, run ``command`` with their URLs in its environment, stop them.

    Returns the command's exit code (128+N when it died of signal N). SIGTERM/SIGHUP (and a
    SIGINT that did not come from our terminal) are forwarded to the command; the services
    are stopped once it has exited. A signal during start-up stops what was started.
    """
    if not command:
        raise ServiceError("no command given: python -m tests.testbed run -- CMD ARGS...")

    def raise_terminated(signum: int, _frame: FrameType | None) -> None:
        raise _Terminated(signum)

    previous = {
        sig: signal.signal(sig, raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        with services() as bed:
            child = subprocess.Popen(list(command), env={**os.environ, **bed.env()})

            def forward(signum: int, _frame: FrameType | None) -> None:
                if signum == signal.SIGINT and _tty_delivers_sigint():
                    return  # the terminal already sent it to the child
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, forward)
            try:
                returncode = child.wait()
            finally:
                # While stopping the services, further signals only get in the way: each
                # stop is bounded anyway, and the JVM exits on its own if we are killed.
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
        return _exit_code(returncode)
    except _Terminated as exc:
        log(f"signal {exc.signum} while starting services: stopped them")
        return 128 + exc.signum
    except KeyboardInterrupt:
        log("interrupted while starting services: stopped them")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def serve() -> int:
    """Start the services and keep them until Ctrl-C/SIGTERM; print `export` lines."""

    def raise_terminated(signum: int, _frame: FrameType | None) -> None:
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGHUP, raise_terminated)
    try:
        with services() as bed:
            for key, value in bed.env().items():
                print(f"export {key}={shlex.quote(value)}", flush=True)
            log("services up; Ctrl-C stops them")
            while True:
                time.sleep(3600)
    except (_Terminated, KeyboardInterrupt):
        return 0
