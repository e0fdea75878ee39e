"""The change-log view API: ``@changelog_view`` and the :class:`StreamChange` it is given.

A change-log view maps each *change* of an item (one stream record), not the item's current
state, to one entry: a Redis Stream entry or an OpenSearch document, appended once per
record however often the record is applied. The function is pure (no I/O) and gets a
:class:`StreamChange`; it returns a dict (the entry) or None (nothing worth telling).

There is nothing to rebuild from: the history is not in the table. ``viewkeeper rebuild``
refuses a change-log view, and a change-log view added to a running deployment starts at
each shard's current checkpoint.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar, overload

from viewkeeper.projection.api import _ATTR, _INDEX_RE, View, _check_common, _misused, _record
from viewkeeper.projection.entries import MAX_TTL

__all__ = ["MIN_RETENTION_DAYS", "StreamChange", "changelog_body", "changelog_view"]

F = TypeVar("F", bound=Callable[..., Any])
Event = Literal["INSERT", "MODIFY", "REMOVE"]

# A physical index is deleted only when every record that could still be read into it (the
# stream keeps 24 hours) is older than the retention: a replay must not make it again.
MIN_RETENTION_DAYS = 2
_MAX_STREAM_KEY = 1024
_NEEDS = "table=..., redis=..., stream=..., maxlen=... (or max_age=...)"
_NEEDS_OS = "table=..., opensearch=..., index=..."
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class StreamChange:
    """One change of one item, as a change-log view sees it.

    ``event`` is ``"INSERT"``, ``"MODIFY"`` or ``"REMOVE"``; ``keys`` the item's key
    attributes; ``old`` and ``new`` the item before and after (None where the stream does
    not carry it — the table's stream view type — or where it does not exist: ``old`` of an
    INSERT, ``new`` of a REMOVE); ``sequence`` the record's SequenceNumber (decimal text);
    ``time`` when DynamoDB wrote it (ApproximateCreationDateTime, UTC).
    """

    event: Event
    keys: Mapping[str, Any]
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    sequence: str
    time: dt.datetime


def _positive(view: str, what: str, value: object, most: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(
            f"view {view!r}: {what} must be a whole number from 1 to {most}, got {value!r}"
        )
    return value


@overload
def changelog_view(
    *,
    table: str,
    redis: str | None = None,
    stream: str | None = None,
    maxlen: int | None = None,
    max_age: int | None = None,
    opensearch: str | None = None,
    index: str | None = None,
    retention_days: int | None = None,
    name: str | None = None,
) -> Callable[[F], F]: ...


@overload
def changelog_view(func: Callable[..., Any], /) -> NoReturn: ...


def changelog_view(
    func: object = None,
    /,
    *,
    table: str = _MISSING,
    redis: str | None = None,
    stream: str | None = None,
    maxlen: int | None = None,
    max_age: int | None = None,
    opensearch: str | None = None,
    index: str | None = None,
    retention_days: int | None = None,
    name: str | None = None,
) -> Callable[[F], F]:
    """Declare a change-log view: the function maps one :class:`StreamChange` to one entry
    (a dict) or None.

    Redis (``redis=``): one entry per change in the Redis Stream ``stream``, capped at about
    ``maxlen`` entries (``XADD ... MAXLEN ~``) and/or entries older than ``max_age`` seconds
    (``XTRIM MINID ~``); at least one of the two is required. OpenSearch
    (``opensearch=``): one document per change, in a physical index per UTC day
    (``INDEX-YYYY.MM.DD``, the day of the change) that readers search through the alias
    ``index``; days older than ``retention_days`` (at least 2; None keeps them) are deleted.
    """
    misused = _misused("changelog_view", func, _NEEDS, table=table)
    if misused is not None:
        raise misused

    def decorate(func: F) -> F:
        view_name: str = name or str(getattr(func, "__name__", ""))
        if (redis is None) == (opensearch is None):
            raise TypeError(
                f"view {view_name!r}: @changelog_view needs exactly one of redis= (with "
                f"stream=) or opensearch= (with index=); got redis={redis!r}, "
                f"opensearch={opensearch!r}"
            )
        module = getattr(func, "__module__", "")
        if redis is not None:
            _check_common("changelog_view", func, view_name, table, redis, "redis")
            if index is not None or retention_days is not None:
                raise TypeError(
                    f"view {view_name!r}: index= and retention_days= are for opensearch= "
                    "change-log views; a Redis one takes stream=, maxlen= and max_age="
                )
            if not isinstance(stream, str) or not stream or len(stream) > _MAX_STREAM_KEY:
                raise ValueError(
                    f"view {view_name!r}: stream= must be the Redis key of the stream (1 to "
                    f"{_MAX_STREAM_KEY} characters), like stream='orders:events'; got {stream!r}"
                )
            cap = _positive(view_name, "maxlen", maxlen, 2**63 - 1)
            age = _positive(view_name, "max_age (seconds)", max_age, MAX_TTL)
            if cap is None and age is None:
                raise ValueError(
                    f"view {view_name!r}: a Redis change-log stream needs a cap, or it grows "
                    "forever: give maxlen= (entries, e.g. maxlen=1_000_000) and/or max_age= "
                    "(seconds, e.g. max_age=7 * 24 * 3600)"
                )
            kind: Literal["redis", "opensearch"] = "redis"
            where: str | None = redis
            options: dict[str, Any] = {"stream": stream, "maxlen": cap, "max_age": age}
        else:
            _check_common("changelog_view", func, view_name, table, opensearch, "opensearch")
            if stream is not None or maxlen is not None or max_age is not None:
                raise TypeError(
                    f"view {view_name!r}: stream=, maxlen= and max_age= are for redis= "
                    "change-log views; an OpenSearch one takes index= and retention_days="
                )
            if not isinstance(index, str) or not _INDEX_RE.match(index):
                raise ValueError(
                    f"view {view_name!r}: index {index!r} is not a valid OpenSearch index "
                    f"name; use lowercase letters, digits, '_', '-' or '.' ({_NEEDS_OS})"
                )
            days = _positive(view_name, "retention_days", retention_days, 100 * 366)
            if days is not None and days < MIN_RETENTION_DAYS:
                raise ValueError(
                    f"view {view_name!r}: retention_days={days} is shorter than the stream "
                    f"keeps records (24 hours) with margin; use at least {MIN_RETENTION_DAYS}"
                )
            kind, where, options = "opensearch", opensearch, {"retention_days": days}
        view = View(
            name=view_name,
            table=table,
            kind=kind,
            connection=str(where),
            func=func,
            module=module,
            index=index,
            changelog=True,
            options=options,
        )
        setattr(func, _ATTR, view)
        _record(view, func)
        return func

    return decorate


def changelog_body(view: View, result: object) -> dict[str, Any] | None:
    """What a change-log function returned, checked: a dict with string keys, or None.
    Raises TypeError/ValueError with the fix (the record is then dead-lettered)."""
    if result is None:
        return None
    if not isinstance(result, dict):
        raise TypeError(
            f"a change-log view returns one entry (a dict) or None per change, got "
            f"{type(result).__name__}; return {{'field': value, ...}}"
        )
    if not result:
        raise ValueError("returned an empty dict; return None when there is nothing to tell")
    for key in result:
        if not isinstance(key, str) or not key:
            raise TypeError(f"entry field names must be non-empty strings, got {key!r}")
    return result
