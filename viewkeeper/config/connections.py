"""The ``redis:`` and ``opensearch:`` sections: one named connection each, with its URL or
hosts, TLS settings and credentials (a Redis URL's password is moved out of the URL into a
:class:`~viewkeeper.config.model.Secret`; OpenSearch credentials only through ``auth:``).
"""

from __future__ import annotations

import re
from typing import cast
from urllib.parse import parse_qs, urlsplit

from viewkeeper.config.messages import _did_you_mean, _kind, _show, _show_url
from viewkeeper.config.model import (
    CLUSTER_OWNER_BUCKETS,
    CLUSTER_SLOTS,
    AwsConfig,
    BasicAuth,
    OpenSearchConnection,
    RedisConnection,
    Secret,
    SigV4Auth,
)
from viewkeeper.config.urls import _OPENSEARCH_CREDENTIALS_FIX, _check_url, _split_password
from viewkeeper.config.validation import _REGION_RE, _SECRET_KEYS, _keys, _Section

_INDEX_PREFIX_RE = re.compile(r"^([a-z0-9][a-z0-9_.-]*)?$")


_TLS_KEYS = ("ssl_ca_file", "ssl_cert_reqs", "ssl_check_hostname", "ssl_cert_file", "ssl_key_file")


def _redis(s: _Section) -> RedisConnection:
    path = (*s.path, "url")
    raw = _check_url(
        s.ctx,
        path,
        s.text("url", example='"redis://127.0.0.1:6379/0"'),
        ("redis", "rediss", "unix"),
        'url: "redis://127.0.0.1:6379/0"',
    )
    parts = urlsplit(raw)
    db = parts.path.strip("/")
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} has no socket path",
            "write it like unix:///run/redis/redis.sock?db=0",
        )
    if parts.scheme != "unix" and db and not db.isdigit():
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} names database {db!r}",
            "the path is a database number, like redis://host:6379/0",
        )
    if "password" in parse_qs(parts.query):
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} carries a password in its query",
            "put it in the URL's user part or use password_env, password_file "
            "or password_credential",
        )
    query_db = ",".join(parse_qs(parts.query).get("db", []))
    cluster = _cluster_flag(s, raw, parts.scheme, query_db or db)
    url, url_password = _split_password(raw)
    password = s.secret()
    if url_password is not None:
        if password is not None:
            raise s.ctx.error(
                path,
                "has a password and so does the section",
                "keep one: remove it from the URL or drop password_*",
            )
        password = Secret(url_password, "url")
    tls_keys = [k for k in _TLS_KEYS if s.has(k)]
    if tls_keys and parts.scheme != "rediss":
        raise s.ctx.error(
            (*s.path, tls_keys[0]),
            f"is set but the URL {_show_url(raw)} is not TLS",
            "use a rediss:// URL, or remove the ssl_* keys",
        )
    cert_reqs = s.choice(
        "ssl_cert_reqs", "required", ("required", "optional", "none"), fold=str.lower
    )
    cert_file = s.file("ssl_cert_file", "certificate")
    key_file = s.file("ssl_key_file", "key file")
    if (cert_file is None) != (key_file is None):
        raise s.ctx.error(
            s.path,
            "sets only one of ssl_cert_file and ssl_key_file",
            "a client certificate needs both",
        )
    key_prefix = s.text("key_prefix", "vk:", example='"vk:"', allow_empty=True)
    if cluster and "{" in key_prefix:
        raise s.ctx.error(
            (*s.path, "key_prefix"),
            f"{_show(key_prefix)} holds '{{', but cluster is true: the cluster sink puts a "
            "hash tag in each bookkeeping key itself",
            'use a prefix without braces, like key_prefix: "vk:"',
        )
    return RedisConnection(
        name=str(s.path[-1]),
        url=url,
        password=password,
        key_prefix=key_prefix,
        entry_prefix=s.text("entry_prefix", "", example='"app1:"', allow_empty=True),
        owner_buckets=_owner_buckets(s, cluster),
        ssl_ca_file=s.file("ssl_ca_file", "CA file"),
        ssl_cert_reqs=cert_reqs,
        ssl_check_hostname=s.flag("ssl_check_hostname", True) and cert_reqs != "none",
        ssl_cert_file=cert_file,
        ssl_key_file=key_file,
        socket_timeout=s.seconds("socket_timeout", 10.0, positive=True),
        connect_timeout=s.seconds("connect_timeout", 5.0, positive=True),
        health_check_interval=s.integer("health_check_interval", 30, 0, 3600),
        cluster=cluster,
    )


def _owner_buckets(s: _Section, cluster: bool) -> int:
    """``owner_buckets``: 1 to 2^20 (standalone), 1 to 16384 with ``cluster: true`` (the
    cluster sink spreads the buckets over the hash slots)."""
    if not cluster:
        return cast(int, s.integer("owner_buckets", 4096, 1, 1 << 20))
    value = cast(int, s.integer("owner_buckets", CLUSTER_OWNER_BUCKETS, 1, 1 << 20))
    if value > CLUSTER_SLOTS:
        raise s.ctx.error(
            (*s.path, "owner_buckets"),
            f"{value} is out of range with cluster: true (a cluster has {CLUSTER_SLOTS} hash "
            "slots)",
            f"use a whole number between 1 and {CLUSTER_SLOTS}, like owner_buckets: "
            f"{CLUSTER_OWNER_BUCKETS}",
        )
    return value


def _cluster_flag(s: _Section, raw: str, scheme: str, db: str) -> bool:
    """``cluster``: true or false (a YAML boolean, not a string or a number); a cluster URL
    is TCP (``redis://``/``rediss://``) and names database 0 or none (a cluster has no
    other)."""
    path = (*s.path, "cluster")
    value = s.data.get("cluster")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise s.ctx.error(
            path,
            f"{_show(value)} is {_kind(value)}, not true or false",
            "write cluster: true for a Redis Cluster (ElastiCache with cluster mode enabled, "
            "ElastiCache Serverless, MemoryDB) or leave it out (false) for a standalone Redis",
        )
    if not value:
        return False
    url_path = (*s.path, "url")
    if scheme == "unix":
        raise s.ctx.error(
            url_path,
            f"{_show_url(raw)} is a unix socket, but cluster is true: a Redis Cluster is "
            "reached over TCP",
            "use redis://host:port or rediss://host:port (any node of the cluster), or "
            "remove cluster: true",
        )
    if db and not (db.isdigit() and int(db) == 0):
        raise s.ctx.error(
            url_path,
            f"{_show_url(raw)} names database {db}, but cluster is true: a Redis Cluster "
            "has database 0 only",
            "end the URL with /0 (or no path), or remove cluster: true for a standalone Redis",
        )
    return True


def _opensearch(s: _Section, aws: AwsConfig) -> OpenSearchConnection:
    example = 'hosts: ["https://search.example.com:9200"]'
    raw = s.data.get("hosts")
    path = (*s.path, "hosts")
    if raw is None:
        raise s.ctx.error(path, "is missing", f"add {example}")
    if isinstance(raw, str):
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} is a string, not a list",
            f"write it as hosts: [{_show_url(raw)}]",
        )
    if not isinstance(raw, list) or not raw:
        raise s.ctx.error(path, f"{_show(raw)} is not a non-empty list", f"use {example}")
    hosts = tuple(
        _check_url(s.ctx, (*path, i), h, ("http", "https"), example, _OPENSEARCH_CREDENTIALS_FIX)
        for i, h in enumerate(raw)
    )
    for i, host in enumerate(hosts):
        if "@" in urlsplit(host).netloc:
            raise s.ctx.error(
                (*path, i),
                f"{_show_url(host)} carries credentials",
                "remove them and use auth: {type: basic, username: ..., password_credential: ...}",
            )
    verify = s.flag("verify_certs", True)
    ca_certs = s.file("ca_certs", "CA bundle")
    if ca_certs and not verify:
        raise s.ctx.error(
            (*s.path, "ca_certs"),
            "is set while verify_certs is false",
            "drop one: a CA bundle is only used to verify certificates",
        )
    return OpenSearchConnection(
        name=str(s.path[-1]),
        hosts=hosts,
        auth=_auth(s, aws),
        verify_certs=verify,
        ca_certs=ca_certs,
        index_prefix=s.text(
            "index_prefix",
            "",
            example="staging-",
            pattern=_INDEX_PREFIX_RE,
            rule="use lowercase letters, digits, '_', '-' or '.'",
            allow_empty=True,
        ),
        timeout=s.seconds("timeout", 30.0, positive=True),
        max_retries=s.integer("max_retries", 3, 0, 20),
        http_compress=s.flag("http_compress", True),
    )


def _auth(s: _Section, aws: AwsConfig) -> BasicAuth | SigV4Auth | None:
    raw = s.data.get("auth")
    path = (*s.path, "auth")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise s.ctx.error(
            path,
            f"must be a mapping, got {_kind(raw)}",
            "write it as auth: {type: basic, username: ..., password_env: ...}",
        )
    kind = raw.get("type")
    if kind == "basic":
        a = _Section(s.ctx, path, raw, _keys(BasicAuth, drop=("password",), add=_SECRET_KEYS))
        username = a.text("username", example="viewkeeper")
        password = a.secret()
        if password is None:
            raise s.ctx.error(
                path,
                "basic auth has no password",
                "add password_env, password_file or password_credential",
            )
        return BasicAuth(username=username, password=password)
    if kind == "sigv4":
        a = _Section(s.ctx, path, raw, _keys(SigV4Auth, drop=()))
        region = a.text(
            "region",
            aws.region,
            example="us-east-1",
            pattern=_REGION_RE,
            rule="use an AWS region name",
        )
        service = a.choice("service", "es", ("es", "aoss"), fold=str.lower)
        return SigV4Auth(region=region, service=service)
    shown = "missing" if kind is None else _show(kind)
    raise s.ctx.error(
        (*path, "type"),
        f"is {shown}",
        "use type: basic (username + password_*) or type: sigv4 (AWS)"
        + _did_you_mean(kind, ("basic", "sigv4")),
    )
