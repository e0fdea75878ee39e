"""Fourth attack on change-log views (Redis): probes that held (no failing test: no bug
found in this round). Each states the guarantee it checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import registry_of
from tests.test_changelog_redis import TABLE, _view, app, entries, page_of_three
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


@pytest.mark.parametrize("shard", ["shard-1", ""], ids=["shard", "lambda"])
def test_the_same_record_twice_in_one_page_is_appended_once(
    sink: RedisSink, redis_client: Any, shard: str
) -> None:
    view = _view()
    sink.prepare([view])
    pipe = Pipeline(registry_of(view), {("redis", "cache"): sink}, MemoryStore(), lambda _: 0)
    page = page_of_three()
    out = pipe.process(TABLE, ("pk",), [page[0], page[1], page[1], page[2]], shard=shard)
    assert (out.applied, out.stale) == (3, 1)
    assert [e["seq"] for e in entries(redis_client)] == ["1", "2", "3"]


def test_an_encode_error_note_below_the_mark_then_a_fixed_replay_appends_nothing_twice(
    sink: RedisSink, redis_client: Any
) -> None:
    """A good process appended the page; an overlapping process whose view gives a NaN for
    record 2 (EncodeError in _group: a note) re-sends it: the note, below the mark with no
    key, records it as appended; the dead letter replayed answers stale."""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    good = View(**{**view.__dict__, "func": lambda c: {"seq": c.sequence}})
    nan = View(
        **{
            **view.__dict__,
            "func": lambda c: {"seq": c.sequence, "v": float("nan") if c.sequence == "2" else 1},
        }
    )
    g = Pipeline(registry_of(good), {("redis", "cache"): sink}, store, lambda _: 0)
    b = Pipeline(registry_of(nan), {("redis", "cache"): sink}, store, lambda _: 0)
    assert g.process(TABLE, ("pk",), page_of_three(), shard="shard-1").applied == 3
    late = b.process(TABLE, ("pk",), page_of_three(), shard="shard-1")
    assert (late.stale, late.dead_lettered) == (2, 1)
    done = replay(store, g, lambda _: ("pk",))
    assert (done.applied, done.stale) == (0, 1)
    assert [e["seq"] for e in entries(redis_client)] == ["1", "2", "3"]


def test_a_lambda_appended_record_is_stale_for_a_shard_reader(
    sink: RedisSink, redis_client: Any
) -> None:
    """Lambda (shard '') then the daemon on the same records (a Lambda -> daemon move):
    the 48 h replay keys answer stale. (The other way, daemon -> Lambda at TRIM_HORIZON,
    appends every record of the last 24 h again: marks are not keys; not a supported mix.)"""
    view = _view()
    sink.prepare([view])
    pipe = Pipeline(registry_of(view), {("redis", "cache"): sink}, MemoryStore(), lambda _: 0)
    assert pipe.process(TABLE, ("pk",), page_of_three(), shard="").applied == 3
    again = pipe.process(TABLE, ("pk",), page_of_three(), shard="shard-1")
    assert (again.applied, again.stale) == (0, 3)
    assert len(entries(redis_client)) == 3


class _RefusesFirstCall(RedisSink):
    """The real sink, whose first script call is refused whole by Redis (a command it
    rejects: wrong number of arguments), as an over-limit call would be."""

    refuse = 1

    def _command(self, batch: Any, stamp: bytes) -> bytes:
        if _RefusesFirstCall.refuse > 0:
            _RefusesFirstCall.refuse -= 1
            return b"*2\r\n$7\r\nEVALSHA\r\n$3\r\nbad\r\n"
        return super()._command(batch, stamp)


def test_a_call_refused_whole_leaves_the_view_s_later_calls_unsent_and_its_records_noted(
    redis_client: Any, redis_url: str
) -> None:
    """Nothing dropped, exactly once (gap found by reading in this round). 300 appends of
    one shard go in two calls; Redis refuses the first whole. Sent anyway, the second would
    raise the mark past the first's records, which a re-read would then take for appended
    (was: the second call was sent, no note written). Now: neither is written,
    all 300 end ERROR (dead-lettered), noted; a re-read of the page then appends each once
    and their replays answer stale."""
    view = _view()
    sink = _RefusesFirstCall.from_url("cache", redis_url)
    try:
        sink.prepare([view])
        _RefusesFirstCall.refuse = 1
        batch = [app(view, "shard-1", q) for q in range(1, 301)]
        out = sink.append(batch)
        assert {r.outcome for r in out} == {Outcome.ERROR}
        assert entries(redis_client) == []
        again = sink.append(batch)  # the page read again (no checkpoint after an ERROR halt)
        assert {r.outcome for r in again} == {Outcome.APPLIED}
        replays = sink.append([app(view, "", q) for q in range(1, 301)])  # the dead letters
        assert {r.outcome for r in replays} == {Outcome.STALE}
        assert [int(e["seq"]) for e in entries(redis_client)] == list(range(1, 301))
    finally:
        sink.close()
