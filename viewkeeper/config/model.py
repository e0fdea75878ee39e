"""The shape of the config file: frozen dataclasses, one per section, and the two types
every other module shares, :class:`ConfigError` and :class:`Secret`.

Defaults live here and only here: a key left out of the file gets the field's default, and
the keys a section accepts are its dataclass's fields (see ``_keys`` in
:mod:`viewkeeper.config.validation`), so adding a field adds the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from viewkeeper.ops.logs import register_secret

__all__ = [
    "CLUSTER_OWNER_BUCKETS",
    "CLUSTER_SLOTS",
    "AwsConfig",
    "BasicAuth",
    "CertReqs",
    "Config",
    "ConfigError",
    "CoordinationConfig",
    "LogFormat",
    "LoggingConfig",
    "MetricsConfig",
    "OnError",
    "OnSinkLoss",
    "OpenSearchConnection",
    "RedisConnection",
    "Secret",
    "SigV4Auth",
    "SigV4Service",
    "StartingPosition",
    "TableConfig",
    "TombstoneConfig",
    "WorkerConfig",
]

StartingPosition = Literal["LATEST", "TRIM_HORIZON"]
OnError = Literal["deadletter", "halt"]
OnSinkLoss = Literal["report", "rebuild"]
LogFormat = Literal["text", "json"]
CertReqs = Literal["required", "optional", "none"]
SigV4Service = Literal["es", "aoss"]


class ConfigError(Exception):
    """A config file that cannot be used, explained in one line (never with a secret)."""

    def __init__(self, message: str, *, source: str = "", path: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.path = path


class Secret:
    """A password. Prints as ``***`` everywhere; :meth:`reveal` is the only way to it.

    ``origin`` says where it came from (``env REDIS_PASSWORD``, ``file /etc/…``,
    ``credential redis-password``, ``url``), which is safe to show.
    """

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str = "") -> None:
        self._value = value
        self.origin = origin
        register_secret(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value, self.origin))


@dataclass(frozen=True)
class AwsConfig:
    """Where DynamoDB is. ``region`` falls back to ``$AWS_REGION``/``$AWS_DEFAULT_REGION``."""

    region: str
    endpoint_url: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class TableConfig:
    """A source table. ``starting_position`` is where a shard with no checkpoint starts."""

    name: str
    starting_position: StartingPosition = "LATEST"


# owner_buckets of a ``cluster: true`` connection that leaves it out (the field's default is
# a standalone Redis's): the cluster sink's own default (sinks/redis_cluster/)
CLUSTER_OWNER_BUCKETS = 1024
CLUSTER_SLOTS = 16384  # a Redis Cluster's hash slots: the most owner_buckets it can take


@dataclass(frozen=True)
class RedisConnection:
    """One named Redis (``redis: {cache: ...}``).

    ``url`` never holds the password: one written in the URL is moved to ``password``.
    ``owner_buckets`` spreads the owner records of a view over that many hashes
    (:data:`CLUSTER_OWNER_BUCKETS` by default with ``cluster: true``, at most
    :data:`CLUSTER_SLOTS` there).
    ``key_prefix`` starts viewkeeper's bookkeeping keys; ``entry_prefix`` is put before every
    key the views write (several deployments or tenants on one database; the demo).
    ``cluster``: the URL is one node of a Redis Cluster (ElastiCache with cluster mode
    enabled, ElastiCache Serverless, MemoryDB), served by the cluster sink; database 0 only,
    and a ``key_prefix`` without ``{`` (the sink adds the hash tags).
    """

    name: str
    url: str
    password: Secret | None = None
    key_prefix: str = "vk:"
    entry_prefix: str = ""
    owner_buckets: int = 4096
    ssl_ca_file: str | None = None
    ssl_cert_reqs: CertReqs = "required"
    ssl_check_hostname: bool = True
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    socket_timeout: float = 10.0
    connect_timeout: float = 5.0
    health_check_interval: int = 30
    cluster: bool = False

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: Secret
    type: Literal["basic"] = "basic"


@dataclass(frozen=True)
class SigV4Auth:
    """AWS request signing; ``service`` is ``es`` (managed domains) or ``aoss`` (Serverless)."""

    region: str
    service: SigV4Service = "es"
    type: Literal["sigv4"] = "sigv4"


@dataclass(frozen=True)
class OpenSearchConnection:
    """One named OpenSearch (``opensearch: {search: ...}``).

    ``index_prefix`` is put in front of every index and alias name viewkeeper manages on this
    connection (one cluster shared by several environments); empty by default, so a view's
    ``index="orders"`` is exactly the name readers use.
    """

    name: str
    hosts: tuple[str, ...]
    auth: BasicAuth | SigV4Auth | None = None
    verify_certs: bool = True
    ca_certs: str | None = None
    index_prefix: str = ""
    timeout: float = 30.0
    max_retries: int = 3
    http_compress: bool = True


@dataclass(frozen=True)
class CoordinationConfig:
    """The DynamoDB table for leases, checkpoints, generations and dead letters."""

    table: str = "viewkeeper-coordination"
    create_if_missing: bool = True


@dataclass(frozen=True)
class WorkerConfig:
    """``on_error``: what a record that cannot be applied does: ``deadletter`` it and go on,
    or ``halt`` the shard (nothing is skipped; an operator decides). ``worker_id`` None means
    one is made up at start (host, pid, random). ``renew_threads``: lease renewals in flight
    at once (one conditional write each; see :mod:`viewkeeper.runtime.supervisor`). ``prefetch``: a
    shard worker reads the next page while it applies a full one (see
    :mod:`viewkeeper.runtime.worker`). ``on_sink_loss``: what the daemon does when a sink
    lost a view's data (see :mod:`viewkeeper.runtime.namespaces`): ``report`` it (an ERROR, the view
    marked needs_rebuild, a metric) and wait for an operator's rebuild, or also ``rebuild``
    the view itself. ``processes``: how many processes ``viewkeeper run`` starts on this host
    (an int, or ``"auto"``: the cores this process may run on); more than one is a parent
    supervising children that share the shards through the leases (see
    :mod:`viewkeeper.ops.processes`)."""

    poll_interval: float = 0.25
    batch_size: int = 1000
    on_error: OnError = "deadletter"
    lease_duration: float = 10.0
    worker_id: str | None = None
    renew_threads: int = 8
    prefetch: bool = True
    on_sink_loss: OnSinkLoss = "report"
    processes: int | Literal["auto"] = 1


@dataclass(frozen=True)
class TombstoneConfig:
    """How long a deleted item's version is remembered (must outlive the 24 h stream)."""

    retention_hours: float = 48.0

    @property
    def retention_seconds(self) -> float:
        return self.retention_hours * 3600.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint; ``port: null`` turns it off."""

    port: int | None = 9464
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LoggingConfig:
    format: LogFormat = "text"
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    """A loaded config file. ``source`` is its path, ``base_dir`` its folder (where view
    modules are looked up first)."""

    aws: AwsConfig
    views: tuple[str, ...]
    tables: Mapping[str, TableConfig] = field(default_factory=dict)
    redis: Mapping[str, RedisConnection] = field(default_factory=dict)
    opensearch: Mapping[str, OpenSearchConnection] = field(default_factory=dict)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    tombstones: TombstoneConfig = field(default_factory=TombstoneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<config>"
    base_dir: str | None = None

    def table(self, name: str) -> TableConfig:
        """The settings of a source table; a table views read but ``tables:`` does not list
        gets the defaults (LATEST)."""
        return self.tables.get(name) or TableConfig(name)

    @property
    def search_path(self) -> tuple[str, ...]:
        """Folders to import view modules from (the config file's own)."""
        return (self.base_dir,) if self.base_dir else ()
