"""Attacks on change-log views (Redis): each test states the guarantee it checks and fails
on main when the guarantee is broken."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.helpers import registry_of
from tests.test_changelog_redis import TABLE, _view, app, entries, record, records
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.api import View
from viewkeeper.runtime.deadletters import replay
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.sinks.base import Outcome
from viewkeeper.sinks.redis import RedisSink


@pytest.fixture
def sink(redis_client: Any, redis_url: str) -> Iterator[RedisSink]:
    s = RedisSink.from_url("cache", redis_url)
    yield s
    s.close()


def test_a_transient_refusal_of_an_earlier_call_loses_its_records(
    sink: RedisSink, redis_client: Any, redis_url: str
) -> None:
    """Exactly once / nothing silently dropped. One sink.append of 200 records of one shard
    is sent as two pipelined script calls (128 + 72). Redis refuses the first one with a
    transient error (OOM under maxmemory; NOREPLICAS, READONLY ... do the same) and, memory
    freed meanwhile by another client (or an expiry), runs the second: the shard's
    high-water mark jumps to record 200. The sink then re-sends the first call, whose 128
    records are all at or below the high-water mark: answered STALE, never appended."""
    view = _view(maxlen=100_000)
    sink.prepare([view])
    side = redis.Redis.from_url(redis_url)
    old = side.config_get("maxmemory")["maxmemory"]
    real = sink._connection

    @contextlib.contextmanager
    def connection() -> Iterator[Any]:
        with real() as conn:
            send = conn.send_packed_command
            state = {"first": True}

            def send_packed(commands: Any, check_health: bool = True) -> None:
                if not state["first"] or not isinstance(commands, list) or len(commands) < 2:
                    return send(commands, check_health=check_health)
                state["first"] = False
                # memory pressure while the first call arrives...
                side.config_set("maxmemory-policy", "noeviction")
                side.config_set("maxmemory", "1")
                send(commands[:1], check_health=check_health)
                time.sleep(0.2)  # Redis refuses it: OOM
                side.config_set("maxmemory", old)  # ...another client freed memory
                send(commands[1:], check_health=False)

            conn.send_packed_command = send_packed
            try:
                yield conn
            finally:
                del conn.send_packed_command

    sink._connection = connection  # type: ignore[method-assign]
    try:
        out = sink.append([app(view, "shard-1", 1000 + i) for i in range(200)])
    finally:
        del sink._connection
        side.config_set("maxmemory", old)
        side.close()
    got = [int(e["seq"]) for e in entries(redis_client)]
    outcomes = [r.outcome for r in out]
    assert got == [1000 + i for i in range(200)], (
        f"{len(got)} of 200 entries in the stream; outcomes: "
        f"{outcomes.count(Outcome.APPLIED)} applied, {outcomes.count(Outcome.STALE)} stale"
    )


def test_a_dead_letter_of_a_record_appended_since_is_appended_again(
    sink: RedisSink, redis_client: Any
) -> None:
    """Exactly once. A page's last record fails the view (dead-lettered, stored before the
    checkpoint), and the page is read again before the checkpoint moved (kill -9 between
    the dead letters and the checkpoint, or a lease moved to a process that already runs the
    fixed view during the rolling deploy of the fix): the fixed view appends it through the
    shard's high-water mark. The dead letter is still there; `viewkeeper deadletters replay`
    appends it through a replay key, which knows nothing of the high-water mark: the
    record is in the stream twice."""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    page = records(
        record(1, "INSERT", {"pk": "a", "status": "new"}, None),
        record(2, "MODIFY", {"pk": "a", "status": "boom"}, {"pk": "a", "status": "new"}),
    )
    buggy = Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0)
    first = buggy.process(TABLE, ("pk",), page, shard="shard-1")
    assert (first.applied, first.dead_lettered) == (1, 1)
    # the page read again (no checkpoint yet) by a process running the fixed view
    fixed = View(**{**view.__dict__, "func": lambda change: {"seq": change.sequence}})
    pipe = Pipeline(registry_of(fixed), {("redis", "cache"): sink}, store, lambda _: 0)
    again = pipe.process(TABLE, ("pk",), page, shard="shard-1")
    assert (again.applied, again.stale) == (1, 1)
    assert len(store.list_deadletters()) == 1  # still listed: the operator replays it
    done = replay(store, pipe, lambda _: ("pk",))
    seqs = [e["seq"] for e in entries(redis_client)]
    assert seqs.count("2") == 1, f"stream: {seqs}; replay applied {done.applied}"


def test_a_replayed_dead_letter_is_appended_again_by_a_reader_behind_it(
    sink: RedisSink, redis_client: Any
) -> None:
    """Exactly once, the other way round: the dead letter is replayed first (a replay key),
    then a reader that is behind on the shard (two processes on one shard during a lease
    move, the old owner still holding the page; or a checkpoint re-read after a crash)
    applies the page with the fixed view: the record is above the high-water mark, so it is
    appended a second time."""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    page = records(
        record(1, "INSERT", {"pk": "a", "status": "new"}, None),
        record(2, "MODIFY", {"pk": "a", "status": "boom"}, {"pk": "a", "status": "new"}),
    )
    buggy = Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0)
    buggy.process(TABLE, ("pk",), page, shard="shard-1")
    fixed = View(**{**view.__dict__, "func": lambda change: {"seq": change.sequence}})
    pipe = Pipeline(registry_of(fixed), {("redis", "cache"): sink}, store, lambda _: 0)
    assert replay(store, pipe, lambda _: ("pk",)).applied == 1
    pipe.process(TABLE, ("pk",), page, shard="shard-1")  # the page read again
    seqs = [e["seq"] for e in entries(redis_client)]
    assert seqs.count("2") == 1, f"stream: {seqs}"


def test_a_changelog_dead_letter_older_than_47_hours_can_never_be_appended(
    sink: RedisSink, redis_client: Any
) -> None:
    """Dead-lettered, never dropped — but unrecoverable: replay refuses a dead letter older
    than the tombstone retention less an hour and says to rebuild the view instead, and a
    change-log view cannot be rebuilt. A change-log append has no tombstone to outlive (it
    does not bring an item back), so the rule only loses the record (a weekend is enough)."""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    page = records(
        record(2, "MODIFY", {"pk": "a", "status": "boom"}, {"pk": "a", "status": "new"}),
    )
    Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0).process(
        TABLE, ("pk",), page, shard="shard-1"
    )
    [dl] = store.list_deadletters()
    fixed = View(**{**view.__dict__, "func": lambda change: {"seq": change.sequence}})
    pipe = Pipeline(registry_of(fixed), {("redis", "cache"): sink}, store, lambda _: 0)
    done = replay(store, pipe, lambda _: ("pk",), now=dl.created_at + 47.5 * 3600)
    assert done.applied == 1, f"skipped: {done.notes}"
