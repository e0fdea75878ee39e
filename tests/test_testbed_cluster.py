"""The test bed's Redis Cluster: 3 masters + 3 replicas covering every slot, and each fault
helper (kill a master, restart it, manual failover, slot migration with MOVED and ASK, pause)
doing what it says while redis-py's RedisCluster client keeps working."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError

from tests.testbed import (
    Node,
    RemoteClusterControl,
    ServiceError,
    key_for_slot,
    slot_of,
)
from tests.testbed.redis_cluster import SLOTS, parse_cluster_nodes

pytestmark = pytest.mark.redis_cluster


def _topology(url: str) -> list[Node]:
    with redis.Redis.from_url(url) as conn:
        return parse_cluster_nodes(conn.execute_command("CLUSTER", "NODES").decode())


def _other_master(cluster: RemoteClusterControl, node: Node) -> Node:
    return next(m for m in cluster.masters() if m.node_id != node.node_id)


def _write_replicated(cluster: RemoteClusterControl, client: RedisCluster, key: str) -> None:
    """SET key, then WAIT until the master's replica has it (failover keeps it)."""
    client.set(key, b"kept")
    master = cluster.node_for_key(key)
    assert cluster.command(master, "WAIT", 1, 5000) >= 1


# -- shape (needs only the URL) ---------------------------------------------------------------


def test_three_masters_three_replicas_cover_every_slot(redis_cluster_url: str) -> None:
    nodes = _topology(redis_cluster_url)
    masters = [n for n in nodes if n.is_master]
    replicas = [n for n in nodes if n.is_replica]
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(r.master_id for r in replicas) == sorted(m.node_id for m in masters)
    covered = sorted(r for m in masters for r in m.slots)
    assert covered[0][0] == 0 and covered[-1][1] == SLOTS - 1
    for (_, end), (start, _) in itertools.pairwise(covered):
        assert start == end + 1  # no gap, no overlap
    for node in nodes:
        assert not node.failing and node.link_state == "connected"
        with redis.Redis(host="127.0.0.1", port=node.port) as conn:
            info = conn.execute_command("CLUSTER", "INFO").decode()
        assert "cluster_state:ok" in info and f"cluster_slots_ok:{SLOTS}" in info


def test_keys_in_different_slots_land_on_the_three_masters(
    redis_cluster_client: RedisCluster, redis_cluster_url: str
) -> None:
    masters = [n for n in _topology(redis_cluster_url) if n.is_master]
    for master in masters:
        key = key_for_slot(master.slots[0][0], "spread")
        redis_cluster_client.set(key, str(master.port))
    for master in masters:
        with redis.Redis(host="127.0.0.1", port=master.port) as conn:
            assert conn.dbsize() == 1  # one key per master, no redirection involved
            key = key_for_slot(master.slots[0][0], "spread")
            assert conn.get(key) == str(master.port).encode()
    slot = masters[0].slots[0][0]
    other = redis.Redis(host="127.0.0.1", port=masters[1].port)
    with other, pytest.raises(MovedError) as moved:
        other.get(key_for_slot(slot, "spread"))
    assert (moved.value.slot_id, moved.value.port) == (slot, masters[0].port)


def test_hash_tags_put_keys_in_one_slot_for_scripts(redis_cluster_client: RedisCluster) -> None:
    tagged = ["{user:42}:profile", "{user:42}:orders", "{user:42}:n"]
    assert len({slot_of(k) for k in tagged}) == 1
    assert slot_of("{user:42}:profile") == slot_of("user:42")
    script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[3])"
    assert redis_cluster_client.eval(script, 3, *tagged, "p") == 1
    assert redis_cluster_client.get(tagged[0]) == b"p"
    apart = ["user:42:profile", "user:43:profile"]
    assert slot_of(apart[0]) != slot_of(apart[1])
    with pytest.raises(redis.RedisClusterException):  # redis-py refuses cross-slot EVAL
        redis_cluster_client.eval(script, 2, *apart, "p")


# -- faults (need the control the launcher exports) -------------------------------------------


def test_kill_master_promotes_its_replica_and_it_rejoins_as_replica(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    master = cluster.masters()[0]
    replica = cluster.replicas_of(master)[0]
    key = key_for_slot(master.slots[0][0], "kept")
    with cluster.cluster_client() as client:
        _write_replicated(cluster, client, key)

        promoted = cluster.kill_master(master)
        assert promoted.node_id == replica.node_id and promoted.slots == master.slots
        assert master.node_id not in {m.node_id for m in cluster.masters()}
        assert client.get(key) == b"kept"  # redis-py found the new master
        client.set(key, b"after")

        back = cluster.restart_as_replica(master)
        assert back.is_replica and back.master_id == promoted.node_id
        with cluster.client(back) as conn:  # synced from the new master
            conn.execute_command("READONLY")
            assert conn.get(key) == b"after"
    cluster.wait_healthy()


def test_manual_failover_swaps_master_and_replica(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    master = cluster.masters()[0]
    replica = cluster.replicas_of(master)[0]
    key = key_for_slot(master.slots[0][0], "fo")
    with cluster.cluster_client() as client:
        _write_replicated(cluster, client, key)
        new_master = cluster.failover(replica)
        assert new_master.is_master and new_master.slots == master.slots
        assert cluster.node(master).master_id == new_master.node_id
        assert client.get(key) == b"kept"
        client.set(key, b"after")
    with cluster.client(new_master) as conn:
        assert conn.get(key) == b"after"


def test_migrate_slot_moves_keys_and_client_follows_moved(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    source = cluster.masters()[0]
    target = _other_master(cluster, source)
    slot = source.slot_inside(7)
    keys = [key_for_slot(slot, f"m{i}") for i in range(5)]
    with cluster.cluster_client() as client:
        for key in keys:
            client.set(key, key)  # the client now caches slot -> source

        assert cluster.migrate_slot(slot, target) == 5
        assert cluster.node_for_slot(slot).node_id == target.node_id
        with cluster.client(source) as conn:
            assert conn.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            with pytest.raises(MovedError) as moved:
                conn.get(keys[0])
        assert (moved.value.slot_id, moved.value.port) == (slot, target.port)
        with cluster.client(target) as conn:
            assert conn.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 5
        assert [client.get(k) for k in keys] == [k.encode() for k in keys]  # MOVED followed
    cluster.migrate_slot(slot, source)  # put it back: later tests see the usual layout
    assert cluster.node_for_slot(slot).node_id == source.node_id


def test_slot_mid_migration_client_follows_ask(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    source = cluster.masters()[0]
    target = _other_master(cluster, source)
    slot = source.slot_inside(11)
    moved, staying, fresh = (key_for_slot(slot, name) for name in ("moved", "staying", "fresh"))
    with cluster.cluster_client() as client:
        client.set(moved, b"1")
        client.set(staying, b"2")
        migration = cluster.begin_migration(slot, target)
        assert migration.move_keys([moved]) == 1

        with cluster.client(source) as conn:
            with pytest.raises(AskError) as ask:
                conn.get(moved)
            assert conn.get(staying) == b"2"
        assert (ask.value.slot_id, ask.value.port) == (slot, target.port)
        assert client.get(moved) == b"1"  # redis-py sent ASKING to the target
        assert client.get(staying) == b"2"
        client.set(fresh, b"3")  # a new key in a migrating slot goes to the target (ASK)
        with cluster.client(target) as conn:
            assert sorted(conn.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)) == sorted(
                [moved.encode(), fresh.encode()]
            )

        assert migration.finish() == 1  # the staying key
        assert cluster.node_for_slot(slot).node_id == target.node_id
        assert [client.get(k) for k in (moved, staying, fresh)] == [b"1", b"2", b"3"]
    cluster.migrate_slot(slot, source)


def test_heal_finishes_a_migration_a_test_left_open(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    source = cluster.masters()[0]
    target = _other_master(cluster, source)
    slot = source.slot_inside(13)
    keys = [key_for_slot(slot, f"h{i}") for i in range(3)]
    with cluster.cluster_client() as client:
        for key in keys:
            client.set(key, b"h")
        cluster.begin_migration(slot, target).move_keys(keys[:1])
        cluster.heal()  # what redis_cluster_faults does after a test that failed mid-way
        assert cluster.node_for_slot(slot).node_id == target.node_id
        assert [client.get(k) for k in keys] == [b"h"] * 3
    cluster.migrate_slot(slot, source)


def test_short_pause_times_out_without_failover(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    master = cluster.masters()[0]
    key = key_for_slot(master.slots[0][0], "p")
    cluster.command(master, "SET", key, "v")
    cluster.pause(master, 0.7)  # well under cluster-node-timeout (1.5 s): no failover
    assert cluster.is_paused(master)
    with cluster.client(master, socket_timeout=0.3) as conn, pytest.raises(redis.TimeoutError):
        conn.get(key)
    deadline = time.monotonic() + 5
    while cluster.is_paused(master) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cluster.is_paused(master)
    cluster.wait_ok()
    assert cluster.node_for_slot(master.slots[0][0]).node_id == master.node_id
    with cluster.cluster_client() as client:
        assert client.get(key) == b"v"


def test_long_pause_gives_clusterdown_then_failover_and_recovery(
    redis_cluster_faults: RemoteClusterControl,
) -> None:
    cluster = redis_cluster_faults
    master = cluster.masters()[0]
    replica = cluster.replicas_of(master)[0]
    other = _other_master(cluster, master)
    key = key_for_slot(master.slots[0][0], "long")
    elsewhere = key_for_slot(other.slots[0][0], "long")
    with cluster.cluster_client() as client:
        _write_replicated(cluster, client, key)
        client.set(elsewhere, b"x")

        cluster.pause(master, 8.0)
        seen_down = False
        deadline = time.monotonic() + 15
        with cluster.client(other, socket_timeout=0.5) as conn:
            while time.monotonic() < deadline:
                try:
                    conn.get(elsewhere)  # a slot on a healthy master: refused while down
                except ClusterDownError:
                    seen_down = True
                else:
                    if seen_down:
                        break  # the replica took over: the cluster serves again
                time.sleep(0.02)
        assert seen_down, "no CLUSTERDOWN while the master was paused"
        cluster.wait_ok()
        assert cluster.node_for_slot(master.slots[0][0]).node_id == replica.node_id
        assert client.get(key) == b"kept"

        cluster.resume(master)  # the old master wakes up and becomes a replica
        cluster.wait_healthy()
        assert cluster.node(master).master_id == replica.node_id
        assert client.get(elsewhere) == b"x"


def test_flush_empties_every_master(redis_cluster_faults: RemoteClusterControl) -> None:
    cluster = redis_cluster_faults
    with cluster.cluster_client() as client:
        for master in cluster.masters():
            client.set(key_for_slot(master.slots[0][0], "f"), b"1")
        cluster.flush()
        assert client.dbsize(target_nodes=RedisCluster.PRIMARIES) == 0


def test_control_channel_gone_is_a_clear_error() -> None:
    description = json.dumps({"control": "127.0.0.1:1", "token": "00" * 32, "nodes": [{"port": 1}]})
    with pytest.raises(ServiceError, match="launcher that started the cluster"):
        RemoteClusterControl(description).live_ports()
