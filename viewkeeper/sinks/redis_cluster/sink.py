"""RedisClusterSink: a ``redis:`` connection with ``cluster: true``.

Owns the class the rest of viewkeeper uses, composed of the package's layers (README.md in
this package): the ``Sink`` protocol over a Redis Cluster.
"""

from __future__ import annotations

from typing import Any

from viewkeeper.sinks.redis_cluster.changelog import _Changelog


class RedisClusterSink(_Changelog):
    """A ``redis:`` connection to a Redis Cluster (``cluster: true``), serving all its views.

    Its constructor is ``_Connection.__init__`` (connection.py): a ``client``
    (``redis.cluster.RedisCluster``, ``decode_responses=False``) or a ``url`` (a startup
    node), ``key_prefix``, ``entry_prefix``, ``owner_buckets``, ``tombstone_retention``,
    ``clock``, ``retry_seconds``, ``batch_size``."""

    @classmethod
    def from_url(cls, name: str, url: str, **options: Any) -> RedisClusterSink:
        """A sink from ``redis://[:password@]host:port`` (any node of the cluster) or
        ``rediss://``."""
        return cls(name, url=url, **options)

    def __repr__(self) -> str:
        return f"RedisClusterSink({self.name!r}, {self.where})"
