"""sd_notify over a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from viewkeeper.ops.sdnotify import Notifier, WatchdogThread, watchdog_interval


class Listener:
    """What systemd does: a bound datagram socket that collects the messages."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        """Every message queued right now (never waits for more)."""
        out: list[str] = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture
def path_socket() -> Iterator[tuple[Listener, str]]:
    # A short folder: unix socket paths are limited to about 107 bytes.
    folder = tempfile.mkdtemp(prefix="vk-sd-", dir="/tmp")
    address = os.path.join(folder, "notify.sock")
    listener = Listener(address)
    yield listener, address
    listener.sock.close()
    shutil.rmtree(folder)


@pytest.fixture
def abstract_socket() -> Iterator[tuple[Listener, str]]:
    name = f"viewkeeper-test-{uuid.uuid4().hex}"
    listener = Listener("\0" + name)
    yield listener, "@" + name
    listener.sock.close()


def test_every_message_arrives_on_a_path_socket(path_socket: tuple[Listener, str]) -> None:
    listener, address = path_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready()
    assert listener.recv() == "READY=1"
    assert notifier.status("12 shards, worst lag 0.4s")
    assert listener.recv() == "STATUS=12 shards, worst lag 0.4s"
    assert notifier.watchdog()
    assert listener.recv() == "WATCHDOG=1"
    assert notifier.extend_timeout(30_000_000)
    assert listener.recv() == "EXTEND_TIMEOUT_USEC=30000000"
    assert notifier.stopping("draining 12 shards")
    assert listener.recv() == "STOPPING=1\nSTATUS=draining 12 shards"
    notifier.close()


def test_abstract_namespace_socket(abstract_socket: tuple[Listener, str]) -> None:
    listener, address = abstract_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": address})
    assert notifier.ready("started")
    assert listener.recv() == "READY=1\nSTATUS=started"
    assert notifier.watchdog()
    assert listener.recv() == "WATCHDOG=1"


def test_status_stays_on_one_line(path_socket: tuple[Listener, str]) -> None:
    listener, address = path_socket
    Notifier(address).status("2 shards\nWATCHDOG=1")
    assert listener.recv() == "STATUS=2 shards WATCHDOG=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notifier.extend_timeout(1)
    assert notifier.watchdog_interval() is None


def test_a_socket_that_is_gone_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": "/tmp/vk-no-such-dir/notify.sock"})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == (
        15.0
    )


def test_watchdog_interval_for_another_process_is_none() -> None:
    other = str(os.getpid() + 1)
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": other}) is None


@pytest.mark.parametrize("value", [None, "", "0", "-5", "soon"])
def test_watchdog_interval_without_a_usable_value_is_none(value: str | None) -> None:
    env = {} if value is None else {"WATCHDOG_USEC": value}
    assert watchdog_interval(env) is None


def test_healthy_tick_pings_and_refreshes_status(path_socket: tuple[Listener, str]) -> None:
    listener, address = path_socket
    thread = WatchdogThread(Notifier(address), 10.0, lambda: True, lambda: "3 shards, lag 0.1s")
    assert thread.tick() is True
    assert listener.recv() == "WATCHDOG=1\nSTATUS=3 shards, lag 0.1s"


def test_unhealthy_tick_withholds_the_ping(path_socket: tuple[Listener, str]) -> None:
    listener, address = path_socket
    thread = WatchdogThread(Notifier(address), 10.0, lambda: False, lambda: "shard-7 stuck")
    assert thread.tick() is False
    assert listener.drain() == ["STATUS=unhealthy: shard-7 stuck"]


def test_a_failing_health_check_counts_as_unhealthy(path_socket: tuple[Listener, str]) -> None:
    listener, address = path_socket

    def broken() -> bool:
        raise RuntimeError("supervisor gone")

    thread = WatchdogThread(Notifier(address), 10.0, broken, lambda: "?")
    assert thread.tick() is False
    assert all("WATCHDOG" not in m for m in listener.drain())


def test_thread_pings_only_while_healthy(path_socket: tuple[Listener, str]) -> None:
    listener, address = path_socket
    healthy = threading.Event()
    healthy.set()
    thread = WatchdogThread(Notifier(address), 0.02, healthy.is_set, lambda: "ok")
    thread.start()
    try:
        time.sleep(0.15)
        before = listener.drain()
        assert sum("WATCHDOG=1" in m for m in before) >= 2
        healthy.clear()
        time.sleep(0.05)  # let a tick that already passed the check finish
        listener.drain()
        time.sleep(0.15)
        after = listener.drain()
        assert after, "STATUS keeps flowing while unhealthy"
        assert not any("WATCHDOG=1" in m for m in after)
    finally:
        thread.stop()
    assert not thread.is_alive()


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        WatchdogThread(Notifier(environ={}), 0, lambda: True, lambda: "")
