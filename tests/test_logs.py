"""Log lines: the text and JSON shapes, and that no password ever reaches one."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import orjson
import pytest

from viewkeeper.config import parse_config
from viewkeeper.ops.logs import mask_url, redact, register_secret, setup_logging

PASSWORD = "n0t-in-any-log-9f3a"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """setup_logging on the root logger, undone after the test."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    chatty = {name: logging.getLogger(name).level for name in ("botocore", "urllib3")}
    out = io.StringIO()
    yield out
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in chatty.items():
        logging.getLogger(name).setLevel(level)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_text_line_shape(stream: io.StringIO) -> None:
    setup_logging("text", "INFO", stream=stream)
    logging.getLogger("viewkeeper.worker").info(
        "caught up after %d records", 12, extra={"shard": "shardId-0001", "lag": 0.4}
    )
    (line,) = lines(stream)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO viewkeeper.worker shard=shardId-0001 lag=0.4 "
        r"caught up after 12 records",
        line,
    ), line


def test_text_quotes_values_with_spaces(stream: io.StringIO) -> None:
    setup_logging("text", stream=stream)
    logging.getLogger("viewkeeper").warning("x", extra={"error": "connection refused"})
    assert 'error="connection refused" x' in stream.getvalue()


def test_json_line_shape(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream=stream)
    logging.getLogger("viewkeeper.worker").info(
        "applied %d", 3, extra={"shard": "shardId-1", "view": "order_card"}
    )
    (line,) = lines(stream)
    doc = orjson.loads(line)
    assert doc["level"] == "INFO"
    assert doc["logger"] == "viewkeeper.worker"
    assert doc["msg"] == "applied 3"
    assert doc["shard"] == "shardId-1" and doc["view"] == "order_card"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])


def test_json_keeps_a_traceback_on_the_same_line(stream: io.StringIO) -> None:
    setup_logging("json", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("viewkeeper").exception("batch failed")
    (line,) = lines(stream)
    doc = orjson.loads(line)
    assert doc["msg"] == "batch failed" and "ValueError: boom" in doc["exc"]


def test_level_filters(stream: io.StringIO) -> None:
    setup_logging("text", "WARNING", stream=stream)
    logging.getLogger("viewkeeper").info("hidden")
    logging.getLogger("viewkeeper").warning("shown")
    assert [line.split(" ", 3)[-1] for line in lines(stream)] == ["shown"]


def test_chatty_libraries_are_quiet_unless_debug(stream: io.StringIO) -> None:
    setup_logging("text", "INFO", stream=stream)
    assert logging.getLogger("urllib3").getEffectiveLevel() == logging.WARNING
    setup_logging("text", "DEBUG", stream=stream)
    assert logging.getLogger("urllib3").getEffectiveLevel() == logging.DEBUG


def test_setup_twice_replaces_its_handler(stream: io.StringIO) -> None:
    setup_logging("text", stream=io.StringIO())
    setup_logging("json", stream=stream)
    logging.getLogger("viewkeeper").info("once")
    assert len(lines(stream)) == 1
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_ViewkeeperHandler"]
    assert len(ours) == 1


def test_bad_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match="'xml'"):
        setup_logging("xml", stream=io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'LOUD'"):
        setup_logging("text", "LOUD", stream=io.StringIO())


# --- masking --------------------------------------------------------------------------


def test_mask_url_keeps_the_user_and_hides_the_password() -> None:
    assert mask_url("redis://default:hunter22@h:6379/0") == "redis://default:***@h:6379/0"
    assert mask_url("rediss://:p@ss@h/0") == "rediss://:***@h/0"
    assert mask_url("http://h:9200/_bulk") == "http://h:9200/_bulk"
    assert mask_url("redis://user@h/0") == "redis://user@h/0"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_url_password_never_reaches_a_log_line(stream: io.StringIO, fmt: str) -> None:
    setup_logging(fmt, stream=stream)  # type: ignore[arg-type]
    url = "redis://default:url-only-pw-77@cache:6379/0"
    log = logging.getLogger("viewkeeper.sinks")
    log.error("cannot reach %s", url, extra={"target": url})
    try:
        raise ConnectionError(f"Error connecting to {url}")
    except ConnectionError:
        log.exception("retrying")
    text = stream.getvalue()
    assert "url-only-pw-77" not in text
    assert "default:***@cache" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_configured_redis_password_never_reaches_a_log_line(
    stream: io.StringIO, fmt: str
) -> None:
    config = parse_config(
        {
            "aws": {"region": "us-east-1"},
            "views": ["views.orders"],
            "redis": {"cache": {"url": "redis://cache:6379/0", "password_env": "VK_TEST_PW"}},
        },
        environ={"VK_TEST_PW": PASSWORD},
    )
    password = config.redis["cache"].password
    assert password is not None
    setup_logging(fmt, stream=stream)  # type: ignore[arg-type]
    log = logging.getLogger("viewkeeper.sinks.redis")
    log.warning("AUTH failed with %s", password.reveal())  # a bug that logs the value itself
    log.warning("config: %r", config.redis["cache"])
    log.info("connected", extra={"conn": {"password": password.reveal()}})
    try:
        raise RuntimeError(f"server said: WRONGPASS {password.reveal()}")
    except RuntimeError:
        log.exception("failed")
    text = stream.getvalue()
    assert PASSWORD not in text
    assert text.count("***") >= 4


def test_registered_secrets_are_masked_longest_first() -> None:
    register_secret("abcd-1234")
    register_secret("abcd-1234-efgh")
    assert redact("x abcd-1234-efgh y abcd-1234 z") == "x *** y *** z"


def test_very_short_values_are_not_registered() -> None:
    register_secret("ab")
    assert redact("tab stab") == "tab stab"


def test_bad_log_arguments_are_masked_too(stream: io.StringIO) -> None:
    handler = setup_logging("text", stream=stream)
    # Straight to our handler: pytest's own capture handler would raise on the bad record.
    args = ("redis://u:argpw-123@h/0",)
    handler.handle(logging.LogRecord("viewkeeper", logging.ERROR, "x", 1, "two %s %s", args, None))
    text = stream.getvalue()
    assert "argpw-123" not in text and "log arguments do not fit" in text
