"""What only the cluster sink has, on the real Redis Cluster: its markers and write counters in
every slot, bookkeeping damaged in one slot, scripts missing on a node, the sweep of entries
no record lists, the purge of retraction marks, the wipe (the shared behaviour runs in
tests/test_sink_redis.py, parametrized)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.helpers import view_for
from viewkeeper import Counter, SetMember, Value, redis_view
from viewkeeper.projection.entries import Entry
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
from viewkeeper.sinks.redis_cluster import RedisClusterSink


@redis_view(table="orders", redis="cache")
def seats(order: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"seat:{order['id']}", order["status"])


VIEW = view_for(seats)
OWNER = Owner("arn:t", "coord", "dep")


def ch(item: str, seq: int, *entries: Entry, gen: int = 0) -> Change:
    return Change(VIEW, item, Version(gen, str(seq)), list(entries))


def outcomes(results: list[Result]) -> list[str]:
    return [r.outcome.value for r in results]


@pytest.fixture
def cluster(redis_cluster_client: RedisCluster) -> RedisCluster:
    return redis_cluster_client


def armed(cluster: RedisCluster, marker: str = "m1") -> RedisClusterSink:
    sink = RedisClusterSink("cache", cluster, retry_seconds=2)
    sink.prepare([VIEW])
    sink.write_claim(VIEW, Claim(OWNER, marker))
    sink.expect(VIEW, marker)
    return sink


def test_a_claim_marks_every_slot_and_a_flushed_master_is_noticed_by_its_next_write(
    cluster: RedisCluster,
) -> None:
    sink = armed(cluster)
    assert all(cluster.hget(sink._claims_key(s), "#1") == b"m1" for s in (0, 8000, 16383))
    # an entry on another master than the view's claim
    central = cluster.get_node_from_key(sink._claim_key(VIEW)).name
    key = next(f"k:{n}" for n in range(100) if cluster.get_node_from_key(f"k:{n}").name != central)
    assert outcomes(sink.apply([ch("a", 1, Value(key, 1))])) == ["applied"]
    # the master holding that key's slot restarts empty (its data, markers included, gone)
    cluster.flushall(target_nodes=cluster.get_node_from_key(key))
    with pytest.raises(NamespaceLost) as lost:
        sink.apply([ch("a", 2, Value(key, 2))])
    assert lost.value.views == ["seats"] and "does not hold its marker" in str(lost.value)
    assert cluster.get(key) is None  # nothing written there
    assert sink.read_claim(VIEW) is None  # the central marker erased: every process sees it
    assert b"seen by a client" in (cluster.hget(sink._claim_key(VIEW), "lost") or b"")
    # re-armed (a new marker in every slot): writes go on
    sink.write_claim(VIEW, Claim(OWNER, "m2"))
    sink.expect(VIEW, "m2")
    assert outcomes(sink.apply([ch("a", 2, Value(key, 2))])) == ["applied"]


def test_a_slots_write_counter_going_back_is_lost_and_two_writers_never_look_so(
    cluster: RedisCluster,
) -> None:
    a, b = armed(cluster), armed(cluster)
    for seq in range(1, 9):  # two processes taking turns on one slot: never a rollback
        s = (a, b)[seq % 2]
        assert outcomes(s.apply([ch("x", seq, Value("k:x", seq))])) == ["applied"]
    assert cluster.get("k:x") == b"8"
    slot = key_slot(b"k:x")
    cluster.hset(a._claims_key(slot), "#1n", 1)  # a replica promoted before it had every write
    with pytest.raises(NamespaceLost) as lost:
        a.apply([ch("x", 9, Value("k:x", 9))])
    assert "write counter went back" in str(lost.value)
    assert cluster.get("k:x") == b"8" and a.read_claim(VIEW) is None
    with pytest.raises(NamespaceLost):  # the other process notices it too, writing nothing
        b.apply([ch("x", 10, Value("k:x", 10))])
    assert cluster.get("k:x") == b"8"


def test_a_slots_bookkeeping_overwritten_fails_only_the_changes_touching_it(
    cluster: RedisCluster,
) -> None:
    sink = RedisClusterSink("cache", cluster, retry_seconds=2)  # no marker expected
    sink.prepare([VIEW])
    damaged = sink._claims_key(key_slot(b"k:bad"))
    cluster.set(damaged, "not a hash")
    results = sink.apply([ch("ok", 1, Value("k:ok", 1)), ch("bad", 1, Value("k:bad", 1))])
    assert outcomes(results) == ["applied", "error"]
    assert "WRONGTYPE" in str(results[1].error) and "item 'bad'" in str(results[1].error)
    assert cluster.get("k:ok") == b"1" and cluster.get("k:bad") is None
    assert sink.owned_entries(VIEW, "bad") is None


def test_a_script_missing_on_a_node_is_loaded_again(cluster: RedisCluster) -> None:
    sink = armed(cluster)
    sink.apply([ch("a", 1, Value("k:a", 1))])
    node = cluster.get_node_from_key("k:b")
    cluster.get_redis_connection(node).script_flush()  # as on a replica just promoted
    assert outcomes(sink.apply([ch("b", 1, Value("k:b", 1))])) == ["applied"]
    assert cluster.get("k:b") == b"1"


def test_the_sweep_retracts_entries_no_record_lists(cluster: RedisCluster) -> None:
    """A master lost an item's owner record (the item's entries live on another): after the
    loss is repaired by a rebuild, the sweep retracts what only a claim still holds."""
    sink = RedisClusterSink("cache", cluster, retry_seconds=2)
    sink.prepare([VIEW])
    sink.apply([ch("gone", 1, Value("k:gone", 1)), ch("kept", 1, Value("k:kept", 1))])
    record = sink._owner_keys(VIEW, sink._bucket(b"gone"))[1]
    assert cluster.hdel(record, "gone") == 1  # the record's master lost it
    sink.apply([ch("kept", 0, Value("k:kept", 2), gen=1)])  # the rebuild re-reads "kept"
    assert sink.sweep(VIEW, 1, time.time()) == 1
    assert cluster.get("k:gone") is None and cluster.get("k:kept") == b"2"
    assert sorted(c.item_key for c in sink.iter_claims(VIEW) if c.live) == ["kept"]


def test_purge_forgets_old_retraction_marks_and_wipe_leaves_nothing_of_the_view(
    cluster: RedisCluster,
) -> None:
    now = [1_000_000.0]
    sink = RedisClusterSink("cache", cluster, clock=lambda: now[0], tombstone_retention=3600)
    sink.prepare([VIEW])
    sink.apply([ch("a", 1, Value("k:a", 1), SetMember("s", "a"), Counter("n"))])
    sink.apply([ch("a", 2, Value("k:a", 2))])  # SetMember and Counter retracted: two marks
    assert sum(c.kind == "mark" for c in sink.iter_claims(VIEW)) == 2
    now[0] += 3601
    sink.purge_tombstones(VIEW)
    assert sum(c.kind == "mark" for c in sink.iter_claims(VIEW)) == 0
    assert cluster.get("k:a") == b"2"
    other = RedisClusterSink("cache", cluster)
    other.prepare([VIEW])
    assert sink.wipe(VIEW) == 1
    assert cluster.get("k:a") is None and list(sink.iter_claims(VIEW)) == []
    assert list(sink.iter_owner_records(VIEW)) == [] and sink.pending_count(VIEW) == 0


def test_results_come_back_in_order_across_slots_and_duplicates(cluster: RedisCluster) -> None:
    sink = RedisClusterSink("cache", cluster)
    sink.prepare([VIEW])
    batch = [ch(f"i{n}", 1, Value(f"k:{n}", n)) for n in range(300)]
    batch.insert(150, Change(VIEW, "bad", Version(0, "1"), [Value("vk:x", 1)]))
    results = sink.apply(batch + batch[:10])
    assert outcomes(results) == ["applied"] * 150 + ["error"] + ["applied"] * 150 + ["stale"] * 10
    assert all(cluster.get(f"k:{n}") == str(n).encode() for n in range(300))
    assert Outcome.ERROR is results[150].outcome and "bookkeeping prefix" in str(results[150].error)


def test_a_batch_is_held_while_a_replica_the_client_does_not_know_of_is_behind(
    redis_cluster_faults: Any,
) -> None:
    """The client's topology is stale (a node came back as a replica after the client's last
    refresh: it thinks the master has none), and that replica is cut off from its master.
    A batch written there must not be acknowledged: the master's death would lose it, with
    nothing noticed if no later write lands there (I5).

    Failed before: the wait for a replica went by the client's slot table only, so the
    batch came back APPLIED at once, on the master alone (in CI, test_cluster_e2e.py's
    test_writes_a_killed_master_lost_are_noticed_even_if_nothing_writes_there_again came out
    silently wrong, and a loss was noticed where none should be). Now each pipeline to a
    master thought to have no replica asks it (ROLE) and waits if it does."""
    control = redis_cluster_faults
    client = control.cluster_client()
    try:
        sink = armed(client)
        key = "seat:held"
        master = control.node_for_slot(key_slot(key.encode()))
        with client.nodes_manager._lock:  # the stale topology: no replica anywhere
            for owners in client.nodes_manager.slots_cache.values():
                del owners[1:]
        with control.replica_cut_off(master), pytest.raises(SinkUnavailable, match="replica"):
            sink.apply([ch("held", 1, Value(key, "paid"))])
        # once the replica has caught up, the same batch sent again is acknowledged
        assert outcomes(sink.apply([ch("held", 1, Value(key, "paid"))])) in (
            ["applied"],
            ["stale"],
        )
        assert client.get(key) == b"paid"
    finally:
        client.close()
