"""``cluster: true`` on a ``redis:`` connection (issue #15): the config accepts it with every
option a standalone connection has and refuses a bad value in one line; the cluster client
is built like the standalone one (timeouts, TLS, password apart from the URL, no redis-py
retries when asked, MOVED and ASK still followed); ``viewkeeper check`` says which mode it
reached and refuses a mismatch either way with the fix; ``viewkeeper demo --redis-cluster``
runs on the test bed's real 3-master cluster.

The end-to-end ones (check with ``cluster: true`` on the cluster, the demo) need the cluster
sink (viewkeeper/sinks/redis_cluster/).
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.cluster import RedisCluster

from tests.helpers import REPO, vk, vk_env, write_config
from tests.test_cli import view_table  # noqa: F401 - a fixture
from tests.test_security import TlsRedis, certs  # noqa: F401 - certs is a fixture
from tests.testbed import RemoteClusterControl, free_port, key_for_slot
from viewkeeper import app as app_module
from viewkeeper.app import App, redis_cluster_client_for
from viewkeeper.cli.failures import _certificate_error
from viewkeeper.config import ConfigError, RedisConnection, load_config, parse_config, redacted
from viewkeeper.config.model import CLUSTER_OWNER_BUCKETS
from viewkeeper.sinks import connect
from viewkeeper.sinks.base import SinkError, SinkUnavailable
from viewkeeper.sinks.connect import NotACluster, RedisTls, cluster_masters, redis_cluster_client

PASSWORD = "cLu5ter-pw-3e9a71"


def cache(environ: dict[str, str] | None = None, **body: Any) -> RedisConnection:
    """The ``redis.cache`` connection of a config whose body is ``body``."""
    config = parse_config(
        {"aws": {"region": "us-east-1"}, "views": ["views.orders"], "redis": {"cache": body}},
        "test.yaml",
        environ=environ or {},
    )
    return config.redis["cache"]


def error_of(environ: dict[str, str] | None = None, **body: Any) -> str:
    with pytest.raises(ConfigError) as info:
        cache(environ, **body)
    message = str(info.value)
    assert "\n" not in message and message.startswith("test.yaml: "), message
    return message


# ==== the config ============================================================================


def test_cluster_is_false_by_default_and_true_when_asked() -> None:
    assert cache(url="redis://127.0.0.1:6379/0").cluster is False
    assert cache(url="redis://127.0.0.1:6379/0", cluster=False).cluster is False
    conn = cache(url="redis://127.0.0.1:7000/0", cluster=True)
    assert conn.cluster is True and conn.url == "redis://127.0.0.1:7000/0"
    assert cache(url="redis://cfg.example:6379", cluster=True).cluster is True  # no path: db 0


def test_owner_buckets_defaults_to_the_cluster_sinks_own_unless_given() -> None:
    assert cache(url="redis://h:6379/0").owner_buckets == 4096
    assert cache(url="redis://h:6379/0", cluster=True).owner_buckets == CLUSTER_OWNER_BUCKETS
    assert cache(url="redis://h:6379/0", cluster=True, owner_buckets=64).owner_buckets == 64


def test_a_cluster_connection_takes_every_option_of_a_standalone_one(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    conn = cache(
        url="rediss://vk@cfg.cache.example:6379/0",
        cluster=True,
        password_file=str(tmp_path / "pw"),
        key_prefix="vk-app1:",
        entry_prefix="app1:",
        owner_buckets=512,
        ssl_ca_file=str(tmp_path / "ca.pem"),
        ssl_cert_reqs="optional",
        ssl_check_hostname=False,
        ssl_cert_file=str(tmp_path / "client.pem"),
        ssl_key_file=str(tmp_path / "client.key"),
        socket_timeout=3,
        connect_timeout=2,
        health_check_interval=15,
    )
    assert conn.cluster and conn.tls
    assert conn.password is not None and conn.password.reveal() == PASSWORD
    assert (conn.key_prefix, conn.entry_prefix, conn.owner_buckets) == ("vk-app1:", "app1:", 512)
    assert (conn.ssl_cert_reqs, conn.ssl_check_hostname) == ("optional", False)
    assert conn.ssl_ca_file == str(tmp_path / "ca.pem")
    assert (conn.socket_timeout, conn.connect_timeout, conn.health_check_interval) == (3, 2, 15)


@pytest.mark.parametrize("source", ["url", "password_env", "password_credential"])
def test_a_cluster_connections_password_comes_from_anywhere_and_is_never_shown(
    tmp_path: Path, source: str
) -> None:
    (tmp_path / "redis-password").write_text(PASSWORD)
    environ = {"REDIS_PASSWORD": PASSWORD, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    body: dict[str, Any] = {"url": "redis://vk@127.0.0.1:7000/0", "cluster": True}
    if source == "url":
        body["url"] = f"redis://vk:{PASSWORD}@127.0.0.1:7000/0"
    elif source == "password_env":
        body["password_env"] = "REDIS_PASSWORD"
    else:
        body["password_credential"] = "redis-password"
    conn = cache(environ, **body)
    assert conn.password is not None and conn.password.reveal() == PASSWORD
    assert conn.url == "redis://vk@127.0.0.1:7000/0"  # never in the URL
    assert PASSWORD not in repr(conn)
    shown = redacted(parse_config(minimal_with(body), environ=environ))
    assert shown["redis"]["cache"]["cluster"] is True
    assert PASSWORD not in repr(shown)


def minimal_with(body: dict[str, Any]) -> dict[str, Any]:
    return {"aws": {"region": "us-east-1"}, "views": ["views.orders"], "redis": {"cache": body}}


@pytest.mark.parametrize(
    ("value", "shown"),
    [("yes", "'yes' is a string"), ("true", "'true' is a string"), (1, "1 is an integer"),
     (0, "0 is an integer"), ([True], "a list is a list")],
)  # fmt: skip
def test_a_cluster_that_is_not_a_boolean_names_the_connection_the_value_and_the_fix(
    value: Any, shown: str
) -> None:
    message = error_of(url="redis://127.0.0.1:7000/0", cluster=value)
    assert message.startswith("test.yaml: redis.cache.cluster: "), message
    assert f"{shown}, not true or false" in message, message
    assert "write cluster: true for a Redis Cluster" in message, message
    assert "leave it out (false) for a standalone Redis" in message, message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:7000/3", "'redis://127.0.0.1:7000/3' names database 3"),
        ("redis://127.0.0.1:7000/0?db=2", "names database 2"),
        (f"rediss://vk:{PASSWORD}@127.0.0.1:7000/1", "'rediss://vk:***@127.0.0.1:7000/1'"),
    ],
)
def test_a_cluster_url_naming_another_database_than_0_is_refused(url: str, shown: str) -> None:
    message = error_of(url=url, cluster=True)
    assert message.startswith("test.yaml: redis.cache.url: "), message
    assert shown in message and "a Redis Cluster has database 0 only" in message, message
    assert "end the URL with /0 (or no path), or remove cluster: true" in message, message
    assert PASSWORD not in message
    assert cache(url=url.replace(PASSWORD, "x")).cluster is False  # fine for a standalone one


def test_a_cluster_takes_at_most_one_owner_bucket_per_slot() -> None:
    assert cache(url="redis://h:6379/0", cluster=True, owner_buckets=16384).owner_buckets == 16384
    message = error_of(url="redis://h:6379/0", cluster=True, owner_buckets=20000)
    assert "redis.cache.owner_buckets: 20000 is out of range with cluster: true" in message
    assert "16384 hash slots" in message and "between 1 and 16384" in message, message
    assert cache(url="redis://h:6379/0", owner_buckets=20000).owner_buckets == 20000


def test_a_cluster_key_prefix_with_a_brace_is_refused() -> None:
    message = error_of(url="redis://h:6379/0", cluster=True, key_prefix="{vk}:")
    assert "redis.cache.key_prefix: '{vk}:' holds '{', but cluster is true" in message, message
    assert 'use a prefix without braces, like key_prefix: "vk:"' in message, message
    assert cache(url="redis://h:6379/0", key_prefix="{vk}:").key_prefix == "{vk}:"  # standalone


def test_a_cluster_on_a_unix_socket_is_refused() -> None:
    message = error_of(url="unix:///run/redis/redis.sock?db=0", cluster=True)
    assert "redis.cache.url: 'unix:///run/redis/redis.sock?db=0' is a unix socket" in message
    assert "use redis://host:port or rediss://host:port" in message, message


def test_a_misspelt_cluster_key_suggests_it() -> None:
    message = error_of(url="redis://127.0.0.1:7000/0", clustered=True)
    assert "redis.cache.clustered: unknown key; did you mean 'cluster'?" in message, message


def offline_config(tmp_path: Path, redis_body: dict[str, Any]) -> Path:
    path = tmp_path / "viewkeeper.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "aws": {"region": "us-east-1"},
                "views": ["tests.views_e2e.bad_views"],
                "redis": {"cache": redis_body},
                "opensearch": {"search": {"hosts": ["http://127.0.0.1:9200"]}},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("body", "must_say"),
    [
        ({"url": "redis://127.0.0.1:7000/0", "cluster": "yes"},
         ["redis.cache.cluster", "'yes'", "cluster: true"]),
        ({"url": "redis://127.0.0.1:7000/2", "cluster": True},
         ["redis.cache.url", "database 2", "remove cluster: true"]),
    ],
    ids=["cluster as text", "cluster on database 2"],
)  # fmt: skip
def test_a_bad_cluster_setting_through_the_cli_is_one_line_and_exit_78(
    tmp_path: Path, body: dict[str, Any], must_say: list[str]
) -> None:
    path = offline_config(tmp_path, body)
    res = vk("check", "--offline", "-c", str(path))
    assert res.returncode == 78, res.stdout + res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert re.match(rf"viewkeeper: {re.escape(str(path))}:\d+: ", line), line  # file:line
    for words in must_say:
        assert words in line, line


def test_check_offline_shows_the_cluster_flag(tmp_path: Path) -> None:
    path = offline_config(tmp_path, {"url": "redis://127.0.0.1:7000/0", "cluster": True})
    res = vk("check", "--offline", "-c", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"cluster": true' in res.stdout, res.stdout


def readme_config() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return block


def test_the_readme_documents_cluster_and_its_config_block_loads(tmp_path: Path) -> None:
    section = (REPO / "README.md").read_text().split("\n## Configuration\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert "cluster: true" in readme_config()
    assert "`cluster: true`" in section and "database 0 only" in section
    assert "ok (host:port, cluster, 3 masters)" in section
    path = tmp_path / "viewkeeper.yaml"
    path.write_text(readme_config())
    config = load_config(path, environ={"REDIS_PASSWORD": PASSWORD})
    assert config.redis["cache"].cluster is False
    data = yaml.safe_load(readme_config())
    data["redis"]["cache"]["cluster"] = True  # the commented option, set
    path.write_text(yaml.safe_dump(data))
    assert load_config(path, environ={"REDIS_PASSWORD": PASSWORD}).redis["cache"].cluster


# ==== the client builder ====================================================================


class Captured(Exception):
    """What connect.RedisCluster was called with (it connects: not wanted here)."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    def fake(**kwargs: Any) -> Any:
        raise Captured(kwargs)

    monkeypatch.setattr(connect, "RedisCluster", fake)

    def build(url: str, **options: Any) -> dict[str, Any]:
        with pytest.raises(Captured) as info:
            redis_cluster_client(url, **options)
        return info.value.kwargs

    return build


def test_the_cluster_client_gets_the_standalone_clients_settings(
    captured: Callable[..., dict[str, Any]],
) -> None:
    kwargs = captured("redis://vk@cfg.example:6379/0", password=PASSWORD)
    assert kwargs["url"] == "redis://vk@cfg.example:6379/0"  # the password is not put in it
    assert kwargs["password"] == PASSWORD
    assert kwargs["socket_timeout"] == 10.0 and kwargs["socket_connect_timeout"] == 5.0
    assert kwargs["socket_keepalive"] is True and kwargs["client_name"] == "viewkeeper"
    assert kwargs["decode_responses"] is False
    assert "retry" not in kwargs  # redis-py's own retries unless retries=False
    assert not any(k.startswith("ssl_") for k in kwargs)


def test_rediss_cluster_client_verifies_certificates_by_default(
    captured: Callable[..., dict[str, Any]],
) -> None:
    kwargs = captured("rediss://cfg.example:6379/0")
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
    assert kwargs["ssl_ca_certs"] is None  # the system CAs
    tls = RedisTls("none", False, "/ca.pem", "/c.pem", "/c.key")
    kwargs = captured("rediss://cfg.example:6379/0", tls=tls)
    assert (kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == ("none", False)
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
        "/ca.pem",
        "/c.pem",
        "/c.key",
    )


def test_retries_false_turns_off_redis_pys_retries_and_overrides_win(
    captured: Callable[..., dict[str, Any]],
) -> None:
    kwargs = captured("redis://cfg.example:6379", retries=False, socket_timeout=1.5)
    assert kwargs["retry"].get_retries() == 0
    assert kwargs["socket_timeout"] == 1.5


def test_a_cluster_client_refuses_a_url_a_cluster_cannot_take() -> None:
    with pytest.raises(ValueError, match=r"cfg.example:6379: the URL names database 3, but a"):
        redis_cluster_client("redis://cfg.example:6379/3")
    with pytest.raises(ValueError, match="names database 2"):
        redis_cluster_client("redis://cfg.example:6379/0?db=2")
    with pytest.raises(ValueError, match="a cluster is reached over TCP"):
        redis_cluster_client("unix:///run/redis.sock")


@pytest.mark.redis_cluster
def test_the_cluster_client_talks_to_the_real_cluster(redis_cluster_url: str) -> None:
    client = redis_cluster_client(redis_cluster_url, retries=False, health_check_interval=7)
    try:
        assert client.ping() is True
        assert cluster_masters(client) == 3
        key = f"vk-connect-{uuid.uuid4().hex}"
        client.set(key, "v")
        assert client.get(key) == b"v"  # bytes: decode_responses=False
        client.delete(key)
        assert client.retry.get_retries() == 0
        for node in client.get_nodes():  # every node's connections, not only the first one
            node_kwargs = node.redis_connection.connection_pool.connection_kwargs
            assert node_kwargs["health_check_interval"] == 7
            assert node_kwargs["client_name"] == "viewkeeper"
            assert node_kwargs["socket_timeout"] == 10.0
            assert node_kwargs["socket_connect_timeout"] == 5.0
    finally:
        client.close()


@pytest.mark.redis_cluster
def test_without_retries_moved_and_ask_are_still_followed(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    source = cluster.masters()[0]
    target = next(m for m in cluster.masters() if m.node_id != source.node_id)
    slot = source.slot_inside(13)
    moved, staying, fresh = (key_for_slot(slot, n) for n in ("moved", "staying", "fresh"))
    client = redis_cluster_client(cluster.url, retries=False)
    try:
        client.set(moved, b"1")
        client.set(staying, b"2")  # the client caches slot -> source
        migration = cluster.begin_migration(slot, target)
        migration.move_keys([moved])
        assert client.get(moved) == b"1"  # ASK followed
        client.set(fresh, b"3")
        assert migration.finish() == 1
        assert [client.get(k) for k in (moved, staying, fresh)] == [b"1", b"2", b"3"]  # MOVED
    finally:
        client.close()
    cluster.migrate_slot(slot, source)


@pytest.mark.redis
def test_a_standalone_redis_is_not_a_cluster(redis_url: str) -> None:
    with pytest.raises(NotACluster) as info:
        redis_cluster_client(redis_url, retries=False)
    host_port = redis_url.split("//")[1].split("/")[0]
    assert str(info.value).startswith(f"redis at {host_port} is not in cluster mode"), info.value
    assert "cluster support disabled" in info.value.reply  # the server's own words


def test_a_cluster_that_cannot_be_reached_is_unavailable_without_the_password() -> None:
    port = free_port()
    with pytest.raises(SinkUnavailable) as info:
        redis_cluster_client(
            f"redis://vk@127.0.0.1:{port}/0", password=PASSWORD, connect_timeout=1, retries=False
        )
    message = str(info.value)
    assert message.startswith(f"redis cluster at 127.0.0.1:{port} cannot be reached"), message
    assert PASSWORD not in message and PASSWORD not in repr(info.value)


@pytest.fixture
def cluster_user(redis_cluster_client: RedisCluster) -> Iterator[str]:
    """A user with PASSWORD on every node of the test bed's cluster (ACLs are per node)."""
    user = f"vk-{uuid.uuid4().hex[:8]}"
    nodes = redis_cluster_client.get_nodes()
    for node in nodes:
        node.redis_connection.execute_command(
            "ACL", "SETUSER", user, "on", f">{PASSWORD}", "~*", "&*", "+@all"
        )
    yield user
    for node in nodes:
        node.redis_connection.execute_command("ACL", "DELUSER", user)


@pytest.mark.redis_cluster
def test_a_cluster_password_is_used_and_never_shown(
    redis_cluster_url: str, cluster_user: str
) -> None:
    url = redis_cluster_url.replace("redis://", f"redis://{cluster_user}@")
    config = parse_config(
        minimal_with({"url": url, "cluster": True, "password_env": "PW"}), environ={"PW": PASSWORD}
    )
    client = redis_cluster_client_for(config.redis["cache"], retries=False)
    try:
        assert client.execute_command("ACL", "WHOAMI") == cluster_user.encode()
        shown = repr(client) + repr(client.get_nodes()) + repr(client.get_default_node())
        assert PASSWORD not in shown
    finally:
        client.close()
    wrong = parse_config(
        minimal_with({"url": url, "cluster": True, "password_env": "PW"}), environ={"PW": "nope"}
    )
    with pytest.raises(SinkUnavailable) as info:
        redis_cluster_client_for(wrong.redis["cache"], retries=False)
    message = str(info.value)
    assert message.startswith("redis sink 'cache': redis cluster at "), message
    assert "authentication failed" in message and "credential file" in message, message
    assert PASSWORD not in message and "nope" not in message


def test_tls_settings_reach_the_cluster_clients_connections(
    certs: Path,  # noqa: F811 - the fixture imported from tests.test_security
) -> None:
    """A TLS Redis (standalone: the handshake is what is tested) — with the CA the client
    gets through TLS and is told the server is no cluster; without it, the certificate
    error, findable by the CLI's probe (in the exception's chain)."""
    with TlsRedis(certs) as server:
        with pytest.raises(NotACluster):
            redis_cluster_client(
                server.url, tls=RedisTls(ca_file=str(server.ca)), connect_timeout=2
            )
        with pytest.raises(SinkUnavailable) as info:
            redis_cluster_client(server.url, connect_timeout=2, retries=False)
        assert "certificate verify failed" in str(info.value).lower(), info.value
        assert _certificate_error(info.value) is not None


# ==== the assembly ==========================================================================


def test_cluster_true_on_a_standalone_redis_names_the_connection_and_the_fix(
    redis_url: str,
) -> None:
    conn = cache(url=redis_url, cluster=True)
    with pytest.raises(NotACluster) as info:
        redis_cluster_client_for(conn, retries=False)
    message = str(info.value)
    assert message.startswith("redis sink 'cache' ("), message
    assert "has cluster: true, but the server is not in cluster mode" in message, message
    assert "remove cluster: true from redis.cache" in message, message
    assert isinstance(info.value, SinkError)


def app_of(body: dict[str, Any]) -> App:
    from tests.helpers import registry_of, view_for
    from tests.views_e2e import bad_views
    from viewkeeper.coordination.memory import MemoryStore
    from viewkeeper.stream.fake import FakeStream

    config = parse_config(
        {"aws": {"region": "us-east-1"}, "views": ["tests.views_e2e.bad_views"],
         "redis": {"cache": body}},
        environ={},
    )  # fmt: skip
    return App(
        config,
        registry=registry_of(view_for(bad_views.bad_card)),
        client=FakeStream(),
        store=MemoryStore(),
        sinks={},
    )


def test_the_daemon_waits_for_a_cluster_it_cannot_reach_and_batch_use_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = app_of({"url": "redis://127.0.0.1:7000/0", "cluster": True})
    calls: list[dict[str, Any]] = []
    slept: list[float] = []

    def flaky(conn: RedisConnection, **overrides: Any) -> Any:
        calls.append(overrides)
        if len(calls) < 4:
            raise SinkUnavailable(f"redis sink {conn.name!r}: redis cluster at h:1 down")
        return "client"

    monkeypatch.setattr(app_module, "redis_cluster_client_for", flaky)
    monkeypatch.setattr(app_module.time, "sleep", slept.append)
    with pytest.raises(SinkUnavailable, match="redis sink 'cache': redis cluster at h:1 down"):
        app.redis_cluster_client("cache")
    assert len(calls) == 1 and not slept
    app.wait_for_sinks = True
    calls.clear()
    assert app.redis_cluster_client("cache") == "client"
    assert slept == [1.0, 2.0, 4.0]
    assert calls[0] == {"retries": False}  # the sinks retry, not redis-py


# ==== viewkeeper check ======================================================================


def check(
    tmp_path: Path, dynamodb_url: str, redis_body: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    config = write_config(
        tmp_path, dynamodb_url=dynamodb_url, views=["cli_views"], redis={"cache": redis_body}
    )
    return vk("check", "-c", str(config))


@pytest.mark.redis_cluster
def test_check_reaches_the_cluster_with_cluster_true_and_says_so(
    tmp_path: Path,
    view_table: Callable[..., str],  # noqa: F811 - the fixture imported from tests.test_cli
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    dynamodb_url: str,
) -> None:
    view_table()
    res = check(tmp_path, dynamodb_url, {"url": redis_cluster_url, "cluster": True})
    assert res.returncode == 0, res.stdout + res.stderr
    host_port = redis_cluster_url.split("//")[1].split("/")[0]
    assert f"  redis cache: ok ({host_port}, cluster, 3 masters)" in res.stdout.splitlines(), (
        res.stdout
    )
    assert "all checks passed" in res.stdout


@pytest.mark.redis_cluster
def test_check_refuses_a_cluster_without_cluster_true_with_the_fix(
    tmp_path: Path,
    view_table: Callable[..., str],  # noqa: F811
    redis_cluster_url: str,
    dynamodb_url: str,
) -> None:
    view_table()
    res = check(tmp_path, dynamodb_url, {"url": redis_cluster_url})
    assert res.returncode == 1, res.stdout + res.stderr
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("  redis cache: ")]
    assert line.startswith("  redis cache: FAILED: redis sink 'cache' ("), line
    assert "is a Redis Cluster" in line, line
    assert "set cluster: true on this connection (redis.cache)" in line, line
    assert "Traceback" not in res.stdout + res.stderr


def test_check_refuses_cluster_true_on_a_standalone_redis_with_the_fix(
    tmp_path: Path,
    view_table: Callable[..., str],  # noqa: F811
    redis_url: str,
    dynamodb_url: str,
) -> None:
    view_table()
    res = check(tmp_path, dynamodb_url, {"url": redis_url, "cluster": True})
    assert res.returncode == 1, res.stdout + res.stderr
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("  redis cache: ")]
    assert line.startswith("  redis cache: FAILED: redis sink 'cache' ("), line
    assert "has cluster: true, but the server is not in cluster mode" in line, line
    assert "remove cluster: true from redis.cache" in line, line
    assert "Traceback" not in res.stdout + res.stderr
    assert "coordination table" in res.stdout  # the other checks still ran


def test_check_names_a_cluster_it_cannot_reach_and_goes_on(
    tmp_path: Path,
    view_table: Callable[..., str],  # noqa: F811
    dynamodb_url: str,
) -> None:
    view_table()
    port = free_port()
    res = check(tmp_path, dynamodb_url, {"url": f"redis://127.0.0.1:{port}/0", "cluster": True})
    assert res.returncode == 1, res.stdout + res.stderr
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("  redis cache: ")]
    assert line.startswith("  redis cache: FAILED: redis sink 'cache': redis cluster at "), line
    assert f"127.0.0.1:{port} cannot be reached" in line, line
    assert "check that the service is running" in line, line
    assert "Traceback" not in res.stdout + res.stderr


def test_run_refuses_cluster_true_on_a_standalone_redis_in_one_line(
    tmp_path: Path,
    view_table: Callable[..., str],  # noqa: F811
    redis_url: str,
    dynamodb_url: str,
) -> None:
    view_table()
    config = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        views=["cli_views"],
        redis={"cache": {"url": redis_url, "cluster": True}},
    )
    res = vk("run", "--until-caught-up", "-c", str(config), timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("viewkeeper: ")]
    assert "redis sink 'cache'" in line and "remove cluster: true from redis.cache" in line
    assert "Traceback" not in res.stderr, res.stderr


@pytest.mark.redis_cluster
def test_run_with_cluster_true_writes_the_views_into_the_cluster(
    tmp_path: Path,
    view_table: Callable[..., str],  # noqa: F811
    dynamodb: Any,
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    dynamodb_url: str,
) -> None:
    """The assembly end to end: a config with cluster: true, `run --until-caught-up`, the
    view's entries in the cluster (on every master: the keys hash to many slots)."""
    table = view_table()
    keys = [f"k{i}" for i in range(30)]
    for pk in keys:
        dynamodb.put_item(TableName=table, Item={"pk": {"S": pk}})
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": "k0"}})
    config = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        views=["cli_views"],
        tables={table: {"starting_position": "TRIM_HORIZON"}},
        redis={"cache": {"url": redis_cluster_url, "cluster": True}},
    )
    res = vk("run", "--until-caught-up", "-c", str(config), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for pk in keys[1:]:
        assert redis_cluster_client.get(f"cli:{pk}") == b"1", pk
    assert redis_cluster_client.get("cli:k0") is None  # the delete retracted it
    masters = {redis_cluster_client.get_node_from_key(f"cli:{pk}").name for pk in keys[1:]}
    assert len(masters) == 3


# ==== viewkeeper demo --redis-cluster =======================================================


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", "demo", "--pace", "0", *args],
        cwd=REPO,
        env=vk_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_the_demo_refuses_redis_cluster_without_a_redis_url() -> None:
    res = demo("--redis-cluster")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--redis-cluster needs --redis-url" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_the_demo_says_which_flag_to_change_for_the_redis_it_is_given(
    redis_url: str, redis_cluster_url: str
) -> None:
    res = demo("--redis-url", redis_url, "--redis-cluster")
    assert res.returncode == 2, res.stdout + res.stderr
    host_port = redis_url.split("//")[1].split("/")[0]
    line = f"viewkeeper demo: --redis-url {host_port} is not a Redis Cluster ("
    assert line in res.stderr and "; drop --redis-cluster" in res.stderr, res.stderr
    res = demo("--redis-url", redis_cluster_url)
    assert res.returncode == 2, res.stdout + res.stderr
    host_port = redis_cluster_url.split("//")[1].split("/")[0]
    line = f"viewkeeper demo: --redis-url {host_port} is a Redis Cluster; add --redis-cluster"
    assert line in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.redis_cluster
def test_the_demo_runs_on_a_redis_cluster(
    redis_cluster_url: str, redis_cluster_client: RedisCluster
) -> None:
    redis_cluster_client.set("order:o-1001", "an application's own value")
    for keep in (True, False):
        res = demo("--redis-url", redis_cluster_url, "--redis-cluster",
                   *(["--keep"] if keep else []))  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout
        host_port = redis_cluster_url.split("//")[1].split("/")[0]
        assert f"Redis: Redis Cluster at {host_port}" in out, out
        assert "+ order:o-1001" in out  # a put appears
        assert "+ orders:status:paid" in out and "{o-1001}" in out  # a status moves
        assert "- customer:bob:orders" in out  # a reassignment retracts the old entry
        assert "- customer:bob:spent_cents" in out
        assert "~ orders:count:new" in out and "+ orders:count:paid" in out
        assert "[carol@1999, alice@4250]" in out
        assert "- order:o-1003" in out
        steps = re.split(r"\n\d\. ", out)  # each step shows its own writes, none late
        assert "+ orders:events                1 events" in steps[1], steps[1]
        assert "'event': 'MODIFY', 'status': 'paid'" in steps[4], steps[4]
        assert '~ order:o-1001                 {"status":"paid"' in steps[4], steps[4]
        replay = out.split("replays the stream from the start")[1]
        assert "(no change)" in replay and "dead-lettered 0" in replay
        assert "Traceback" not in res.stderr, res.stderr
        left = list(redis_cluster_client.scan_iter(match="viewkeeper-demo:*"))
        assert bool(left) is keep, left
    assert redis_cluster_client.get("order:o-1001") == b"an application's own value"


def test_the_demo_help_names_redis_cluster() -> None:
    res = vk("demo", "--help")
    assert "--redis-cluster" in res.stdout and "cluster: true" in " ".join(res.stdout.split())
