"""Change-log views on the real Redis: the API's refusals, the sink's append (once per
record, per shard in order, replays by sequence), trimming, keys in the stream's slot,
claims, purge and wipe; the pipeline's accounting and dead letters; property tests of the
dedup under replays and overlapping appliers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.helpers import registry_of
from viewkeeper import StreamChange, changelog_view
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.api import View, view_of
from viewkeeper.runtime.deadletters import replay
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.sinks.base import Append, Claim, NamespaceLost, Outcome, Owner
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.sinks.redis.changelog import slot_tag
from viewkeeper.sinks.redis_cluster import RedisClusterSink
from viewkeeper.stream.records import ChangeRecord

TABLE = "orders"


def _view(stream: str = "orders:events", **kw: Any) -> View:
    kw.setdefault("maxlen", 1000)

    @changelog_view(table=TABLE, redis="cache", stream=stream, **kw)
    def events(change: StreamChange) -> dict[str, Any] | None:
        same = change.old and change.new and change.old.get("status") == change.new.get("status")
        if change.event == "MODIFY" and same:
            return None
        if (change.new or {}).get("status") == "boom":
            raise RuntimeError("cannot tell this one")
        return {"id": change.keys["pk"], "event": change.event, "seq": change.sequence}

    view = view_of(events)
    assert view is not None
    return view


@pytest.fixture(params=["redis", "cluster"])
def redis_client(request: pytest.FixtureRequest, redis_client: Any) -> Any:
    """The real redis-server, or the real Redis Cluster (the cluster sink)."""
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster_client")
    return redis_client


@pytest.fixture
def sink(redis_client: Any, redis_url: str) -> Iterator[Any]:
    if isinstance(redis_client, RedisCluster):
        s: Any = RedisClusterSink("cache", redis_client)
    else:
        s = RedisSink.from_url("cache", redis_url)
    yield s
    s.close()


def entries(client: Any, stream: str = "orders:events") -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(stream)
    ]


def app(view: View, shard: str, seq: int, body: dict[str, Any] | None = None) -> Append:
    return Append(view, shard, str(seq), f"k{seq}", body or {"seq": str(seq)}, 0.0)


# --- the API ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"redis": "cache", "stream": "s"}, "needs a cap"),
        ({"redis": "cache", "maxlen": 10}, "stream= must be the Redis key"),
        ({"redis": "cache", "stream": "s", "maxlen": 0}, "maxlen must be a whole number"),
        ({"redis": "cache", "stream": "s", "maxlen": 1.5}, "maxlen must be a whole number"),
        ({"redis": "cache", "stream": "s", "max_age": True}, "max_age (seconds) must be"),
        ({"redis": "cache", "opensearch": "s", "stream": "s"}, "exactly one of redis="),
        ({"stream": "s", "maxlen": 3}, "exactly one of redis="),
        ({"redis": "cache", "stream": "s", "maxlen": 3, "index": "x"}, "index= and retention"),
        ({"opensearch": "search", "index": "Bad Index"}, "not a valid OpenSearch index"),
        ({"opensearch": "search", "index": "audit", "retention_days": 1}, "at least 2"),
        ({"opensearch": "search", "index": "audit", "maxlen": 5}, "stream=, maxlen= and"),
    ],
)
def test_changelog_view_refuses_bad_arguments_naming_the_fix(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises((TypeError, ValueError)) as err:
        changelog_view(table=TABLE, name="events", **kwargs)(lambda change: None)
    assert message in str(err.value)


def test_changelog_view_without_arguments_says_how_to_call_it() -> None:
    with pytest.raises(TypeError, match=r"@changelog_view\(table=\.\.\."):

        @changelog_view
        def events(change: StreamChange) -> None: ...


def test_the_function_stays_callable_as_written() -> None:
    view = _view()
    change = StreamChange("INSERT", {"pk": "a"}, None, {"pk": "a"}, "12", dt.datetime.now(dt.UTC))
    assert view.func(change) == {"id": "a", "event": "INSERT", "seq": "12"}  # type: ignore[arg-type]
    assert view.changelog and view.kind == "redis" and view.options["maxlen"] == 1000


# --- the sink ----------------------------------------------------------------------------
def test_each_record_is_appended_once_per_shard_in_order(
    sink: RedisSink, redis_client: Any
) -> None:
    view = _view()
    sink.prepare([view])
    first = sink.append([app(view, "s1", 100), app(view, "s1", 101), app(view, "s2", 7)])
    assert [r.outcome for r in first] == [Outcome.APPLIED] * 3
    # the page read again after a crash, a lease moved mid-page, and then new records
    again = sink.append([app(view, "s1", 100), app(view, "s1", 101), app(view, "s1", 102)])
    assert [r.outcome for r in again] == [Outcome.STALE, Outcome.STALE, Outcome.APPLIED]
    # a sequence number of another length compares as a number, not as text
    assert sink.append([app(view, "s2", 10)])[0].outcome is Outcome.APPLIED
    assert sink.append([app(view, "s2", 9)])[0].outcome is Outcome.STALE
    assert [e["seq"] for e in entries(redis_client)] == ["100", "101", "7", "102", "10"]


def test_a_replayed_record_without_shard_is_appended_once(
    sink: RedisSink, redis_client: Any
) -> None:
    view = _view()
    sink.prepare([view])
    sink.append([app(view, "s1", 200)])
    out = sink.append([app(view, "", 150), app(view, "", 150)])
    assert [r.outcome for r in out] == [Outcome.APPLIED, Outcome.STALE]
    assert sink.append([app(view, "", 150)])[0].outcome is Outcome.STALE
    assert [e["seq"] for e in entries(redis_client)] == ["200", "150"]


def test_field_values_are_encoded_like_other_redis_values(
    sink: RedisSink, redis_client: Any
) -> None:
    view = _view()
    sink.prepare([view])
    body = {"s": "é", "n": Decimal("10.50"), "d": {"a": [1, 2]}, "b": True, "raw": b"\x00x"}
    assert sink.append([app(view, "s1", 1, body)])[0].outcome is Outcome.APPLIED
    [(_, fields)] = redis_client.xrange("orders:events")
    assert fields == {
        b"s": "é".encode(),
        b"n": b"10.50",
        b"d": b'{"a":[1,2]}',
        b"b": b"true",
        b"raw": b"\x00x",
    }


def test_an_entry_that_cannot_be_encoded_fails_alone(sink: RedisSink, redis_client: Any) -> None:
    view = _view()
    sink.prepare([view])
    out = sink.append([app(view, "s1", 1, {"x": float("nan")}), app(view, "s1", 2)])
    assert out[0].outcome is Outcome.ERROR and "view events" in (out[0].error or "")
    assert out[1].outcome is Outcome.APPLIED
    assert [e["seq"] for e in entries(redis_client)] == ["2"]


def test_a_stream_key_holding_another_type_is_an_error_and_is_left_alone(
    sink: RedisSink, redis_client: Any
) -> None:
    view = _view()
    sink.prepare([view])
    redis_client.set("orders:events", "not a stream")
    out = sink.append([app(view, "s1", 1), app(view, "s1", 2)])
    assert [r.outcome for r in out] == [Outcome.ERROR, Outcome.ERROR]
    assert "holds a string, not a stream" in (out[0].error or "")
    assert redis_client.get("orders:events") == b"not a stream"
    redis_client.delete("orders:events")  # fixed: the same records go in, once
    assert [r.outcome for r in sink.append([app(view, "s1", 1)])] == [Outcome.APPLIED]


def test_maxlen_caps_the_stream_and_max_age_trims_old_entries(
    sink: RedisSink, redis_client: Any
) -> None:
    capped = _view("capped", maxlen=10)
    aged = _view("aged", maxlen=None, max_age=60)
    sink.prepare([capped, aged])
    sink.append([app(capped, "s1", i) for i in range(1, 501)])
    # MAXLEN ~ trims whole nodes (100 entries by default): about 10, never below
    assert 10 <= redis_client.xlen("capped") <= 110
    assert entries(redis_client, "capped")[-1]["seq"] == "500"
    now_ms = int(redis_client.time()[0]) * 1000
    for i in range(300):  # entries 10 minutes old
        redis_client.xadd("aged", {"old": str(i)}, id=f"{now_ms - 600_000}-{i}")
    sink.append([app(aged, "s1", 1)])
    left = entries(redis_client, "aged")
    assert left[-1] == {"seq": "1"}
    assert len(left) < 300  # MINID ~ trims whole nodes of old entries


def test_bookkeeping_lives_in_the_stream_keys_slot() -> None:
    for key in [b"orders:events", b"{tenant1}:events", b"ev{}{x}", b"a}b", b"x{y", b"{}"]:
        tag = slot_tag(key)
        assert key_slot(b"vk:cl:{" + tag + b"}:view:hw") == key_slot(key), key
    assert slot_tag(b"{tenant1}:events") == b"tenant1"
    assert slot_tag(b"plain") == b"plain"


def test_a_stream_key_inside_the_bookkeeping_prefix_is_refused_at_prepare(
    sink: RedisSink,
) -> None:
    view = _view("vk:events")
    with pytest.raises(Exception, match="inside viewkeeper's bookkeeping prefix 'vk:'"):
        sink.prepare([view])


def test_two_change_log_views_on_one_stream_are_refused_at_prepare(sink: RedisSink) -> None:
    one, two = _view("shared:events"), _view("shared:events")
    two = View(**{**two.__dict__, "name": "events_again"})
    with pytest.raises(Exception, match="views events and events_again both append to"):
        sink.prepare([one, two])


def test_a_changed_claim_refuses_the_appends_and_writes_nothing(
    sink: RedisSink, redis_client: Any
) -> None:
    view = _view()
    sink.prepare([view])
    owner = Owner("arn:table/orders", "vk-coord", "d1")
    sink.write_claim(view, Claim(owner, "m1"))
    sink.expect(view, "m1")
    assert sink.append([app(view, "s1", 1)])[0].outcome is Outcome.APPLIED
    redis_client.flushall()  # the server came back empty
    with pytest.raises(NamespaceLost) as lost:
        sink.append([app(view, "s1", 2)])
    assert lost.value.views == ["events"]
    assert redis_client.exists("orders:events") == 0


def test_purge_forgets_idle_shards_replay_keys_expire_and_wipe_deletes_everything(
    sink: RedisSink, redis_client: Any
) -> None:
    view = _view("ev[1]*")  # glob characters in the key: wipe's SCAN pattern escapes them
    sink.prepare([view])
    sink.append([app(view, "s1", 1), app(view, "", 5)])
    stream, hw, rp = sink.changelog_keys(view)
    assert 0 < redis_client.ttl(rp + b"5") <= sink.tombstone_retention
    assert sink.purge_tombstones(view, older_than=0) == 0  # nothing that old
    assert sink.purge_tombstones(view, older_than=2**40) == 1
    assert redis_client.exists(hw) == 0
    redis_client.set(rp[:-3] + b"x", "not ours")  # a key next to the replay keys stays
    assert sink.wipe(view) == 2
    assert redis_client.exists(stream, rp + b"5") == 0
    assert redis_client.get(rp[:-3] + b"x") == b"not ours"


# --- the pipeline ------------------------------------------------------------------------
def record(seq: int, event: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> Any:
    raw: dict[str, Any] = {
        "eventName": event,
        "dynamodb": {
            "Keys": {"pk": {"S": (new or old or {})["pk"]}},
            "SequenceNumber": str(seq),
            "ApproximateCreationDateTime": 1_796_000_000,
        },
    }
    for name, image in (("NewImage", new), ("OldImage", old)):
        if image is not None:
            raw["dynamodb"][name] = {k: {"S": v} for k, v in image.items()}
    return raw


def records(*raws: Any) -> list[ChangeRecord]:
    from viewkeeper.stream.records import decode_records

    return decode_records(list(raws))


def page_of_three() -> list[ChangeRecord]:
    return records(
        record(1, "INSERT", {"pk": "a", "status": "new"}, None),
        record(2, "MODIFY", {"pk": "a", "status": "odd"}, {"pk": "a", "status": "new"}),
        record(3, "MODIFY", {"pk": "a", "status": "paid"}, {"pk": "a", "status": "odd"}),
    )


def test_the_pipeline_maps_every_record_counts_nothing_as_applied_and_dead_letters_errors(
    sink: RedisSink, redis_client: Any
) -> None:
    view = _view()
    store = MemoryStore()
    pipe = Pipeline(registry_of(view), {("redis", "cache"): sink}, store, lambda _: 0)
    sink.prepare([view])
    page = records(
        record(1, "INSERT", {"pk": "a", "status": "new"}, None),
        record(2, "MODIFY", {"pk": "a", "status": "new"}, {"pk": "a", "status": "new"}),
        record(3, "MODIFY", {"pk": "a", "status": "boom"}, {"pk": "a", "status": "new"}),
        record(4, "MODIFY", {"pk": "a", "status": "paid"}, {"pk": "a", "status": "boom"}),
        record(5, "REMOVE", None, {"pk": "a", "status": "paid"}),
    )
    report = pipe.process(TABLE, ("pk",), page, shard="s1")
    assert (report.applied, report.stale, report.dead_lettered) == (4, 0, 1)
    assert [(e["event"], e["seq"]) for e in entries(redis_client)] == [
        ("INSERT", "1"),
        ("MODIFY", "4"),
        ("REMOVE", "5"),
    ]
    again = pipe.process(TABLE, ("pk",), page, shard="s1")  # read again: nothing twice
    assert (again.applied, again.stale, again.dead_lettered) == (1, 3, 1)
    [letter] = store.list_deadletters()
    assert "cannot tell this one" in letter.error
    # the view fixed, the dead letter replayed: appended once, after the later changes
    fixed = View(**{**view.__dict__, "func": lambda change: {"seq": change.sequence}})
    pipe = Pipeline(registry_of(fixed), {("redis", "cache"): sink}, store, lambda _: 0)
    done = replay(store, pipe, lambda _: ("pk",))
    assert (done.replayed, done.applied) == (1, 1)
    assert store.list_deadletters() == []
    # the same record replayed again (a crash before the dead letter was deleted)
    twice = pipe.process(TABLE, ("pk",), [page[2]], only=["events"], generations={"events": 0})
    assert (twice.applied, twice.stale) == (0, 1)
    assert [e["seq"] for e in entries(redis_client)] == ["1", "4", "5", "3"]


# --- properties --------------------------------------------------------------------------
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shards=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    steps=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(1, 8)), max_size=25
    ),
    replays=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 11)), max_size=6),
)
def test_any_replays_and_overlaps_append_each_record_exactly_once(
    sink: RedisSink,
    redis_client: Any,
    shards: list[int],
    steps: list[tuple[int, int, int]],
    replays: list[tuple[int, int]],
) -> None:
    """Each shard's records (sequences growing by random gaps) are applied by readers that
    each go in order from some checkpoint at or before where the shard's progress is (a
    crash, a lease move, two processes on one shard), in any interleaving; dead letters are
    replayed any number of times. Afterwards every record is in the stream exactly once and
    each shard's records in order."""
    redis_client.flushall()
    view = _view()
    sink.prepare([view])
    seqs = [[1000 * (s + 1) + 7 * i + (i * i) % 5 for i in range(n)] for s, n in enumerate(shards)]
    done = [0] * len(seqs)  # how far each shard's records are known to be appended
    for shard, start, length in steps:
        if shard >= len(seqs):
            continue
        begin = min(start, done[shard])  # a reader starts at or before the progress
        chunk = seqs[shard][begin : begin + length]
        sink.append([app(view, f"shard-{shard}", q) for q in chunk])
        done[shard] = max(done[shard], begin + len(chunk))
    for shard in range(len(seqs)):  # every reader catches up
        sink.append([app(view, f"shard-{shard}", q) for q in seqs[shard]])
    replayed = []
    for shard, i in replays:
        if shard < len(seqs) and i < len(seqs[shard]):
            q = seqs[shard][i] + 1  # a dead letter: a record no reader appended
            replayed.append(q)
            sink.append([app(view, "", q)])
    got = [int(e["seq"]) for e in entries(redis_client)]
    assert sorted(got) == sorted([q for s in seqs for q in s] + list(dict.fromkeys(replayed)))
    for s in seqs:
        mine = [q for q in got if q in set(s)]
        assert mine == s


# the last record of a shard failed: replayed before a re-read, and re-read before a replay
@example(shards=[2], failing={1}, first=[], then=[(True, 0, 0, 1), (False, 0, 0, 2)])
@example(shards=[2], failing={1}, first=[], then=[(False, 0, 0, 2)])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shards=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    failing=st.sets(st.integers(0, 5), max_size=4),
    first=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(1, 8)), max_size=12
    ),
    then=st.lists(
        st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 12), st.integers(1, 8)),
        max_size=20,
    ),
)
def test_dead_lettered_records_are_appended_once_by_replay_or_fixed_reread_in_any_order(
    sink: RedisSink,
    redis_client: Any,
    shards: list[int],
    failing: set[int],
    first: list[tuple[int, int, int]],
    then: list[tuple[bool, int, int, int]],
) -> None:
    """Some records fail the view at first (dead-lettered: the pipeline sends their notes,
    Append.failed). Then the view is fixed: readers re-read from any checkpoint (a crash, a
    lease move, a rolling deploy) while the dead letters are replayed, in any interleaving,
    any number of times; at the end every dead letter is replayed once more. Every record
    is in the stream exactly once, and each shard's records that never failed in order."""
    redis_client.flushall()
    view = _view()
    sink.prepare([view])
    seqs = [[1000 * (s + 1) + 3 * i for i in range(n)] for s, n in enumerate(shards)]

    def read(shard: int, begin: int, length: int, fixed: bool) -> None:
        batch = []
        for i, q in enumerate(seqs[shard][begin : begin + length], start=begin):
            a = app(view, f"shard-{shard}", q)
            broken = not fixed and i in failing
            batch.append(
                Append(a.view, a.shard, a.sequence, a.item_key, {}, 0.0, True) if broken else a
            )
        sink.append(batch)

    done = [0] * len(seqs)
    for shard, start, length in first:  # the view is broken
        if shard < len(seqs):
            begin = min(start, done[shard])
            read(shard, begin, length, fixed=False)
            done[shard] = max(done[shard], min(len(seqs[shard]), begin + length))
    for shard in range(len(seqs)):
        read(shard, done[shard], len(seqs[shard]), fixed=False)
    failed = [q for s in seqs for i, q in enumerate(s) if i in failing]
    for replaying, shard, start, length in then:  # the view is fixed
        if shard >= len(seqs):
            continue
        if replaying:
            if failed:
                sink.append([app(view, "", failed[(start + length) % len(failed)])])
        else:
            read(shard, start, length, fixed=True)
    for q in failed:
        sink.append([app(view, "", q)])
    got = [int(e["seq"]) for e in entries(redis_client)]
    assert sorted(got) == sorted(q for s in seqs for q in s)
    for s in seqs:
        kept = [q for i, q in enumerate(s) if i not in failing]
        assert [q for q in got if q in set(kept)] == kept
