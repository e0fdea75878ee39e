"""Ready-to-use clients for the connections the config declares.

The one place that turns a :class:`~viewkeeper.config.RedisConnection` or
:class:`~viewkeeper.config.OpenSearchConnection` into a client: TLS verified by default,
timeouts on every socket (a hung peer must surface as an error the worker retries, not as a
worker that stops without a sound), passwords taken from the config's Secret at the last
moment and never put in a URL, a repr or a message.

Building a client does not connect: the first command does (the sinks' ``ping``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import boto3
import redis
from opensearchpy import OpenSearch, Urllib3AWSV4SignerAuth, Urllib3HttpConnection

from viewkeeper.config import (
    AwsConfig,
    BasicAuth,
    ConfigError,
    OpenSearchConnection,
    RedisConnection,
    SigV4Auth,
)

__all__ = ["describe_target", "opensearch_client", "redis_client", "sigv4_auth"]

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


def redis_client(conn: RedisConnection, **overrides: Any) -> redis.Redis:
    """A client for one ``redis:`` connection.

    ``rediss://`` URLs verify the server certificate and host name unless the config says
    otherwise (``ssl_cert_reqs``, ``ssl_check_hostname``), against ``ssl_ca_file`` or the
    system CAs. ``overrides`` go to ``redis.Redis`` last (e.g. ``decode_responses=True``).
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": conn.socket_timeout,
        "socket_connect_timeout": conn.connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": conn.health_check_interval,
        "client_name": "viewkeeper",
    }
    if conn.password is not None:
        kwargs["password"] = conn.password.reveal()
    if conn.tls:
        kwargs.update(
            ssl_cert_reqs=conn.ssl_cert_reqs,
            ssl_check_hostname=conn.ssl_check_hostname,
            ssl_ca_certs=conn.ssl_ca_file,
            ssl_certfile=conn.ssl_cert_file,
            ssl_keyfile=conn.ssl_key_file,
        )
    kwargs.update(overrides)
    return redis.Redis.from_url(conn.url, **kwargs)


def sigv4_auth(auth: SigV4Auth, aws: AwsConfig, *, where: str = "") -> Urllib3AWSV4SignerAuth:
    """Request signing with the credentials boto3 finds (environment, ``aws.profile``,
    instance or task role). They are refreshed as they expire: the signer asks the boto3
    credentials object for a frozen copy on every request.
    """
    session = boto3.Session(profile_name=aws.profile, region_name=auth.region)
    credentials = session.get_credentials()
    if credentials is None:
        raise ConfigError(
            f"{where or 'opensearch auth'}: sigv4 needs AWS credentials and boto3 found none; "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, aws.profile, or run with an "
            "instance or task role",
            path=where,
        )
    return Urllib3AWSV4SignerAuth(credentials, auth.region, auth.service)


def opensearch_client(conn: OpenSearchConnection, aws: AwsConfig, **overrides: Any) -> OpenSearch:
    """A client for one ``opensearch:`` connection.

    Transport: opensearch-py's default urllib3 connection. SigV4 uses its urllib3 signer
    (``Urllib3AWSV4SignerAuth``, the same signer as ``AWSV4SignerAuth`` without the
    requests dependency) so the compressed body is what gets signed. Certificates are
    verified unless ``verify_certs: false``. ``overrides`` go to ``OpenSearch`` last.
    """
    http_auth: Any = None
    if isinstance(conn.auth, BasicAuth):
        http_auth = (conn.auth.username, conn.auth.password.reveal())
    elif isinstance(conn.auth, SigV4Auth):
        http_auth = sigv4_auth(conn.auth, aws, where=f"opensearch.{conn.name}.auth")
    kwargs: dict[str, Any] = {
        "hosts": list(conn.hosts),
        "http_auth": http_auth,
        "connection_class": Urllib3HttpConnection,
        "verify_certs": conn.verify_certs,
        "ssl_show_warn": True,
        "timeout": conn.timeout,
        "max_retries": conn.max_retries,
        "retry_on_timeout": True,
        "http_compress": conn.http_compress,
        # one connection per shard worker thread that may send a bulk at the same time
        "pool_maxsize": 32,
    }
    if conn.ca_certs is not None:
        kwargs["ca_certs"] = conn.ca_certs
    kwargs.update(overrides)
    return OpenSearch(**kwargs)
