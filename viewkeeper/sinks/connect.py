"""Ready-to-use Redis and OpenSearch clients, from plain values.

The one place that builds the sinks' clients: TLS verified by default, timeouts on every
socket (a hung peer must surface as an error the worker retries, not as a worker that stops
without a sound), passwords passed in at the last moment and never put in a URL, a repr or
a message. The assembly (:mod:`viewkeeper.app`) reads the config and calls these with plain
values: the sinks know nothing of the config's types.

Building a client does not connect: the first command does (the sinks' ``ping``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
import redis
from opensearchpy import OpenSearch, Urllib3AWSV4SignerAuth, Urllib3HttpConnection
from redis.backoff import NoBackoff
from redis.retry import Retry

from viewkeeper.sinks.base import SinkError

__all__ = [
    "MissingCredentials",
    "RedisTls",
    "describe_target",
    "opensearch_client",
    "redis_client",
    "sigv4_auth",
]


class MissingCredentials(SinkError):
    """SigV4 signing was asked for and boto3 found no AWS credentials."""


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
