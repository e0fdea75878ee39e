"""Ready-to-use Redis and OpenSearch clients, from plain values.

The one place that builds the sinks' clients: TLS verified by default, timeouts on every
socket (a hung peer must surface as an error the worker retries, not as a worker that stops
without a sound), passwords passed in at the last moment and never put in a URL, a repr or
a message. The assembly (:mod:`viewkeeper.app`) reads the config and calls these with plain
values: the sinks know nothing of the config's types.

Building a client does not connect: the first command does (the sinks' ``ping``). The one
exception is :func:`redis_cluster_client`: redis-py's cluster client asks its startup node
for the cluster's slots as it is built, so it connects (and fails, in words, right there).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import redis
from opensearchpy import OpenSearch, Urllib3AWSV4SignerAuth, Urllib3HttpConnection
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import AuthenticationError, RedisClusterException
from redis.retry import Retry

from viewkeeper.sinks.base import SinkError, SinkUnavailable

__all__ = [
    "MissingCredentials",
    "NotACluster",
    "RedisTls",
    "cluster_masters",
    "describe_target",
    "opensearch_client",
    "redis_client",
    "redis_cluster_client",
    "sigv4_auth",
]


class MissingCredentials(SinkError):
    """SigV4 signing was asked for and boto3 found no AWS credentials."""


class NotACluster(SinkError):
    """A cluster client was asked for and the server is not in cluster mode (it refused
    ``CLUSTER SLOTS``): a standalone Redis, or ElastiCache with cluster mode disabled.
    ``reply``: the server's answer to ``CLUSTER SLOTS`` (empty when unknown)."""

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class RedisTls:
    """How a ``rediss://`` connection checks the server (and presents itself)."""

    cert_reqs: str = "required"
    check_hostname: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "http": 9200, "https": 443}


def describe_target(url: str) -> str:
    """``host:port`` of a Redis or OpenSearch URL, for messages: never user or password.

    A URL without a port shows the port the client will use (6379 for Redis, 9200 for
    http and 443 for https, as opensearch-py does); a unix socket shows its path.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if parts.scheme == "unix":
        return parts.path or "<unix socket>"
    host = parts.hostname or "<no host>"
    if ":" in host:
        host = f"[{host}]"
    port = port or _DEFAULT_PORTS.get(parts.scheme)
    return f"{host}:{port}" if port else host


def redis_client(
    url: str,
    *,
    password: str | None = None,
    socket_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    health_check_interval: int = 30,
    tls: RedisTls | None = None,
    retries: bool = True,
    **overrides: Any,
) -> redis.Redis:
    """A client for one Redis.

    ``rediss://`` URLs verify the server certificate and host name unless ``tls`` says
    otherwise, against ``tls.ca_file`` or the system CAs. ``retries=False`` turns off
    redis-py's own retries (the sinks retry within their time budget, which redis-py's
    would stretch; a probe wants the first answer). ``overrides`` go to ``redis.Redis``
    last (e.g. ``decode_responses=True``).
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": health_check_interval,
        "client_name": "viewkeeper",
    }
    if password is not None:
        kwargs["password"] = password
    if url.startswith("rediss://"):
        tls = tls or RedisTls()
        kwargs.update(
            ssl_cert_reqs=tls.cert_reqs,
            ssl_check_hostname=tls.check_hostname,
            ssl_ca_certs=tls.ca_file,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
        )
    if not retries:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs.update(overrides)
    return redis.Redis.from_url(url, **kwargs)


def redis_cluster_client(
    url: str,
    *,
    password: str | None = None,
    socket_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    health_check_interval: int = 30,
    tls: RedisTls | None = None,
    retries: bool = True,
    **overrides: Any,
) -> RedisCluster:
    """A client for one Redis Cluster, from the URL of any of its nodes (the startup node;
    the others are found with ``CLUSTER SLOTS``).

    The same settings as :func:`redis_client`: timeouts, keepalive, ``client_name``, the
    password passed apart from the URL, ``rediss://`` verified unless ``tls`` says otherwise
    (every node gets them). Replies are bytes (``decode_responses=False``).
    ``retries=False``: no redis-py retries of a command that failed on a connection error, a
    timeout or CLUSTERDOWN (``retry=Retry(NoBackoff(), 0)``; the sinks retry within their time
    budget); MOVED and ASK redirections are still followed: redis-py follows them in its
    per-command loop, whatever ``retry`` says. ``overrides`` go to ``RedisCluster`` last.

    It connects (see the module doc). Raises ``ValueError`` for a URL a cluster cannot take
    (a unix socket, a database other than 0: a cluster has database 0 only),
    :class:`NotACluster` when the node is not in cluster mode, and
    :class:`~viewkeeper.sinks.base.SinkUnavailable` when the cluster cannot be reached or
    used now (refused, timed out, authentication failed, slots not covered), each naming
    host:port and never the password.
    """
    where = describe_target(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"redis cluster at {where}: a cluster is reached over TCP; give a redis:// or "
            "rediss:// URL of one of its nodes"
        )
    db = ",".join(parse_qs(parts.query).get("db", [])) or parts.path.strip("/")
    if db and not (db.isdigit() and int(db) == 0):
        raise ValueError(
            f"redis cluster at {where}: the URL names database {db}, but a Redis Cluster has "
            "database 0 only; end the URL with /0 or no path"
        )
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "client_name": "viewkeeper",
        "decode_responses": False,
        # RedisCluster passes no health_check_interval to its nodes' connections: the
        # nodes' pools set it (they are built from the URL's options: url= below)
        "connection_pool_class": _health_checked_pool(health_check_interval),
    }
    if password is not None:
        kwargs["password"] = password
    if parts.scheme == "rediss":
        tls = tls or RedisTls()
        kwargs.update(
            ssl_cert_reqs=tls.cert_reqs,
            ssl_check_hostname=tls.check_hostname,
            ssl_ca_certs=tls.ca_file,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
        )
    if not retries:
        kwargs["retry"] = Retry(NoBackoff(), 0)
        if _REDIS_MAJOR < 6:  # redis-py 5 counted cluster retries apart (deprecated since 6)
            kwargs["cluster_error_retry_attempts"] = 0
    kwargs.update(overrides)
    try:
        return RedisCluster(url=url, **kwargs)
    except (RedisClusterException, redis.RedisError) as exc:
        raise _cluster_failure(exc, where, password) from exc


_REDIS_MAJOR = int(redis.__version__.split(".", 1)[0])


def _health_checked_pool(interval: int) -> type[redis.ConnectionPool]:
    """A connection pool class whose connections check themselves (PING) after ``interval``
    idle seconds, as :func:`redis_client`'s do."""

    class HealthCheckedPool(redis.ConnectionPool):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("health_check_interval", interval)
            super().__init__(**kwargs)

    return HealthCheckedPool


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _cluster_failure(exc: BaseException, where: str, password: str | None) -> SinkError:
    """What building a cluster client failed on, in one line naming host:port."""

    def text(e: BaseException) -> str:
        words = " ".join(str(e).split()) or type(e).__name__
        return words.replace(password, "***") if password else words

    chain = list(_chain(exc))
    for i, e in enumerate(chain):
        if "Cluster mode is not enabled" in str(e):
            # redis-py raised it on the node's error reply to CLUSTER SLOTS (its context)
            reply = next((text(c) for c in chain[i + 1 :] if isinstance(c, redis.RedisError)), "")
            answered = f" (CLUSTER SLOTS answered: {reply})" if reply else ""
            return NotACluster(f"redis at {where} is not in cluster mode{answered}", reply)
    for e in chain:
        if isinstance(e, AuthenticationError):
            return SinkUnavailable(
                f"redis cluster at {where}: authentication failed ({text(e)}); check the "
                "URL's user, the password or the credential file"
            )
    cause = next(
        (e for e in chain if isinstance(e, redis.ConnectionError | redis.TimeoutError)), None
    )
    if cause is not None:
        return SinkUnavailable(f"redis cluster at {where} cannot be reached: {text(cause)}")
    return SinkUnavailable(f"redis cluster at {where} cannot be used: {text(exc)}")


def cluster_masters(client: Any) -> int:
    """How many masters (primaries) a cluster client knows of."""
    return len(client.get_primaries())


def sigv4_auth(
    region: str, service: str, *, profile: str | None = None, where: str = ""
) -> Urllib3AWSV4SignerAuth:
    """Request signing with the credentials boto3 finds (environment, ``profile``, instance
    or task role). They are refreshed as they expire: the signer asks the boto3 credentials
    object for a frozen copy on every request.
    """
    session = boto3.Session(profile_name=profile, region_name=region)
    credentials = session.get_credentials()
    if credentials is None:
        raise MissingCredentials(
            f"{where or 'opensearch auth'}: sigv4 needs AWS credentials and boto3 found none; "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, aws.profile, or run with an "
            "instance or task role"
        )
    return Urllib3AWSV4SignerAuth(credentials, region, service)


def opensearch_client(
    hosts: Sequence[str],
    *,
    http_auth: Any = None,
    verify_certs: bool = True,
    ca_certs: str | None = None,
    timeout: float = 30.0,
    max_retries: int = 3,
    http_compress: bool = True,
    **overrides: Any,
) -> OpenSearch:
    """A client for one OpenSearch (``http_auth``: a (user, password) pair or a signer).

    Transport: opensearch-py's default urllib3 connection. SigV4 uses its urllib3 signer
    (``Urllib3AWSV4SignerAuth``, the same signer as ``AWSV4SignerAuth`` without the
    requests dependency) so the compressed body is what gets signed. Certificates are
    verified unless ``verify_certs`` is false. ``overrides`` go to ``OpenSearch`` last.
    """
    kwargs: dict[str, Any] = {
        "hosts": list(hosts),
        "http_auth": http_auth,
        "connection_class": Urllib3HttpConnection,
        "verify_certs": verify_certs,
        "ssl_show_warn": True,
        "timeout": timeout,
        "max_retries": max_retries,
        "retry_on_timeout": True,
        "http_compress": http_compress,
        # one connection per shard worker thread that may send a bulk at the same time
        "pool_maxsize": 32,
    }
    if ca_certs is not None:
        kwargs["ca_certs"] = ca_certs
    kwargs.update(overrides)
    return OpenSearch(**kwargs)
