"""RedisSink: the ``redis:`` connection of the config, composed of the package's layers.

Owns the class the rest of viewkeeper uses and the ``Sink`` protocol's prepare, apply,
append, ping and close; its other methods come from the layers below (:mod:`.changelog`,
:mod:`.maintenance`, :mod:`.apply`, :mod:`.claims`, :mod:`.connection`, which also holds
``__init__``). The design: README.md in this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import Append, Change, Result, SinkUnavailable
from viewkeeper.sinks.redis.changelog import _Changelog
from viewkeeper.sinks.redis.connection import log


class RedisSink(_Changelog):
    """A ``redis:`` connection of the config, serving all its views (the ``Sink`` protocol).

    Its constructor is ``_Connection.__init__`` (connection.py): a ``client`` or a ``url``,
    ``key_prefix``, ``entry_prefix``, ``owner_buckets``, ``tombstone_retention``,
    ``clock``, ``retry_seconds``, ``batch_size``."""

    @classmethod
    def from_url(cls, name: str, url: str, **options: Any) -> RedisSink:
        """A sink from ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS)."""
        return cls(name, url=url, **options)

    def __repr__(self) -> str:
        return f"RedisSink({self.name!r}, {self.where})"

    # -- the Sink protocol -----------------------------------------------------------------
    def prepare(self, views: Sequence[View]) -> None:
        """Load the scripts, check the bucket count and register the views' ids."""
        self._ensure_ready()
        streams: dict[bytes, str] = {}
        for view in views:
            self._view_id(view.name)
            if view.changelog:
                self.check_changelog(view, streams)
        policy = self._with_retry(partial(self._config, "maxmemory-policy")) or ""
        if policy.startswith("allkeys-"):
            log.warning(
                "redis sink %s (%s): maxmemory-policy %s may evict owner records; use "
                "noeviction or volatile-*",
                self.name,
                self.where,
                policy,
            )

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        """One Result per change, in order; raises SinkUnavailable after ``retry_seconds``."""
        try:
            return self._apply(changes, self._clock())
        except SinkUnavailable:
            self._ready = False  # check again before the retry: a restart, changed limits
            raise

    def append(self, appends: Sequence[Append]) -> list[Result]:
        """Change-log entries, each appended once (changelog.py); one Result per append."""
        try:
            return self._append(appends, self._clock())
        except SinkUnavailable:
            self._ready = False
            raise

    def ping(self) -> None:
        self._with_retry(self._client.ping)
        self._refuse_cluster()

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
