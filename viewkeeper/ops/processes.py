"""``viewkeeper run --processes N``: one parent supervising N children on one host.

A Python process applies records on one core (the GIL). N children use N cores; they share
the shards exactly as separate hosts do — each child is today's single-process daemon with
its own worker id, taking, renewing and balancing leases in the coordination table. There is
no second coordination mechanism: the parent never assigns a shard.

The parent (this module, in the process ``viewkeeper run`` started):

- starts each child as ``python -m viewkeeper.cli run -c FILE --child-of PID --child-index
  I`` in its own process group (a terminal's Ctrl-C reaches the parent only, which drains
  the children), and restarts one that exits with a backoff: 1 s, doubling to 30 s, back to
  1 s once a child ran for 60 s. A child exiting 78 (a config or namespace that cannot work)
  stops everything with 78: restarting cannot fix it;
- on SIGTERM/SIGINT sends SIGTERM (the graceful drain: every child applies its batch in
  flight, checkpoints and releases its leases) to every child and waits up to
  ``drain_timeout``; exits 0 when every child exited 0. A second signal, a second after the
  first, is forwarded (children exit at once) and the parent exits 1;
- is the only process that speaks sd_notify (``NotifyAccess=main`` stays right): each child
  gets a private datagram socket as ``$NOTIFY_SOCKET``, so the children's own
  :mod:`viewkeeper.ops.sdnotify` code talks to the parent unchanged. READY=1 once every
  child said READY; WATCHDOG=1 only while every child is running and pinged within its
  watchdog period (a child pings only while its supervisor loop turns); STATUS with the sum
  of the shards and the worst lag across children;
- serves the one metrics endpoint: children write prometheus-client's multiprocess files
  into a private folder (``$PROMETHEUS_MULTIPROC_DIR`` in their environment); the parent
  collects them, names a per-process series by a ``process`` label (the child's index), and
  calls ``mark_process_dead`` when a child exits. How each gauge combines is said in
  :mod:`viewkeeper.runtime.metrics`. A metrics port already taken (another instance on this
  host) is one WARNING; the processes run without an endpoint.

Children do not outlive the parent: each sets ``PR_SET_PDEATHSIG`` to SIGTERM (a parent
killed with -9 makes its children drain and exit; their leases are released, not left to
expire) and, as a fallback, checks every supervisor round that its parent is still its
parent (:func:`parent_gone`).

Balance: the children's supervisors aim at ceil(S / live workers) leases each and steal one
lease per round from a worker holding two more than themselves, so after the settling time
(README: at most S - ceil(S/N) - 1 rounds of ``lease_duration / 3`` after the last start)
no process holds more than ceil(S/N) + 1; a child that dies has its leases taken by its
siblings once they expire (one lease duration after its last renewal, plus a round to notice
and one to take), or at once when it drained and released them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from viewkeeper.config.model import MetricsConfig
from viewkeeper.ops.sdnotify import Notifier, watchdog_interval

__all__ = ["Parent", "die_with_parent", "label_logs", "parent_gone", "resolve", "usable_cores"]

log = logging.getLogger("viewkeeper.processes")

EX_CONFIG = 78
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 60.0  # a child that ran this long starts its backoff again at 1 s
DRAIN_TIMEOUT = 50.0  # under TimeoutStopSec=60: the parent kills stragglers and says so
CHILD_WATCHDOG = 10.0  # seconds; children ping every half of it while healthy
_PR_SET_PDEATHSIG = 1
_STATUS_RE = re.compile(r"(\d+) shards, worst lag ([0-9.]+)s")


_FOLDER = "viewkeeper-procs-"


def _sweep(where: str) -> None:
    """Remove the folders (sockets, metrics files) of parents that were killed with -9 and
    could not clean up."""
    with contextlib.suppress(OSError):
        for name in os.listdir(where):
            found = re.fullmatch(_FOLDER + r"(\d+)-\w+", name)
            if found is None:
                continue
            try:
                os.kill(int(found.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(where, name), ignore_errors=True)
            except OSError:
                pass  # alive, another user's


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a cpuset's
    limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve(value: int | str) -> int:
    """A process count from ``--processes`` or ``worker.processes``: a whole number from 1,
    or ``auto`` (:func:`usable_cores`). ValueError with the fix otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return usable_cores()
        if not text.isdigit():
            raise ValueError("use a whole number of processes from 1, or auto")
        value = int(text)
    if value < 1:
        raise ValueError("use a whole number of processes from 1, or auto")
    return value


def die_with_parent(parent: int) -> None:
    """In a child, before anything else: ask Linux for SIGTERM (the graceful drain) when the
    parent dies, then check that it has not died already (the race prctl cannot close)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:  # the fallback check still runs each round
            log.warning("cannot ask to be stopped with the parent: %s", exc)
    if parent_gone(parent):
        log.warning("parent process %d is gone before this child started; exiting", parent)
        raise SystemExit(0)


def parent_gone(parent: int) -> bool:
    return os.getppid() != parent


class _ChildLabel(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.child = self.index  # an extra: ``child=I`` in text, a field in JSON
        return True


def label_logs(index: int) -> None:
    """In a child, after logging is set up: every line says which child wrote it (the
    children write to the parent's stderr, one journal stream)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ChildLabel(index))


@dataclass
class _Child:
    index: int
    sock: socket.socket
    address: str
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    start_at: float = 0.0  # when to (re)start it, on the monotonic clock
    ready: bool = False
    pinged_at: float | None = None
    status: str = ""

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


class Parent:
    """The supervising parent of ``count`` children running the config at ``config``."""

    def __init__(
        self,
        config: str,
        count: int,
        metrics: MetricsConfig,
        serve: Callable[[str, int, str, Callable[[str], str]], Any],
        *,
        environ: Mapping[str, str] | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = os.path.abspath(config)
        self.count = count
        self.metrics = metrics
        self.serve = serve  # the metrics endpoint (cli.run.serve_metrics)
        self.environ = dict(os.environ if environ is None else environ)
        self.drain_timeout = drain_timeout
        self.clock = clock
        self.notifier = Notifier(environ=self.environ)
        self.watchdog_every = watchdog_interval(self.environ)  # the parent's own period
        # a child must ping at least as often as systemd expects the parent to
        self.child_watchdog = min(CHILD_WATCHDOG, 2 * (self.watchdog_every or CHILD_WATCHDOG))
        self.children: list[_Child] = []
        self.stopping_at: float | None = None
        self.exit_code = 0
        self.fatal: int | None = None
        self._signals: list[int] = []
        self._ready_sent = False
        self._last_ping = -1e9
        self._last_status = ""
        self._last_status_at = -1e9
        self._server: Any = None
        self.folder = ""
        self.metrics_dir = ""

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        where = self.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()
        _sweep(where)
        self.folder = tempfile.mkdtemp(prefix=f"{_FOLDER}{os.getpid()}-", dir=where)
        try:
            self.metrics_dir = os.path.join(self.folder, "metrics")
            os.mkdir(self.metrics_dir)
            for i in range(self.count):
                address = os.path.join(self.folder, f"notify-{i}.sock")
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.bind(address)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                sock.setblocking(False)
                self.children.append(_Child(i, sock, address))
            self._serve_metrics()
            log.info(
                "running %d processes (worker.processes / --processes) on config %s",
                self.count,
                self.config,
            )
            for child in self.children:
                self._start(child)
            while not self._finished():
                self._turn()
            return self.fatal if self.fatal is not None else self.exit_code
        finally:
            for child in self.children:
                if child.running():
                    assert child.popen is not None
                    child.popen.kill()
                    child.popen.wait()
                child.sock.close()
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
            self.notifier.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            for s, h in previous.items():
                signal.signal(s, h)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # handled by the loop, on the main thread

    def _turn(self) -> None:
        socks = [c.sock for c in self.children]
        readable, _, _ = select.select(socks, [], [], 0.1)
        for sock in readable:
            self._receive(next(c for c in self.children if c.sock is sock))
        now = self.clock()
        while self._signals:
            self._signal(self._signals.pop(0), now)
        for child in self.children:
            self._reap(child, now)
            if child.popen is None and self.stopping_at is None and now >= child.start_at:
                self._start(child)
        if self.stopping_at is not None and now - self.stopping_at > self.drain_timeout:
            for child in self.children:
                if child.running():
                    assert child.popen is not None
                    log.error(
                        "child %d (pid %d) did not drain within %.0fs; killing it (its leases "
                        "expire, nothing is lost)",
                        child.index,
                        child.popen.pid,
                        self.drain_timeout,
                    )
                    child.popen.kill()
        self._notify(now)

    def _finished(self) -> bool:
        return self.stopping_at is not None and all(c.popen is None for c in self.children)

    # --- children -----------------------------------------------------------------------
    def child_env(self, child: _Child) -> dict[str, str]:
        env = dict(self.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        env["NOTIFY_SOCKET"] = child.address
        env["WATCHDOG_USEC"] = str(int(self.child_watchdog * 1_000_000))
        env.pop("WATCHDOG_PID", None)  # the child's own check: the pings are meant for it
        return env

    def _start(self, child: _Child) -> None:
        argv = [
            sys.executable,
            "-m",
            "viewkeeper.cli",
            "run",
            "-c",
            self.config,
            "--child-of",
            str(os.getpid()),
            "--child-index",
            str(child.index),
        ]
        # from the main thread: PR_SET_PDEATHSIG fires when the thread that forked exits
        child.popen = subprocess.Popen(argv, env=self.child_env(child), process_group=0)
        child.started_at = self.clock()
        child.ready = False
        child.pinged_at = None
        child.status = ""
        log.info("started child %d (pid %d)", child.index, child.popen.pid)

    def _reap(self, child: _Child, now: float) -> None:
        if child.popen is None:
            return
        code = child.popen.poll()
        if code is None:
            return
        pid = child.popen.pid
        child.popen = None
        child.ready = False
        child.pinged_at = None
        self._mark_dead(pid)
        if self.stopping_at is not None:
            log.info("child %d (pid %d) stopped: %s", child.index, pid, _describe(code))
            # killed by the SIGTERM itself: it was still starting (no handler yet, so no
            # lease either): as clean as a drain
            if code not in (0, -signal.SIGTERM):
                self.exit_code = 1
            return
        if code == EX_CONFIG:
            log.error(
                "child %d (pid %d) exited 78: the config (or a view's namespace) cannot work; "
                "stopping every process",
                child.index,
                pid,
            )
            self.fatal = EX_CONFIG
            self._stop(now)
            return
        ran = now - child.started_at
        if ran >= BACKOFF_RESET_AFTER:
            child.failures = 0
        delay = min(BACKOFF_FIRST * 2**child.failures, BACKOFF_MAX)
        child.failures += 1
        child.start_at = now + delay
        log.error(
            "child %d (pid %d) ended (%s) after %.0fs; restarting it in %.0fs",
            child.index,
            pid,
            _describe(code),
            ran,
            delay,
        )

    def _signal(self, signum: int, now: float) -> None:
        if self.stopping_at is None:
            log.info("%s: draining %d processes", signal.Signals(signum).name, self.count)
            self._stop(now)
        elif now - self.stopping_at > 1.0:
            log.warning("second signal: children exit at once")
            self.exit_code = 1
            for child in self.children:
                if child.running():
                    assert child.popen is not None
                    child.popen.send_signal(signal.SIGTERM)

    def _stop(self, now: float) -> None:
        self.stopping_at = now
        self.notifier.stopping(f"draining {self.count} processes")
        for child in self.children:
            if child.running():
                assert child.popen is not None
                child.popen.send_signal(signal.SIGTERM)

    # --- sd_notify ----------------------------------------------------------------------
    def _receive(self, child: _Child) -> None:
        creds = struct.calcsize("3i")
        while True:
            try:
                data, ancillary, _, _ = child.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except BlockingIOError:
                return
            sender = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("3i", payload[:creds])[0]
            if sender is not None and sender != child.pid:
                continue  # a datagram from an earlier incarnation of this child
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    child.ready = True
                    child.pinged_at = self.clock()
                elif key == "WATCHDOG" and value == "1":
                    child.pinged_at = self.clock()
                elif key == "STATUS":
                    child.status = value

    def summary(self) -> tuple[int, float]:
        """(shards held, worst lag) over the children, from their STATUS lines."""
        shards, worst = 0, 0.0
        for child in self.children:
            found = _STATUS_RE.search(child.status)
            if found:
                shards += int(found.group(1))
                worst = max(worst, float(found.group(2)))
        return shards, worst

    def turning(self, now: float) -> list[str]:
        """Why a watchdog ping must be withheld: the children not running, or silent."""
        problems = []
        for child in self.children:
            if not child.running():
                problems.append(f"child {child.index} not running")
            elif child.pinged_at is None or now - child.pinged_at > self.child_watchdog:
                problems.append(f"child {child.index} not turning")
        return problems

    def status_line(self) -> str:
        shards, worst = self.summary()
        running = sum(1 for c in self.children if c.running())
        return f"{running}/{self.count} processes, {shards} shards, worst lag {worst:.1f}s"

    def _notify(self, now: float) -> None:
        if self.stopping_at is not None:
            return
        if not self._ready_sent:
            if all(c.ready and c.running() for c in self.children):
                self._ready_sent = True
                self.notifier.ready(self.status_line())
                log.info("all %d processes ready", self.count)
            return
        text = self.status_line()
        if self.watchdog_every is not None and now - self._last_ping >= self.watchdog_every:
            self._last_ping = now
            problems = self.turning(now)
            if problems:
                self.notifier.status(f"unhealthy: {', '.join(problems)}; {text}")
                log.warning("withholding the watchdog ping: %s", ", ".join(problems))
            else:
                self.notifier.notify("WATCHDOG=1", f"STATUS={text}")
            self._last_status, self._last_status_at = text, now
        elif text != self._last_status or now - self._last_status_at >= 5.0:
            self.notifier.status(text)
            self._last_status, self._last_status_at = text, now

    # --- metrics ------------------------------------------------------------------------
    def _serve_metrics(self) -> None:
        if self.metrics.port is None:
            return
        try:
            self._server = self.serve(
                self.metrics.host, self.metrics.port, self.metrics_dir, self._process_label
            )
            log.info("metrics of %d processes on port %d", self.count, self.metrics.port)
        except Exception as exc:  # the caller's serve explains it (host:port, the fix)
            log.warning("%s; running without a metrics endpoint", exc)

    def _process_label(self, pid: str) -> str:
        for child in self.children:
            if str(child.pid) == pid:
                return str(child.index)
        return f"pid {pid}"

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
