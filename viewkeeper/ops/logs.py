"""Logging: one line per event, text for people or JSON for machines, secrets masked.

Text: ``2026-11-27T02:44:03Z INFO viewkeeper.worker shard=shardId-1 lag=0.4 caught up``
(the ``extra={...}`` fields as ``key=value`` before the message). JSON: one object per
line with ``ts``, ``level``, ``logger``, ``msg``, the extra fields, and ``exc`` when there
is a traceback.

Masking is defence in depth: secrets live in :class:`viewkeeper.config.Secret`, whose repr
is ``'***'``, so the code never *means* to log one. But a URL in an exception message from
a client library, or a password a user pasted where a host belongs, can still reach a log
line; the :class:`RedactingFilter` on every handler masks ``scheme://user:PASSWORD@`` and
every value registered with :func:`register_secret` (the config registers each secret it
loads) before the line is written.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import orjson

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "mask_url",
    "redact",
    "register_secret",
    "setup_logging",
]

LogFormat = Literal["text", "json"]

# Shorter values are not registered: masking every "abc" in every log line would make the
# logs useless while the secret itself is still protected by its wrapper.
MIN_SECRET_LENGTH = 4

# The password runs to the *last* '@' before the host (an unencoded '@' inside it is
# common), but never across whitespace, quotes or a path.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"'<>]*:)[^\s/\"'<>]+(?=@)"
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secrets_sorted: tuple[str, ...] = ()

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Libraries that log every request at INFO; quiet unless the user asks for DEBUG.
_CHATTY = ("botocore", "boto3", "urllib3", "opensearch", "s3transfer")
# Libraries that log a WARNING (opensearch-py: with a full traceback) for every retried or
# failed request, and every 404 of a HEAD probe: thousands of lines in seconds when a
# service is down. The sinks report the failure once, clearly; these are held at ERROR
# unless the user asks for DEBUG.
_NOISY = ("opensearch", "opensearchpy", "urllib3.connectionpool")


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it appears in a log line from now on."""
    global _secrets_sorted
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # Longest first, so a secret that contains another is masked whole.
        _secrets_sorted = tuple(sorted(_secrets, key=len, reverse=True))


def mask_url(text: str) -> str:
    """``redis://user:pw@host`` → ``redis://user:***@host``; anything else unchanged."""
    return _URL_PASSWORD.sub(r"\g<head>***", text)


def redact(text: str) -> str:
    """Mask passwords inside URLs and every registered secret."""
    text = mask_url(text)
    for secret in _secrets_sorted:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))


class RedactingFilter(logging.Filter):
    """Rewrites each record so its message, extras and traceback carry no secret.

    Attach it to a handler (not a logger): handler filters see records propagated from
    every logger, logger filters only their own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # Bad %-arguments. logging's own error report would print the raw arguments to
            # stderr, past this filter; log them masked instead.
            message = f"{record.msg} (log arguments do not fit: {record.args!r})"
        record.msg = redact(message)
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, _redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _utc(created: float, *, millis: bool) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    if millis:
        stamp += f".{int(created * 1000) % 1000:03d}"
    return stamp + "Z"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-27T02:44:03Z INFO viewkeeper.worker shard=... message`` (UTC, one line
    per event; a traceback follows on the next lines)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_utc(record.created, millis=False), record.levelname, record.name]
        parts += [f"{k}={_text_value(v)}" for k, v in _extras(record).items()]
        parts.append(record.getMessage())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, extras, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _utc(record.created, millis=True),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # Redact before encoding: inside JSON a secret may be escaped past recognition.
        return orjson.dumps(_redact_value(doc), default=str).decode()


class _ViewkeeperHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(
    format: LogFormat = "text", level: str | int = "INFO", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every logger's records to ``stream`` (stderr: journald under systemd).

    Calling it again replaces the handler it installed before (``check`` then ``run``,
    or tests). Chatty client libraries are held at WARNING, and opensearch-py and urllib3's
    connection pool (a WARNING with a traceback per retried request) at ERROR, unless
    ``level`` is DEBUG; never below ``level`` itself.
    """
    if format not in ("text", "json"):
        raise ValueError(f"log format {format!r} is not 'text' or 'json'")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    handler = _ViewkeeperHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ViewkeeperHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    debug = numeric <= logging.DEBUG
    for name in _CHATTY:
        logging.getLogger(name).setLevel(numeric if debug else max(numeric, logging.WARNING))
    for name in _NOISY:
        logging.getLogger(name).setLevel(numeric if debug else max(numeric, logging.ERROR))
    logging.captureWarnings(True)
    return handler
