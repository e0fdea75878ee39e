"""Shared test helpers: config files for a test's own services, views, and sink contents."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
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
    """Every key the views own (bookkeeping left out) with its content, for comparisons."""
    out: dict[str, Any] = {}
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        if key.startswith(prefix):
            continue
        kind = client.type(key).decode()
        if kind == "string":
            out[key] = client.get(key).decode()
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
