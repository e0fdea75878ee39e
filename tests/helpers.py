"""Shared test helpers: config files for a test's own services, views, and sink contents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from viewkeeper.projection.api import View, view_of
from viewkeeper.projection.registry import ViewRegistry

REPO = Path(__file__).resolve().parent.parent


def view_for(func: object) -> View:
    """The View a decorated view function carries (a test's own declaration)."""
    found = view_of(func)
    assert found is not None, f"{func!r} is not a decorated view"
    return found


def registry_of(*views: View) -> ViewRegistry:
    """A registry holding exactly ``views``."""
    reg = ViewRegistry()
    for v in views:
        reg.add(v)
    return reg


def write_config(
    tmp_path: Path,
    *,
    dynamodb_url: str,
    redis_url: str | None = None,
    opensearch_url: str | None = None,
    views: list[str],
    tables: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """A viewkeeper.yaml for the test's services; its folder is on the view import path."""
    cfg: dict[str, Any] = {
        "aws": {"region": "us-east-1", "endpoint_url": dynamodb_url},
        "tables": tables or {},
        "views": views,
        "coordination": {"table": f"vk-coord-{uuid.uuid4().hex[:8]}"},
        "worker": {"poll_interval": 0.05, "lease_duration": 3.0},
        "metrics": {"port": None},
    }
    if redis_url:
        cfg["redis"] = {"cache": {"url": redis_url}}
    if opensearch_url:
        cfg["opensearch"] = {"search": {"hosts": [opensearch_url]}}
    for key, value in extra.items():
        cfg[key] = value
    path = tmp_path / "viewkeeper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def vk_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AWS_ACCESS_KEY_ID", "testing")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def redis_view_keys(client: Any, prefix: str = "vk:") -> dict[str, Any]:
    """Every key the views own (bookkeeping left out) with its content, for comparisons.
    Polled while daemons still write: a key retracted between SCAN and its read is left out
    (the caller compares again)."""
    out: dict[str, Any] = {}
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        if key.startswith(prefix):
            continue
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key)
            if value is not None:
                out[key] = value.decode()
        elif kind == "zset":
            out[key] = {m.decode(): s for m, s in client.zrange(key, 0, -1, withscores=True)}
        elif kind == "set":
            out[key] = {m.decode() for m in client.smembers(key)}
        elif kind == "hash":
            out[key] = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
    return out


def vk(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``viewkeeper`` command from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", *args],
        cwd=REPO,
        env=env or vk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Canned:
    """A local HTTP server answering each POST with the next canned (status, body, headers)."""

    def __init__(self) -> None:
        self.responses: list[tuple[int, bytes, dict[str, str]]] = []
        self.requests: list[tuple[dict[str, str], bytes]] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                canned.requests.append((dict(self.headers.items()), body))
                status, payload, headers = (
                    canned.responses.pop(0) if canned.responses else (200, b"{}", {})
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def error(self, status: int, code: str, message: str = "msg") -> None:
        body = {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}
        self.responses.append((status, json.dumps(body).encode(), {"x-amzn-RequestId": "RID"}))

    def ok(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.responses.append((200, json.dumps(body).encode(), headers or {}))


class Clock:
    """A clock a test moves by hand (``clock.now += 60``)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
