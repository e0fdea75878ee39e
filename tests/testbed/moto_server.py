"""moto's HTTP server (DynamoDB + DynamoDB Streams and the rest of moto) on 127.0.0.1."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from ._proc import ServiceProcess


class MotoServer(ServiceProcess):
    """``python -m moto.server -H 127.0.0.1 -p PORT`` in its own process.

    All state is in memory: ``restart()`` comes back empty on the same port. Without a
    restart, ``reset()`` (POST /moto-api/reset) wipes every table and stream.
    Clients: endpoint_url=url, region us-east-1, any access key/secret (e.g. testing/testing).
    """

    name = "moto"
    stop_timeout = 5.0
    start_timeout = 30.0

    def __init__(self, port: int | None = None, python: str = sys.executable) -> None:
        super().__init__(port)
        self.python = python

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> Sequence[str]:
        return [self.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1.0) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10.0):
            pass
