"""A Redis Cluster (ElastiCache with cluster mode enabled, Serverless, MemoryDB) on a
connection without ``cluster: true`` is refused in one clear line naming the fix, on the test
bed's real 3-master cluster: the standalone sink's apply script touches keys of many hash
slots in one call, which a cluster answers with CROSSSLOT or MOVED (``cluster: true`` gets
the cluster sink: tests/test_cluster_config.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import vk, write_config
from tests.test_cli import view_table  # noqa: F401 - a fixture
from viewkeeper.sinks.base import SinkError
from viewkeeper.sinks.redis import RedisSink

MESSAGE = r"is a Redis Cluster \(cluster_enabled:1\), but this connection is for a standalone Redis"


def test_a_cluster_is_refused_at_ping_and_prepare(redis_cluster_url: str) -> None:
    sink = RedisSink.from_url("cache", redis_cluster_url, retry_seconds=1.0)
    try:
        with pytest.raises(SinkError, match=MESSAGE + ".*set cluster: true on this connection"):
            sink.ping()
        with pytest.raises(SinkError, match=MESSAGE):
            sink.prepare([])
    finally:
        sink.close()


def test_check_refuses_a_cluster_naming_the_connection(
    tmp_path: Path,
    view_table: Callable[..., str],  # noqa: F811 - the fixture imported from tests.test_cli
    redis_cluster_url: str,
    dynamodb_url: str,
) -> None:
    view_table()
    config = write_config(
        tmp_path, dynamodb_url=dynamodb_url, redis_url=redis_cluster_url, views=["cli_views"]
    )
    res = vk("check", "-c", str(config))
    assert res.returncode != 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "redis cache" in out and "is a Redis Cluster" in out, out
    assert "set cluster: true on this connection (redis.cache)" in out, out
    assert "Traceback" not in out
