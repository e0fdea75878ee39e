"""The ``viewkeeper`` command's failures: one line naming the thing, the value and the fix,
the right exit code, a traceback only at DEBUG level, never a secret.

The cases tests/test_bad_input.py and tests/test_security.py already drive end to end
(services down, the metrics port taken, a bad coordination table, passwords in URLs) are
not repeated here; these cover the classification itself and the rest of the start-up.
"""

from __future__ import annotations

import io
import logging
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from tests.helpers import REPO, vk_env, write_config
from tests.test_security import TlsRedis, certs  # noqa: F401 - certs is a fixture used here
from viewkeeper import cli
from viewkeeper.cli import run as cli_run
from viewkeeper.config import ConfigError, parse_config
from viewkeeper.coordination.dynamodb import CoordinationTableError, DynamoDBStore
from viewkeeper.ops.logs import setup_logging
from viewkeeper.sinks.base import SinkError, SinkUnavailable
from viewkeeper.stream.errors import AccessDeniedError, ConnectionFailedError

SECRET = "s3cret-Pa55word-7c1e"


def vk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", *args],
        cwd=REPO,
        env=vk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def client_error(code: str, message: str = "it failed", operation: str = "Query") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


# ==== classification: every runtime failure is one line with an exit code ==================


@pytest.mark.parametrize(
    ("exc", "code", "must_say"),
    [
        (
            CoordinationTableError("coordination table 't' has key schema id; fix it"),
            78,
            ["'t'", "key schema"],
        ),
        (
            CoordinationTableError("coordination table 't' does not exist", configuration=False),
            1,
            ["'t'", "does not exist"],
        ),
        (
            SinkUnavailable("redis sink 'cache' at 127.0.0.1:1 is unavailable: refused."),
            1,
            ["127.0.0.1:1", "check that the service is running"],
        ),
        (
            SinkUnavailable("redis sink 'c' at h:1: authentication failed (x); check the password"),
            1,
            ["authentication failed", "check the password"],
        ),
        (
            SinkUnavailable("redis sink 'c' at h:1: [SSL: CERTIFICATE_VERIFY_FAILED] no"),
            1,
            ["h:1", "ssl_ca_file"],
        ),
        (SinkError("views 'a' and 'b' both use index 'x'; give each view its own"), 1, ["'x'"]),
        (
            EndpointConnectionError(endpoint_url="http://127.0.0.1:4567/"),
            1,
            ["DynamoDB at 127.0.0.1:4567", "aws.endpoint_url"],
        ),
        (NoCredentialsError(), 1, ["AWS credentials", "AWS_ACCESS_KEY_ID"]),
        (client_error("AccessDeniedException"), 1, ["AccessDeniedException", "IAM policy"]),
        (client_error("ResourceInUseException"), 1, ["ResourceInUseException", "again"]),
        (
            ConnectionFailedError("NewConnectionError: refused", operation="DescribeTable"),
            1,
            ["cannot be reached", "DescribeTable", "aws.endpoint_url"],
        ),
        (AccessDeniedError("no", operation="GetRecords"), 1, ["GetRecords", "credentials"]),
        (OSError(98, "Address already in use"), 1, ["Address already in use"]),
        (cli.Failure("metrics endpoint: cannot listen on h:1 (x); fix"), 1, ["metrics", "h:1"]),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_a_runtime_failure_is_one_line_with_its_exit_code(
    exc: BaseException, code: int, must_say: list[str]
) -> None:
    explained = cli.explain_failure(exc)
    assert explained is not None
    line, exit_code = explained
    assert exit_code == code
    assert "\n" not in line
    for words in must_say:
        assert words in line, line


def test_a_bug_keeps_its_traceback() -> None:
    assert cli.explain_failure(ZeroDivisionError("a bug")) is None
    assert cli.explain_failure(KeyError("x")) is None


def test_a_failure_message_never_carries_a_url_password() -> None:
    exc = SinkUnavailable(f"redis sink 'c' (redis://vk:{SECRET}@h:1/0) unavailable")
    explained = cli.explain_failure(exc)
    assert explained is not None and SECRET not in explained[0], explained


@pytest.fixture
def root_logging() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_main_prints_one_line_and_keeps_the_traceback_for_debug(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    root_logging: io.StringIO,
    level: str,
) -> None:
    setup_logging("text", level, stream=root_logging)

    def failing(args: Any) -> int:
        raise SinkUnavailable("redis sink 'cache' at 127.0.0.1:1 is unavailable")

    monkeypatch.setitem(cli._COMMANDS, "status", failing)
    assert cli.main(["status", "-c", "unused.yaml"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("viewkeeper: redis sink 'cache' at 127.0.0.1:1"), line
    logged = root_logging.getvalue()
    assert ("Traceback" in logged) == (level == "DEBUG"), logged


def test_main_lets_a_bug_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(args: Any) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli._COMMANDS, "status", buggy)
    with pytest.raises(ZeroDivisionError):
        cli.main(["status", "-c", "unused.yaml"])


def test_run_help_says_what_happens_when_a_service_is_down() -> None:
    res = vk("run", "--help")
    text = " ".join(res.stdout.split())
    assert "exit 1" in text and "Restart=on-failure" in text and "retry" in text, text


# ==== the metrics endpoint ==================================================================


def test_a_taken_metrics_port_names_host_port_and_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(cli.Failure) as caught:
            cli.serve_metrics("127.0.0.1", port)
    message = str(caught.value)
    assert f"metrics endpoint: cannot listen on 127.0.0.1:{port}" in message, message
    assert "metrics.port" in message
    assert isinstance(caught.value, cli_run.PortTaken)  # `run` warns and goes on (#14)


def test_a_metrics_host_that_does_not_resolve_names_the_fix() -> None:
    with pytest.raises(cli.Failure) as caught:
        cli.serve_metrics("no-such-host.invalid", 9464)
    assert "no-such-host.invalid:9464" in str(caught.value)
    assert "metrics.host" in str(caught.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::", "localhost", "m-1.lan"])
def test_a_metrics_host_may_be_an_address_or_a_host_name(host: str) -> None:
    config = parse_config(
        {"aws": {"region": "us-east-1"}, "views": ["v"], "metrics": {"host": host}}, environ={}
    )
    assert config.metrics.host == host


@pytest.mark.parametrize("host", ["metrics host!", "http://127.0.0.1", "[::1]", "a_b", "-x"])
def test_a_metrics_host_that_is_neither_is_refused_with_the_fix(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"aws": {"region": "us-east-1"}, "views": ["v"], "metrics": {"host": host}},
            environ={},
        )
    message = str(caught.value)
    assert "metrics.host" in message and "127.0.0.1" in message, message


# ==== URLs with passwords in config errors =================================================


@pytest.mark.parametrize(
    ("url", "must_say"),
    [
        (f"redis://h:6379/0?password={SECRET}", ["password=***", "password_env"]),
        (f"vk:{SECRET}@h:6379", ["vk:***@h:6379", "redis://"]),
        (f"redis://vk:{SECRET}@h:6379/cache", ["vk:***@h", "database 'cache'"]),
        (f"redis://:{SECRET}/x@h:6379/0", ["percent-encode", "password_env"]),
        (f"redis://:{SECRET}#x@h:6379/0", ["percent-encode", "password_env"]),
        (f"redis://:{SECRET}@h:99999/0", ["port 99999 is out of range"]),
    ],
)
def test_a_redis_url_error_masks_the_password_and_names_the_fix(
    url: str, must_say: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"aws": {"region": "us-east-1"}, "views": ["v"], "redis": {"c": {"url": url}}},
            environ={},
        )
    message = str(caught.value)
    assert "redis.c.url" in message and SECRET not in message, message
    assert "could not be cast" not in message, message
    for words in must_say:
        assert words in message, message


def test_an_opensearch_host_with_a_special_password_points_at_auth() -> None:
    host = f"https://vk:{SECRET}/x@search:9200"
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "aws": {"region": "us-east-1"},
                "views": ["v"],
                "opensearch": {"s": {"hosts": [host]}},
            },
            environ={},
        )
    message = str(caught.value)
    assert SECRET not in message and "auth: {type: basic" in message, message


# ==== log noise =============================================================================


def test_opensearch_and_urllib3_warnings_are_held_back_unless_debug(
    root_logging: io.StringIO,
) -> None:
    noisy = ("opensearch", "urllib3.connectionpool")
    saved = {name: logging.getLogger(name).level for name in noisy}
    try:
        setup_logging("text", "INFO", stream=root_logging)
        for name in noisy:
            logging.getLogger(name).warning("GET / [status:N/A] Traceback ...")
        assert root_logging.getvalue() == ""
        logging.getLogger("opensearch").error("really wrong")
        assert "really wrong" in root_logging.getvalue()
        setup_logging("text", "CRITICAL", stream=root_logging)
        assert logging.getLogger("opensearch").getEffectiveLevel() == logging.CRITICAL
        setup_logging("text", "DEBUG", stream=root_logging)
        assert logging.getLogger("opensearch").getEffectiveLevel() == logging.DEBUG
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# ==== DynamoDBStore.check: validate, never create ==========================================


class FakeDynamoDB:
    """describe_table only; create_table must never be called by check()."""

    def __init__(self, table: dict[str, Any] | None) -> None:
        self.table = table
        self.created = False

    def describe_table(self, TableName: str) -> dict[str, Any]:
        if self.table is None:
            raise client_error("ResourceNotFoundException", "Requested resource not found")
        return {"Table": self.table}

    def create_table(self, **kwargs: Any) -> None:
        self.created = True


def key_table(*keys: tuple[str, str, str]) -> dict[str, Any]:
    return {
        "KeySchema": [{"AttributeName": n, "KeyType": k} for n, _, k in keys],
        "AttributeDefinitions": [{"AttributeName": n, "AttributeType": t} for n, t, _ in keys],
    }


@pytest.mark.parametrize("create", [True, False])
def test_store_check_reports_a_missing_table_without_creating_it(create: bool) -> None:
    db = FakeDynamoDB(None)
    store = DynamoDBStore(db, "vk-coord", create_if_missing=create)
    with pytest.raises(CoordinationTableError) as caught:
        store.check()
    message = str(caught.value)
    assert not db.created
    assert "'vk-coord' does not exist" in message and "pk" in message and "sk" in message
    if create:
        assert "viewkeeper run" in message and not caught.value.configuration, message
    else:
        assert "create_if_missing: true" in message and caught.value.configuration, message


@pytest.mark.parametrize(
    "table",
    [
        key_table(("id", "S", "HASH")),
        key_table(("pk", "S", "HASH"), ("sk", "N", "RANGE")),
        key_table(("sk", "S", "HASH"), ("pk", "S", "RANGE")),
    ],
    ids=["other key", "sk a number", "keys swapped"],
)
def test_store_check_reports_a_wrong_key_schema(table: dict[str, Any]) -> None:
    store = DynamoDBStore(FakeDynamoDB(table), "vk-coord")
    with pytest.raises(CoordinationTableError) as caught:
        store.check()
    message = str(caught.value)
    assert "'vk-coord' has key schema" in message and "coordination.table" in message, message
    assert caught.value.configuration


def test_store_check_accepts_the_right_table() -> None:
    DynamoDBStore(FakeDynamoDB(key_table(("pk", "S", "HASH"), ("sk", "S", "RANGE"))), "t").check()


def test_store_check_lets_other_errors_through() -> None:
    class Denied(FakeDynamoDB):
        def describe_table(self, TableName: str) -> dict[str, Any]:
            raise client_error("AccessDeniedException", "not allowed", "DescribeTable")

    with pytest.raises(ClientError):
        DynamoDBStore(Denied(None), "t").check()


# ==== through the command, on the test bed =================================================


@pytest.fixture
def view_table(
    tmp_path: Path, dynamodb: Any, make_table: Callable[..., tuple[str, str]]
) -> Callable[..., str]:
    """``view_table(stream=True)``: a table of its own and a Redis view module reading it
    (``cli_views``, next to the config); returns the table name."""

    def make(stream: bool = True) -> str:
        table = f"vk-cli-{uuid.uuid4().hex[:8]}"
        make_table(dynamodb, table, hash_key="pk", stream=stream)
        (tmp_path / "cli_views.py").write_text(
            textwrap.dedent(
                f"""
                from viewkeeper import Value, redis_view

                @redis_view(table={table!r}, redis="cache")
                def cli_card(item):
                    yield Value("cli:" + item["pk"], 1)
                """
            )
        )
        return table

    return make


def test_status_on_a_table_not_created_yet_says_to_run_once(
    tmp_path: Path, view_table: Callable[..., str], dynamodb_url: str, redis_url: str
) -> None:
    view_table()
    config = write_config(
        tmp_path, dynamodb_url=dynamodb_url, redis_url=redis_url, views=["cli_views"]
    )
    for args in (["status"], ["deadletters", "list"]):
        res = vk(*args, "-c", str(config))
        assert res.returncode == 1, res.stdout + res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert "does not exist" in line and "viewkeeper run" in line, line
    # and it was not created by looking at it
    res = vk("status", "-c", str(config))
    assert "does not exist" in res.stderr


def test_run_on_a_table_without_a_stream_exits_with_one_line(
    tmp_path: Path, view_table: Callable[..., str], dynamodb_url: str, redis_url: str
) -> None:
    table = view_table(stream=False)
    config = write_config(
        tmp_path, dynamodb_url=dynamodb_url, redis_url=redis_url, views=["cli_views"]
    )
    started = time.monotonic()
    res = vk("run", "--until-caught-up", "-c", str(config), timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert time.monotonic() - started < 30
    lines = [x for x in res.stderr.splitlines() if x.startswith("viewkeeper: ")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert repr(table) in lines[0] and "NEW_AND_OLD_IMAGES" in lines[0], lines[0]


def test_run_on_a_source_table_that_does_not_exist_exits_with_one_line(
    tmp_path: Path, dynamodb_url: str, redis_url: str
) -> None:
    (tmp_path / "ghost_views.py").write_text(
        "from viewkeeper import Value, redis_view\n\n"
        '@redis_view(table="vk-cli-no-such-table", redis="cache")\n'
        "def ghost(item):\n"
        '    yield Value("g:" + item["pk"], 1)\n'
    )
    config = write_config(
        tmp_path, dynamodb_url=dynamodb_url, redis_url=redis_url, views=["ghost_views"]
    )
    res = vk("run", "--until-caught-up", "-c", str(config), timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("viewkeeper: ")]
    assert "vk-cli-no-such-table" in line and "create the table" in line, line


def test_check_prints_one_line_per_connection_with_where_it_is(
    tmp_path: Path, view_table: Callable[..., str], dynamodb_url: str, redis_url: str
) -> None:
    view_table()
    config = write_config(
        tmp_path, dynamodb_url=dynamodb_url, redis_url=redis_url, views=["cli_views"]
    )
    res = vk("check", "-c", str(config))
    assert res.returncode == 0, res.stdout + res.stderr
    host_port = redis_url.split("//")[1].split("/")[0]
    assert f"  redis cache: ok ({host_port}, standalone)" in res.stdout.splitlines(), res.stdout


# ==== TLS to Redis: a certificate that does not verify is reported at once ==================


def tls_conn(url: str, **options: Any) -> Any:
    config = parse_config(
        {"aws": {"region": "us-east-1"}, "views": ["v"], "redis": {"c": {"url": url, **options}}},
        environ={},
    )
    return config.redis["c"]


def test_a_redis_certificate_that_does_not_verify_is_reported_at_once_with_the_fix(
    certs: Path,  # noqa: F811 - the fixture imported from tests.test_security
) -> None:
    with TlsRedis(certs) as server:
        started = time.monotonic()
        with pytest.raises(cli.Failure) as caught:
            cli.probe_redis_tls("c", tls_conn(server.url))
        assert time.monotonic() - started < 3  # not retried as if it were temporary
        message = str(caught.value)
        assert f"127.0.0.1:{server.port}" in message and "certificate verify failed" in message
        assert "redis.c.ssl_ca_file" in message, message
        cli.probe_redis_tls("c", tls_conn(server.url, ssl_ca_file=str(server.ca)))  # fine

    with TlsRedis(certs, name="other") as server:  # a certificate for redis.internal
        with pytest.raises(cli.Failure) as caught:
            cli.probe_redis_tls("c", tls_conn(server.url, ssl_ca_file=str(server.ca)))
        assert "mismatch" in str(caught.value) and "ssl_check_hostname: false" in str(caught.value)


def test_a_redis_that_is_down_is_left_to_the_sink_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli.probe_redis_tls("c", tls_conn(f"rediss://127.0.0.1:{port}/0"))  # no Failure
