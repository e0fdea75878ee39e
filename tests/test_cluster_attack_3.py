"""Third attack round on the Redis Cluster sink (viewkeeper/sinks/redis_cluster/README.md):
the fixes of the second round (step E's group check in cluster_slot.lua: ``resolve`` for keys
of another type, ``check_counter`` with its replaced / gone / noput cases, the Value-over-
counter 'last contributor' rule; the sweep's counter repair, step S) attacked with the other
entry types (HashField / SortedSetMember against hash-field and sorted-set counters at one
place), counters moving between Redis types at one key, two items at one key, the same
item's changes in one slot call or in different processes, step S racing the stream, and the
wipe of a view with counters.

Techniques and helpers are those of tests/test_cluster_attack.py and
tests/test_cluster_attack_2.py: a sink held before a step (``Held``), a sink killed before a
step, several sinks (each its own client: a process of its own) on one cluster; the
standalone sink (the real redis-server) as the reference where the guarantee is "as on
standalone". Every test asserts the exact end state. Tests marked HOLE fail: a broken
guarantee. Tests marked HELD pass: scenarios the sink survived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from tests.test_cluster_attack import Crash, Held, crash_before, data, outcomes
from tests.test_cluster_attack_2 import OTHER, VIEW, S, book, ch, records, scan
from viewkeeper import (
    Counter,
    HashField,
    SetMember,
    SortedSetCounter,
    SortedSetMember,
    Value,
)
from viewkeeper.sinks.base import Outcome
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.sinks.redis_cluster import RedisClusterSink

pytestmark = pytest.mark.redis_cluster


@pytest.fixture
def cluster(redis_cluster_client: RedisCluster) -> RedisCluster:
    return redis_cluster_client


@pytest.fixture
def sinks(redis_cluster_url: str, cluster: RedisCluster) -> Iterator[Callable[[], Any]]:
    """New sinks (processes), each on its own client; each prepares both views."""
    made: list[RedisClusterSink] = []

    def new() -> RedisClusterSink:
        s = RedisClusterSink.from_url("cache", redis_cluster_url, retry_seconds=3)
        s.prepare([VIEW, OTHER])
        made.append(s)
        return s

    yield new
    for s in made:
        s.close()


def standalone_data(client: redis.Redis) -> dict[bytes, Any]:
    """``data`` for the standalone sink's redis-server."""
    out: dict[bytes, Any] = {}
    for key in client.scan_iter():
        if key.startswith(b"vk:"):
            continue
        kind = client.type(key).decode()
        if kind == "string":
            out[key] = (kind, client.get(key))
        elif kind == "hash":
            out[key] = (kind, client.hgetall(key))
        elif kind == "set":
            out[key] = (kind, client.smembers(key))
        else:
            out[key] = (kind, dict(client.zrange(key, 0, -1, withscores=True)))
    return out


def Z(member: str, score: float) -> tuple[str, dict[bytes, float]]:
    return ("zset", {member.encode(): score})


def H(fields: dict[str, str | int]) -> tuple[str, dict[bytes, bytes]]:
    return ("hash", {f.encode(): str(v).encode() for f, v in fields.items()})


# ---- holes: a counter moving to another Redis type at its key -----------------------------

# (old counter, new entry, the key's content after the new one, its place in the book)
_MOVES = [
    pytest.param(Counter("k:1", 5), SortedSetCounter("k:1", "m", 4), Z("m", 4.0), "Z", id="v-z"),
    pytest.param(Counter("k:1", 5), Counter("k:1", 4, field="f"), H({"f": 4}), "H", id="v-h"),
    pytest.param(Counter("k:1", 5, field="f"), Counter("k:1", 4), S(4), "V", id="h-v"),
    pytest.param(SortedSetCounter("k:1", "m", 5), Counter("k:1", 4), S(4), "V", id="z-v"),
]


# HOLE (fixed): a counter moving to another Redis type at its key (its only contributor) is refused
# Item i alone counts at k (a string Counter, say); its next change counts at k as a
# SortedSetCounter (or a hash-field Counter): the key must change type. Standalone applies it
# (a counter this item alone contributed to and no longer does vanishes: the read of the new
# one's place on the old type is fine). On the cluster, check_counter of the new counter finds
# the key of another type and asks resolve(), which refuses any key holding a counter's claim
# ('type: string'), though the same group retracts i's old counter, its last contribution:
# the newest, valid record is dead-lettered (I5) and the key keeps the old sum forever (I1).
@pytest.mark.parametrize(("old", "new", "want", "t"), _MOVES)
def test_a_counter_moving_to_another_type_at_its_key_is_refused(
    sinks: Callable[[], Any],
    cluster: RedisCluster,
    redis_client: redis.Redis,
    old: Any,
    new: Any,
    want: Any,
    t: str,
) -> None:
    # the reference: standalone applies both
    ref = RedisSink("cache", redis_client, retry_seconds=2)
    ref.prepare([VIEW, OTHER])
    assert outcomes(ref.apply([ch("i", 1, old)])) == ["applied"]
    assert outcomes(ref.apply([ch("i", 2, new)])) == ["applied"]
    assert standalone_data(redis_client) == {b"k:1": want}
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, old)])) == ["applied"]
    [r] = sink.apply([ch("i", 2, new)])
    assert (r.outcome, r.error) == (Outcome.APPLIED, None)
    assert data(cluster) == {b"k:1": want}
    place = (t, "k:1", {"V": "", "H": "f", "Z": "m"}[t])
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {place: 1},
        "shares": {place: {"i": 4}},
    }
    assert sink.pending_count(VIEW) == 0


# HOLE (fixed): a counter turning into an entry of another type at its key (sole contributor)
# The same with a plain entry: i alone counts at k (a string Counter) and its next change
# writes HashField(k, f) (or a hash-field counter becomes a Value, a sorted-set counter a
# HashField). The group retracts i's counter, its last contribution, but the new entry's
# check sends the key of another type to resolve(), which refuses a counter's claim: the
# newest record is dead-lettered and k keeps the old sum (I1, I5). Standalone refuses it too
# (its `vanishes` ignores retracted counters): the guarantee is broken on both sinks.
@pytest.mark.parametrize(
    ("old", "new", "want", "place"),
    [
        pytest.param(
            Counter("k:2", 5),
            HashField("k:2", "f", "x"),
            H({"f": "x"}),
            ("H", "k:2", "f"),
            id="v-H",
        ),
        pytest.param(
            Counter("k:2", 5, field="f"), Value("k:2", "x"), S("x"), ("V", "k:2", ""), id="h-V"
        ),
        pytest.param(
            SortedSetCounter("k:2", "m", 5),
            SetMember("k:2", "m"),
            ("set", {b"m"}),
            ("S", "k:2", "m"),
            id="z-S",
        ),
    ],
)
def test_a_counter_turning_into_an_entry_of_another_type_at_its_key_is_refused(
    sinks: Callable[[], Any], cluster: RedisCluster, old: Any, new: Any, want: Any, place: Any
) -> None:
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, old)])) == ["applied"]
    [r] = sink.apply([ch("i", 2, new)])
    assert (r.outcome, r.error) == (Outcome.APPLIED, None)
    assert data(cluster) == {b"k:2": want}
    assert book(sink, cluster) == {"entries": {place: "i"}, "counters": {}, "shares": {}}
    assert sink.pending_count(VIEW) == 0


# ---- held: an entry and a counter of one item at one place, every entry type --------------

# (plain entry, its counter at the same place, the place in the book, the key's content)
_PAIRS = [
    pytest.param(
        lambda v: Value("k:3", v), lambda n: Counter("k:3", n), ("V", "k:3", ""), S, id="value"
    ),
    pytest.param(
        lambda v: HashField("k:3", "f", v),
        lambda n: Counter("k:3", n, field="f"),
        ("H", "k:3", "f"),
        lambda x: H({"f": x}),
        id="hashfield",
    ),
    pytest.param(
        lambda v: SortedSetMember("k:3", "m", float(len(v))),
        lambda n: SortedSetCounter("k:3", "m", n),
        ("Z", "k:3", "m"),
        lambda x: Z("m", float(x) if isinstance(x, int) else float(len(x))),
        id="zmember",
    ),
]


@pytest.mark.parametrize(("plain", "counter", "place", "shown"), _PAIRS)
def test_older_counter_and_newer_entry_in_one_slot_call_either_order(
    sinks: Callable[[], Any],
    cluster: RedisCluster,
    plain: Any,
    counter: Any,
    place: Any,
    shown: Any,
) -> None:
    # HELD (I2): i's entry (v1), its counter at the same place (v2), the entry again (v3):
    # v2 and v3 in one batch (one slot call, both read record v1 at O) in either order, then
    # both again: the place holds v3's entry, no counter left.
    for order in ((2, 3), (3, 2)):
        cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
        sink = sinks()
        assert outcomes(sink.apply([ch("i", 1, plain("a"))])) == ["applied"]
        batch = {2: ch("i", 2, counter(5)), 3: ch("i", 3, plain("bbb"))}
        got = outcomes(sink.apply([batch[o] for o in order]))
        assert got == (["applied", "applied"] if order == (2, 3) else ["applied", "stale"])
        assert outcomes(sink.apply([batch[2], batch[3]])) == ["stale", "stale"]
        assert data(cluster) == {b"k:3": shown("bbb")}, order
        assert book(sink, cluster) == {"entries": {place: "i"}, "counters": {}, "shares": {}}
        assert records(sink, VIEW, "i") == {"i": [place]}
        assert sink.pending_count(VIEW) == 0


@pytest.mark.parametrize(("plain", "counter", "place", "shown"), _PAIRS)
def test_older_entry_and_newer_counter_in_one_slot_call_either_order(
    sinks: Callable[[], Any],
    cluster: RedisCluster,
    plain: Any,
    counter: Any,
    place: Any,
    shown: Any,
) -> None:
    # HELD (I2): i's counter (v1), its entry at the same place (v2), the counter again with
    # another amount (v3), v2 and v3 in one batch in either order: the counter holds 7 once.
    for order in ((2, 3), (3, 2)):
        cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
        sink = sinks()
        assert outcomes(sink.apply([ch("i", 1, counter(5))])) == ["applied"]
        batch = {2: ch("i", 2, plain("x")), 3: ch("i", 3, counter(7))}
        got = outcomes(sink.apply([batch[o] for o in order]))
        assert got == (["applied", "applied"] if order == (2, 3) else ["applied", "stale"])
        assert data(cluster) == {b"k:3": shown(7)}, order
        assert book(sink, cluster) == {
            "entries": {},
            "counters": {place: 1},
            "shares": {place: {"i": 7}},
        }
        assert records(sink, VIEW, "i") == {"i": [(place[0].lower(), *place[1:])]}
        assert sink.pending_count(VIEW) == 0


@pytest.mark.parametrize(("plain", "counter", "place", "shown"), _PAIRS)
def test_slow_older_counter_or_entry_held_while_the_newer_one_runs(
    sinks: Callable[[], Any],
    cluster: RedisCluster,
    plain: Any,
    counter: Any,
    place: Any,
    shown: Any,
) -> None:
    # HELD (I2, I4): a process behind holds i's older change after O (the counter, or the
    # entry), another applies the newer one (the entry, or the counter) whole; the held one
    # goes on: stale, nothing of it left.
    for counter_first in (True, False):
        cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
        fast, slow = sinks(), sinks()
        base = plain("a") if counter_first else counter(5)
        older = counter(6) if counter_first else plain("x")
        newer = plain("bbb") if counter_first else counter(7)
        assert outcomes(fast.apply([ch("i", 1, base)])) == ["applied"]
        held = Held(slow, "_step_e", [ch("i", 2, older)])
        assert outcomes(fast.apply([ch("i", 3, newer)])) == ["applied"]
        assert held.finish() == ["stale"]
        if counter_first:
            assert data(cluster) == {b"k:3": shown("bbb")}
            assert book(fast, cluster) == {"entries": {place: "i"}, "counters": {}, "shares": {}}
        else:
            assert data(cluster) == {b"k:3": shown(7)}
            assert book(fast, cluster) == {
                "entries": {},
                "counters": {place: 1},
                "shares": {place: {"i": 7}},
            }
        assert fast.pending_count(VIEW) == 0


# ---- step S (the sweep's counter repair) beside the stream --------------------------------


def _racing_s(monkeypatch: pytest.MonkeyPatch, rebuild: Any, then: Callable[[], None]) -> None:
    """``then()`` runs once, just before the rebuild's first step S call is sent (after the
    sweep read the counters and their contributions)."""
    original = rebuild._run
    fired: list[int] = []

    def racing(calls: Any, *a: Any, **kw: Any) -> Any:
        if not fired and calls and calls[0][1][0] == b"S":
            fired.append(1)
            then()
        return original(calls, *a, **kw)

    monkeypatch.setattr(rebuild, "_run", racing)


# HOLE (fixed): a tampered counter not repaired by the rebuild once the stream touches it
# A counter k (A 3 + B 4) is set to 100 outside viewkeeper; a rebuild (generation 1) reads
# A and B, then its sweep lists k's contributions for step S. Before S runs, the stream
# applies A's next change (amount 5, generation 1): the live sum becomes 100 + 5 - 3 = 102.
# Step S finds A's contribution changed since it was read and leaves k alone ('s': "changed
# meanwhile"): after the rebuild k holds 102, not 9, and nothing repairs it until a later
# rebuild happens to run while nobody touches k. A hot counter (the one most likely to be
# tampered with) is never repaired. Standalone's rebuild sets it from sums kept beside the
# stream's changes (begin_rebuild / finalize): 9.
def test_step_s_skips_a_tampered_counter_the_stream_touched_meanwhile(
    sinks: Callable[[], Any], cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, rebuild = sinks(), sinks()
    assert outcomes(stream.apply([ch("A", 1, Counter("k:4", 3)), ch("B", 1, Counter("k:4", 4))]))
    cluster.set("k:4", 100)  # changed outside viewkeeper
    assert outcomes(
        rebuild.apply([scan("A", 1, Counter("k:4", 3)), scan("B", 1, Counter("k:4", 4))])
    )

    def stream_goes_on() -> None:
        assert outcomes(stream.apply([ch("A", 5, Counter("k:4", 5), gen=1)])) == ["applied"]

    _racing_s(monkeypatch, rebuild, stream_goes_on)
    rebuild.sweep(VIEW, 1, 0.0)
    assert book(rebuild, cluster) == {
        "entries": {},
        "counters": {("V", "k:4", ""): 2},
        "shares": {("V", "k:4", ""): {"A": 5, "B": 4}},
    }
    assert data(cluster) == {b"k:4": S(9)}


def test_step_s_racing_a_contributor_leaving_and_another_joining(
    sinks: Callable[[], Any], cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HELD (I1, I6): no tampering; between the sweep's read and step S one contributor
    # leaves and another joins (the count is unchanged, the set of contributors is not): S
    # must not write the sum it read (A + B); the counter holds B + C.
    stream, rebuild = sinks(), sinks()
    assert outcomes(stream.apply([ch("A", 1, Counter("k:5", 3)), ch("B", 1, Counter("k:5", 4))]))
    assert outcomes(
        rebuild.apply([scan("A", 1, Counter("k:5", 3)), scan("B", 1, Counter("k:5", 4))])
    )

    def stream_goes_on() -> None:
        got = stream.apply([ch("A", 5, gen=1), ch("C", 5, Counter("k:5", 20), gen=1)])
        assert outcomes(got) == ["applied"] * 2

    _racing_s(monkeypatch, rebuild, stream_goes_on)
    rebuild.sweep(VIEW, 1, 0.0)
    assert data(cluster) == {b"k:5": S(24)}
    assert book(rebuild, cluster) == {
        "entries": {},
        "counters": {("V", "k:5", ""): 2},
        "shares": {("V", "k:5", ""): {"B": 4, "C": 20}},
    }
    assert records(rebuild, VIEW, "A", "B", "C") == {
        "A": [],
        "B": [("v", "k:5", "")],
        "C": [("v", "k:5", "")],
    }


def test_step_s_repairs_tampered_counters_of_every_type_and_leaves_other_data(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: counters of the three types, tampered (changed, deleted) outside viewkeeper, in
    # a hash and a sorted set that also hold another view's entries: the sweep sets each to
    # its contributions' sum and touches nothing else.
    sink = sinks()
    mine = [Counter("k:6", 2), Counter("h:6", 3, field="n"), SortedSetCounter("z:6", "m", 4)]
    assert outcomes(sink.apply([ch("A", 1, *mine), ch("B", 1, *mine)]))
    theirs = [HashField("h:6", "o", "x"), SortedSetMember("z:6", "o", 1.5)]
    assert outcomes(sink.apply([ch("X", 1, *theirs, view=OTHER)])) == ["applied"]
    cluster.set("k:6", 77)
    cluster.hdel("h:6", "n")
    cluster.zadd("z:6", {"m": -1})
    assert outcomes(sink.apply([scan("A", 1, *mine), scan("B", 1, *mine)]))
    sink.sweep(VIEW, 1, 0.0)
    assert data(cluster) == {
        b"k:6": S(4),
        b"h:6": H({"n": 6, "o": "x"}),
        b"z:6": ("zset", {b"m": 8.0, b"o": 1.5}),
    }


# ---- the wipe of a view with counters ------------------------------------------------------


def test_wipe_of_a_view_with_counters_leaves_only_the_other_views_data(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: a view with counters of every type (in keys the other view also writes), plain
    # entries, a stray contribution (a change dead after E: no record), a pending note (a
    # change dead after O) and a tombstone is wiped: every key, claim, contribution, mark,
    # record and pending list of it is gone; the other view's entries and counters stay.
    sink = sinks()
    mine = [
        Counter("k:7", 2),
        Counter("h:7", 3, field="n"),
        SortedSetCounter("z:7", "m", 4),
        HashField("h:7", "f", "mine"),
        Value("v:7", "mine"),
    ]
    assert outcomes(sink.apply([ch("A", 1, *mine), ch("B", 1, Counter("k:7", 5))]))
    assert outcomes(sink.apply([ch("C", 1, Value("c:7", "x")), ch("C", 2)]))
    theirs = [
        HashField("h:7", "o", "theirs"),
        SortedSetMember("z:7", "o", 1.5),
        Counter("h:7", 9, field="p"),
        Counter("t:7", 1),
    ]
    assert outcomes(sink.apply([ch("X", 1, *theirs, view=OTHER)])) == ["applied"]
    dying = sinks()
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("S", 1, Counter("k:7", 100), SortedSetCounter("z:7", "m", 1))])
    dying2 = sinks()
    crash_before(dying2, "_step_e")
    with pytest.raises(Crash):
        dying2.apply([ch("P", 1, Counter("p:7", 1))])
    before_other = book(sink, cluster, OTHER)
    sink.wipe(VIEW)
    assert data(cluster) == {
        b"h:7": H({"o": "theirs", "p": 9}),
        b"z:7": ("zset", {b"o": 1.5}),
        b"t:7": S(1),
    }
    assert list(sink.iter_claims(VIEW)) == []
    assert list(sink.iter_owner_records(VIEW)) == []
    assert sink.pending_count(VIEW) == 0
    assert book(sink, cluster, OTHER) == before_other
    vid = sink._view_id(VIEW.name)
    left = [
        (k, f)
        for node in cluster.get_primaries()
        for k in cluster.scan_iter(match="vk:*", target_nodes=node)
        if cluster.type(k) == b"hash" and k != b"vk:views"  # the registry of view ids
        for f in cluster.hkeys(k)
        if f.startswith(b"#" + vid) or vid + b":" in f
    ]
    assert left == []


# ---- held: two items at one key --------------------------------------------------------------


def test_clear_path_never_deletes_a_key_holding_another_items_counter_or_entry(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I1, I5): A's HashField and B's hash-field counter share hash k; A's change to a
    # Value at k (its own field retracted in the same group) is refused with nothing written,
    # B's counter and C's field kept; the same with C's plain field instead; once B and C
    # leave, A's dead letter replayed applies and k is A's string.
    sink = sinks()
    got = sink.apply(
        [
            ch("A", 1, HashField("k:8", "a", "x")),
            ch("B", 1, Counter("k:8", 3, field="b")),
            ch("C", 1, HashField("k:8", "c", "y")),
        ]
    )
    assert outcomes(got) == ["applied"] * 3
    [r] = sink.apply([ch("A", 2, Value("k:8", "new"))])
    assert r.outcome is Outcome.ERROR and "holds a hash" in str(r.error)
    assert data(cluster) == {b"k:8": H({"a": "x", "b": 3, "c": "y"})}
    assert outcomes(sink.apply([ch("B", 2)])) == ["applied"]
    [r] = sink.apply([ch("A", 2, Value("k:8", "new"))])
    assert r.outcome is Outcome.ERROR and "holds a hash" in str(r.error)
    assert data(cluster) == {b"k:8": H({"a": "x", "c": "y"})}
    assert outcomes(sink.apply([ch("C", 2)])) == ["applied"]
    assert outcomes(sink.apply([ch("A", 2, Value("k:8", "new"))])) == ["applied"]
    assert data(cluster) == {b"k:8": S("new")}
    assert book(sink, cluster) == {"entries": {("V", "k:8", ""): "A"}, "counters": {}, "shares": {}}
    assert sink.pending_count(VIEW) == 0


def test_entry_replaced_by_a_counter_then_another_item_counts_then_the_old_entry_replays(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I2, I4): i's HashField at h f (v1); its change to a counter at h f (v2) dies
    # after E (the counter took the field's place); j counts there too; v2 is sent again
    # (counted once), then v1 again (stale, its field not written back over the sum).
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, HashField("k:9", "f", "old"))])) == ["applied"]
    dying = sinks()
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("i", 2, Counter("k:9", 5, field="f"))])
    assert outcomes(sink.apply([ch("j", 1, Counter("k:9", 2, field="f"))])) == ["applied"]
    again = sinks()
    assert outcomes(again.apply([ch("i", 2, Counter("k:9", 5, field="f"))])) == ["applied"]
    got = again.apply(
        [ch("i", 1, HashField("k:9", "f", "old")), ch("i", 2, Counter("k:9", 5, field="f"))]
    )
    assert outcomes(got) == ["stale", "stale"]
    assert data(cluster) == {b"k:9": H({"f": 7})}
    place = ("H", "k:9", "f")
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {place: 2},
        "shares": {place: {"i": 5, "j": 2}},
    }
    assert records(sink, VIEW, "i") == {"i": [("h", "k:9", "f")]}
    assert sink.pending_count(VIEW) == 0
