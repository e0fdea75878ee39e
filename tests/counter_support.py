"""What the counter attack tests share: a one-counter view (``money``: ``sum:{g}`` of ``a``),
changes of it, and a Redis sink on the test's real redis-server that has prepared it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.helpers import view_for
from viewkeeper import Counter, redis_view
from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.project import project
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Outcome
from viewkeeper.sinks.redis import RedisSink

SEQ = 10**20
INT64_MAX = 2**63 - 1


@redis_view(table="orders", redis="cache", name="money")
def money(item: dict[str, Any]) -> Iterator[Entry]:
    yield Counter(f"sum:{item['g']}", amount=item["a"])


MONEY = view_for(money)


def change(view: View, item: str, seq: int, state: dict[str, Any] | None, gen: int = 0) -> Change:
    entries = [] if state is None else project(view, {"id": item, **state}, item, ("id",))
    return Change(view, item, Version(gen, str(seq)), entries)


@pytest.fixture
def sink(redis_client: redis.Redis) -> Iterator[RedisSink]:
    s = RedisSink("cache", redis_client, retry_seconds=2)
    s.prepare([MONEY])
    yield s
    s.close()


def applied(results: list[Any]) -> bool:
    return all(r.outcome is Outcome.APPLIED for r in results)
