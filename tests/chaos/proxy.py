"""A TCP proxy on 127.0.0.1 that a test controls: the network faults of the chaos suite.

``TcpProxy(upstream)`` listens on a fixed loopback port (kept across cuts) and forwards every
connection to ``upstream``. A test can:

- ``cut("refuse")``: stop listening (new connections get ECONNREFUSED) and reset every open
  connection: a service that is down.
- ``cut("reset")``: keep listening but reset every connection, old and new, at once: a
  crashing load balancer.
- ``cut("stall")``: keep every connection open and forward nothing either way; new ones are
  accepted and never answered: a network partition (clients see timeouts, not errors).
- ``restore()``: back to forwarding; stalled connections are reset (as a partition that heals
  makes their peers time out).
- ``hold(pattern)``: arm a trap: the first client→server chunk containing ``pattern`` is not
  forwarded and its connection freezes; ``held`` is set. ``release()`` resets that connection
  (the request is lost), ``release(forward=True)`` lets it through late.
  With a DynamoDB endpoint behind the proxy this stops a checkpoint write exactly between
  "every sink acknowledged" and "the checkpoint moved".

Plain threads (two pumps per connection) with short socket timeouts, so every state change
takes effect within ~0.1 s. Nothing here is specific to a protocol.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from tests.testbed import free_port

__all__ = ["CutMode", "TcpProxy"]

CutMode = Literal["refuse", "reset", "stall"]
_TICK = 0.1
_CHUNK = 65536


def _reset(sock: socket.socket | None) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the peer sees ECONNRESET."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    upstream: socket.socket | None
    frozen: bool = False
    closed: bool = False
    tail: bytes = b""
    held_data: bytes = b""
    threads: list[threading.Thread] = field(default_factory=list)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _reset(self.client)
            _reset(self.upstream)


class TcpProxy:
    """A controllable TCP forwarder ``127.0.0.1:port`` → ``upstream`` (see module doc)."""

    def __init__(self, upstream: str, *, name: str = "proxy", port: int | None = None) -> None:
        parts = urlsplit(upstream if "://" in upstream else f"tcp://{upstream}")
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{upstream!r}: give host:port or a URL with a port")
        self.name = name
        self.upstream = (parts.hostname, parts.port)
        self.scheme = parts.scheme if "://" in upstream else "tcp"
        self.port = port if port is not None else free_port()
        self.mode: Literal["open", "refuse", "reset", "stall"] = "open"
        self.connections = 0
        self.cuts = 0
        self.held = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._trap: bytes | None = None
        self._held_conn: _Conn | None = None
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._stop_accepting = threading.Event()
        self._closed = False

    # --- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The upstream URL with the proxy's address (``http://127.0.0.1:PORT``)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        host, port = self.upstream
        return f"<TcpProxy {self.name} :{self.port} -> {host}:{port} {self.mode}>"

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._listen()
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._unlisten()
        for conn in self._snapshot():
            conn.close()

    def _listen(self) -> None:
        if self._listener is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.05)
        sock.listen(128)
        sock.settimeout(_TICK)
        self._listener = sock
        self._stop_accepting = threading.Event()
        self._accepting = threading.Thread(
            target=self._accept_loop,
            args=(sock, self._stop_accepting),
            name=f"{self.name}-accept",
            daemon=True,
        )
        self._accepting.start()

    def _unlisten(self) -> None:
        self._stop_accepting.set()
        if self._accepting is not None:
            self._accepting.join(5.0)
            self._accepting = None
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None

    def _snapshot(self) -> list[_Conn]:
        with self._lock:
            return list(self._conns)

    # --- faults -----------------------------------------------------------------------------
    def cut(self, mode: CutMode = "refuse") -> None:
        """Break the link (see the module doc for the three modes)."""
        self.cuts += 1
        self.mode = mode
        if mode == "refuse":
            self._unlisten()
        for conn in self._snapshot():
            if mode == "stall":
                conn.frozen = True
            else:
                conn.close()

    def restore(self) -> None:
        """Forward again; connections frozen by a stall (or a hold) are reset."""
        self.mode = "open"
        for conn in self._snapshot():
            if conn.frozen:
                conn.close()
        if self._held_conn is not None:
            self.release()
        if not self._closed:
            self._listen()

    def hold(self, pattern: bytes) -> None:
        """Freeze the first connection that sends ``pattern`` (client → server)."""
        self.held.clear()
        with self._lock:
            self._trap = pattern

    def release(self, *, forward: bool = False) -> None:
        """Disarm the trap. The held connection is reset (its request never arrives), or
        with ``forward`` the held bytes go on and the connection works again (it arrives
        late)."""
        with self._lock:
            self._trap = None
            conn, self._held_conn = self._held_conn, None
        if conn is None:
            return
        if forward and conn.upstream is not None and not conn.closed:
            try:
                conn.upstream.sendall(conn.held_data)
                conn.frozen = False
                return
            except OSError:
                pass
        conn.close()

    # --- plumbing ---------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            mode = self.mode
            if mode in ("reset", "refuse"):
                _reset(client)
                continue
            upstream: socket.socket | None = None
            if mode == "open":
                try:
                    upstream = socket.create_connection(self.upstream, timeout=2.0)
                except OSError:
                    _reset(client)
                    continue
            conn = _Conn(client, upstream, frozen=mode == "stall")
            with self._lock:
                self._conns.add(conn)
            for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
                if src is None:
                    continue
                t = threading.Thread(
                    target=self._pump,
                    args=(conn, src, dst, direction == "up"),
                    name=f"{self.name}-{direction}",
                    daemon=True,
                )
                conn.threads.append(t)
                t.start()
            if upstream is None:  # stalled from the start: no pump reads the client
                t = threading.Thread(target=self._idle, args=(conn,), daemon=True)
                t.start()

    def _idle(self, conn: _Conn) -> None:
        while not conn.closed and not self._closed:
            time.sleep(_TICK)
        self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        conn.close()
        with self._lock:
            self._conns.discard(conn)

    def _pump(
        self, conn: _Conn, src: socket.socket, dst: socket.socket | None, upward: bool
    ) -> None:
        try:
            src.settimeout(_TICK)
            while not conn.closed:
                if conn.frozen:
                    time.sleep(_TICK)  # read nothing: the sender's buffers fill up
                    continue
                try:
                    data = src.recv(_CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    break
                if upward and self._trap is not None and self._trips(conn, data):
                    continue
                if conn.frozen or dst is None:
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._forget(conn)

    def _trips(self, conn: _Conn, data: bytes) -> bool:
        with self._lock:
            trap = self._trap
            if trap is None or self._held_conn is not None:
                return False
            window = conn.tail + data
            conn.tail = window[-(len(trap) - 1) :] if len(trap) > 1 else b""
            if trap not in window:
                return False
            conn.frozen = True
            conn.held_data = data
            self._held_conn = conn
            self._trap = None
        self.held.set()
        return True
