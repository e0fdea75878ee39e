"""Third attack on change-log views (Redis): each test states the guarantee it checks and
fails on main when the guarantee is broken."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import registry_of
from tests.test_changelog_redis import TABLE, _view, entries, page_of_three
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.api import View
from viewkeeper.runtime import changelog as changelog_module
from viewkeeper.runtime.deadletters import replay
from viewkeeper.runtime.pipeline import HaltShard, Pipeline
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.records import DecodeError


@pytest.fixture
def sink(redis_client: Any, redis_url: str) -> Iterator[RedisSink]:
    s = RedisSink.from_url("cache", redis_url)
    yield s
    s.close()


def test_on_error_halt_an_append_the_sink_refuses_is_stale_after_the_fix(
    sink: RedisSink, redis_client: Any
) -> None:
    """Nothing dropped silently (worker.on_error=halt). Record 2's entry cannot be encoded
    (a NaN: EncodeError in _group), so _group sends it as a dead-letter note (f = -1) and
    the same script call appends record 3, raising shard-1's high-water mark to 3. Then
    _append sees record 2's ERROR: _dead raises HaltShard (no dead letter is stored, the
    page is not checkpointed: halt means "stop here, fix, restart"). Fixed and restarted,
    the worker reads the page again: record 2 finds its 'dl' note and a mark above it and
    answers STALE. Counted stale, never appended, no dead letter: lost silently (was; now
    the note makes the re-read append it, once)."""
    view = _view()
    nan = View(
        **{
            **view.__dict__,
            "func": lambda c: {"seq": c.sequence, "v": float("nan") if c.sequence == "2" else 1},
        }
    )
    store = MemoryStore()
    sink.prepare([view])
    halting = Pipeline(
        registry_of(nan), {("redis", "cache"): sink}, store, lambda _: 0, on_error="halt"
    )
    with pytest.raises(HaltShard):
        halting.process(TABLE, ("pk",), page_of_three(), shard="shard-1")
    assert store.list_deadletters() == []  # halt stores none: the shard stops
    # the view fixed, the worker restarted: the page is read again from the checkpoint
    fixed = View(**{**view.__dict__, "func": lambda c: {"seq": c.sequence, "v": 1}})
    pipe = Pipeline(
        registry_of(fixed), {("redis", "cache"): sink}, store, lambda _: 0, on_error="halt"
    )
    again = pipe.process(TABLE, ("pk",), page_of_three(), shard="shard-1")
    seqs = [e["seq"] for e in entries(redis_client)]
    # appended once, when the shard resumed: after record 3, which the same call appended
    # before the halt (README, "Change-log views": order under on_error: halt)
    assert seqs == ["1", "3", "2"], (
        f"stream: {seqs}; the re-read: {again.applied} applied, {again.stale} stale, "
        f"{again.dead_lettered} dead-lettered, dead letters: {len(store.list_deadletters())}"
    )


def test_a_record_dead_lettered_before_mapping_is_appended_twice_after_an_upgrade(
    sink: RedisSink, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly once. Only a ProjectionError (and a sink refusal) leaves a 'dl' note; a record
    _map_changes dead-letters before the view runs (its OldImage or creation time cannot be
    read as a StreamChange; an ItemKeyError; a record decode_records marked invalid) gets
    none. The last record of a page is dead-lettered that way (the mark stays below it);
    viewkeeper is upgraded to a version that reads it (the rolling deploy of that fix); the
    page is read again before its checkpoint (kill -9, or a lease moved to an upgraded
    process): the record is above the mark, appended, and no replay key written. The dead
    letter is replayed (shard ''): no replay key, so appended a second time. (Attack 1's
    second bug, fixed for ProjectionError only.)"""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    page = page_of_three()[:2]
    real = changelog_module.StreamChange

    def old_version(**kw: Any) -> Any:  # the old release cannot read record 2
        if kw["sequence"] == "2":
            raise DecodeError("attribute of an unknown type")
        return real(**kw)

    monkeypatch.setattr(changelog_module, "StreamChange", old_version)
    pipe = Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0)
    first = pipe.process(TABLE, ("pk",), page, shard="shard-1")
    assert (first.applied, first.dead_lettered) == (1, 1)
    monkeypatch.setattr(changelog_module, "StreamChange", real)  # the upgrade
    again = pipe.process(TABLE, ("pk",), page, shard="shard-1")  # read again, no checkpoint
    assert (again.applied, again.stale) == (1, 1)
    done = replay(store, pipe, lambda _: ("pk",))
    seqs = [e["seq"] for e in entries(redis_client)]
    assert seqs.count("2") == 1, f"stream: {seqs}; replay applied {done.applied}"


def test_a_dead_letter_note_after_the_record_was_appended_lets_its_replay_append_it_again(
    sink: RedisSink, redis_client: Any
) -> None:
    """Exactly once. A failed Append's note (f = -1) is SET NX of 'dl' on the replay key,
    whatever the shard's high-water mark says. A record appended in shard mode leaves no
    replay key, so when the same record later fails for the view on the same page (the old
    owner of a lease move still holding the page, running the view before the rolling
    deploy of its fix reached it; or a re-read after kill -9 before the checkpoint whose view
    failed this time: a rollback, a function that raises on a timeout), the note is written
    for a record already in the stream, and a dead letter is stored. Replayed, the note
    says 'dl': the record is appended a second time."""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    page = page_of_three()
    boom = View(
        **{
            **view.__dict__,
            "func": lambda c: (
                (_ for _ in ()).throw(RuntimeError("timeout"))
                if c.sequence == "2"
                else {"seq": c.sequence}
            ),
        }
    )
    good = View(**{**view.__dict__, "func": lambda c: {"seq": c.sequence}})
    new_owner = Pipeline(registry_of(good), {("redis", "cache"): sink}, store, lambda _: 0)
    old_owner = Pipeline(registry_of(boom), {("redis", "cache"): sink}, store, lambda _: 0)
    assert new_owner.process(TABLE, ("pk",), page, shard="shard-1").applied == 3
    late = old_owner.process(TABLE, ("pk",), page, shard="shard-1")  # the same page
    assert (late.stale, late.dead_lettered) == (2, 1)
    done = replay(store, new_owner, lambda _: ("pk",))
    seqs = [e["seq"] for e in entries(redis_client)]
    assert seqs.count("2") == 1, f"stream: {seqs}; replay applied {done.applied}"
