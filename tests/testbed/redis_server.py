"""A throw-away redis-server on 127.0.0.1 with no persistence."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ._proc import ServiceError, ServiceProcess, log, scratch_dir


def ensure_redis_server() -> str:
    """Path of redis-server; apt-get installs it when missing and we are root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceError(
            "redis-server not found: install Debian's redis-server package "
            "(sudo apt-get install -y redis-server) or set VIEWKEEPER_TEST_REDIS_URL"
        )
    log("redis-server missing: apt-get install -y redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "redis-server"]):
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    # The package's own service may have been started by the install; we do not use it.
    found = shutil.which("redis-server")
    if not found:
        raise ServiceError("apt-get install redis-server did not provide redis-server")
    return found


class RedisServer(ServiceProcess):
    """``redis-server --save "" --appendonly no`` on a free (or given) loopback port.

    Data lives in memory only: ``stop()``/``start()`` (or ``restart()``) comes back EMPTY on
    the same port, like a cache node that lost its memory. ``kill()`` crashes it.
    """

    name = "redis"
    stop_timeout = 10.0
    start_timeout = 20.0

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        super().__init__(port)
        self.extra_args = list(extra_args)
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def prepare(self) -> None:
        if self._dir is None:
            self._dir = scratch_dir("redis")

    def workdir(self) -> Path:
        assert self._dir is not None
        return self._dir

    def command(self) -> Sequence[str]:
        return [
            ensure_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.workdir()),
            "--logfile", "",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cleanup(self) -> None:
        if self._dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._dir)
            self._dir = None
