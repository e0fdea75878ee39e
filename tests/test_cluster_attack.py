"""Attacks on the Redis Cluster sink's apply protocol (viewkeeper/sinks/redis_cluster/README.md,
"The protocol"): steps O, E, F, P of concurrent processes interleaved by hand, crashes between
steps, replays, rebuild scan writes and the sweep, on the real Redis Cluster.

Every test asserts the exact end state: each data key and its value, the live claims (and
whose), the owner records, and that no pending list is left. Tests marked HOLE fail: they show
a broken guarantee (I1 convergence, I3 no resurrection, I6 rebuild). Tests marked HELD pass:
scenarios the sink survived, kept for coverage tests/test_sink_redis.py does not have.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from redis.cluster import RedisCluster

from tests.helpers import view_for
from viewkeeper import HashField, SetMember, SortedSetMember, Value, redis_view
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Result
from viewkeeper.sinks.encoding import redis_value
from viewkeeper.sinks.redis.packing import _text
from viewkeeper.sinks.redis_cluster import RedisClusterSink
from viewkeeper.sinks.redis_cluster.maintenance import _place_of

pytestmark = pytest.mark.redis_cluster


@redis_view(table="things", redis="cache")
def things(item: dict[str, Any]) -> Iterator[Entry]:
    """Unused as a function: the tests give each change's entries by hand (the view's
    entries as the item's image at that version would project them)."""
    yield Value(f"thing:{item['id']}", item)


VIEW = view_for(things)
SEQ = 10**20


def ch(item: str, seq: int, *entries: Entry, gen: int = 0) -> Change:
    """A change of ``item`` at (gen, SEQ + seq) owning ``entries`` (none: deleted)."""
    return Change(VIEW, item, Version(gen, str(SEQ + seq)), list(entries))


def scan(item: str, gen: int, *entries: Entry) -> Change:
    """A rebuild's scan write of ``item``: at (gen, 0)."""
    return Change(VIEW, item, Version(gen, "0"), list(entries))


class Crash(Exception):
    """The process was killed here (kill -9 between two script calls)."""


@pytest.fixture
def cluster(redis_cluster_client: RedisCluster) -> RedisCluster:
    return redis_cluster_client


@pytest.fixture
def sinks(redis_cluster_url: str, cluster: RedisCluster) -> Iterator[Callable[[], Any]]:
    """New sinks (processes), each on its own client; the first one prepares the view."""
    made: list[RedisClusterSink] = []

    def new() -> RedisClusterSink:
        s = RedisClusterSink.from_url("cache", redis_cluster_url, retry_seconds=3)
        s.prepare([VIEW])
        made.append(s)
        return s

    yield new
    for s in made:
        s.close()


# ---- driving the steps --------------------------------------------------------------------


class Held:
    """``sink.apply(changes)`` in a thread, held just before its first call of ``step``
    (``_step_e``, ``_step_f``): ``wait()`` until it is there, ``release()`` to go on,
    ``finish()`` for its results."""

    def __init__(self, sink: Any, step: str, changes: Sequence[Change]) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.results: list[Result] | None = None
        self.error: BaseException | None = None
        original = getattr(sink, step)

        def held(*args: Any, **kw: Any) -> Any:
            if not self.reached.is_set():
                self.reached.set()
                assert self.go.wait(20), "never released"
            return original(*args, **kw)

        setattr(sink, step, held)
        self.thread = threading.Thread(target=self._main, args=(sink, changes), daemon=True)
        self.thread.start()
        assert self.reached.wait(20), f"{step} never reached"

    def _main(self, sink: Any, changes: Sequence[Change]) -> None:
        try:
            self.results = sink.apply(changes)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def release(self) -> None:
        self.go.set()

    def finish(self) -> list[str]:
        self.release()
        self.thread.join(20)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        assert self.results is not None
        return [r.outcome.value for r in self.results]


def crash_before(sink: Any, step: str) -> None:
    """The process dies the first time it reaches ``step`` (its earlier steps are done)."""
    original = getattr(sink, step)
    fired = []

    def dying(*args: Any, **kw: Any) -> Any:
        if not fired:
            fired.append(1)
            raise Crash(step)
        return original(*args, **kw)

    setattr(sink, step, dying)


def crash_in_e_after(sink: Any, calls: int) -> None:
    """The process dies in step E once ``calls`` of its one-slot script calls answered."""
    original = sink._run

    def dying(batch: Sequence[Any]) -> list[Any]:
        if batch and batch[0][1][0] == b"E":
            original(list(batch)[:calls])
            raise Crash("E")
        return original(batch)

    sink._run = dying


def outcomes(results: list[Result]) -> list[str]:
    return [r.outcome.value for r in results]


# ---- the end state ------------------------------------------------------------------------


def data(client: RedisCluster) -> dict[bytes, Any]:
    """Every key outside viewkeeper's prefix, with its type and content."""
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


def projection(final: dict[str, list[Entry]]) -> dict[bytes, Any]:
    """The keys the items' newest entries make."""
    out: dict[bytes, Any] = {}
    for entries in final.values():
        for e in entries:
            key = e.key.encode()  # type: ignore[union-attr]
            if isinstance(e, Value):
                out[key] = ("string", redis_value(e.value))
            elif isinstance(e, HashField):
                out.setdefault(key, ("hash", {}))[1][e.field.encode()] = redis_value(e.value)
            elif isinstance(e, SetMember):
                out.setdefault(key, ("set", set()))[1].add(str(e.member).encode())
            elif isinstance(e, SortedSetMember):
                out.setdefault(key, ("zset", {}))[1][str(e.member).encode()] = float(e.score)
    return out


def live_claims(sink: Any) -> dict[tuple[str, str, str], str]:
    """identity -> item of every live entry claim of the view."""
    out = {}
    for c in sink.iter_claims(VIEW):
        if c.live:
            t, key, sub = _place_of(c.identity)
            out[(t, _text(key), _text(sub))] = c.item_key
    return out


def assert_converged(client: RedisCluster, sink: Any, final: dict[str, list[Entry]]) -> None:
    """The sink holds exactly the projection of each item's newest entries (I1)."""
    assert data(client) == projection(final)
    want = {e.ident: item for item, entries in final.items() for e in entries}
    assert live_claims(sink) == want
    for item, entries in final.items():
        assert sorted(sink.owned_entries(VIEW, item) or []) == sorted(e.ident for e in entries)
    assert sink.pending_count(VIEW) == 0


# ---- holes ---------------------------------------------------------------------------------


# HOLE (fixed): an older Value in a batch SETs over the item's newer hash, then its clean-up DELs it
# E's type check counts a retraction that will not remove (the claim is newer), so an
# older Value's SET replaces the item's newer hash, and the older change's clean-up DELs it.
def test_older_value_in_the_same_batch_replaces_the_newer_hash_of_its_key(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    sink = sinks()
    newer = HashField("k:1", "f", "new")
    older = Value("k:1", "old")
    # I2: any order. The newer change first, the older one (its replay) after, in one batch.
    got = outcomes(sink.apply([ch("i", 2, newer), ch("i", 1, older)]))
    assert got == ["applied", "stale"]
    assert_converged(cluster, sink, {"i": [newer]})


# HOLE (fixed): a slow process's older Value SETs over the newer hash of the key, then DELs it
# The same across two processes (a lease moved: the old holder is behind): the newer
# change (a hash field at the key) passes O, then the older one (a Value there) passes O and
# reads the newer one's note; the newer one completes; the older one's E counts the newer,
# live claim as retracted (its retraction at the older version is a no-op), SETs over the
# hash, loses at F and its clean-up DELs the key (I1, I2).
def test_older_value_of_a_slow_process_replaces_the_newer_hash_of_its_key(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    new_holder, old_holder = sinks(), sinks()
    new = HashField("k:2", "f", "new")
    n = Held(new_holder, "_step_e", [ch("i", 5, new)])  # O done: the field noted at 5
    o = Held(old_holder, "_step_e", [ch("i", 4, Value("k:2", "old"))])  # O read that note
    assert n.finish() == ["applied"]
    assert o.finish() == ["stale"]
    assert_converged(cluster, new_holder, {"i": [new]})


# HOLE (fixed): a replay at the same version with other entries leaves the first attempt's entry
# A crash after E, then the same record sent again while the view yields other entries
# (the view's code changed between the two): the replay's retraction at v skips the claim the
# first attempt wrote at v, so the entry stays live, claimed, and pending, though no record
# lists it (I1).
def test_replay_with_other_entries_at_the_same_version_leaves_the_first_attempts_entry(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    first, second = sinks(), sinks()
    keep, drop = Value("k:keep", "a"), Value("k:drop", "b")
    crash_before(first, "_step_f")
    with pytest.raises(Crash):
        first.apply([ch("i", 1, keep, drop)])
    assert outcomes(second.apply([ch("i", 1, keep)])) == ["applied"]
    assert_converged(cluster, second, {"i": [keep]})


# HOLE (fixed): a held older write of a key's previous owner destroys the new owner's entry
# A key handed from one item to another (A no longer yields it, B does): A's older
# change, held by a slow process after its step O, writes over B's live claim (A's own
# tombstone there was replaced by B's claim, so nothing marks the write stale), then loses at F
# and its clean-up deletes the key: B's entry is gone, though B's record lists it (I1, I3).
def test_held_older_write_of_the_previous_owner_deletes_the_new_owners_entry(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    slow, fast = sinks(), sinks()
    a_old = Value("seat:1", "A")
    held = Held(slow, "_step_e", [ch("A", 1, a_old)])  # O noted seat:1 for A at 1
    assert outcomes(fast.apply([ch("A", 2)])) == ["applied"]  # A leaves the seat
    b = Value("seat:1", "B")
    assert outcomes(fast.apply([ch("B", 1, b)])) == ["applied"]  # B takes it
    held.finish()
    assert_converged(cluster, fast, {"A": [], "B": [b]})


# HOLE (fixed): a held rebuild scan write destroys the entry the stream handed to another item
# The same during a rebuild: the scan read A while A held the seat; the stream (after the
# handshake, generation G) moves the seat to B while the scan's write sits between O and E;
# the scan's write then lands over B's claim and its clean-up deletes the seat; the sweep
# leaves it gone (I6).
def test_rebuild_scan_write_of_the_previous_owner_deletes_the_streams_new_owner(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    stream, rebuild = sinks(), sinks()
    a = Value("seat:2", "A")
    assert outcomes(stream.apply([ch("A", 1, a)])) == ["applied"]
    held = Held(rebuild, "_step_e", [scan("A", 1, a)])
    assert outcomes(stream.apply([ch("A", 2, gen=1)])) == ["applied"]
    b = Value("seat:2", "B")
    assert outcomes(stream.apply([ch("B", 3, b, gen=1)])) == ["applied"]
    assert held.finish() == ["stale"]
    rebuild.sweep(VIEW, 1, 0.0)
    assert_converged(cluster, rebuild, {"A": [], "B": [b]})


# HOLE (fixed): the newest record is dead-lettered and the sink keeps the older one's hash
# The mirror race ends in a dead letter for the NEWEST record, the sink showing the older
# one: the newer change (a Value at the key) passes O; the older one (a hash field there, from
# a slow process) passes O, reads that note, retracts the Value at its older version and
# completes (HSET, owner record at the older version); the newer change's E finds a hash it
# never heard of at its key and refuses the whole change as a type conflict: ERROR. The
# standalone sink (and this one in any sequential order) applies the newer one and calls the
# older one stale; here the end state is the older record's and the newer record is
# dead-lettered though nothing is wrong with it (I2: any order = the newest record once).
def test_newer_value_is_refused_after_an_older_hash_field_got_in_first(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    new_holder, old_holder = sinks(), sinks()
    new = Value("k:3", "new")
    n = Held(new_holder, "_step_e", [ch("i", 5, new)])
    assert outcomes(old_holder.apply([ch("i", 4, HashField("k:3", "f", "old"))])) == ["applied"]
    got = n.finish()
    assert_converged(cluster, new_holder, {"i": [new]})
    assert got == ["applied"]


# ---- held ----------------------------------------------------------------------------------

# Keys whose slot is their hash tag, keys with braces that are no tag, plain keys: spread so
# that an item's entries sit on every master.
BRACED = ["{user:1}:cart", "a}b{c", "{}x", "p{q}r", "x{}{y}", "plain:1", "plain:2", "plain:3"]


def test_braced_keys_on_every_master_converge_after_a_crash_mid_e_and_a_newer_change(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: a change over 8 keys on all three masters dies after 2 of its E calls; another
    # process applies a newer change (other members, other keys); the dead one's records are
    # sent again (stale now) and everything converges, braces or not.
    nodes = {cluster.get_node_from_key(k).name for k in BRACED}
    assert len(nodes) == 3, nodes
    first, second = sinks(), sinks()
    v1 = [SetMember(k, "m1") for k in BRACED[:5]] + [Value(k, "one") for k in BRACED[5:]]
    crash_in_e_after(first, 2)
    with pytest.raises(Crash):
        first.apply([ch("i", 1, *v1)])
    assert first.pending_count(VIEW) == 1
    v2 = [SetMember(k, "m2") for k in BRACED[2:]] + [HashField("h:" + BRACED[0], "f", "two")]
    assert outcomes(second.apply([ch("i", 2, *v2)])) == ["applied"]
    replay = sinks()
    assert outcomes(replay.apply([ch("i", 1, *v1)])) == ["stale"]
    assert_converged(cluster, replay, {"i": v2})
    # each claim sits in its key's own slot
    for c in replay.iter_claims(VIEW):
        key = _place_of(c.identity)[1]
        assert cluster.hexists(replay._claims_key(replay._slot(key)), c.field)


def test_key_changing_type_in_one_batch_and_replays_in_every_order(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD: one key is a Value, then a hash field, then a sorted-set member of one item, in one
    # batch in order; then each older record sent again alone, in every order, by new
    # processes: all stale, the key stays the newest type and value.
    sink = sinks()
    history = [
        ch("i", 1, Value("t:1", "v")),
        ch("i", 2, HashField("t:1", "f", "h")),
        ch("i", 3, SortedSetMember("t:1", "m", 3)),
    ]
    assert outcomes(sink.apply(history)) == ["applied"] * 3
    for order in itertools.permutations(history[:2]):
        again = sinks()
        for c in order:
            assert outcomes(again.apply([c])) == ["stale"]
    assert_converged(cluster, sink, {"i": list(history[2].entries)})


def test_sweep_leaves_a_stray_the_stream_wrote_again_after_the_sweep_read_it(
    sinks: Callable[[], Any], cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HELD (I6): a change died after E, leaving a stray under a tombstone record; the rebuild
    # (generation 1) does not see the item; the sweep reads the stray's claim, then the stream
    # (generation 1) re-creates the item writing that key again, then the sweep retracts the
    # claims it read at (1, 0): the stream's newer write stays. The dead change's replay is
    # stale.
    stream, rebuild = sinks(), sinks()
    assert outcomes(stream.apply([ch("A", 1, Value("s:1", "x")), ch("A", 2)])) == ["applied"] * 2
    dying = sinks()
    crash_before(dying, "_step_f")
    with pytest.raises(Crash):
        dying.apply([ch("A", 3, Value("s:1", "stray"), Value("s:2", "stray"))])
    new = [Value("s:1", "new"), Value("s:3", "new")]
    original = rebuild._retract_claims

    def racing(view: Any, claims: list[Any], at: Version, now: float) -> None:
        assert sorted(_text(_place_of(c.identity)[1]) for c in claims) == ["s:1", "s:2"]
        assert outcomes(stream.apply([ch("A", 9, *new, gen=1)])) == ["applied"]
        original(view, claims, at, now)

    monkeypatch.setattr(rebuild, "_retract_claims", racing)
    rebuild.sweep(VIEW, 1, 0.0)
    assert outcomes(sinks().apply([ch("A", 3, Value("s:1", "stray"), Value("s:2", "stray"))])) == [
        "stale"
    ]
    assert_converged(cluster, rebuild, {"A": new})


def test_crash_after_o_then_a_newer_delete_then_the_replay_resurrects_nothing(
    sinks: Callable[[], Any], cluster: RedisCluster
) -> None:
    # HELD (I3): a create dies after O (its entries noted, none written); another process
    # deletes the item at a newer version, retracting the noted entries; the create's replay
    # is stale and writes nothing; a held copy of it that passed O before the delete writes at
    # its old version, loses at F and takes its writes back.
    first, second, slow = sinks(), sinks(), sinks()
    entries = [Value("r:1", "v"), SetMember("r:set", "i"), HashField("r:h", "i", "1")]
    held = Held(slow, "_step_e", [ch("i", 1, *entries)])
    crash_before(first, "_step_e")
    with pytest.raises(Crash):
        first.apply([ch("i", 1, *entries)])
    assert outcomes(second.apply([ch("i", 2)])) == ["applied"]
    assert outcomes(first.apply([ch("i", 1, *entries)])) == ["stale"]
    assert held.finish() == ["stale"]
    assert_converged(cluster, second, {"i": []})
