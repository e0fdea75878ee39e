"""Assembly: a validated config becomes the running parts (views, stream client, coordination
store, sinks, pipeline, supervisor). The CLI, the Lambda handler and the tests build here, so
each part is built one way only. Tests inject a fake stream or a memory store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from viewkeeper.config import (
    AwsConfig,
    BasicAuth,
    Config,
    ConfigError,
    OpenSearchConnection,
    RedisConnection,
    SigV4Auth,
    check_view_connections,
    load_config,
)
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.model import CoordinationStore
from viewkeeper.projection.api import View
from viewkeeper.projection.registry import ViewRegistry, load_views
from viewkeeper.runtime.namespaces import Namespaces, TakeOver
from viewkeeper.runtime.pipeline import Pipeline, SinkKey
from viewkeeper.runtime.rebuild import RebuildReport, RebuildSettings
from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import WorkerSettings
from viewkeeper.sinks.base import Owner, Sink, SinkUnavailable
from viewkeeper.stream.client import StreamClient
from viewkeeper.stream.http import HttpStreamClient

__all__ = ["App", "opensearch_client_for", "redis_client_for", "redis_cluster_client_for"]

log = logging.getLogger("viewkeeper.app")


def _redis_options(conn: RedisConnection) -> dict[str, Any]:
    """What a ``redis:`` connection gives its client, standalone or cluster."""
    from viewkeeper.sinks.connect import RedisTls

    tls = RedisTls(
        conn.ssl_cert_reqs,
        conn.ssl_check_hostname,
        conn.ssl_ca_file,
        conn.ssl_cert_file,
        conn.ssl_key_file,
    )
    return {
        "password": conn.password.reveal() if conn.password is not None else None,
        "tls": tls if conn.tls else None,
        "socket_timeout": conn.socket_timeout,
        "connect_timeout": conn.connect_timeout,
        "health_check_interval": conn.health_check_interval,
    }


def redis_client_for(conn: RedisConnection, **overrides: Any) -> Any:
    """The client of one ``redis:`` connection of the config (see sinks/connect.py): a
    client of the one server its URL names, also for a ``cluster: true`` connection (a
    probe of that node); :func:`redis_cluster_client_for` gives the cluster's client."""
    from viewkeeper.sinks.connect import redis_client

    return redis_client(conn.url, **(_redis_options(conn) | overrides))


def redis_cluster_client_for(conn: RedisConnection, **overrides: Any) -> Any:
    """The cluster client (``redis.cluster.RedisCluster``) of one ``redis:`` connection with
    ``cluster: true`` (see sinks/connect.py). It connects as it is built: a server that is
    not in cluster mode is a ``NotACluster`` (a SinkError) naming the connection and the
    fix; one that cannot be reached now is a ``SinkUnavailable`` naming the connection."""
    from viewkeeper.sinks.base import SinkUnavailable
    from viewkeeper.sinks.connect import NotACluster, describe_target, redis_cluster_client

    try:
        return redis_cluster_client(conn.url, **(_redis_options(conn) | overrides))
    except NotACluster as exc:
        answered = f" (CLUSTER SLOTS answered: {exc.reply})" if exc.reply else ""
        raise NotACluster(
            f"redis sink {conn.name!r} ({describe_target(conn.url)}) has cluster: true, but "
            f"the server is not in cluster mode{answered}; remove cluster: true from "
            f"redis.{conn.name} to use it as a standalone Redis (or point the URL at a node "
            "of a Redis Cluster)",
            exc.reply,
        ) from exc
    except SinkUnavailable as exc:
        raise SinkUnavailable(f"redis sink {conn.name!r}: {exc}") from exc


def opensearch_client_for(conn: OpenSearchConnection, aws: AwsConfig, **overrides: Any) -> Any:
    """The client of one ``opensearch:`` connection of the config (see sinks/connect.py);
    SigV4 without AWS credentials is a ConfigError naming the connection."""
    from viewkeeper.sinks.connect import MissingCredentials, opensearch_client, sigv4_auth

    http_auth: Any = None
    where = f"opensearch.{conn.name}.auth"
    if isinstance(conn.auth, BasicAuth):
        http_auth = (conn.auth.username, conn.auth.password.reveal())
    elif isinstance(conn.auth, SigV4Auth):
        try:
            http_auth = sigv4_auth(
                conn.auth.region, conn.auth.service, profile=aws.profile, where=where
            )
        except MissingCredentials as exc:
            raise ConfigError(str(exc), path=where) from None
    return opensearch_client(
        conn.hosts,
        http_auth=http_auth,
        verify_certs=conn.verify_certs,
        ca_certs=conn.ca_certs,
        timeout=conn.timeout,
        max_retries=conn.max_retries,
        http_compress=conn.http_compress,
        **overrides,
    )


class App:
    def __init__(
        self,
        config: Config,
        *,
        registry: ViewRegistry | None = None,
        client: StreamClient | None = None,
        store: CoordinationStore | None = None,
        sinks: Mapping[SinkKey, Sink] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or load_views(
            config.views, search_path=[config.base_dir] if config.base_dir else []
        )
        self.warnings = check_view_connections(config, self.registry)
        self._client = client
        self._store = store
        self._sinks = dict(sinks) if sinks is not None else None
        self._key_names: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        # `run` (the daemon) waits for a Redis/OpenSearch that is down at start; batch use
        # (`--until-caught-up`, `check`, `rebuild`) fails at once with the reason
        self.wait_for_sinks = False
        self._namespaces: Namespaces | None = None
        self._claimed = False
        # worker.on_sink_loss: rebuild starts rebuilds from here (the daemon sets it)
        self.on_views_lost: Callable[[list[str]], None] | None = None

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> App:
        return cls(load_config(path), **kwargs)

    # --- parts, built on first use -----------------------------------------------------
    def _session(self) -> Any:
        import boto3

        return boto3.Session(
            profile_name=self.config.aws.profile, region_name=self.config.aws.region
        )

    @property
    def client(self) -> StreamClient:
        if self._client is None:
            aws = self.config.aws
            self._client = HttpStreamClient(
                aws.region, aws.endpoint_url, self._session(), max_pool=64
            )
        return self._client

    @property
    def store(self) -> CoordinationStore:
        if self._store is None:
            aws = self.config.aws
            db = self._session().client("dynamodb", endpoint_url=aws.endpoint_url)
            self._store = DynamoDBStore(
                db,
                self.config.coordination.table,
                create_if_missing=self.config.coordination.create_if_missing,
            )
        return self._store

    @property
    def sinks(self) -> dict[SinkKey, Sink]:
        if self._sinks is None:
            self._sinks = self._build_sinks()
        return self._sinks

    def build_sink(self, kind: str, name: str, *, client: Any = None) -> Sink:
        """One connection's sink, built (not yet prepared) from the config: the daemon builds
        them all, `check` builds each on its own so one failure does not hide the others.
        A ``redis:`` connection with ``cluster: true`` gets the cluster sink; ``client``: the
        Redis client to give it (default: one built from the config, without redis-py's
        retries: the sinks retry)."""
        retention = self.config.tombstones.retention_hours * 3600
        if kind == "redis":
            rconf = self.config.redis[name]
            options: dict[str, Any] = {
                "key_prefix": rconf.key_prefix,
                "entry_prefix": rconf.entry_prefix,
                "owner_buckets": rconf.owner_buckets,
                "tombstone_retention": retention,
            }
            if rconf.cluster:
                if client is None:  # first: it refuses a server that is not a cluster
                    client = self.redis_cluster_client(name)
                from viewkeeper.sinks.redis_cluster import RedisClusterSink

                return RedisClusterSink(name, client, **options)
            from viewkeeper.sinks.redis import RedisSink

            if client is None:
                client = redis_client_for(rconf, retries=False)
            return RedisSink(name, client, **options)
        from viewkeeper.sinks.opensearch import OpenSearchSink

        oconf = self.config.opensearch[name]
        return OpenSearchSink(
            name,
            opensearch_client_for(oconf, self.config.aws),
            index_prefix=oconf.index_prefix,
            tombstone_retention=retention,
        )

    def redis_cluster_client(self, name: str) -> Any:
        """The cluster client of ``redis.<name>`` (``cluster: true``), without redis-py's
        retries. It connects as it is built (sinks/connect.py): the daemon
        (``wait_for_sinks``) waits for a cluster that cannot be reached, as it waits for any
        sink at start (nothing is leased before every view's namespace is claimed); batch
        use fails at once with the reason."""
        rconf = self.config.redis[name]
        delay = 1.0
        while True:
            try:
                return redis_cluster_client_for(rconf, retries=False)
            except SinkUnavailable as exc:
                if not self.wait_for_sinks:
                    raise
                log.error("%s; waiting for it", exc)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _build_sinks(self) -> dict[SinkKey, Sink]:
        sinks: dict[SinkKey, Sink] = {
            (kind, name): self.build_sink(kind, name)
            for kind in ("redis", "opensearch")
            for name in sorted(self.registry.connections(kind))
        }
        for key, sink in sinks.items():
            try:
                sink.prepare([v for v in self.registry if (v.kind, v.connection) == key])
            except SinkUnavailable as exc:
                if not self.wait_for_sinks:
                    raise
                # the daemon rides out a sink that is down at start as it does one that goes
                # down later: shards hold their checkpoints and retry; sinks prepare lazily
                log.error("%s; shards will wait for it with their checkpoints held", exc)
        return sinks

    def key_names(self, table: str) -> tuple[str, ...]:
        with self._lock:
            if table not in self._key_names:
                self._key_names[table] = self.client.describe_table(table).key_names
            return self._key_names[table]

    # --- one namespace, one source (viewkeeper.runtime.namespaces) --------------------------------
    def owner(self, table: str) -> Owner:
        """This deployment as the owner of ``table``'s views' namespaces."""
        info = self.client.describe_table(table)
        source = info.arn or f"{self.config.aws.region}/{table}"
        return Owner(source, self.config.coordination.table, self.store.deployment())

    @property
    def namespaces(self) -> Namespaces:
        if self._namespaces is None:
            self.store.ensure()
            self._namespaces = Namespaces(
                self.registry,
                self.sinks,
                self.store,
                {table: self.owner(table) for table in self.tables},
                on_loss=self._views_lost,
            )
        return self._namespaces

    def _views_lost(self, views: list[str]) -> None:
        if self.on_views_lost is not None:
            self.on_views_lost(views)

    def enable_auto_rebuild(self) -> None:
        """worker.on_sink_loss: rebuild — see viewkeeper.runtime.auto_rebuild."""
        import io

        from viewkeeper.runtime.auto_rebuild import AutoRebuild

        def rebuild(names: list[str]) -> str:
            views = [self.registry.get(n) for n in names]
            return self.rebuild(views, self.rebuild_settings(), io.StringIO()).summary()

        def still_marked() -> list[str]:
            return [n for n, state in self.store.view_states().items() if state.needs_rebuild]

        self.on_views_lost = AutoRebuild(rebuild, still_marked).start

    def rebuild(self, views: list[View], settings: RebuildSettings, out: TextIO) -> RebuildReport:
        """Rebuild ``views`` from a scan of their tables (see viewkeeper.runtime.rebuild), with
        their claims announced and their needs_rebuild marks cleared."""
        from viewkeeper.runtime.rebuild import rebuild

        return rebuild(
            views,
            self.registry,
            self.client,
            self.store,
            self.pipeline,
            settings,
            out=out,
            namespaces=self.namespaces,
        )

    def claim(self, take_over: tuple[str, ...] = ()) -> list[TakeOver]:
        """Claim every view's sink namespace for this deployment, once (refusing another
        owner's with NamespaceOwned unless taken over); see viewkeeper.runtime.namespaces."""
        taken = self.namespaces.claim(take_over=take_over)
        self._claimed = True
        return taken

    def ensure_claimed(self) -> None:
        if not self._claimed:
            self.claim()

    def pipeline(self, generation_of: Callable[[str], int] | None = None) -> Pipeline:
        """The apply step; every entry point claims the namespaces before its first apply
        (``run``: the supervisor's start; ``rebuild``, replay, the Lambda handler: before
        they build one)."""
        if generation_of is None:
            gens = self.store.generations()
            generation_of = lambda view: gens.get(view, 0)  # noqa: E731
        return Pipeline(
            self.registry,
            self.sinks,
            self.store,
            generation_of,
            on_error=self.config.worker.on_error,
            on_lost=lambda sink, exc: self.namespaces.lost(sink, exc),
        )

    @property
    def tables(self) -> list[str]:
        return self.registry.tables

    def supervisor(self, *, worker_id: str | None = None, **overrides: Any) -> Supervisor:
        """The daemon's supervisor; ``worker_id`` replaces the configured one (a child of
        ``run --processes N`` suffixes it with its index: ids must be unique)."""
        w = self.config.worker
        values: dict[str, Any] = {
            "lease_duration": w.lease_duration,
            "starting_positions": {t: self.config.table(t).starting_position for t in self.tables},
            "worker": WorkerSettings(
                batch_size=w.batch_size, poll_interval=w.poll_interval, prefetch=w.prefetch
            ),
            "renew_threads": w.renew_threads,
        }
        settings = SupervisorSettings(**(values | overrides))
        return Supervisor(
            self.tables,
            self.client,
            self.store,
            self.pipeline,
            settings,
            worker_id=worker_id or w.worker_id,
            start=self.ensure_claimed,
            verify=lambda: self.namespaces.verify(),
            fatal=lambda: self._namespaces.fatal if self._namespaces is not None else None,
        )

    def rebuild_settings(self, **overrides: Any) -> RebuildSettings:
        overrides.setdefault("lease_duration", self.config.worker.lease_duration)
        return RebuildSettings(**overrides)

    def close(self) -> None:
        for sink in (self._sinks or {}).values():
            try:
                sink.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing %s: %s", sink.name, exc)
