"""Second attack round on the Redis Cluster sink (viewkeeper/sinks/redis_cluster/README.md):
counters (Counter, SortedSetCounter) under crashes between steps and replays, counters and
entries of an item switching at one key, the sweep beside the stream, refusals mid-batch, and
change-log views on the cluster (replays, a lost stream slot, concurrent sinks).

Techniques and helpers are those of tests/test_cluster_attack.py: a sink held before a step
(``Held``), a sink killed before a step or after some of its E calls, several sinks (each its
own client: a process of its own) on one cluster. Every test asserts the exact end state:
data keys and values, every counter's claim (its contributor count) and each item's
contribution, live entry claims, owner records, pending lists. Tests marked HOLE fail: a
broken guarantee. Tests marked HELD pass: scenarios the sink survived.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis.cluster import RedisCluster

from tests.helpers import view_for
from tests.test_cluster_attack import Crash, Held, crash_before, crash_in_e_after, data, outcomes
from viewkeeper import (
    Counter,
    HashField,
    SetMember,
    SortedSetCounter,
    StreamChange,
    Value,
    changelog_view,
    redis_view,
)
from viewkeeper.projection.api import View, view_of
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Append, Change, Claim, NamespaceLost, Outcome, Owner, SinkError
from viewkeeper.sinks.redis.packing import _text
from viewkeeper.sinks.redis_cluster import RedisClusterSink
from viewkeeper.sinks.redis_cluster.apply import _version_end
from viewkeeper.sinks.redis_cluster.maintenance import _place_of

pytestmark = pytest.mark.redis_cluster


@redis_view(table="orders", redis="cache", name="atk2_stats")
def stats(item: dict[str, Any]) -> Iterator[Entry]:
    """Unused as a function: the tests give each change's entries by hand."""
    yield Counter(f"n:{item['status']}")


@redis_view(table="orders", redis="cache", name="atk2_other")
def other(item: dict[str, Any]) -> Iterator[Entry]:
    """A second view (its counters on the first view's keys: a view bug)."""
    yield Counter(f"n:{item['status']}")


VIEW, OTHER = view_for(stats), view_for(other)
SEQ = 10**20
TOP = 2**63 - 1


def ch(item: str, seq: int, *entries: Entry, gen: int = 0, view: View = VIEW) -> Change:
    """A change of ``item`` at (gen, SEQ + seq) owning ``entries`` (none: deleted)."""
    return Change(view, item, Version(gen, str(SEQ + seq)), list(entries))


def scan(item: str, gen: int, *entries: Entry) -> Change:
    """A rebuild's scan write of ``item``: at (gen, 0)."""
    return Change(VIEW, item, Version(gen, "0"), list(entries))


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


# ---- the end state ------------------------------------------------------------------------


def book(sink: Any, cluster: RedisCluster, view: View = VIEW) -> dict[str, Any]:
    """The view's bookkeeping: entry claims {(t, key, sub): item}, counter claims
    {(t, key, sub): contributors}, contributions {(t, key, sub): {item: amount}}."""
    entries: dict[tuple[str, str, str], str] = {}
    counters: dict[tuple[str, str, str], int] = {}
    shares: dict[tuple[str, str, str], dict[str, int]] = {}
    for c in sink.iter_claims(view):
        t, key, sub = _place_of(c.identity)
        place = (t, _text(key), _text(sub))
        raw = cluster.hget(sink._claims_key(sink._slot(key)), c.field)
        if c.kind == "claim":
            entries[place] = c.item_key
        elif c.kind == "counter":
            counters[place] = int(raw.split(b"#")[2])  # "#<vid>#<n>#<sum>"
        elif c.kind == "contribution":
            shares.setdefault(place, {})[c.item_key] = int(raw[_version_end(raw) :])
    return {"entries": entries, "counters": counters, "shares": shares}


def records(sink: Any, view: View, *items: str) -> dict[str, list[tuple[str, str, str]] | None]:
    out: dict[str, list[tuple[str, str, str]] | None] = {}
    for item in items:
        got = sink.owned_entries(view, item)
        out[item] = None if got is None else sorted(got)
    return out


def S(value: str | int) -> tuple[str, bytes]:
    return ("string", str(value).encode())


# ---- holes: a counter and an entry of one item at one key ---------------------------------


# HOLE (fixed): an older Counter of the item writes over its newer Value at the key, then deletes it
# Item i: a Value at k (v1), a Counter at k (v2), a Value at k again (v3). v3 and then v2 (its
# replay: any order) in one batch: both pass O on record v1; E writes v3's Value, then v2's
# counter check sees the Value claimed by i and i's retraction of it in the group, and takes
# that as "replaced" without asking whether the retraction will remove (the claim is at v3,
# above v2: it will not); the counter's sum is SET over the Value. v2 loses at F; its
# clean-up retracts the counter at v3 and DELs the key: the Value v3's record lists is gone.
def test_older_counter_in_a_batch_writes_over_the_items_newer_value_and_deletes_it(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, Value("k:1", "a"))])) == ["applied"]
    got = outcomes(sink.apply([ch("i", 3, Value("k:1", "b")), ch("i", 2, Counter("k:1", 5))]))
    assert got == ["applied", "stale"]
    assert data(cluster) == {b"k:1": S("b")}
    assert book(sink, cluster) == {"entries": {("V", "k:1", ""): "i"}, "counters": {}, "shares": {}}
    assert records(sink, VIEW, "i") == {"i": [("V", "k:1", "")]}
    assert sink.pending_count(VIEW) == 0


# HOLE (fixed): the same across processes: a slow holder's older Counter replaces the newer Value
# The older change (a Counter at k) of a process that is behind (a lease moved) passes O
# and is held; the newer change (a Value at k again) runs whole in another process; the held
# one's E SETs its sum over the Value and its clean-up deletes the key (I1, I2).
def test_older_counter_of_a_slow_process_replaces_the_items_newer_value(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    fast, slow = sinks(), sinks()
    assert outcomes(fast.apply([ch("i", 1, Value("k:2", "a"))])) == ["applied"]
    held = Held(slow, "_step_e", [ch("i", 2, Counter("k:2", 5))])
    assert outcomes(fast.apply([ch("i", 3, Value("k:2", "b"))])) == ["applied"]
    assert held.finish() == ["stale"]
    assert data(cluster) == {b"k:2": S("b")}
    assert book(fast, cluster) == {"entries": {("V", "k:2", ""): "i"}, "counters": {}, "shares": {}}
    assert records(fast, VIEW, "i") == {"i": [("V", "k:2", "")]}
    assert fast.pending_count(VIEW) == 0


# HOLE (fixed): an older Value of the item writes over its newer Counter, the counter is lost
# Item i: a Counter at k (v1), a Value at k (v2), the Counter again with another amount (v3).
# v3 then v2 in one batch: v2's group retracts the counter at v2 (skipped: i's contribution
# is at v3) and writes the Value; its check takes the counter as "this item's last" because
# the group retracts it, without asking whether that retraction removes anything; the Value
# is SET over the sum and its claim replaces the counter's. v2 loses at F and its clean-up
# DELs the key: v3's record lists the counter at 7, the key is gone, i's contribution stays
# without a counter claim. It lasts: i's next change (7 again) beside j's 2 leaves the key at
# 2 claimed by 1 contributor (i's 7 never counted again), and i's later delete DELs the key
# while j still counts.
def test_older_value_in_a_batch_writes_over_the_items_newer_counter(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, Counter("k:3", 5))])) == ["applied"]
    got = outcomes(sink.apply([ch("i", 3, Counter("k:3", 7)), ch("i", 2, Value("k:3", "x"))]))
    assert got == ["applied", "stale"]
    assert data(cluster) == {b"k:3": S(7)}
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {("V", "k:3", ""): 1},
        "shares": {("V", "k:3", ""): {"i": 7}},
    }
    assert records(sink, VIEW, "i") == {"i": [("v", "k:3", "")]}
    assert sink.pending_count(VIEW) == 0


# HOLE (fixed): an item's entry turning into a Counter of another Redis type at its key is refused
# Standalone applies it (a key of another type is fine when the change retracts all it
# holds). On the cluster, the counter's check reads the key's current sum (GET / ZSCORE) on
# the item's own older hash or set before anything is retracted, and refuses the change as a
# type conflict: a valid, newest record is dead-lettered and the key keeps the old entry.
@pytest.mark.parametrize(
    ("old", "new", "want", "book_want"),
    [
        (
            HashField("k:4", "f", "x"),
            Counter("k:4", 3),
            S(3),
            ("V", "k:4", ""),
        ),
        (
            SetMember("k:4", "m"),
            SortedSetCounter("k:4", "m", 4),
            ("zset", {b"m": 4.0}),
            ("Z", "k:4", "m"),
        ),
    ],
)
def test_an_items_entry_turning_into_a_counter_of_another_type_at_its_key(
    sinks: Callable[[], Any],
    cluster: RedisCluster,
    old: Entry,
    new: Any,
    want: Any,
    book_want: tuple[str, str, str],
) -> None:
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, old)])) == ["applied"]
    [r] = sink.apply([ch("i", 2, new)])
    assert (r.outcome, r.error) == (Outcome.APPLIED, None)
    assert data(cluster) == {b"k:4": want}
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {book_want: 1},
        "shares": {book_want: {"i": new.amount}},
    }
    assert sink.pending_count(VIEW) == 0


# HOLE (fixed): retracting a contribution from a counter whose key now holds another type is refused
# Standalone applies the change (a counter whose place holds another type now only counts its
# contributors). On the cluster the retraction's check reads the sum (GET on a hash) and
# fails the whole change as "writes a string Counter there" though it writes nothing: every
# later change of every contributor of that counter is dead-lettered, deletes included.
def test_a_delete_retracting_from_a_counter_replaced_by_a_hash_is_refused(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    sink = sinks()
    got = sink.apply(
        [ch("a", 1, Counter("k:5", 3), Value("v:a", "a")), ch("b", 1, Counter("k:5", 2))]
    )
    assert outcomes(got) == ["applied", "applied"]
    cluster.delete("k:5")
    cluster.hset("k:5", "f", "outside")  # replaced outside viewkeeper
    [r] = sink.apply([ch("a", 2)])
    assert (r.outcome, r.error) == (Outcome.APPLIED, None)
    assert data(cluster) == {b"k:5": ("hash", {b"f": b"outside"})}
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {("V", "k:5", ""): 1},
        "shares": {("V", "k:5", ""): {"b": 2}},
    }


# HOLE (fixed): a stale older write at a key that became another item's counter is dead-lettered
# A's older change (a Value at k) is held after O by a slow process; A leaves k (v2), then B
# counts at k. The held write is stale (A retracted k at v2: its mark is there), but E checks
# for a counter's claim before staleness and refuses the change as a type/claim conflict:
# the stale record is an ERROR (dead-lettered) instead of STALE (I5 counts it wrong).
def test_a_held_stale_value_at_a_key_now_another_items_counter_is_stale_not_an_error(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    slow, fast = sinks(), sinks()
    held = Held(slow, "_step_e", [ch("A", 1, Value("k:6", "A"))])
    assert outcomes(fast.apply([ch("A", 2)])) == ["applied"]
    assert outcomes(fast.apply([ch("B", 1, Counter("k:6", 4))])) == ["applied"]
    got = held.finish()
    assert data(cluster) == {b"k:6": S(4)}  # the state is right ...
    assert book(fast, cluster) == {
        "entries": {},
        "counters": {("V", "k:6", ""): 1},
        "shares": {("V", "k:6", ""): {"B": 4}},
    }
    assert records(fast, VIEW, "A", "B") == {"A": [], "B": [("v", "k:6", "")]}
    assert fast.pending_count(VIEW) == 0
    assert got == ["stale"]  # ... but the stale record was an ERROR (a dead letter)


# HOLE (fixed): an item's stale pending counter note lets its Value overwrite another item's counter
# X's create (a Counter at k) dies after O: its pending list notes k. Y is then k's only
# contributor. X's next change writes a Value at k: its group retracts X's counter at k (X
# has no contribution: skipped) and the Value's check takes the counter as "this item's
# last" because the claim counts 1 and the group retracts it, never asking whose that one
# contribution is. The Value is SET over Y's sum and replaces the counter's claim (reported
# as a collision with "view ##1#1"); standalone refuses X's change. Y's 4 is lost, its
# contribution orphaned, and every later change of Y (its delete too) is refused.
def test_a_dead_pending_counter_note_lets_a_value_overwrite_another_items_counter(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    dying, sink = sinks(), sinks()
    crash_before(dying, "_step_e")
    with pytest.raises(Crash):
        dying.apply([ch("X", 1, Counter("k:12", 5))])
    assert outcomes(sink.apply([ch("Y", 1, Counter("k:12", 4))])) == ["applied"]
    [r] = sink.apply([ch("X", 2, Value("k:12", "x"))])
    assert r.outcome is Outcome.ERROR and "already written" in str(r.error)  # as standalone
    assert data(cluster) == {b"k:12": S(4)}
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {("V", "k:12", ""): 1},
        "shares": {("V", "k:12", ""): {"Y": 4}},
    }
    assert outcomes(sink.apply([ch("Y", 2)])) == ["applied"]


# HOLE (fixed): the sweep's retraction of a stray contribution is refused and the sweep says nothing
# _retract_claims runs step E and never reads its works' errors: a retraction the script
# refuses (here: the sum without the stray would overflow) is counted as retracted, logged as
# done, and the stray contribution stays counted (I5: nothing silent; _retract_all raises
# SinkError for the same refusal of a record's entries).
def test_sweep_ignores_a_refused_retraction_of_a_stray_contribution(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    dying, sink = sinks(), sinks()
    crash_before(dying, "_step_f")  # X's create died after E: a stray -1, no record
    with pytest.raises(Crash):
        dying.apply([ch("X", 1, Counter("k:7", -1))])
    assert outcomes(sink.apply([ch("A", 1, Counter("k:7", TOP)), ch("B", 1, Counter("k:7", 1))]))
    assert data(cluster) == {b"k:7": S(TOP)}
    # the rebuild (generation 1) reads A and B; X is not in the table
    assert outcomes(
        sink.apply([scan("A", 1, Counter("k:7", TOP)), scan("B", 1, Counter("k:7", 1))])
    )
    with pytest.raises(SinkError):
        sink.sweep(VIEW, 1, 0.0)


# ---- held: counters under crashes and replays ---------------------------------------------

# counters on every master: the keys' slots spread over the three
SPREAD = ["c:{a}", "c:{b}", "c:{c}", "c:{d}", "c:{e}", "c:{f}"]


def by_master(cluster: RedisCluster, n: int) -> list[str]:
    """n keys of SPREAD, on n different masters."""
    seen: dict[str, str] = {}
    # SPREAD first; more keys where earlier tests left slots unevenly spread (migrations)
    for k in [*SPREAD, *(f"c:{{k{i}}}" for i in range(500))]:
        seen.setdefault(cluster.get_node_from_key(k).name, k)
    assert len(seen) >= n
    return list(seen.values())[:n]


def test_crash_between_a_counters_e_and_f_then_a_newer_move_then_the_replay(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I2, I4): i counts 5 at A (master 1); its change to B (master 2, 7) dies after E
    # (A retracted, B counted, no record); another process moves i to C (master 3, 9); the
    # dead change is sent again (stale): A, B, C hold i once, at C; another item j keeps A.
    a, b, c = by_master(cluster, 3)
    first, dying, second = sinks(), sinks(), sinks()
    assert outcomes(first.apply([ch("i", 1, Counter(a, 5)), ch("j", 1, Counter(a, 1))]))
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("i", 2, Counter(b, 7), Value("i:v", "2"))])
    assert data(cluster) == {a.encode(): S(1), b.encode(): S(7), b"i:v": S(2)}
    assert outcomes(second.apply([ch("i", 3, Counter(c, 9))])) == ["applied"]
    assert outcomes(sinks().apply([ch("i", 2, Counter(b, 7), Value("i:v", "2"))])) == ["stale"]
    assert data(cluster) == {a.encode(): S(1), c.encode(): S(9)}
    assert book(second, cluster) == {
        "entries": {},
        "counters": {("V", a, ""): 1, ("V", c, ""): 1},
        "shares": {("V", a, ""): {"j": 1}, ("V", c, ""): {"i": 9}},
    }
    assert records(second, VIEW, "i", "j") == {"i": [("v", c, "")], "j": [("v", a, "")]}
    assert second.pending_count(VIEW) == 0


def test_newer_move_read_before_a_dying_change_noted_its_counter_then_the_replay(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I4): the newer change (to C) passes O first and is held; the older change (to B)
    # runs O and E and dies; the newer one completes (its pending list did not hold B, so B
    # keeps the dead change's 7 and its note); the dead change's replay is stale and takes it
    # back: B absent, C 9.
    a, b, c = by_master(cluster, 3)
    newer, dying = sinks(), sinks()
    assert outcomes(newer.apply([ch("i", 1, Counter(a, 5))])) == ["applied"]
    held = Held(newer, "_step_e", [ch("i", 3, Counter(c, 9))])
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("i", 2, Counter(b, 7))])
    assert held.finish() == ["applied"]
    assert data(cluster) == {b.encode(): S(7), c.encode(): S(9)}
    assert newer.pending_count(VIEW) == 1
    assert outcomes(sinks().apply([ch("i", 2, Counter(b, 7))])) == ["stale"]
    assert data(cluster) == {c.encode(): S(9)}
    assert book(newer, cluster) == {
        "entries": {},
        "counters": {("V", c, ""): 1},
        "shares": {("V", c, ""): {"i": 9}},
    }
    assert newer.pending_count(VIEW) == 0


def test_crash_mid_e_of_a_move_across_masters_replayed_by_another_process(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I2, I4): a change moving i's counters and value across all masters dies after
    # each possible number of its E calls; the replay (another process) counts each once.
    keys = by_master(cluster, 3)
    for calls in range(4):
        cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
        first = sinks()
        old = [Counter(keys[0], 5), SortedSetCounter(keys[1] + ":z", "m", 2), Value("w", "1")]
        assert outcomes(first.apply([ch("i", 1, *old), ch("j", 1, Counter(keys[0], 1))]))
        new = [Counter(keys[2], 8), SortedSetCounter(keys[1] + ":z", "m", 3), Value("w", "2")]
        dying = sinks()
        crash_in_e_after(dying, calls)
        with pytest.raises(Crash):
            dying.apply([ch("i", 2, *new)])
        replay = sinks()
        assert outcomes(replay.apply([ch("i", 2, *new)])) == ["applied"]
        assert outcomes(replay.apply([ch("i", 2, *new), ch("i", 1, *old)])) == ["stale"] * 2
        assert data(cluster) == {
            keys[0].encode(): S(1),
            keys[2].encode(): S(8),
            (keys[1] + ":z").encode(): ("zset", {b"m": 3.0}),
            b"w": S(2),
        }, calls
        assert book(replay, cluster) == {
            "entries": {("V", "w", ""): "i"},
            "counters": {
                ("V", keys[0], ""): 1,
                ("V", keys[2], ""): 1,
                ("Z", keys[1] + ":z", "m"): 1,
            },
            "shares": {
                ("V", keys[0], ""): {"j": 1},
                ("V", keys[2], ""): {"i": 8},
                ("Z", keys[1] + ":z", "m"): {"i": 3},
            },
        }, calls
        assert replay.pending_count(VIEW) == 0


def test_amount_changed_at_the_same_version_after_a_crash_after_e(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I2): the view's code changed between a crash after E (amount 5 counted at v) and
    # the replay at v (amount 9): the counter holds 9 once; a second replay with 5 after F is
    # stale and keeps 9; the record lists the counter.
    dying = sinks()
    assert outcomes(dying.apply([ch("j", 1, Counter("k:8", 100))]))
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("i", 1, Counter("k:8", 5))])
    assert data(cluster) == {b"k:8": S(105)}
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, Counter("k:8", 9))])) == ["applied"]
    assert outcomes(sink.apply([ch("i", 1, Counter("k:8", 5))])) == ["stale"]
    assert data(cluster) == {b"k:8": S(109)}
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {("V", "k:8", ""): 2},
        "shares": {("V", "k:8", ""): {"i": 9, "j": 100}},
    }
    assert sink.pending_count(VIEW) == 0


@pytest.mark.parametrize("first_value", [True, False])
def test_value_or_counter_at_one_key_changed_by_the_view_between_a_crash_and_the_replay(
    sinks: Callable[[], Any], cluster: RedisCluster, first_value: bool
) -> None:
    # HELD (I2): the first attempt at v (a Value at k, or a Counter) dies after E; the view's
    # code changed, the replay at v yields the other one at k: the key holds the replay's,
    # claimed once, nothing of the first attempt left.
    value, counter = Value("k:13", "v"), Counter("k:13", 6)
    first, then = (value, counter) if first_value else (counter, value)
    assert outcomes(sinks().apply([ch("j", 1, Counter("k:14", 1))]))
    dying = sinks()
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("i", 1, first)])
    sink = sinks()
    assert outcomes(sink.apply([ch("i", 1, then)])) == ["applied"]
    assert data(cluster) == {b"k:13": S("v" if then is value else 6), b"k:14": S(1)}
    assert book(sink, cluster) == {
        "entries": {("V", "k:13", ""): "i"} if then is value else {},
        "counters": {("V", "k:14", ""): 1} | ({} if then is value else {("V", "k:13", ""): 1}),
        "shares": {("V", "k:14", ""): {"j": 1}}
        | ({} if then is value else {("V", "k:13", ""): {"i": 6}}),
    }
    assert sink.pending_count(VIEW) == 0


def test_value_counter_value_at_one_key_replayed_in_order_with_crashes(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: each change of Value -> Counter -> Value -> Counter at one key, sent in order
    # (separate batches), each dying once before F and sent again by a new process, then
    # every record sent again: the key ends as the last counter, counted once.
    history = [
        ch("i", 1, Value("k:9", "a")),
        ch("i", 2, Counter("k:9", 5)),
        ch("i", 3, Value("k:9", "b")),
        ch("i", 4, Counter("k:9", 7)),
    ]
    assert outcomes(sinks().apply([ch("j", 1, Value("other", "j"))]))
    for c in history:
        dying = sinks()
        crash_before(dying, "_step_f")
        with pytest.raises(Crash):
            dying.apply([c])
        assert outcomes(sinks().apply([c])) == ["applied"]
    last = sinks()
    assert outcomes(last.apply(history)) == ["stale"] * 4
    assert data(cluster) == {b"k:9": S(7), b"other": S("j")}
    assert book(last, cluster) == {
        "entries": {("V", "other", ""): "j"},
        "counters": {("V", "k:9", ""): 1},
        "shares": {("V", "k:9", ""): {"i": 7}},
    }
    assert last.pending_count(VIEW) == 0


def test_two_views_counting_at_one_key_concurrently(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: two views' counters at one key (a view bug): whichever comes second is refused
    # per change, the first view's sum and contributors untouched, even with the second's
    # change held after O while the first counts; the first view's retraction releases it.
    one, two = sinks(), sinks()
    held = Held(two, "_step_e", [ch("x", 1, Counter("k:10", 50), view=OTHER)])
    assert outcomes(one.apply([ch("a", 1, Counter("k:10", 3)), ch("b", 1, Counter("k:10", 4))]))
    assert held.finish() == ["error"]
    [r] = two.apply([ch("x", 2, Counter("k:10", 50), view=OTHER)])
    assert r.outcome is Outcome.ERROR and "atk2_stats" in str(r.error)
    assert data(cluster) == {b"k:10": S(7)}
    assert book(one, cluster)["counters"] == {("V", "k:10", ""): 2}
    assert book(two, cluster, OTHER) == {"entries": {}, "counters": {}, "shares": {}}
    assert outcomes(one.apply([ch("a", 2), ch("b", 2)])) == ["applied"] * 2
    assert outcomes(two.apply([ch("x", 3, Counter("k:10", 50), view=OTHER)])) == ["applied"]
    assert data(cluster) == {b"k:10": S(50)}


def test_overflow_mid_batch_leaves_the_other_changes_and_no_counter_off(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I5): a batch where the middle change overflows one counter after moving off
    # another (in another slot): the others apply; the refused change is an ERROR; its
    # dead letter replayed once the sum fits again counts it exactly once.
    a, b = by_master(cluster, 2)
    sink = sinks()
    assert outcomes(sink.apply([ch("big", 1, Counter(b, TOP)), ch("i", 1, Counter(a, 5))]))
    got = sink.apply(
        [ch("j", 1, Counter(a, 2)), ch("i", 2, Counter(b, 1)), ch("k", 1, Counter(a, 3))]
    )
    assert [r.outcome for r in got] == [Outcome.APPLIED, Outcome.ERROR, Outcome.APPLIED]
    assert "outside" in str(got[1].error)
    # the refused change left its other slot's write: a retracted from i (documented)
    assert outcomes(sink.apply([ch("big", 2, Counter(b, 10))])) == ["applied"]
    assert outcomes(sink.apply([ch("i", 2, Counter(b, 1))])) == ["applied"]  # the replay
    assert outcomes(sink.apply([ch("i", 2, Counter(b, 1))])) == ["stale"]
    assert data(cluster) == {a.encode(): S(5), b.encode(): S(11)}
    assert book(sink, cluster) == {
        "entries": {},
        "counters": {("V", a, ""): 2, ("V", b, ""): 2},
        "shares": {("V", a, ""): {"j": 2, "k": 3}, ("V", b, ""): {"big": 10, "i": 1}},
    }
    assert sink.pending_count(VIEW) == 0


def test_sweep_retracting_contributions_while_the_stream_counts(
    sinks: Callable[[], Any], cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HELD (I6): a stray contribution (a change dead after E) and a record the rebuild did
    # not see; the sweep reads them, then the stream (generation 1) re-creates both items on
    # the same counter, then the sweep retracts what it read at (1, 0): the stream's newer
    # contributions stay, counted once.
    stream, rebuild = sinks(), sinks()
    assert outcomes(stream.apply([ch("gone", 1, Counter("k:11", 10))]))
    dying = sinks()
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("stray", 1, Counter("k:11", 100))])
    assert outcomes(rebuild.apply([scan("kept", 1, Counter("k:11", 1))]))
    original = rebuild._retract_claims

    def racing(view: Any, claims: list[Any], at: Version, now: float) -> None:
        assert sorted(c.item_key for c in claims) == ["stray"]
        back = [
            ch("stray", 5, Counter("k:11", 1000), gen=1),
            ch("gone", 5, Counter("k:11", 7), gen=1),
        ]
        assert outcomes(stream.apply(back)) == ["applied"] * 2
        original(view, claims, at, now)

    monkeypatch.setattr(rebuild, "_retract_claims", racing)
    original_all = rebuild._retract_all

    def racing_all(what: str, changes: list[Change], now: float) -> int:
        assert [c.item_key for c in changes] == ["gone"]
        return original_all(what, changes, now)

    monkeypatch.setattr(rebuild, "_retract_all", racing_all)
    rebuild.sweep(VIEW, 1, 0.0)
    assert outcomes(sinks().apply([ch("stray", 1, Counter("k:11", 100))])) == ["stale"]
    assert data(cluster) == {b"k:11": S(1008)}
    assert book(rebuild, cluster) == {
        "entries": {},
        "counters": {("V", "k:11", ""): 3},
        "shares": {("V", "k:11", ""): {"gone": 7, "kept": 1, "stray": 1000}},
    }
    assert rebuild.pending_count(VIEW) == 0


# ---- change-log views on the cluster ------------------------------------------------------


def _log_view(stream: str = "atk2:events") -> View:
    @changelog_view(table="orders", redis="cache", stream=stream, maxlen=10000)
    def atk2_events(change: StreamChange) -> dict[str, Any] | None:
        return {"seq": change.sequence}

    view = view_of(atk2_events)
    assert view is not None
    return view


def app(view: View, shard: str, seq: int) -> Append:
    return Append(view, shard, str(seq), f"k{seq}", {"seq": str(seq)}, 0.0)


def seqs(cluster: RedisCluster, stream: str = "atk2:events") -> list[int]:
    return [int(f[b"seq"]) for _, f in cluster.xrange(stream)]


def test_changelog_lost_stream_slot_is_namespace_lost_and_appends_nothing(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: flush only the master holding the stream's slot (its marker, high-water marks,
    # stream): the next append raises NamespaceLost, appends nothing, erases the claim's
    # marker; a table view whose slots are on the other masters keeps its data.
    view = _log_view()
    sink = sinks()
    sink.prepare([view])
    sink.write_claim(view, Claim(Owner("arn:t", "coord", "d1"), "m1"))
    sink.expect(view, "m1")
    assert [r.outcome for r in sink.append([app(view, "s1", 1), app(view, "s1", 2)])] == [
        Outcome.APPLIED
    ] * 2
    node = cluster.get_node_from_key("atk2:events")
    elsewhere = next(k for k in SPREAD if cluster.get_node_from_key(k).name != node.name)
    assert outcomes(sink.apply([ch("i", 1, Counter(elsewhere, 3))])) == ["applied"]
    cluster.flushall(target_nodes=node)
    with pytest.raises(NamespaceLost) as lost:
        sink.append([app(view, "s1", 3)])
    assert lost.value.views == [view.name]
    assert cluster.exists("atk2:events") == 0
    assert sink.read_claim(view) is None  # the marker erased: every process sees it
    assert cluster.get(elsewhere) == b"3"
    # a process re-arms (new marker) and appends again from its checkpoint: once each
    sink.write_claim(view, Claim(Owner("arn:t", "coord", "d1"), "m2"))
    sink.expect(view, "m2")
    again = sink.append([app(view, "s1", 2), app(view, "s1", 3), app(view, "s1", 3)])
    assert [r.outcome for r in again] == [Outcome.APPLIED, Outcome.APPLIED, Outcome.STALE]
    assert seqs(cluster) == [2, 3]


def test_changelog_two_sinks_appending_one_shard_concurrently_append_each_once(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: two processes on one shard (a lease moved; the old holder is still reading), both
    # from the same checkpoint, in pages, in threads; a third replays dead letters (no shard):
    # each record once, the shard's in order.
    view = _log_view()
    one, two, three = sinks(), sinks(), sinks()
    for s in (one, two, three):
        s.prepare([view])
        s.write_claim(view, Claim(Owner("arn:t", "coord", "d1"), "m1"))
        s.expect(view, "m1")
    records_ = list(range(100, 400, 3))
    errors: list[BaseException] = []

    def reader(sink: Any, start: int) -> None:
        try:
            for i in range(start, len(records_), 4):
                sink.append([app(view, "s1", q) for q in records_[i : i + 4]])
        except BaseException as exc:
            errors.append(exc)

    def replayer() -> None:
        try:
            for q in (1001, 1002, 1001, 1003):
                three.append([app(view, "", q)])
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=reader, args=(one, 0)),
        threading.Thread(target=reader, args=(two, 0)),
        threading.Thread(target=replayer),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # the old holder's remainder and a re-read after a crash: all stale
    assert {r.outcome for r in one.append([app(view, "s1", q) for q in records_])} == {
        Outcome.STALE
    }
    got = seqs(cluster)
    assert sorted(got) == sorted([*records_, 1001, 1002, 1003])
    assert [q for q in got if q < 1000] == records_
