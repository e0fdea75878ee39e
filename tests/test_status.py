"""`viewkeeper status` names the host and pid of each lease's holder (issue #14: with several
processes per host, the worker id alone does not say which process to look at)."""

from __future__ import annotations

from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import Lease, WorkerInfo
from viewkeeper.ops.status import collect, format_table


def test_each_lease_names_its_holders_host_and_pid() -> None:
    store = MemoryStore(clock=lambda: 1000.0)
    for shard in ("shardId-a", "shardId-b", "shardId-c"):
        store.create_lease(Lease("t", shard, "arn:s"))
    leases = {lease.shard_id: lease for lease in store.list_leases("t")}
    assert store.take_lease(leases["shardId-a"], "web-1-x") is not None
    assert store.take_lease(leases["shardId-b"], "gone-9-y") is not None  # no worker row
    store.put_worker(WorkerInfo("web-1-x", 1000.0, host="web-1", pid=4242, leases=1))

    data = collect(store, ["t"], now=1001.0)
    rows = {row["shard_id"]: row for row in data["shards"]}
    assert (rows["shardId-a"]["host"], rows["shardId-a"]["pid"]) == ("web-1", 4242)
    assert (rows["shardId-b"]["host"], rows["shardId-b"]["pid"]) == (None, None)
    assert (rows["shardId-c"]["host"], rows["shardId-c"]["pid"]) == (None, None)

    lines = format_table(data).splitlines()
    assert "HOST/PID" in lines[0]
    line_of = {shard: next(x for x in lines if shard in x) for shard in rows}
    assert "web-1/4242" in line_of["shardId-a"]
    assert " ? " in line_of["shardId-b"]  # held, but its worker row is gone
    assert "web-1" not in line_of["shardId-c"]
