"""Sixth attack round on the Redis Cluster sink's send path (connection.py
``_replicas_listed``, ``_address``, ``_send_node``): a master's replicas are the node ids its
``CLUSTER NODES`` lists as its own united with the cluster nodes ``INFO replication`` shows
attached (matched by resolved ip:port against CLUSTER NODES addresses); each pipeline ends in
``WAIT <n>``.

Every test runs against the real Redis Cluster of the test bed (3 masters + 3 replicas).
Tests marked HOLE failed on the code under attack (6a45379); one is fixed, one is open
(a strict xfail, README "Redis Cluster").
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from tests.test_cluster_attack import assert_converged, ch
from tests.test_cluster_attack_4 import apply_until, armed, final, pick, results_of, slot_of
from viewkeeper import Value
from viewkeeper.sinks.base import SinkUnavailable

pytestmark = pytest.mark.redis_cluster


@pytest.fixture
def control(redis_cluster_faults: Any) -> Any:
    return redis_cluster_faults


@pytest.fixture
def client(control: Any) -> Iterator[RedisCluster]:
    c: RedisCluster = control.cluster_client()
    yield c
    c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relink(control: Any, master: Any, replica: Any) -> None:
    """The master drops its replicas' links; wait until ``replica`` is linked again and
    INFO replication on the master shows it online (not round 5's relink: that one looks
    for the replica's own port, which these tests announce as another)."""
    control.command(master, "CLIENT", "KILL", "TYPE", "replica")

    def up() -> list[str]:
        repl = control.info(replica, "replication")
        return [] if repl.get("master_link_status") == "up" else ["link not up"]

    control.wait_until(f"{replica} linked again", up, 20.0)


def info_ports(node: Any) -> list[int]:
    """The ports of the replicas INFO replication on ``node`` shows attached."""
    with redis.Redis(port=node.port, socket_timeout=2) as conn:
        repl = conn.info("replication")
    attached = [v for k, v in repl.items() if k.startswith("slave") and isinstance(v, dict)]
    return [int(v["port"]) for v in attached]


# ---- holes ---------------------------------------------------------------------------------


# HOLE (fixed; liveness, I1): a replica whose INFO replication address is another cluster
# node's. Fixed: an INFO address that is a master's is not counted. As found:
# a replica whose INFO replication address is another cluster node's
# address is counted twice. _replicas_listed maps INFO's slaveN ip:port (the replication
# connection's peer ip, and the replica's replica-announce-port, else its port) to a node id
# by comparing it with CLUSTER NODES' addresses (cluster-announce-ip/port). The two are
# announced by different settings: a Docker/NAT deployment sets cluster-announce-ip/port (as
# Redis' docs ask) but not replica-announce-port, so a containerised replica shows in INFO as
# <host ip, SNAT>:6379 (its in-container port), which is exactly the cluster address of a
# node running with host networking on that host's 6379 (another master, or another master's
# replica). The master then counts {its replica (CLUSTER NODES), that other node (INFO)} = 2,
# WAIT 2 is never met (one replica acks), and every batch touching that master is held
# (SinkUnavailable) for as long as the deployment stays. Emulated here with the replica's
# replica-announce-port set to another master's port (INFO: 127.0.0.1:<other master>). Seen:
# SinkUnavailable "... 1 of its 2 replica(s) ...", every run.
# Fix idea: an INFO entry counts only for a node that CLUSTER NODES does not list as a master
# and does not list as another master's replica (or: match INFO entries to nodes by the
# replication connection's identity, e.g. CLIENT LIST type=replica laddr/addr + the replica's
# own INFO/CLUSTER MYID, not by announced address text); never count more nodes from INFO
# than it has slaveN entries not already explained by listed replicas.
def test_a_replica_whose_info_address_is_another_nodes_is_not_counted_twice(
    control: Any, client: RedisCluster
) -> None:
    sink = armed(client, retry_seconds=3)
    masters = control.masters()
    master, other = masters[0], masters[1]
    key, item = pick(control, sink, master)
    assert results_of(sink.apply([ch(item, 1, Value(key, "a"))])) == ["applied"]
    replica = control.replicas_of(master)[0]
    control.command(replica, "CONFIG", "SET", "replica-announce-port", str(other.port))
    try:
        relink(control, master, replica)
        control.wait_until(
            "INFO on the master shows the replica at the other master's address",
            lambda: [] if info_ports(master) == [other.port] else [str(info_ports(master))],
            20.0,
        )
        try:
            got: Any = apply_until(sink, [ch(item, 2, Value(key, "b"))], seconds=10)
        except SinkUnavailable as exc:
            got = exc
        assert got == ["applied"], f"its one replica in sync, yet the batch was held: {got!r}"
    finally:
        control.command(replica, "CONFIG", "SET", "replica-announce-port", "0")
        relink(control, master, replica)
    assert_converged(client, sink, final(**{item: [Value(key, "b")]}))
    sink.close()


# HOLE (open, strict xfail; I4): WAIT <n> counts every replication client that acks, cluster node or
# not, while n counts only cluster nodes. Round 5 made _replicas_listed skip attached clients that
# are no cluster node (they are never promoted), but the WAIT it sends still counts their REPLCONF
# ACKs: a standalone redis-server replicating from a cluster master (an analytics or backup copy
# outside the cluster, a migration tool such as redis-shake / RIOT that acks the stream) satisfies
# WAIT 1 for a master whose only cluster replica R1 is cut off. The batch is APPLIED; the master is
# killed; R1 is promoted without the batch: an acknowledged write lost. Seen: APPLIED, then the key
# back at "a" on the cluster, every run.
# Fix idea: WAIT can not tell replicas apart; after WAIT, check each counted replica's offset (INFO
# replication slaveN offset= for the CLUSTER NODES/INFO-matched cluster replicas, >=
# master_repl_offset read in the same pipeline after the writes), or WAIT <n + attached non-cluster
# replication clients> (held while any non-cluster client does not ack, which is safe).
@pytest.mark.xfail(
    strict=True,
    reason="open: a replication client outside the cluster that acks satisfies WAIT (README "
    "'Redis Cluster': do not attach one to a master)",
)
def test_an_ack_from_a_replication_client_outside_the_cluster_is_not_enough(
    control: Any, client: RedisCluster, tmp_path: Path
) -> None:
    server = shutil.which("redis-server")
    assert server, "redis-server is needed"
    sink = armed(client)
    master = control.masters()[0]
    key, item = pick(control, sink, master)
    assert results_of(sink.apply([ch(item, 1, Value(key, "a"))])) == ["applied"]
    r1 = control.replicas_of(master)[0]
    port = _free_port()
    outside = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--replicaof",
            "127.0.0.1",
            str(master.port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    got: Any = None
    try:

        def outside_synced() -> list[str]:
            try:
                repl = redis.Redis(port=port, socket_timeout=2).info("replication")
            except redis.RedisError as exc:
                return [str(exc)]
            return [] if repl.get("master_link_status") == "up" else ["outside link not up"]

        control.wait_until("the outside copy in sync", outside_synced, 20.0)
        control.cut_off_replica(master, r1)  # R1 cut off; the outside copy reconnects
        control.wait_until("the outside copy back", outside_synced, 20.0)
        try:
            got = results_of(sink.apply([ch(item, 2, Value(key, "b"))]))
        except SinkUnavailable as exc:  # held: not acknowledged (right)
            got = exc
        control.kill_master(master)
        assert control.node_for_slot(slot_of(key)).node_id == r1.node_id
    finally:
        control.reattach_replica(r1)
        outside.terminate()
        outside.wait(10)
    fresh = control.cluster_client()
    try:
        on_cluster = fresh.get(key)
    finally:
        fresh.close()
    if got == ["applied"]:
        assert on_cluster == b"b", (
            f"batch acknowledged (WAIT met by a copy outside the cluster), but {key} is "
            f"{on_cluster!r} after its only cluster replica took over"
        )
    sink.close()
