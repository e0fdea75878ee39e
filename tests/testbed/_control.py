"""A tiny request/response channel: pytest asks the launcher to act on processes it owns.

The launcher owns the Redis Cluster's processes (it started them, it stops them). pytest runs
in a child process, so a fault test that must kill, pause or restart a node sends the
request here instead.

Protocol: TCP on 127.0.0.1:<free port>; one JSON line per connection each way:
``{"token": T, "op": "kill", "args": [port]}`` -> ``{"ok": true, "value": ...}`` or
``{"ok": false, "error": "..."}``. T is a random 32-byte hex token the launcher exports with
the address (compared in constant time); JSON, so nothing is unpickled. Requests are served
one at a time by ONE long-lived thread, with a timeout on each connection so a stray client
cannot block it. That thread is also the one that forks restarted nodes, so their
PR_SET_PDEATHSIG safety net (see _proc._die_with_parent) fires only when the channel closes,
which the cluster does after stopping its nodes.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

from ._proc import ServiceError, log

Handler = Callable[[str, list[Any]], Any]
_MAX_LINE = 1 << 16


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_LINE:
            raise ValueError("request too long")
    return data


class ControlServer:
    """Serve ``handler(op, args)`` on 127.0.0.1:<free port> until ``close()``."""

    conn_timeout = 5.0  # a client gets this long to send its request line

    def __init__(self, handler: Handler, name: str = "control") -> None:
        self._handler = handler
        self.token = secrets.token_hex(32)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)  # accept() wakes up to notice close()
        self.address: tuple[str, int] = ("127.0.0.1", int(self._sock.getsockname()[1]))
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                continue
            with conn:
                conn.settimeout(self.conn_timeout)
                try:
                    self._answer(conn)
                except (OSError, ValueError) as exc:
                    log(f"cluster control: bad request ({exc!r})")

    def _answer(self, conn: socket.socket) -> None:
        request = json.loads(_read_line(conn) or b"{}")
        if not hmac.compare_digest(str(request.get("token", "")), self.token):
            conn.sendall(b'{"ok": false, "error": "bad token"}\n')
            return
        op, args = str(request.get("op", "")), list(request.get("args", []))
        try:
            reply = {"ok": True, "value": self._handler(op, args)}
        except Exception as exc:  # sent back to the caller, raised there
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        """Stop serving; the serving thread exits (and with it the PDEATHSIG parent)."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._thread.join(60.0)
        if self._thread.is_alive():
            log("cluster control thread did not stop in 60s")
        with contextlib.suppress(OSError):
            self._sock.close()


def call(address: tuple[str, int], token: str, op: str, *args: Any, timeout: float = 90.0) -> Any:
    """Send one request to a ControlServer; an error there comes back as ServiceError."""
    try:
        conn = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise ServiceError(
            f"cannot reach the test bed's cluster control channel at "
            f"{address[0]}:{address[1]} ({exc!r}): is the launcher that started the cluster "
            f"(python -m tests.testbed run/serve) still running?"
        ) from exc
    with conn:
        conn.sendall(json.dumps({"token": token, "op": op, "args": list(args)}).encode() + b"\n")
        try:
            line = _read_line(conn)
        except TimeoutError as exc:
            raise ServiceError(f"cluster control {op}{args!r}: no reply in {timeout:.0f}s") from exc
    if not line:
        raise ServiceError(f"cluster control {op}{args!r}: the launcher closed the connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ServiceError(f"cluster control {op}{args!r} failed in the launcher: {reply['error']}")
    return reply.get("value")
