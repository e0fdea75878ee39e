"""The Redis sink's guarantees, on the real redis-server (and the fast ones on fakeredis too)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from redis.cluster import RedisCluster

from tests.helpers import view_for
from viewkeeper import HashField, SetMember, SortedSetMember, Value, redis_view
from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.project import project
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import (
    Change,
    Claim,
    NamespaceLost,
    Outcome,
    Owner,
    Result,
    SinkUnavailable,
)
from viewkeeper.sinks.encoding import redis_value
from viewkeeper.sinks.redis import RedisSink, pack_version
from viewkeeper.sinks.redis_cluster import RedisClusterSink

SEQ = 10**20  # 21 digits, like DynamoDB's


@redis_view(table="orders", redis="cache")
def card(order: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"order:{order['id']}", {"status": order["status"]})
    yield SortedSetMember(f"customer:{order['customer']}:orders", order["id"], order["score"])
    if order["status"] != "void":
        yield SetMember(f"status:{order['status']}", order["id"])
    yield HashField(f"totals:{order['customer']}", order["id"], str(order["score"]))


@redis_view(table="orders", redis="cache", name="card_copy")
def card_copy(order: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"order:{order['id']}", "copy")  # the same key as `card`: a view bug


@redis_view(table="orders", redis="cache", ttl=30)
def short_lived(order: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"session:{order['id']}", order["status"])


CARD, COPY, SHORT = view_for(card), view_for(card_copy), view_for(short_lived)


def order(
    oid: str, customer: str = "c1", status: str = "new", score: float = 1.0
) -> dict[str, Any]:
    return {"id": oid, "customer": customer, "status": status, "score": score}


def change(
    view: View, item: str, seq: int | str, state: dict[str, Any] | None, gen: int = 0
) -> Change:
    entries = [] if state is None else project(view, state, item, ("id",))
    return Change(view, item, Version(gen, str(seq)), entries)


def entries(*items: Entry) -> list[Entry]:
    return list(items)


@pytest.fixture(params=["redis", "fakeredis", "cluster"])
def client(request: pytest.FixtureRequest) -> Any:
    """The real redis-server, fakeredis, or the real Redis Cluster (the cluster sink)."""
    if request.param == "redis":
        real: redis.Redis = request.getfixturevalue("redis_client")
        return real
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster_client")
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


# What only the standalone sink has (its script's arguments, its claim buckets, its connection
# handling): tests/test_sink_redis_cluster.py has the cluster's own.
standalone_only = pytest.mark.parametrize("client", ["redis", "fakeredis"], indirect=True)


@pytest.fixture
def sink(client: Any) -> Iterator[Any]:
    s = any_sink(client)
    s.prepare([CARD, COPY, SHORT])
    yield s
    s.close()


@pytest.fixture
def real_sink(redis_client: redis.Redis) -> RedisSink:
    s = RedisSink("cache", redis_client, retry_seconds=2)
    s.prepare([CARD, COPY, SHORT])
    return s


def any_sink(client: Any, **options: Any) -> Any:
    """The sink for ``client``: the cluster sink on a cluster client, else the standalone one."""
    if isinstance(client, RedisCluster):
        return RedisClusterSink("cache", client, retry_seconds=2, **options)
    return RedisSink("cache", client, retry_seconds=2, **options)


def live_claims(sink: Any, client: Any) -> int:
    """How many entry claims the sink holds (a cluster keeps retracted ones as tombstones)."""
    if isinstance(sink, RedisClusterSink):
        return sum(c.live for c in sink.iter_claims())
    return sum(client.hlen(k) for k in client.scan_iter(b"vk:c:*"))


def outcomes(results: list[Result]) -> list[str]:
    return [r.outcome.value for r in results]


def data_keys(client: redis.Redis) -> list[bytes]:
    return sorted(k for k in client.scan_iter() if not k.startswith(b"vk:"))


# ---- apply, update, delete ----------------------------------------------------------------


def test_each_entry_type_is_written_updated_and_deleted(sink: RedisSink, client: Any) -> None:
    assert outcomes(sink.apply([change(CARD, "o1", SEQ + 1, order("o1", score=2))])) == ["applied"]
    assert client.get("order:o1") == b'{"status":"new"}'
    assert client.zrange("customer:c1:orders", 0, -1, withscores=True) == [(b"o1", 2.0)]
    assert client.smembers("status:new") == {b"o1"}
    assert client.hgetall("totals:c1") == {b"o1": b"2"}

    sink.apply([change(CARD, "o1", SEQ + 2, order("o1", status="paid", score=3.5))])
    assert client.get("order:o1") == b'{"status":"paid"}'
    assert client.zscore("customer:c1:orders", "o1") == 3.5
    assert client.smembers("status:paid") == {b"o1"} and not client.exists("status:new")
    assert client.hget("totals:c1", "o1") == b"3.5"

    assert outcomes(sink.apply([change(CARD, "o1", SEQ + 3, None)])) == ["applied"]
    assert data_keys(client) == []
    assert sink.owned_entries(CARD, "o1") == []  # a tombstone
    assert live_claims(sink, client) == 0  # claims released


def test_moved_keys_retract_old_entries_in_the_same_apply(sink: RedisSink, client: Any) -> None:
    sink.apply(
        [
            change(CARD, "o1", SEQ + 1, order("o1", "c1")),
            change(CARD, "o2", SEQ + 1, order("o2", "c1")),
        ]
    )
    sink.apply([change(CARD, "o1", SEQ + 2, order("o1", "c2", status="void"))])
    assert client.zrange("customer:c1:orders", 0, -1) == [b"o2"]
    assert client.zrange("customer:c2:orders", 0, -1) == [b"o1"]
    assert client.smembers("status:new") == {b"o2"}
    assert client.hgetall("totals:c1") == {b"o2": b"1.0"}
    assert client.hgetall("totals:c2") == {b"o1": b"1.0"}
    assert sorted(sink.owned_entries(CARD, "o1") or []) == [
        ("H", "totals:c2", "o1"),
        ("V", "order:o1", ""),
        ("Z", "customer:c2:orders", "o1"),
    ]


def test_empty_projection_retracts_everything_and_keeps_a_tombstone(
    sink: RedisSink, client: Any
) -> None:
    sink.apply([change(CARD, "o1", SEQ + 1, order("o1"))])
    sink.apply([Change(CARD, "o1", Version(0, str(SEQ + 2)), [])])
    assert data_keys(client) == []
    (rec,) = sink.iter_owner_records(CARD)
    assert rec.tombstone and rec.entries == () and rec.version == Version(0, str(SEQ + 2))


def test_a_deleted_item_comes_back_with_a_newer_version(sink: RedisSink, client: Any) -> None:
    sink.apply([change(CARD, "o1", SEQ + 1, order("o1")), change(CARD, "o1", SEQ + 2, None)])
    assert outcomes(sink.apply([change(CARD, "o1", SEQ + 3, order("o1", "c9"))])) == ["applied"]
    assert client.zrange("customer:c9:orders", 0, -1) == [b"o1"]


# ---- versions -------------------------------------------------------------------------------


def test_stale_update_is_ignored(sink: RedisSink, client: Any) -> None:
    sink.apply([change(CARD, "o1", SEQ + 5, order("o1", status="paid"))])
    assert outcomes(sink.apply([change(CARD, "o1", SEQ + 4, order("o1", "c7"))])) == ["stale"]
    assert client.get("order:o1") == b'{"status":"paid"}'
    assert not client.exists("customer:c7:orders")


def test_stale_update_after_delete_does_not_resurrect(sink: RedisSink, client: Any) -> None:
    sink.apply([change(CARD, "o1", SEQ + 1, order("o1"))])
    sink.apply([change(CARD, "o1", SEQ + 3, None)])
    assert outcomes(sink.apply([change(CARD, "o1", SEQ + 2, order("o1", "c2"))])) == ["stale"]
    assert data_keys(client) == []


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("9" * 21, "1" + "0" * 21),  # 21 nines < 22 digits
        ("9" * 39, "1" + "0" * 39),  # 39 digits < 40 digits
        ("1" + "0" * 39, "1" + "0" * 38 + "1"),  # 40 digits, last digit decides
        ("9" * 21, "1" * 40),
        ("12345678901234567890123456789012345678", "12345678901234567890123456789012345679"),
        ("0", "1"),  # a rebuild write (sequence 0) loses to any stream record
    ],
)
def test_long_sequence_numbers_compare_as_integers(
    sink: RedisSink, client: Any, older: str, newer: str
) -> None:
    assert Version(0, older) < Version(0, newer)
    assert pack_version(Version(0, older)) < pack_version(Version(0, newer))
    sink.apply([change(CARD, "o1", older, order("o1", status="old"))])
    assert outcomes(sink.apply([change(CARD, "o1", newer, order("o1", status="new"))])) == [
        "applied"
    ]
    assert outcomes(sink.apply([change(CARD, "o1", older, order("o1", status="old"))])) == ["stale"]
    assert client.get("order:o1") == b'{"status":"new"}'


def test_generation_beats_sequence(sink: RedisSink, client: Any) -> None:
    sink.apply([change(CARD, "o1", "9" * 40, order("o1", status="stream"), gen=0)])
    assert outcomes(sink.apply([change(CARD, "o1", 0, order("o1", status="scan"), gen=1)])) == [
        "applied"
    ]
    assert outcomes(sink.apply([change(CARD, "o1", "9" * 40, order("o1"), gen=0)])) == ["stale"]
    assert outcomes(sink.apply([change(CARD, "o1", 5, order("o1", status="x"), gen=1)])) == [
        "applied"
    ]
    assert client.get("order:o1") == b'{"status":"x"}'


def test_duplicate_delivery_is_idempotent(sink: RedisSink, client: Any) -> None:
    batch = [change(CARD, "o1", SEQ + 1, order("o1")), change(CARD, "o2", SEQ + 1, order("o2"))]
    assert outcomes(sink.apply(batch + batch)) == ["applied", "applied", "stale", "stale"]
    before = _snapshot(client)
    assert outcomes(sink.apply(batch)) == ["stale", "stale"]
    assert _snapshot(client) == before


def _snapshot(client: Any) -> dict[bytes, Any]:
    """Every key's bytes; for the cluster's slot bookkeeping, its fields but '#w', which counts
    the calls that checked no view (every call writes: sinks/redis_cluster/README.md)."""
    out: dict[bytes, Any] = {}
    for k in client.scan_iter():
        if k.startswith(b"vk:{") and k.endswith(b"}:c"):
            out[k] = {f: v for f, v in client.hgetall(k).items() if f != b"#w"}
        else:
            out[k] = client.dump(k)
    return out


# ---- collisions -------------------------------------------------------------------------------


def test_collision_is_reported_and_losers_retraction_keeps_the_winners_entry(
    sink: RedisSink, client: Any
) -> None:
    a = Change(CARD, "item-a", Version(0, "1"), entries(Value("shared:key", "from a")))
    b = Change(CARD, "item-b", Version(0, "1"), entries(Value("shared:key", "from b")))
    assert not sink.apply([a])[0].collisions
    (result,) = sink.apply([b])
    assert result.outcome is Outcome.APPLIED
    assert [(c.entry, c.other_item) for c in result.collisions] == [
        ("Value 'shared:key'", "item-a")
    ]
    assert client.get("shared:key") == b"from b"  # last writer wins
    sink.apply([Change(CARD, "item-a", Version(0, "2"), [])])  # the loser goes away
    assert client.get("shared:key") == b"from b"
    sink.apply([Change(CARD, "item-b", Version(0, "2"), [])])
    assert not client.exists("shared:key")


def test_collision_across_views_names_the_other_view(sink: RedisSink, client: Any) -> None:
    sink.apply([change(CARD, "o1", 1, order("o1"))])
    (result,) = sink.apply([change(COPY, "o1", 1, order("o1"))])
    assert [c.other_item for c in result.collisions] == ["o1 (view card)"]
    assert client.get("order:o1") == b"copy"


def test_collision_report_works_when_the_item_key_is_not_in_the_entry(
    sink: RedisSink, client: Any
) -> None:
    long_item = "L" * 300  # too long for the compact claim form
    sink.apply([Change(CARD, long_item, Version(0, "1"), entries(SetMember("s", "m")))])
    (result,) = sink.apply([Change(CARD, "x", Version(0, "1"), entries(SetMember("s", "m")))])
    assert [(c.entry, c.other_item) for c in result.collisions] == [
        ("SetMember 's' member 'm'", long_item)
    ]


# ---- entry options and rejections -----------------------------------------------------------


def test_ttl_is_set_on_value_entries(sink: RedisSink, client: Any) -> None:
    sink.apply(
        [
            change(SHORT, "o1", 1, order("o1")),
            Change(CARD, "o2", Version(0, "1"), entries(Value("v:o2", "x", ttl=100))),
        ]
    )
    assert 0 < client.ttl("session:o1") <= 30
    assert 0 < client.ttl("v:o2") <= 100
    sink.apply([Change(CARD, "o2", Version(0, "2"), entries(Value("v:o2", "y")))])
    assert client.ttl("v:o2") == -1  # an entry without ttl does not keep the old one


TOO_LONG = 10**16  # seconds: SET ... EX refuses it (its milliseconds overflow with now added)


@pytest.mark.parametrize("ttl", [TOO_LONG, 3_153_600_001, 0, -5, True, 1.5, "60"])
def test_a_ttl_out_of_bounds_is_refused_where_the_view_builds_the_value(ttl: Any) -> None:
    """Redis refuses a SET ... EX whose expiry overflows; the script would get that error
    after the change's first writes. The view API bounds ttl where the entry is built."""
    with pytest.raises(ValueError) as caught:
        Value("k", "v", ttl=ttl)
    for words in (repr(ttl), "'k'", "3153600000", "100 years", "None"):
        assert words in str(caught.value), str(caught.value)
    with pytest.raises(ValueError) as caught:
        redis_view(table="orders", redis="cache", ttl=ttl, name="ttl_view")(lambda o: None)
    for words in ("'ttl_view'", repr(ttl), "3153600000", "None"):
        assert words in str(caught.value), str(caught.value)


def test_the_largest_ttl_is_accepted_by_redis(sink: RedisSink, client: Any) -> None:
    from viewkeeper.projection.entries import MAX_TTL

    assert MAX_TTL == 100 * 365 * 24 * 3600 and Value("k", "v", ttl=MAX_TTL).ttl == MAX_TTL
    ch = Change(CARD, "i", Version(0, "1"), entries(Value("k", "v", ttl=MAX_TTL)))
    assert outcomes(sink.apply([ch])) == ["applied"]
    assert client.ttl("k") > MAX_TTL - 60


@redis_view(table="orders", redis="cache", name="forever")
def forever(order: dict[str, Any]) -> Iterator[Entry]:
    yield SetMember("forever:all", order["id"])
    yield Value(f"forever:{order['id']}", order["status"], ttl=order["ttl"])


def test_a_view_building_a_value_with_a_huge_ttl_fails_that_record_only() -> None:
    """The ValueError raised inside the view becomes a ProjectionError for that record (the
    pipeline dead-letters it), not a crash."""
    from viewkeeper.projection.project import ProjectionError

    view = view_for(forever)
    assert project(view, {**order("o1"), "ttl": 60}, "o1", ("id",))
    with pytest.raises(ProjectionError) as caught:
        project(view, {**order("o2"), "ttl": TOO_LONG}, "o2", ("id",))
    assert "'o2'" in str(caught.value) and str(TOO_LONG) in str(caught.value)


def _huge_ttl_change(item: str, seq: int) -> Change:
    """A change whose Value skipped the view API's check (built by hand): its ttl reaches
    the sink. The SetMember comes first, so a failing SET ... EX would come after a write."""
    value = Value(f"v:{item}", "x", ttl=60)
    object.__setattr__(value, "ttl", TOO_LONG)
    return Change(CARD, item, Version(0, str(seq)), entries(SetMember(f"s:{item}", item), value))


def test_a_huge_ttl_that_reaches_the_sink_writes_nothing_and_leaves_no_orphan(
    sink: RedisSink, client: Any
) -> None:
    results = sink.apply([_huge_ttl_change("o1", 1), change(CARD, "o2", 1, order("o2"))])
    assert outcomes(results) == ["error", "applied"]
    assert client.smembers("s:o1") == set() and not client.exists("v:o1")  # nothing written
    assert sink.owned_entries(CARD, "o1") is None
    sink.apply([Change(CARD, "o1", Version(0, "2"), [])])  # the item is deleted
    assert client.smembers("s:o1") == set()  # no orphan entry
    assert not any(b"s:o1" in f for k in client.scan_iter(b"vk:c:*") for f in client.hkeys(k))
    assert "ttl" in str(results[0].error) and str(TOO_LONG) in str(results[0].error)


@standalone_only
@pytest.mark.parametrize(
    ("at", "bad"),
    [
        ("ttl", b"10000000000000000"),
        ("ttl", b"3153600001"),
        ("ttl", b"0"),
        ("ttl", b"-5"),
        ("ttl", b"1.5"),
        ("ttl", b" 60"),
        ("score", b"abc"),
        ("score", b"nan"),
        ("score", b"1e400"),
        ("score", b" 1"),
        ("type", b"Q"),
    ],
)
def test_the_script_checks_every_argument_before_its_first_write(
    sink: RedisSink, client: Any, monkeypatch: pytest.MonkeyPatch, at: str, bad: bytes
) -> None:
    """Arguments the client would never send (its checks bypassed): the script validates
    them all before the change's first write, so the change fails whole, writing nothing."""
    real = sink._args_for

    def poisoned(ch: Change) -> Any:
        args, ents = real(ch)
        if ch.item_key == "o7":  # entries: S s:o7 (first), then V v:o7 / Z z:o7
            if at == "type":
                args[-4] = bad
            else:
                args[-1] = bad
        return args, ents

    monkeypatch.setattr(sink, "_args_for", poisoned)
    last: Entry = SortedSetMember("z:o7", "m", 1.5) if at == "score" else Value("v:o7", "x", 60)
    batch = [change(SHORT, f"o{i}", 1, order(f"o{i}")) for i in range(10)]
    batch[7] = Change(CARD, "o7", Version(0, "1"), entries(SetMember("s:o7", "m"), last))
    results = sink.apply(batch)
    assert outcomes(results) == ["applied"] * 7 + ["error"] + ["applied"] * 2, results[7]
    assert client.smembers("s:o7") == set(), "written before the failing command"
    assert not client.exists("v:o7", "z:o7") and sink.owned_entries(CARD, "o7") is None
    assert client.exists("session:o6") and client.exists("session:o8")
    assert at in str(results[7].error) and "'o7'" in str(results[7].error), results[7].error
    assert "nothing of the change was written" in str(results[7].error)


def test_a_retracted_entry_whose_key_changed_type_outside_is_left_alone(
    sink: RedisSink, client: Any
) -> None:
    """Someone replaced keys the item owned entries in (outside viewkeeper): SREM on what is
    now a string would fail after the change's first writes, and DEL would delete someone
    else's hash. The script checks the retracted keys' types before any write: an entry
    whose key holds another type is gone already; its claim is released, the key untouched."""
    old = entries(SetMember("k0", "m"), SetMember("k", "m"), Value("k2", "mine"), Value("v:i", 1))
    sink.apply([Change(CARD, "i", Version(0, "1"), old)])
    client.delete("k", "k2")
    client.set("k", "foreign string")
    client.hset("k2", "f", "foreign hash")
    (result,) = sink.apply([Change(CARD, "i", Version(0, "2"), entries(Value("v:i", 2)))])
    assert result.outcome is Outcome.APPLIED, result.error
    assert not client.exists("k0") and client.get("v:i") == b"2"
    assert client.get("k") == b"foreign string" and client.hgetall("k2") == {b"f": b"foreign hash"}
    assert sink.owned_entries(CARD, "i") == [("V", "v:i", "")]
    assert live_claims(sink, client) == 1  # claims released


@standalone_only
def test_claims_are_read_before_the_first_write(sink: RedisSink, client: Any) -> None:
    """A claim bucket that is not a hash (bookkeeping damaged outside viewkeeper) fails the
    change before its first write, not after its first entries were written."""

    def claim_bucket(ident: bytes) -> bytes:
        return b"vk:c:%d" % (int.from_bytes(ident, "big") % 2147483629 % 4096)

    first, second = claim_bucket(b"S\x02a1m"), claim_bucket(b"S\x02zzm")
    assert first != second
    client.set(second, "not a hash")
    es = entries(SetMember("a1", "m"), SetMember("zz", "m"))
    (result,) = sink.apply([Change(CARD, "i", Version(0, "1"), es)])
    assert result.outcome is Outcome.ERROR
    assert not client.exists("a1", "zz") and not client.exists(first)
    assert sink.owned_entries(CARD, "i") is None
    assert "wrong kind of value" in str(result.error).lower(), result.error


def test_wrong_type_fails_only_that_item_and_writes_nothing_of_it(
    sink: RedisSink, client: Any
) -> None:
    client.hset("order:o2", "someone", "else")
    results = sink.apply(
        [
            change(CARD, "o1", 1, order("o1")),
            change(CARD, "o2", 1, order("o2")),
            change(CARD, "o3", 1, order("o3")),
        ]
    )
    assert outcomes(results) == ["applied", "error", "applied"]
    message = results[1].error or ""
    for part in ("'order:o2'", "holds a hash", "view card", "string Value", "'o2'", "rename"):
        assert part in message
    assert client.zrange("customer:c1:orders", 0, -1) == [b"o1", b"o3"]  # no o2 member
    assert client.hgetall("order:o2") == {b"someone": b"else"}
    assert sink.owned_entries(CARD, "o2") is None  # no owner record either


def test_an_item_may_change_the_type_of_a_key_it_alone_owns(sink: RedisSink, client: Any) -> None:
    sink.apply([Change(CARD, "i", Version(0, "1"), entries(SetMember("k", "m")))])
    (result,) = sink.apply([Change(CARD, "i", Version(0, "2"), entries(Value("k", "v")))])
    assert result.outcome is Outcome.APPLIED and client.get("k") == b"v"
    client.sadd("k2", "foreign")
    sink.apply([Change(CARD, "i", Version(0, "3"), entries(SetMember("k2", "m")))])
    (result,) = sink.apply([Change(CARD, "i", Version(0, "4"), entries(Value("k2", "v")))])
    assert result.outcome is Outcome.ERROR  # "foreign" would stay: the key keeps its type
    assert client.smembers("k2") == {b"foreign", b"m"}


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (entries(Value("vk:c:1", "x")), "bookkeeping prefix"),
        (entries(Value("k", "x"), SetMember("k", "m")), "a key has one type"),
        (entries(SortedSetMember("z", "m", float("nan"))), "is not a number"),
        (entries(SortedSetMember("z", "m", 10**400)), "is not a number"),
        (entries(Value("k", object())), "cannot encode"),
    ],
)
def test_invalid_entries_are_errors_of_their_item_only(
    sink: RedisSink, client: Any, bad: list[Entry], words: str
) -> None:
    results = sink.apply(
        [Change(CARD, "bad", Version(0, "1"), bad), change(CARD, "o1", 1, order("o1"))]
    )
    assert outcomes(results) == ["error", "applied"]
    assert words in (results[0].error or "") and "item 'bad'" in (results[0].error or "")
    assert sink.owned_entries(CARD, "bad") is None and not client.exists("z")


def test_scores_keep_their_value(sink: RedisSink, client: Any) -> None:
    from decimal import Decimal

    es = entries(
        SortedSetMember("z", "int", 2**53 + 1),
        SortedSetMember("z", "float", 0.1),
        SortedSetMember("z", "dec", Decimal("12.50")),
        SortedSetMember("z", "inf", float("-inf")),
        SortedSetMember("z", "neg", -3),
    )
    assert outcomes(sink.apply([Change(CARD, "i", Version(0, "1"), es)])) == ["applied"]
    assert dict(client.zrange("z", 0, -1, withscores=True)) == {
        b"int": float(2**53 + 1),
        b"float": 0.1,
        b"dec": 12.5,
        b"inf": float("-inf"),
        b"neg": -3.0,
    }


HOSTILE = [
    "'; redis.call('FLUSHALL') --",
    "]]\n[[",
    '"\\"\r\n\x00',
    "\udcfe\udcfd\udcff",  # raw bytes 0xFE 0xFD 0xFF (the packing's own marker values)
    "ключ 🔑",
    "x" * 300,
]


@pytest.mark.parametrize("item", ["item-1", *HOSTILE])
def test_hostile_contents_are_stored_verbatim(sink: RedisSink, client: Any, item: str) -> None:
    blob = bytes(range(256)) * 4096  # one megabyte of every byte value
    es: list[Entry] = [
        Value(f"v:{item}", blob),
        Value(f"w:{item}", "'\"]]--\n"),
        HashField(f"h:{item}", f"f{item}" * 300, blob),  # a 4-byte length in the record
        SetMember(f"s{item}", item),
        SortedSetMember("z" + item * 2, f"{item}\x00", 1.5),
    ]
    es += [SetMember("s:hostile", h) for h in HOSTILE]
    assert outcomes(sink.apply([Change(CARD, item, Version(0, "1"), es)])) == ["applied"]
    raw = item.encode("utf-8", "surrogateescape")
    assert client.get(b"v:" + raw) == blob
    assert client.get(b"w:" + raw) == b"'\"]]--\n"
    assert client.hget(b"h:" + raw, (b"f" + raw) * 300) == blob
    assert client.smembers(b"s" + raw) == {raw}
    assert client.zscore(b"z" + raw * 2, raw + b"\x00") == 1.5
    assert client.smembers("s:hostile") == {h.encode("utf-8", "surrogateescape") for h in HOSTILE}
    assert sorted(sink.owned_entries(CARD, item) or []) == sorted(e.ident for e in es)
    # moving every entry retracts every old one, read back from the packed owner record
    assert outcomes(sink.apply([Change(CARD, item, Version(0, "2"), [Value("other", "x")])])) == [
        "applied"
    ]
    assert data_keys(client) == [b"other"]
    assert live_claims(sink, client) == 1  # claims released


def test_many_changes_keep_their_order_across_slices(sink: RedisSink, client: Any) -> None:
    changes = [change(CARD, f"o{i}", 10, order(f"o{i}")) for i in range(1234)]
    changes[700] = Change(CARD, "bad", Version(0, "1"), entries(Value("vk:x", 1)))
    sink.apply(changes[:100])
    results = sink.apply(changes)
    assert outcomes(results) == ["stale"] * 100 + ["applied"] * 600 + ["error"] + ["applied"] * 533
    assert client.zcard("customer:c1:orders") == 1233


# ---- rebuild and retention ---------------------------------------------------------------------


def test_sweep_retracts_older_generations_and_leaves_newer_ones(
    sink: RedisSink, client: Any
) -> None:
    sink.apply([change(CARD, x, SEQ, order(x, "c1")) for x in ("kept", "gone", "streamed")])
    sink.apply([change(CARD, "future", 1, order("future", "c1"), gen=2)])
    sink.apply([change(CARD, "dead", SEQ, None)])  # a tombstone: nothing to retract
    # the rebuild (generation 1) rewrites the items that still exist; one arrives by stream
    sink.apply(
        [
            change(CARD, "kept", 0, order("kept", "c1"), gen=1),
            change(CARD, "streamed", SEQ + 1, order("streamed", "c1"), gen=1),
        ]
    )
    assert sink.sweep(CARD, 1, time.time()) == 1
    assert client.zrange("customer:c1:orders", 0, -1) == [b"future", b"kept", b"streamed"]
    assert not client.exists("order:gone") and sink.owned_entries(CARD, "gone") == []
    assert sink.sweep(CARD, 1, time.time()) == 0


def test_purge_removes_old_tombstones_only(client: Any) -> None:
    now = [1_000_000.0]
    sink = any_sink(client, clock=lambda: now[0], tombstone_retention=3600)
    sink.apply(
        [
            change(CARD, "old", 1, order("old")),
            change(CARD, "young", 1, order("young")),
            change(CARD, "alive", 1, order("alive")),
        ]
    )
    sink.apply([change(CARD, "old", 2, None)])
    now[0] += 1000
    sink.apply([change(CARD, "young", 2, None)])
    assert sink.purge_tombstones(CARD, older_than=now[0] - 500) == 1
    assert sink.owned_entries(CARD, "old") is None
    assert sink.owned_entries(CARD, "young") == []
    assert sink.owned_entries(CARD, "alive") is not None
    now[0] += 3600 + 1  # the default: older than the retention
    assert sink.purge_tombstones(CARD) == 1
    assert [r.item_key for r in sink.iter_owner_records(CARD)] == ["alive"]


# ---- the connection ------------------------------------------------------------------------------


def test_noscript_is_recovered_after_script_flush(sink: RedisSink, client: Any) -> None:
    sink.apply([change(CARD, "o1", 1, order("o1"))])
    client.script_flush()
    results = sink.apply([change(CARD, f"o{i}", 2, order(f"o{i}", "c2")) for i in range(120)])
    assert outcomes(results) == ["applied"] * 120
    client.script_flush()
    sink.apply([change(CARD, "o1", 3, None)])
    assert sink.purge_tombstones(CARD, older_than=time.time() + 10) == 1  # its own script too


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_raises_sink_unavailable_without_the_password() -> None:
    port = _closed_port()
    sink = RedisSink.from_url("cache", f"redis://:s3cret-pw@127.0.0.1:{port}/0", retry_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(SinkUnavailable) as caught:
        sink.apply([change(CARD, "o1", 1, order("o1"))])
    assert time.monotonic() - started < 3
    text = "".join(traceback.format_exception(caught.value)) + repr(sink)
    assert f"127.0.0.1:{port}" in str(caught.value) and "'cache'" in str(caught.value)
    assert "s3cret" not in text
    with pytest.raises(SinkUnavailable):
        sink.ping()


def test_wrong_password_is_reported_without_it(redis_url: str) -> None:
    from tests.testbed import RedisServer

    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", "right-pw")
        admin.close()
        url = server.url.replace("redis://", "redis://:wrong-pw@")
        sink = RedisSink.from_url("cache", url, retry_seconds=0.3)
        with pytest.raises(SinkUnavailable) as caught:
            sink.ping()
        assert "authentication" in str(caught.value) and "wrong-pw" not in str(caught.value)
        good = RedisSink.from_url("cache", server.url.replace("redis://", "redis://:right-pw@"))
        good.ping()
        assert outcomes(good.apply([change(CARD, "o1", 1, order("o1"))])) == ["applied"]
        good.close()


def test_a_redis_restart_is_survived(redis_url: str) -> None:
    from tests.testbed import RedisServer

    with RedisServer() as server:
        sink = RedisSink.from_url("cache", server.url, retry_seconds=15)
        sink.prepare([CARD])
        sink.apply([change(CARD, "o1", 1, order("o1"))])
        server.stop()
        box: list[Any] = []
        worker = threading.Thread(
            target=lambda: box.append(sink.apply([change(CARD, "o1", 2, order("o1", "c2"))]))
        )
        worker.start()
        time.sleep(0.5)  # the apply is now retrying against a closed port
        server.start()  # empty: no scripts, no data
        worker.join(20)
        assert outcomes(box[0]) == ["applied"]
        client = redis.Redis.from_url(server.url)
        assert client.zrange("customer:c2:orders", 0, -1) == [b"o1"]
        sink.close()
        client.close()


def test_owner_buckets_cannot_change_under_existing_data(
    real_sink: RedisSink, redis_client: Any
) -> None:
    from viewkeeper.sinks.base import SinkError

    real_sink.apply([change(CARD, "o1", 1, order("o1"))])
    other = RedisSink("cache", redis_client, owner_buckets=16)
    with pytest.raises(SinkError, match="owner_buckets: 4096"):
        other.prepare([CARD])


def test_decode_responses_clients_are_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisSink("cache", redis.Redis.from_url(redis_url, decode_responses=True))


def test_claims_live_where_python_computes_them(real_sink: RedisSink, redis_client: Any) -> None:
    """The script finds a retracted entry's claim by recomputing its bucket: both must agree."""
    real_sink.apply([change(CARD, f"o{i}", 1, order(f"o{i}", f"c{i % 7}")) for i in range(200)])
    claims = sum(redis_client.hlen(k) for k in redis_client.scan_iter(b"vk:c:*"))
    assert claims == 200 * 4
    real_sink.apply([change(CARD, f"o{i}", 2, None) for i in range(200)])
    assert list(redis_client.scan_iter(b"vk:c:*")) == []
    assert data_keys(redis_client) == []


def test_value_bytes_are_the_documented_encoding(real_sink: RedisSink, redis_client: Any) -> None:
    value = {"n": 1, "s": {"b", "a"}}
    real_sink.apply([Change(CARD, "i", Version(0, "1"), entries(Value("k", value)))])
    assert redis_client.get("k") == redis_value(value) == b'{"n":1,"s":["a","b"]}'


@standalone_only
def test_buckets_past_listpack_size_are_read_completely(client: Any) -> None:
    sink = RedisSink("small", client, key_prefix="vk2:", owner_buckets=2)
    sink.apply([change(CARD, f"o{i}", 1, order(f"o{i}")) for i in range(300)])
    if not isinstance(client, fakeredis.FakeRedis):  # fakeredis has no OBJECT
        assert client.object("encoding", "vk2:card:o:0") == b"hashtable"
    assert len(list(sink.iter_owner_records(CARD))) == 300
    sink.apply([change(CARD, f"o{i}", 2, None) for i in range(150)])
    assert sink.sweep(CARD, 1, time.time()) == 150
    assert sink.purge_tombstones(CARD, older_than=time.time() + 10) == 300
    assert sorted(client.scan_iter()) == [b"vk2:meta", b"vk2:views"]


@standalone_only
def test_a_connection_lost_mid_batch_resends_what_got_no_reply(
    sink: RedisSink, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import viewkeeper.sinks.redis.apply as module  # where _apply and _resend look _read up

    real_read, reads = module._read, [0]

    def flaky_read(conn: Any, batch: Any) -> None:
        reads[0] += 1
        if reads[0] == 4:  # two batches were read, more were sent: the connection dies
            raise redis.ConnectionError("connection reset (injected)")
        real_read(conn, batch)

    monkeypatch.setattr(module, "_read", flaky_read)
    results = sink.apply([change(CARD, f"o{i}", 1, order(f"o{i}")) for i in range(400)])
    assert set(outcomes(results)) <= {"applied", "stale"} and reads[0] > 4
    assert outcomes(results)[:100] == ["applied"] * 100  # replies read before the loss
    # the rest: applied by the resend, or stale when the first send landed and only its
    # reply was lost (both mean "the sink holds this version")
    assert client.zcard("customer:c1:orders") == 400


@standalone_only
def test_a_redis_error_inside_one_change_fails_that_change_alone(
    sink: RedisSink, client: Any
) -> None:
    """The batch is one script call; a command that fails inside one change (here: its owner
    record's hash was replaced by a string, outside viewkeeper; nothing the view API builds
    fails, see test_the_script_checks_every_argument_before_its_first_write) must not take
    the changes before or after it in the same call down with it."""
    owner = sink._owner_key(SHORT, b"o7")
    assert all(sink._owner_key(SHORT, b"o%d" % i) != owner for i in range(20) if i != 7)
    client.set(owner, "not a hash")
    results = sink.apply([change(SHORT, f"o{i}", 1, order(f"o{i}")) for i in range(20)])
    got = outcomes(results)
    assert got[7] == "error" and got[:7] + got[8:] == ["applied"] * 19
    assert "Redis rejected the change" in str(results[7].error)
    assert "wrong kind of value" in str(results[7].error).lower()
    assert "o7" in str(results[7].error)
    assert client.exists("session:o6") and client.exists("session:o8")
    assert not client.exists("session:o7") and client.get(owner) == b"not a hash"


# ---- the server refuses writes: failover, OOM (transient: held and retried, never half-done) --


def _entry_exists(client: Any, t: str, key: str, sub: str) -> bool:
    if t == "V":
        return bool(client.exists(key))
    if t == "H":
        return bool(client.hexists(key, sub))
    if t == "S":
        return bool(client.sismember(key, sub))
    return client.zscore(key, sub) is not None


def _assert_consistent(sink: RedisSink, client: Any, view: View) -> None:
    """No change half-applied: each owned entry exists, and each entry that exists is owned."""
    owned: set[tuple[str, str, str]] = set()
    for rec in sink.iter_owner_records(view):
        for t, key, sub in rec.entries:
            owned.add((t, key, sub))
            assert _entry_exists(client, t, key, sub), (rec.item_key, t, key, sub)
    for raw in data_keys(client):
        kind, key = client.type(raw).decode(), raw.decode()
        if kind == "string":
            assert ("V", key, "") in owned, key
            continue
        members = {
            "hash": lambda k: client.hkeys(k),
            "set": lambda k: client.smembers(k),
            "zset": lambda k: client.zrange(k, 0, -1),
        }[kind](raw)
        t = {"hash": "H", "set": "S", "zset": "Z"}[kind]
        for m in members:
            assert (t, key, m.decode()) in owned, (key, m)


def _wait_link_up(client: Any) -> None:
    deadline = time.monotonic() + 20
    while client.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, client.info("replication")
        time.sleep(0.05)


def _moves_and_news() -> list[Change]:
    """A batch that writes first (new items), then retracts (moved, deleted items)."""
    return [
        change(CARD, "new1", 2, order("new1", "c3")),
        change(CARD, "o1", 2, order("o1", "c2", status="paid")),  # moves: retracts c1's
        change(CARD, "o2", 2, None),  # deleted: retracts everything
        change(CARD, "new2", 2, order("new2", "c3")),
        change(CARD, "o3", 2, order("o3", "c2", status="void")),
    ]


@pytest.mark.parametrize("script", ["shebang", "legacy"])
def test_a_read_only_replica_holds_the_batch_writes_nothing_and_applies_it_once_promoted(
    script: str,
) -> None:
    """A failover demoted the sink's server to a replica: every write is refused with
    READONLY. That is the sink's state, not the records': the batch must raise
    SinkUnavailable (checkpoint held, batch retried), not come back as ERROR results that
    the worker would dead-letter while moving the checkpoint past them. 'shebang': Redis
    refuses the call whole; 'legacy': the script ends the call at the first refused write."""
    from tests.testbed import RedisServer

    with RedisServer() as a, RedisServer() as b:
        ca, cb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
        for c in (ca, cb):
            c.config_set("repl-diskless-sync-delay", 0)
        sink = RedisSink.from_url("cache", a.url, retry_seconds=1)
        if script == "legacy":
            sink._use_legacy_script()
        sink.prepare([CARD, COPY, SHORT])
        assert sink._apply_src.startswith(b"#!lua") == (script == "shebang")
        sink.apply([change(CARD, f"o{i}", 1, order(f"o{i}")) for i in range(5)])
        # failover: b takes a's data and becomes the master, a follows it as a replica
        cb.replicaof("127.0.0.1", a.port)
        _wait_link_up(cb)
        cb.replicaof("NO", "ONE")
        ca.replicaof("127.0.0.1", b.port)
        _wait_link_up(ca)
        before, before_b = _snapshot(ca), _snapshot(cb)
        batch = _moves_and_news()
        started = time.monotonic()
        with pytest.raises(SinkUnavailable) as caught:
            sink.apply(batch)
        assert time.monotonic() - started < 5
        assert "READONLY" in str(caught.value) or "read only" in str(caught.value)
        assert _snapshot(ca) == before and _snapshot(cb) == before_b  # nothing written
        ca.replicaof("NO", "ONE")  # promoted back
        assert outcomes(sink.apply(batch)) == ["applied"] * len(batch)
        assert ca.zrange("customer:c2:orders", 0, -1) == [b"o1", b"o3"]
        _assert_consistent(sink, ca, CARD)
        sink.close()
        ca.close()
        cb.close()


@pytest.mark.parametrize("script", ["shebang", "legacy"])
def test_oom_holds_the_batch_and_no_change_is_half_applied(script: str) -> None:
    """Under maxmemory with noeviction, Redis refuses writes: SinkUnavailable, nothing written.
    'shebang': the flagged script is refused whole before it starts. 'legacy' (the variant
    without the shebang, for servers that cannot compile it): Redis refuses the first write
    of the call, and the script aborts the whole call instead of failing that change alone
    (a failed change would be dead-lettered; and once a script has written, Redis lets its
    later writes go past maxmemory)."""
    from tests.testbed import RedisServer

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        sink = RedisSink.from_url("cache", server.url, retry_seconds=1)
        if script == "legacy":
            sink._use_legacy_script()
        sink.prepare([CARD, COPY, SHORT])
        assert sink._apply_src.startswith(b"#!lua") == (script == "shebang")
        sink.apply([change(CARD, f"o{i}", 1, order(f"o{i}")) for i in range(5)])
        client.set("vk:filler", b"f" * 2_000_000)  # inside the prefix: not a view entry
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)
        before = _snapshot(client)
        batch = _moves_and_news()
        with pytest.raises(SinkUnavailable) as caught:
            sink.apply(batch)
        assert "OutOfMemoryError" in str(caught.value) or "OOM" in str(caught.value)
        assert _snapshot(client) == before
        _assert_consistent(sink, client, CARD)
        client.config_set("maxmemory", 0)
        assert outcomes(sink.apply(batch)) == ["applied"] * len(batch)
        _assert_consistent(sink, client, CARD)
        assert sink.owned_entries(CARD, "o2") == []
        sink.close()
        client.close()


@standalone_only
def test_a_server_that_cannot_compile_the_shebang_gets_the_script_without_it(
    client: Any,
) -> None:
    """fakeredis (like Redis < 7) cannot compile ``#!lua``: the sink loads the same script
    without that line, remembers it, and reloads that same variant after a SCRIPT FLUSH."""
    sink = RedisSink("cache", client)
    sink.prepare([CARD])
    fake = isinstance(client, fakeredis.FakeRedis)
    assert sink._apply_src.startswith(b"#!lua") != fake
    assert sink._apply_sha == hashlib.sha1(sink._apply_src).hexdigest().encode()
    assert outcomes(sink.apply([change(CARD, "o1", 1, order("o1"))])) == ["applied"]
    client.script_flush()
    assert outcomes(sink.apply([change(CARD, "o2", 1, order("o2"))])) == ["applied"]
    assert sink._apply_src.startswith(b"#!lua") != fake


# ---- the server's size limits -------------------------------------------------------------------


def test_values_over_the_bulk_limit_are_errors_before_sending_and_the_rest_applies() -> None:
    """An argument over ``proto-max-bulk-len``: Redis answers a protocol error and closes the
    connection, often while the client still sends, which then sees ECONNRESET, takes it
    for a transient failure and retried the page forever. The sink learns the limit at
    prepare and refuses such a change before sending it."""
    from tests.testbed import RedisServer

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("proto-max-bulk-len", "1mb")
        sink = RedisSink.from_url("cache", server.url, retry_seconds=5)
        sink.prepare([CARD])
        big, almost = b"b" * (2 * 2**20), b"a" * (2**20 - 100)
        changes = [
            Change(CARD, f"i{n}", Version(0, "1"), entries(Value(f"v:{n}", f"small {n}")))
            for n in range(200)
        ]
        for n, value in ((50, big), (120, almost), (150, big)):
            changes[n] = Change(CARD, f"i{n}", Version(0, "1"), entries(Value(f"v:{n}", value)))
        started = time.monotonic()
        results = sink.apply(changes)
        took = time.monotonic() - started
        got = outcomes(results)
        assert [n for n, o in enumerate(got) if o != "applied"] == [50, 150], results[50]
        assert took < 2, f"{took:.1f}s"
        for n in (50, 150):
            error = str(results[n].error)
            for words in (
                "view card",
                f"item 'i{n}'",
                f"'v:{n}'",
                "2097152 bytes",
                "proto-max-bulk-len",
                "1048576",
                "raise",
            ):
                assert words in error, error
        assert client.get("v:120") == almost and client.get("v:0") == b"small 0"
        assert not client.exists("v:50") and sink.owned_entries(CARD, "i50") is None
        assert len(data_keys(client)) == 198
        more = [Change(CARD, "i300", Version(0, "1"), entries(Value("v:300", "x")))]
        assert outcomes(sink.apply(more)) == ["applied"]  # the connection is fine
        sink.close()
        client.close()


def test_calls_are_cut_by_bytes_under_the_query_buffer_limit() -> None:
    """A script call stays under ``client-query-buffer-limit``; a change over it alone is an
    ERROR (nothing sent), the others are spread over as many calls as needed."""
    from tests.testbed import RedisServer

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("client-query-buffer-limit", "1mb")
        client.config_set("proto-max-bulk-len", "1mb")
        sink = RedisSink.from_url("cache", server.url, retry_seconds=5)
        sink.prepare([CARD])
        sizes: list[int] = []
        real = sink._command

        def spy(args: list[list[bytes]], stamp: bytes) -> bytes:
            command = real(args, stamp)
            sizes.append(len(command))
            return command

        sink._command = spy  # type: ignore[method-assign]
        part = b"p" * 300_000

        def fat(n: int, parts: int) -> Change:
            es = [HashField(f"h:{n}", f"f{p}", part) for p in range(parts)]
            return Change(CARD, f"i{n}", Version(0, "1"), es)

        changes = [fat(n, 3) for n in range(10)]  # about 900 kB each
        changes.insert(5, fat(99, 4))  # 1.2 MB: over the limit alone
        results = sink.apply(changes)
        assert outcomes(results) == ["applied"] * 5 + ["error"] + ["applied"] * 5
        error = str(results[5].error)
        for words in ("view card", "item 'i99'", "client-query-buffer-limit", "1048576", "raise"):
            assert words in error, error
        assert len(sizes) >= 10 and max(sizes) <= 2**20, sizes
        assert client.hlen("h:3") == 3 and not client.exists("h:99")
        sink.close()
        client.close()


def test_without_config_the_limits_are_redis_defaults() -> None:
    """CONFIG is often disabled (renamed) on managed Redis: 512 MB and 1 GB, Redis' defaults."""
    from tests.testbed import RedisServer

    with RedisServer(extra_args=["--rename-command", "CONFIG", ""]) as server:
        sink = RedisSink.from_url("cache", server.url, retry_seconds=1)
        sink.prepare([CARD])
        assert (sink._max_bulk, sink._max_query) == (512 * 2**20, 2**30)
        assert outcomes(sink.apply([change(CARD, "o1", 1, order("o1"))])) == ["applied"]
        sink.close()
    with RedisServer(extra_args=["--proto-max-bulk-len", "2mb"]) as server:
        sink = RedisSink.from_url("cache", server.url, retry_seconds=1)
        sink.prepare([CARD])
        assert (sink._max_bulk, sink._max_query) == (2 * 2**20, 2**30)
        sink.close()


def test_an_evicting_maxmemory_policy_is_warned_about(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.testbed import RedisServer

    with RedisServer(extra_args=["--maxmemory-policy", "allkeys-lru"]) as server:
        sink = RedisSink.from_url("cache", server.url, retry_seconds=1)
        with caplog.at_level("WARNING", "viewkeeper.sinks.redis"):
            sink.prepare([CARD])
        assert "allkeys-lru may evict owner records" in caplog.text
        sink.close()


@standalone_only
def test_a_claim_whose_write_counter_goes_back_is_lost_and_two_writers_never_look_so(
    client: Any,
) -> None:
    """F4: each call increments its views' claim counter; a call that finds it below what
    the sink saw writes nothing, erases the claim's marker and raises NamespaceLost. Two
    sinks (processes) sharing the counter, and a claim written again under the same marker
    (a rebuild's announce), never look like a rollback."""
    owner = Owner("arn:t", "coord", "dep")
    a, b = RedisSink("cache", client, retry_seconds=1), RedisSink("cache", client, retry_seconds=1)
    a.write_claim(CARD, Claim(owner, "m1"))
    for s in (a, b):
        s.prepare([CARD])
        s.expect(CARD, "m1")
    for seq in range(1, 6):  # interleaved writers of one view
        for s in (a, b):
            assert outcomes(s.apply([change(CARD, f"o{seq}", seq, order(f"o{seq}"))])) != ["error"]
    a.write_claim(CARD, Claim(owner, "m1", generation=3))  # announce: same marker
    assert outcomes(a.apply([change(CARD, "o9", 9, order("o9"))])) == ["applied"]
    assert outcomes(b.apply([change(CARD, "o9", 9, order("o9"))])) == ["stale"]

    client.hset("vk:card:ns", "n", 2)  # an older snapshot of the claim
    with pytest.raises(NamespaceLost) as lost:
        a.apply([change(CARD, "o10", 10, order("o10"))])
    assert lost.value.views == ["card"] and "back in time" in str(lost.value)
    assert client.get("order:o10") is None
    assert a.read_claim(CARD) is None  # erased: every process sees the namespace lost
    with pytest.raises(NamespaceLost):
        b.apply([change(CARD, "o10", 10, order("o10"))])
    a.write_claim(CARD, Claim(owner, "m2"))  # re-armed: the check starts again
    for s in (a, b):
        s.expect(CARD, "m2")
        assert outcomes(s.apply([change(CARD, "o10", 10, order("o10"))])) != ["error"]
    assert client.hget("vk:card:ns", "lost") is None
    for s in (a, b):
        s.close()


@standalone_only
def test_a_claim_key_overwritten_with_another_type_is_a_lost_claim(client: Any) -> None:
    owner = Owner("arn:t", "coord", "dep")
    sink = RedisSink("cache", client, retry_seconds=1)
    sink.write_claim(CARD, Claim(owner, "m1"))
    sink.prepare([CARD])
    sink.expect(CARD, "m1")
    client.set("vk:card:ns", "not a hash")
    with pytest.raises(NamespaceLost):
        sink.apply([change(CARD, "o1", 1, order("o1"))])
    assert sink.read_claim(CARD) is None
    sink.write_claim(CARD, Claim(owner, "m2"))
    sink.expect(CARD, "m2")
    assert outcomes(sink.apply([change(CARD, "o1", 1, order("o1"))])) == ["applied"]
    sink.close()


def test_claim_buckets_follow_the_documented_hash(redis_client: redis.Redis) -> None:
    """README "Key layout": the claim of an identity is in bucket int(identity, big-endian) %
    2147483629 % owner_buckets, whatever the identity's length (the script hashes two bytes
    per step: the same number)."""

    @redis_view(table="orders", redis="cache", name="bucketed")
    def bucketed(item: dict[str, Any]) -> Iterator[Entry]:
        yield Value(item["k"], "1")

    view = view_for(bucketed)
    sink = RedisSink("cache", redis_client, owner_buckets=97)
    sink.prepare([view])
    keys = ["a", "ab", "abc", "order:o-00000001", "x" * 300, "é☃"]
    sink.apply([Change(view, k, Version(0, "1"), [Value(k, "1")]) for k in keys])
    for k in keys:
        ident = b"V" + k.encode()
        bucket = int.from_bytes(ident, "big") % 2147483629 % 97
        assert redis_client.hexists(b"vk:c:%d" % bucket, ident), k
