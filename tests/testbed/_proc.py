"""Process plumbing shared by the services: ports, logs, process groups, readiness."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
LOG_DIR = CACHE_DIR / "testbed" / "logs"

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


class ServiceError(RuntimeError):
    """A service could not be built, started or reached."""


def log(message: str) -> None:
    """One line to stderr, flushed: the launcher's only chatter."""
    print(f"testbed: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """preexec_fn: the service gets ``sig`` (SIGTERM) when the thread that started it dies.

    This is the safety net for a launcher killed with SIGKILL; normal exits stop services
    explicitly. Caveat: it fires when the *thread* that forked exits, so start services from
    a thread that outlives them (the main thread, in practice).
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


SCRATCH_PREFIX = "viewkeeper-testbed-"
_OWNER_FILE = ".owner-pid"


def scratch_dir(kind: str) -> Path:
    """A temp dir for one service, tagged with our pid so a later run can reap it."""
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-"))
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_stale(max_log_age_days: float = 2.0) -> None:
    """Remove scratch dirs of launchers that died without cleaning up (SIGKILL), and old logs."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            owner = int((path / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
    cutoff = time.time() - max_log_age_days * 86400
    if LOG_DIR.is_dir():
        for log_file in LOG_DIR.glob("*.log"):
            with contextlib.suppress(OSError):
                if log_file.stat().st_mtime < cutoff:
                    log_file.unlink()


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ServiceProcess:
    """One service process in its own process group, on a fixed 127.0.0.1 port.

    The port is chosen once, when the object is made (or given by the caller), and kept for
    the object's life: ``stop()`` then ``start()`` (or ``restart()``) brings the service back
    on the SAME port, which is what a client reconnecting after an outage expects. ``kill()``
    simulates a crash (SIGKILL to the whole group). ``close()`` stops it and removes its
    scratch files. Objects are context managers (start on enter, close on exit).
    """

    name = "service"
    stop_timeout = 15.0
    start_timeout = 60.0
    # sent when the starting thread dies (_die_with_parent); SIGKILL also ends a SIGSTOPped one
    death_signal = signal.SIGTERM

    def __init__(self, port: int | None = None) -> None:
        self.port: int = port if port is not None else free_port()
        self._fixed_port = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.start_seconds: float | None = None
        self._launched_at = 0.0
        self.log_path = LOG_DIR / f"{self.name}-{self.port}.log"

    # -- to be provided by subclasses -------------------------------------------------------

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> Sequence[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Called before each start (build, scratch dirs)."""

    def cleanup(self) -> None:
        """Called by close() after the process is gone."""

    def stdin_pipe(self) -> bool:
        """Keep a pipe on the child's stdin (closed by stop) instead of /dev/null."""
        return False

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, wait: bool = True) -> Self:
        """Start (no-op when running) and wait until it answers; on the same port as before.

        With ``wait=False`` it only launches the process: call ``wait_ready()`` later (lets a
        slow service boot while others start).
        """
        if self.is_running():
            return self
        self._signal_and_reap(signal.SIGKILL, 5.0)  # reap a process that died on its own
        self.prepare()
        if not wait:
            self._launch()
            return self
        attempts = 1 if self._fixed_port or self.start_seconds is not None else 3
        for attempt in range(attempts):
            try:
                self._launch()
                self.wait_ready()
                return self
            except ServiceError:
                # A free port can be taken between free_port() and bind: try another one,
                # but only on the first start (a restart must keep its port).
                if attempt + 1 >= attempts or not port_is_open(self.port):
                    raise
                self.port = free_port()
                self.log_path = LOG_DIR / f"{self.name}-{self.port}.log"
        return self

    def _launch(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _signal_and_reap
        self._log_file.write(f"\n==== {time.strftime('%F %T')} start {self.name}\n".encode())
        self._log_file.flush()
        self._launched_at = time.monotonic()
        self._proc = subprocess.Popen(
            list(self.command()),
            stdin=subprocess.PIPE if self.stdin_pipe() else subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, self.death_signal),
            cwd=str(self.workdir()),
        )

    def wait_ready(self) -> Self:
        """Block until the launched process answers; stop it and raise ServiceError if not."""
        try:
            self._wait_ready(self._launched_at)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - self._launched_at
        return self

    def workdir(self) -> Path:
        return REPO_ROOT

    def _wait_ready(self, begin: float) -> None:
        assert self._proc is not None
        deadline = begin + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} while starting; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} not ready after {self.start_timeout:.0f}s; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout` seconds. Idempotent."""
        self._signal_and_reap(signal.SIGTERM, self.stop_timeout if timeout is None else timeout)

    def kill(self) -> None:
        """Crash it: SIGKILL to the process group, no shutdown path."""
        self._signal_and_reap(signal.SIGKILL, 5.0)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self.cleanup()

    def _signal_and_reap(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout:.0f}s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def run_checked(cmd: Sequence[str], *, cwd: Path | None = None, what: str) -> None:
    """Run a build step; on failure raise with its output."""
    result = subprocess.run(
        list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
    )
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace")[-6000:]
        raise ServiceError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{output}")
