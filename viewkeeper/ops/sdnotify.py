"""systemd notification (``Type=notify``) with the standard library only.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd the
variable is unset and every call is a cheap no-op, so the daemon code never asks "am I
under systemd?".

The watchdog contract: systemd restarts the service when ``WATCHDOG=1`` stops arriving for
``WatchdogSec``. Pinging from a thread that merely exists would prove nothing, so
:class:`WatchdogThread` pings only while a health check supplied by the supervisor says the
shard workers are making progress; a wedged process gets restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "WatchdogThread", "watchdog_interval"]

log = logging.getLogger("viewkeeper.sdnotify")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec``, as sd_watchdog_enabled(3)
    advises), or None when systemd expects none from this process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process (we are a child of the service)
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends state changes to systemd; does nothing when ``$NOTIFY_SOCKET`` is unset.

    A failed send is logged once and reported by the return value, never raised: losing a
    STATUS line must not stop the daemon (a lost READY shows as a start timeout anyway).
    """

    def __init__(
        self, address: str | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        raw = address if address is not None else env.get("NOTIFY_SOCKET", "")
        self._environ = env
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        if raw.startswith("@"):
            self._address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd", raw)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when it was sent."""
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot notify systemd at %r: %s", self._address, exc)
                    self._warned = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup is done: leases table reachable, sinks prepared, workers starting."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """The one-line state ``systemctl status`` shows (e.g. "12 shards, worst lag 0.4s")."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (SIGTERM): systemd then waits up to TimeoutStopSec for the drain."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def extend_timeout(self, usec: int) -> bool:
        """Ask for ``usec`` more microseconds to start or stop (a slow drain, a big prepare)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(usec)}")

    def watchdog_interval(self) -> float | None:
        """See :func:`watchdog_interval`."""
        return watchdog_interval(self._environ)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line: a newline would start a new field


class WatchdogThread(threading.Thread):
    """Every ``interval`` seconds: refresh STATUS, and send WATCHDOG=1 if ``healthy()``.

    ``healthy`` and ``status`` run on this thread: keep them cheap and read-only (e.g. the
    supervisor's "every running shard worker made progress within the lease duration" and
    its lag summary). An exception in either counts as unhealthy and is logged.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float,
        healthy: Callable[[], bool],
        status: Callable[[], str],
    ) -> None:
        super().__init__(name="viewkeeper-watchdog", daemon=True)
        if interval <= 0:
            raise ValueError(f"watchdog interval {interval!r} must be positive seconds")
        self.notifier = notifier
        self.interval = interval
        self._healthy = healthy
        self._status = status
        self._stop_event = threading.Event()
        self._was_healthy = True

    def tick(self) -> bool:
        """One round; True when WATCHDOG=1 was sent. Called by the thread (or a test)."""
        try:
            text = self._status()
        except Exception:
            log.exception("status callback failed")
            text = "status unavailable"
        try:
            ok = bool(self._healthy())
        except Exception:
            log.exception("health check failed")
            ok = False
        if ok != self._was_healthy:
            if ok:
                log.info("healthy again; resuming watchdog pings")
            else:
                log.warning("unhealthy; withholding watchdog pings so systemd can restart us")
            self._was_healthy = ok
        if ok:
            return self.notifier.notify("WATCHDOG=1", _status_line(text))
        self.notifier.status(f"unhealthy: {text}")
        return False

    def run(self) -> None:
        while True:
            self.tick()
            if self._stop_event.wait(self.interval):
                return

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop pinging (call before STOPPING=1) and wait for the thread to end."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
