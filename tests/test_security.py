"""Security: secrets never shown, metrics on loopback, hostile contents stored verbatim
(KEYS/ARGV only, escaped JSON), TLS to Redis verified by default.

Against the test bed's services, plus Redis servers started here with ``--requirepass`` or
TLS (a CA and server certificates made with ``openssl`` in a temporary folder).
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from opensearchpy import OpenSearch

from tests.helpers import registry_of, view_for, vk, vk_env, write_config
from tests.testbed import RedisServer, free_port
from tests.views_e2e import bad_views
from viewkeeper.app import opensearch_client_for as opensearch_client
from viewkeeper.app import redis_client_for as redis_client
from viewkeeper.config import ConfigError, MetricsConfig, parse_config, redacted
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.ops.logs import setup_logging
from viewkeeper.projection.keys import encode_key
from viewkeeper.runtime import metrics
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.sinks.base import Sink, SinkUnavailable
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.errors import StreamError
from viewkeeper.stream.http import HttpStreamClient
from viewkeeper.stream.records import ChangeRecord, decode_record
from viewkeeper.stream.values import encode_image

TABLE = bad_views.TABLE
KEYS = ("pk",)
_SEQ = itertools.count(10**20 + 1)

REDIS_PASSWORD = "rEd1s-S3cret-9f2c7a"
OPENSEARCH_PASSWORD = "0pen-S3arch-Secret-4b1d"
AWS_SECRET = "aWsSecretKey0b9e8d7c6a5f4e3d2c1b"
SECRETS = (REDIS_PASSWORD, OPENSEARCH_PASSWORD, AWS_SECRET)


CARD = view_for(bad_views.bad_card)
DOC = view_for(bad_views.bad_doc)


def record(item: Mapping[str, Any]) -> ChangeRecord:
    return decode_record(
        {
            "eventName": "INSERT",
            "dynamodb": {
                "Keys": encode_image({"pk": item["pk"]}),
                "NewImage": encode_image(item),
                "SequenceNumber": str(next(_SEQ)),
            },
        }
    )


def leaked(text: str, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """The secrets (or their basic-auth base64 form) that appear in ``text``."""
    found = [s for s in secrets if s in text]
    for s in secrets:
        encoded = base64.b64encode(f"vk:{s}".encode()).decode()
        if encoded in text:
            found.append(f"base64 of {s}")
    return found


class AuthRedis(RedisServer):
    """redis-server with ``--requirepass``: ready once it answers PING with NOAUTH."""

    def __init__(self, password: str) -> None:
        super().__init__(extra_args=["--requirepass", password])

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


@pytest.fixture(scope="module")
def auth_redis() -> Iterator[AuthRedis]:
    with AuthRedis(REDIS_PASSWORD) as server:
        yield server


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything logged, as ``viewkeeper run`` would write it (DEBUG, text lines)."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = setup_logging("text", "DEBUG", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


# ==== secrets =================================================================================


@pytest.fixture
def secret_config(
    tmp_path: Path,
    auth_redis: AuthRedis,
    dynamodb: Any,
    make_table: Any,
    dynamodb_url: str,
    opensearch_url: str,
    os_client: OpenSearch,
    os_prefix: str,
) -> Path:
    make_table(dynamodb, TABLE, hash_key="pk")
    for item in ({"pk": "ok", "v": 1}, {"pk": "boom", "redis": "raise", "search": "raise"}):
        dynamodb.put_item(TableName=TABLE, Item=encode_image(item))
    return write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        views=["tests.views_e2e.bad_views"],
        tables={TABLE: {"starting_position": "TRIM_HORIZON"}},
        redis={"cache": {"url": auth_redis.url, "password_env": "VK_REDIS_PASSWORD"}},
        opensearch={
            "search": {
                "hosts": [opensearch_url],
                "index_prefix": os_prefix,
                "auth": {"type": "basic", "username": "vk", "password_env": "VK_OS_PASSWORD"},
            }
        },
        logging={"level": "DEBUG"},
        metrics={"port": free_port()},
    )


def secret_env(redis_password: str = REDIS_PASSWORD) -> dict[str, str]:
    return vk_env() | {
        "VK_REDIS_PASSWORD": redis_password,
        "VK_OS_PASSWORD": OPENSEARCH_PASSWORD,
        "AWS_ACCESS_KEY_ID": "AKIAVIEWKEEPERTEST",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    }


def test_no_secret_in_any_command_output_or_debug_log(
    secret_config: Path, auth_redis: AuthRedis
) -> None:
    env = secret_env()
    commands = [
        ["check"],
        ["check", "--offline"],
        ["run", "--until-caught-up"],
        ["status"],
        ["status", "--json"],
        ["deadletters", "list"],
        ["deadletters", "list", "--json"],
        ["deadletters", "replay"],
    ]
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    for args in commands:
        res = vk(*args, "-c", str(secret_config), env=env)
        outputs[" ".join(args)] = res
        assert leaked(res.stdout + res.stderr) == [], " ".join(args)
    # the secrets were used, not just absent: the daemon wrote through the password
    assert outputs["check"].returncode == 0, outputs["check"].stdout
    assert "redis cache: ok" in outputs["check"].stdout
    assert '"***"' in outputs["check --offline"].stdout
    assert outputs["run --until-caught-up"].returncode == 0
    assert "metrics on http://127.0.0.1:" in outputs["run --until-caught-up"].stderr
    client = redis.Redis.from_url(auth_redis.url, password=REDIS_PASSWORD)
    assert client.get("card:ok") is not None
    client.flushall()
    client.close()
    assert "cannot make a card" in outputs["deadletters list"].stdout


def test_a_wrong_redis_password_is_reported_without_either_password(
    secret_config: Path,
) -> None:
    wrong = "wr0ng-Passw0rd-x81"
    env = secret_env(redis_password=wrong)
    res = vk("check", "-c", str(secret_config), env=env)
    assert res.returncode == 1
    (line,) = [x for x in res.stdout.splitlines() if "FAILED" in x]
    assert "authentication failed" in line and "127.0.0.1:" in line, line
    assert leaked(res.stdout + res.stderr, (*SECRETS, wrong)) == []
    res = vk("run", "--until-caught-up", "-c", str(secret_config), env=env)
    assert res.returncode != 0
    assert leaked(res.stdout + res.stderr, (*SECRETS, wrong)) == []


def test_failing_connections_with_passwords_never_show_them(
    log_stream: io.StringIO, auth_redis: AuthRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens there
    environ = {"VK_OS_PASSWORD": OPENSEARCH_PASSWORD, "VK_WRONG": "wr0ng-Passw0rd-x82"}
    config = parse_config(
        {
            "aws": {"region": "us-east-1", "endpoint_url": f"http://127.0.0.1:{port}"},
            "views": ["tests.views_e2e.bad_views"],
            "redis": {
                "down": {"url": f"redis://vk:{REDIS_PASSWORD}@127.0.0.1:{port}/0"},
                "wrong": {"url": auth_redis.url, "password_env": "VK_WRONG"},
            },
            "opensearch": {
                "search": {
                    "hosts": [f"http://127.0.0.1:{port}"],
                    "auth": {"type": "basic", "username": "vk", "password_env": "VK_OS_PASSWORD"},
                }
            },
        },
        environ=environ,
    )
    messages: list[str] = []

    down = RedisSink("down", redis_client(config.redis["down"]), retry_seconds=0.5)
    messages += [repr(down), repr(config), json.dumps(redacted(config))]
    with pytest.raises(SinkUnavailable) as caught:
        down.ping()
    messages.append(str(caught.value))
    assert f"127.0.0.1:{port}" in str(caught.value)

    wrong = RedisSink("wrong", redis_client(config.redis["wrong"]), retry_seconds=0.5)
    with pytest.raises(SinkUnavailable) as caught:
        wrong.ping()
    messages.append(str(caught.value))
    assert "authentication failed" in str(caught.value)

    search = OpenSearchSink(
        "search", opensearch_client(config.opensearch["search"], config.aws), unavailable_after=1
    )
    with pytest.raises(SinkUnavailable) as caught:
        search.ping()
    messages.append(str(caught.value))
    assert f"127.0.0.1:{port}" in str(caught.value)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAVIEWKEEPERTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    import boto3

    streams = HttpStreamClient("us-east-1", config.aws.endpoint_url, boto3.Session())
    with pytest.raises(StreamError) as stream_error:
        streams.describe_table(TABLE)
    messages += [str(stream_error.value), repr(streams)]

    logging.getLogger("viewkeeper.test").error("failures: %s", messages)
    text = "\n".join(messages) + log_stream.getvalue()
    assert leaked(text, (*SECRETS, "wr0ng-Passw0rd-x82")) == []


PIECES = ("Tr0ub4dor", "3xKq9wLm")  # the password is PIECES joined by a special character


@pytest.mark.parametrize(
    ("section", "url"),
    [
        ("redis", "redis://:Tr0ub4dor/3xKq9wLm@cache:6379/0"),
        ("redis", "redis://:Tr0ub4dor#3xKq9wLm@cache:6379/0"),
        ("redis", "redis://:Tr0ub4dor?3xKq9wLm@cache:6379/0"),
        ("redis", 'redis://:Tr0ub4dor"3xKq9wLm@cache:6379/x'),
        ("redis", "redis://:Tr0ub4dor 3xKq9wLm@cache:6379/x"),
        ("redis", "redis://user:Tr0ub4dor3xKq9wLm@cache:99999/0"),
        ("opensearch", "https://vk:Tr0ub4dor/3xKq9wLm@search:9200"),
        ("opensearch", "https://vk:Tr0ub4dor3xKq9wLm@search:9200"),
        ("aws", "http://key:Tr0ub4dor/3xKq9wLm@127.0.0.1:8000"),
    ],
    ids=[
        "redis slash",
        "redis hash",
        "redis question mark",
        "redis quote",
        "redis space",
        "redis bad port",
        "opensearch slash",
        "opensearch plain",
        "aws endpoint slash",
    ],
)
def test_a_config_error_never_echoes_a_password_whatever_its_characters(
    section: str, url: str
) -> None:
    data: dict[str, Any] = {"aws": {"region": "us-east-1"}, "views": ["views.orders"]}
    if section == "redis":
        data["redis"] = {"cache": {"url": url}}
    elif section == "opensearch":
        data["opensearch"] = {"search": {"hosts": [url]}}
    else:
        data["aws"]["endpoint_url"] = url
    try:
        config = parse_config(data, "viewkeeper.yaml", environ={})
    except ConfigError as exc:
        shown = str(exc)
        assert section in shown, shown  # still says where the problem is
    else:  # accepted: then it must never be shown either
        shown = repr(config) + json.dumps(redacted(config))
    for piece in PIECES:
        assert piece not in shown, shown


def test_a_config_error_from_the_cli_never_echoes_the_password(tmp_path: Path) -> None:
    path = tmp_path / "viewkeeper.yaml"
    url = "redis://:Tr0ub4dor/3xKq9wLm@cache:6379/0"
    path.write_text(
        yaml.safe_dump(
            {"aws": {"region": "us-east-1"}, "views": ["v"], "redis": {"c": {"url": url}}}
        )
    )
    res = vk("check", "--offline", "-c", str(path))
    assert res.returncode == 78
    assert "redis.c.url" in res.stderr
    for piece in PIECES:
        assert piece not in res.stderr, res.stderr


# ==== the metrics endpoint ====================================================================


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def test_metrics_listen_on_loopback_only_by_default() -> None:
    assert MetricsConfig().host == "127.0.0.1"
    minimal = parse_config({"aws": {"region": "us-east-1"}, "views": ["v"]}, environ={})
    assert (minimal.metrics.host, minimal.metrics.port) == ("127.0.0.1", 9464)

    port = free_port()
    metrics.serve(port)  # the default host
    deadline = time.monotonic() + 5
    while not _reachable("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.05)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200 and b"viewkeeper_records_total" in resp.read()
    assert not _reachable("127.0.0.2", port)  # another loopback address: not bound there
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 and nothing else


def test_metrics_listen_elsewhere_only_when_configured() -> None:
    """The control for the probe above: bound to every address, 127.0.0.2 answers."""
    port = free_port()
    metrics.serve(port, host="0.0.0.0")
    deadline = time.monotonic() + 5
    while not _reachable("127.0.0.2", port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _reachable("127.0.0.2", port)
    assert _listening_addresses(port) == {"00000000"}


# ==== hostile keys and values =================================================================

HOSTILE = [
    "]]..redis.call('flushall')..[[",
    "') redis.call('flushall') --",
    "a\"b'c`d",
    "line\nbreak\r\n\ttab",
    "nul\0byte\0",
    "ünïcødé 🚀 \u202eevil \ufeff",
    "a|b\\c\\|",
    "../../_all/_doc",
    "%2F?x=1#frag&y=*",
    "*",
    "{{ctx.op='delete'}}",
    "<script>alert(1)</script>",
    " ",
]


@pytest.fixture
def hostile_pipeline(
    redis_client: redis.Redis, os_client: OpenSearch, os_prefix: str
) -> Iterator[tuple[Pipeline, RedisSink, OpenSearchSink, MemoryStore]]:
    redis_sink = RedisSink("cache", redis_client, retry_seconds=2)
    os_sink = OpenSearchSink(
        "search", os_client, index_prefix=os_prefix, index_settings={"number_of_replicas": 0}
    )
    sinks: dict[tuple[str, str], Sink] = {("redis", "cache"): redis_sink}
    sinks[("opensearch", "search")] = os_sink
    redis_sink.prepare([CARD])
    os_sink.prepare([DOC])
    store = MemoryStore()
    yield Pipeline(registry_of(CARD, DOC), sinks, store, lambda v: 0), redis_sink, os_sink, store
    os_sink.close()


def test_hostile_keys_and_values_are_stored_verbatim_in_redis_and_opensearch(
    hostile_pipeline: tuple[Pipeline, RedisSink, OpenSearchSink, MemoryStore],
    redis_client: redis.Redis,
    os_client: OpenSearch,
) -> None:
    pipe, redis_sink, os_sink, store = hostile_pipeline
    alias = os_sink.indexes(DOC).alias
    injection = f'"}}}}\n{{"delete":{{"_index":"{alias}","_id":"canary"}}}}\n'
    megabyte = ("]]\0\"'\n{ü" * 150_000)[: 2**20]
    items = [
        {"pk": h, "redis": "hostile", "search": "hostile", "key": f"k:{h}", "value": h * 3}
        for h in [*HOSTILE, injection]
    ]
    items.append({"pk": "mb", "redis": "hostile", "search": "hostile", "key": "k:mb"})
    items[-1]["value"] = megabyte
    redis_client.set("canary", "alive")
    os_client.index(index=alias, id="canary", body={"pk": "canary"}, refresh=True)

    report = pipe.process(TABLE, KEYS, [record(i) for i in items])
    assert report.dead_lettered == 0, [d.error for d in store.list_deadletters()]
    assert report.applied == 2 * len(items)

    assert redis_client.get("canary") == b"alive"  # no script ran what the data said
    for item in items:
        key, value = item["key"].encode(), item["value"].encode()
        assert redis_client.get(key) == value, item["pk"]
        assert redis_client.hgetall(key + b":h") == {value: value}
        assert redis_client.smembers(key + b":set") == {value}
        assert redis_client.zrange(key + b":z", 0, -1) == [value]
        owned = redis_sink.owned_entries(CARD, encode_key(item, KEYS)) or []
        assert ("V", item["key"], "") in owned

    ids = [encode_key(i, KEYS) for i in items]
    found = os_client.mget(index=alias, body={"ids": [*ids, "canary"]})["docs"]
    assert all(d["found"] for d in found), [d["_id"] for d in found if not d["found"]]
    by_id = {d["_id"]: d["_source"] for d in found}
    for item, doc_id in zip(items, ids, strict=True):
        assert by_id[doc_id]["pk"] == item["pk"] and by_id[doc_id]["text"] == item["value"]
    assert by_id["canary"] == {"pk": "canary"}


# ==== TLS to Redis ============================================================================


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt; server.crt/key for 127.0.0.1 and localhost; other.crt/key for redis.internal."""
    folder = tmp_path_factory.mktemp("tls")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=viewkeeper test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    for name, names in (("server", "IP:127.0.0.1,DNS:localhost"), ("other", "DNS:redis.internal")):
        (folder / f"{name}.ext").write_text(
            f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
            cwd=folder,
        )  # fmt: skip
    return folder


class TlsRedis(RedisServer):
    """redis-server speaking TLS only (``--port 0 --tls-port P``), client certs not asked."""

    def __init__(self, certs: Path, name: str = "server") -> None:
        port = free_port()
        self.ca = certs / "ca.crt"
        super().__init__(
            port=port,
            extra_args=[
                "--port", "0",
                "--tls-port", str(port),
                "--tls-cert-file", str(certs / f"{name}.crt"),
                "--tls-key-file", str(certs / f"{name}.key"),
                "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "no",
            ],
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def is_ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw,
                context.wrap_socket(raw) as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="module")
def tls_redis(certs: Path) -> Iterator[TlsRedis]:
    with TlsRedis(certs) as server:
        yield server


def tls_connection(server: TlsRedis, **options: Any) -> Any:
    config = parse_config(
        {
            "aws": {"region": "us-east-1"},
            "views": ["tests.views_e2e.bad_views"],
            "redis": {"cache": {"url": server.url, **options}},
        },
        environ={},
    )
    return config.redis["cache"]


def test_rediss_with_the_ca_file_connects_and_applies(tls_redis: TlsRedis) -> None:
    conn = tls_connection(tls_redis, ssl_ca_file=str(tls_redis.ca))
    client = redis_client(conn)
    assert client.ping() is True
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
    sink = RedisSink("cache", client, retry_seconds=2)
    sink.prepare([CARD])
    store = MemoryStore()
    pipe = Pipeline(registry_of(CARD), {("redis", "cache"): sink}, store, lambda v: 0)
    assert pipe.process(TABLE, KEYS, [record({"pk": "tls", "v": 7})]).applied == 1
    stored = client.get("card:tls")
    assert isinstance(stored, bytes) and json.loads(stored) == {"pk": "tls", "v": 7}
    client.close()


def test_rediss_without_the_ca_is_refused_with_a_certificate_error(
    tls_redis: TlsRedis,
    tmp_path: Path,
    dynamodb_url: str,
    opensearch_url: str,
    os_client: OpenSearch,
    os_prefix: str,
) -> None:
    conn = tls_connection(tls_redis)  # verification is on by default; the system CAs only
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis_client(conn).ping()
    sink = RedisSink("cache", redis_client(conn), retry_seconds=0.5)
    with pytest.raises(SinkUnavailable) as caught:
        sink.ping()
    message = str(caught.value)
    assert f"127.0.0.1:{tls_redis.port}" in message and "certificate verify failed" in message

    config = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        views=["tests.views_e2e.bad_views"],
        redis={"cache": {"url": tls_redis.url}},
        opensearch={"search": {"hosts": [opensearch_url], "index_prefix": os_prefix}},
    )
    res = vk("check", "-c", str(config))
    assert res.returncode == 1
    assert "certificate verify failed" in res.stdout, res.stdout


def test_rediss_checks_the_host_name_unless_told_not_to(certs: Path) -> None:
    with TlsRedis(certs, name="other") as server:  # a certificate for redis.internal
        checked = tls_connection(server, ssl_ca_file=str(server.ca))
        with pytest.raises(redis.ConnectionError, match="mismatch"):
            redis_client(checked).ping()
        unchecked = tls_connection(server, ssl_ca_file=str(server.ca), ssl_check_hostname=False)
        assert redis_client(unchecked).ping() is True
