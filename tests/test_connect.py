"""Clients built from the config: TLS verified by default, passwords never shown, SigV4
signing with the configured region and service. No network needed except the loopback."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import redis
from opensearchpy import Urllib3AWSV4SignerAuth

from tests.testbed import free_port
from viewkeeper.app import opensearch_client_for as opensearch_client
from viewkeeper.app import redis_client_for as redis_client
from viewkeeper.config import Config, ConfigError, parse_config
from viewkeeper.sinks.connect import describe_target

PASSWORD = "c0nnect-pw-5e1d"


def config_of(environ: dict[str, str] | None = None, **sections: Any) -> Config:
    data: dict[str, Any] = {"aws": {"region": "us-east-1"}, "views": ["views.orders"]}
    data.update(sections)
    return parse_config(data, "test.yaml", environ=environ or {})


# --- describe_target ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{PASSWORD}@cache.internal:6380/0", "cache.internal:6380"),
        (f"rediss://default:{PASSWORD}@cache.internal/2", "cache.internal:6379"),
        ("http://127.0.0.1:9200", "127.0.0.1:9200"),
        ("http://search", "search:9200"),
        ("https://search.example.com", "search.example.com:443"),
        ("redis://[::1]:6379/0", "[::1]:6379"),
        ("unix:///run/redis/redis.sock?db=0", "/run/redis/redis.sock"),
        ("redis://h:99999", "<invalid URL>"),
    ],
)
def test_describe_target_shows_host_and_port_only(url: str, shown: str) -> None:
    assert describe_target(url) == shown


# --- Redis ---------------------------------------------------------------------------------


def test_plain_redis_client_has_timeouts_and_health_checks() -> None:
    conn = config_of(redis={"cache": {"url": "redis://127.0.0.1:6379/3"}}).redis["cache"]
    client = redis_client(conn)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.Connection
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6379, 3)
    assert kwargs["socket_timeout"] == 10.0 and kwargs["socket_connect_timeout"] == 5.0
    assert kwargs["health_check_interval"] == 30
    assert "password" not in kwargs or kwargs["password"] is None


def test_rediss_verifies_certificates_by_default(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cache = {"url": "rediss://cache.internal:6380/0", "ssl_ca_file": str(ca)}
    conn = config_of(redis={"cache": cache}).redis["cache"]
    client = redis_client(conn)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is True
    assert kwargs["ssl_ca_certs"] == str(ca)


def test_rediss_without_verification_must_be_asked_for() -> None:
    cache = {"url": "rediss://cache.internal:6380/0", "ssl_cert_reqs": "none"}
    conn = config_of(redis={"cache": cache}).redis["cache"]
    kwargs = redis_client(conn).connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "none"
    assert kwargs["ssl_check_hostname"] is False  # ssl refuses hostname checks without certs


def test_password_from_the_url_reaches_the_client_but_not_its_repr() -> None:
    url = f"redis://default:{PASSWORD}@127.0.0.1:6379/0"
    conn = config_of(redis={"cache": {"url": url}}).redis["cache"]
    client = redis_client(conn)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["password"] == PASSWORD and kwargs["username"] == "default"
    assert PASSWORD not in repr(client)
    assert PASSWORD not in repr(client.connection_pool)
    assert PASSWORD not in repr(conn)


def test_password_from_a_file_reaches_the_client_but_not_its_repr(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    cache = {"url": "redis://127.0.0.1:6379/0", "password_file": str(tmp_path / "pw")}
    conn = config_of(redis={"cache": cache}).redis["cache"]
    client = redis_client(conn)
    assert client.connection_pool.connection_kwargs["password"] == PASSWORD
    assert PASSWORD not in repr(client) and PASSWORD not in repr(conn)


def test_a_connection_error_does_not_carry_the_password() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    conn = config_of(redis={"cache": {"url": url, "connect_timeout": 1}}).redis["cache"]
    client = redis_client(conn, retry=None)
    with pytest.raises(redis.ConnectionError) as info:
        client.ping()
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value)


def test_overrides_win() -> None:
    conn = config_of(redis={"cache": {"url": "redis://127.0.0.1/0"}}).redis["cache"]
    client = redis_client(conn, decode_responses=True, socket_timeout=1.5)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["decode_responses"] is True and kwargs["socket_timeout"] == 1.5


@pytest.mark.redis
def test_the_client_talks_to_a_real_redis(redis_url: str) -> None:
    conn = config_of(redis={"cache": {"url": redis_url}}).redis["cache"]
    client = redis_client(conn)
    try:
        assert client.ping() is True
        assert client.client_getname() == "viewkeeper"
    finally:
        client.close()


# --- OpenSearch ----------------------------------------------------------------------------


def only_connection(client: Any) -> Any:
    (conn,) = client.transport.connection_pool.connections
    return conn


def test_https_verifies_certificates_by_default() -> None:
    cfg = config_of(opensearch={"search": {"hosts": ["https://search.internal:9200"]}})
    client = opensearch_client(cfg.opensearch["search"], cfg.aws)
    conn = only_connection(client)
    assert conn.use_ssl is True
    assert conn.pool.cert_reqs == "CERT_REQUIRED"
    assert conn.http_compress is True
    assert conn.timeout == 30.0


def test_ca_certs_are_passed_on(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    search = {"hosts": ["https://search.internal:9200"], "ca_certs": str(ca)}
    cfg = config_of(opensearch={"search": search})
    conn = only_connection(opensearch_client(cfg.opensearch["search"], cfg.aws))
    assert conn.pool.ca_certs == str(ca)


def test_basic_auth_password_is_sent_but_never_shown(tmp_path: Path) -> None:
    (tmp_path / "os-pw").write_text(PASSWORD)
    search = {
        "hosts": ["https://search.internal:9200"],
        "auth": {"type": "basic", "username": "vk", "password_credential": "os-pw"},
    }
    cfg = config_of({"CREDENTIALS_DIRECTORY": str(tmp_path)}, opensearch={"search": search})
    client = opensearch_client(cfg.opensearch["search"], cfg.aws)
    conn = only_connection(client)
    expected = "Basic " + base64.b64encode(f"vk:{PASSWORD}".encode()).decode()
    assert conn.headers["authorization"] == expected
    for text in (repr(client), repr(conn), repr(cfg)):
        assert PASSWORD not in text and expected not in text


@pytest.fixture
def aws_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Static test credentials, and no ~/.aws or instance metadata to fall back to."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")


@pytest.mark.usefixtures("aws_keys")
@pytest.mark.parametrize(
    ("auth", "region", "service"),
    [
        ({"type": "sigv4"}, "us-east-1", "es"),
        ({"type": "sigv4", "region": "eu-west-1", "service": "aoss"}, "eu-west-1", "aoss"),
    ],
)
def test_sigv4_signs_for_the_configured_region_and_service(
    auth: dict[str, str], region: str, service: str
) -> None:
    search = {"hosts": ["https://search-x.us-east-1.es.amazonaws.com"], "auth": auth}
    cfg = config_of(opensearch={"search": search})
    conn = only_connection(opensearch_client(cfg.opensearch["search"], cfg.aws))
    signer = conn.http_auth
    assert isinstance(signer, Urllib3AWSV4SignerAuth)
    assert (signer.signer.region, signer.service) == (region, service)
    headers = signer("GET", "https://search-x.us-east-1.es.amazonaws.com/_cluster/health", None)
    assert f"/{region}/{service}/aws4_request" in headers["Authorization"]
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")


def test_sigv4_without_credentials_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)
    search = {"hosts": ["https://h"], "auth": {"type": "sigv4"}}
    cfg = config_of(opensearch={"search": search})
    with pytest.raises(ConfigError, match=r"opensearch.search.auth: sigv4 needs AWS credentials"):
        opensearch_client(cfg.opensearch["search"], cfg.aws)
