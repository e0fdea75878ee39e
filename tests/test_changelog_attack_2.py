"""Second attack on change-log views (Redis): each test states the guarantee it checks and
fails on main when the guarantee is broken."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import registry_of
from tests.test_changelog_redis import TABLE, _view, entries, record, records
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.ops.lambda_handler import handle_event
from viewkeeper.runtime.deadletters import replay
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.sinks.base import SinkError, SinkUnavailable
from viewkeeper.sinks.redis import RedisSink

ARN = f"arn:aws:dynamodb:us-east-1:123456789012:table/{TABLE}/stream/2024-01-01T00:00:00.000"


@pytest.fixture
def sink(redis_client: Any, redis_url: str) -> Iterator[RedisSink]:
    s = RedisSink.from_url("cache", redis_url)
    yield s
    s.close()


def _page_with(bad: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        record(1, "INSERT", {"pk": "a", "status": "new"}, None),
        bad,
        record(3, "MODIFY", {"pk": "a", "status": "paid"}, {"pk": "a", "status": "new"}),
    ]


def _bad_old_image() -> dict[str, Any]:
    """A record whose OldImage does not decode (an attribute of an unknown type): decoded
    lazily, only a change-log view reads it."""
    raw = record(2, "MODIFY", {"pk": "a", "status": "new"}, {"pk": "a", "status": "new"})
    raw["dynamodb"]["OldImage"] = {"pk": {"S": "a"}, "status": {"X": "?"}}
    return raw


def _bad_time() -> dict[str, Any]:
    """A creation time the decoder takes (any number) that datetime cannot represent
    (epoch milliseconds instead of seconds, say)."""
    raw = record(2, "MODIFY", {"pk": "a", "status": "x"}, {"pk": "a", "status": "new"})
    raw["dynamodb"]["ApproximateCreationDateTime"] = 1_796_000_000_000
    return raw


@pytest.mark.parametrize("bad", [_bad_old_image, _bad_time], ids=["old-image", "time"])
def test_a_record_the_changelog_view_cannot_read_is_dead_lettered_and_the_page_goes_on(
    sink: RedisSink, redis_client: Any, bad: Any
) -> None:
    """Never dropped, never stalls (I5: "a malformed record is no reason to stop"). A record
    whose OldImage does not decode, or whose ApproximateCreationDateTime is out of datetime's
    range, passes decode_records (OldImage is decoded lazily; any number is a time) and
    reaches _map_changes, whose try catches only ItemKeyError and ProjectionError: the
    DecodeError / ValueError escapes Pipeline.process. The worker's _process catches only
    SinkUnavailable: the worker crashes, is restarted, reads the page again and crashes
    again, forever: the shard is stuck (every later record of it, for every view of the
    table, until the stream trims it: then 'DATA LOST TO STREAM RETENTION')."""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    pipe = Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0)
    try:
        report = pipe.process(TABLE, ("pk",), records(*_page_with(bad())), shard="shard-1")
    except Exception as exc:  # what the worker gets
        pytest.fail(f"Pipeline.process raised {type(exc).__name__}: {exc}")
    assert report.applied + report.stale + report.dead_lettered == 3
    assert [e["seq"] for e in entries(redis_client)] == ["1", "3"]


@pytest.mark.parametrize("bad", [_bad_old_image, _bad_time], ids=["old-image", "time"])
def test_the_lambda_handler_dead_letters_a_record_the_changelog_view_cannot_read(
    sink: RedisSink, redis_client: Any, bad: Any
) -> None:
    """The same through the Lambda handler: handle_event raises (the invocation fails, and
    with the documented retry attempts -1 Lambda retries the batch forever: the shard is
    stuck) instead of dead-lettering the record and answering no failures."""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    pipe = Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0)
    event = {"Records": [{**r, "eventSourceARN": ARN} for r in _page_with(bad())]}
    try:
        out = handle_event(event, pipe, lambda _: ("pk",))
    except Exception as exc:
        pytest.fail(f"handle_event raised {type(exc).__name__}: {exc}")
    assert out == {"batchItemFailures": []}
    assert len(store.list_deadletters()) == 1


def test_a_key_refused_by_an_acl_after_the_xadd_appends_the_record_twice(
    sink: RedisSink, redis_client: Any, redis_url: str
) -> None:
    """Exactly once. append_one runs XADD, then HSET of the high-water hash (and SET of the
    replay key): an ACL that lets the user write the view's stream but not viewkeeper's
    bookkeeping keys (an ACL file reloaded with a narrower rule) refuses the HSET after the
    XADD. Redis 7.0 answers "ERR The user executing the script can't access ...": the
    append is an ERROR, dead-lettered (its 'dl' note refused too) while its entry is in the
    stream; the dead letter replayed once the ACL is fixed appends it again. (Where Redis
    answers NOPERM, transient for the sink, the call is re-sent and the page retried until
    the ACL is fixed: one more entry per attempt. The sink README argues a retry after
    NOPERM inside the script is harmless: true of apply, not of append.)"""
    view = _view()
    store = MemoryStore()
    sink.prepare([view])
    page = records(
        record(1, "INSERT", {"pk": "a", "status": "new"}, None),
        record(2, "MODIFY", {"pk": "a", "status": "paid"}, {"pk": "a", "status": "new"}),
    )
    good = Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0)
    good.process(TABLE, ("pk",), page[:1], shard="shard-1")  # the high-water hash exists
    user = f"vk-{uuid.uuid4().hex[:8]}"
    redis_client.execute_command("ACL", "SETUSER", user, "on", "nopass", "+@all", "~*")
    limited = RedisSink.from_url(
        "cache", redis_url.replace("redis://", f"redis://{user}:x@"), retry_seconds=1.0
    )
    try:
        limited.prepare([view])
        # the stream writable, viewkeeper's bookkeeping keys read-only
        acl = ("resetkeys", "%RW~orders:*", "%R~vk:*")
        redis_client.execute_command("ACL", "SETUSER", user, *acl)
        pipe = Pipeline(registry_of(view), {("redis", "cache"): limited}, store, lambda _: 0)
        held = True
        for _ in range(3):  # the worker retries a page the sink could not take
            try:
                pipe.process(TABLE, ("pk",), page[1:], shard="shard-1")
                held = False  # taken (checkpointed), record 2 dead-lettered
                break
            except SinkUnavailable:
                continue
    finally:
        limited.close()
        redis_client.execute_command("ACL", "DELUSER", user)
    # the ACL fixed: the page goes through, the dead letters are replayed
    if held:
        good.process(TABLE, ("pk",), page[1:], shard="shard-1")
    replay(store, good, lambda _: ("pk",))
    seqs = [e["seq"] for e in entries(redis_client)]
    assert seqs.count("2") == 1, f"stream: {seqs}"


def test_a_take_over_of_one_changelog_view_cannot_delete_another_views_entries(
    sink: RedisSink, redis_client: Any
) -> None:
    """Never dropped silently. Two change-log views on one stream key (all the events of two
    tables in one stream, say) would each append their own entries once, and `viewkeeper
    rebuild A --take-over` wipes view A — wipe DELetes the whole stream key, view B's
    entries with it, and no loss reported for B. Refused at prepare instead (was: accepted,
    and the wipe of A deleted B's entry)."""
    a = _view(name="events_a")
    b = _view(name="events_b")
    with pytest.raises(SinkError, match="views events_a and events_b both append to"):
        sink.prepare([a, b])
