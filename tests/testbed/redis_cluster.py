"""A Redis Cluster on 127.0.0.1 (3 masters + 3 replicas of one redis-server) and ways to break it.

Three classes share one set of helpers (``ClusterControl``):

- ``RedisClusterServer`` starts and owns the six processes (the launcher uses it; a test may
  also run a private one: ``with RedisClusterServer() as cluster: ...``, about 2 s to start).
- ``RemoteClusterControl`` is what pytest gets for the cluster the launcher started: the
  Redis commands (CLUSTER FAILOVER, SETSLOT, MIGRATE, FLUSHALL...) it sends itself; the
  process operations (SIGKILL, SIGSTOP/SIGCONT, start again) it asks the launcher to do over
  the control channel described in VIEWKEEPER_TEST_REDIS_CLUSTER_CONTROL (see _control.py).

Nodes: ``redis-server --cluster-enabled yes`` each in its own scratch dir (nodes.conf lives
there, so a killed node restarts with its identity), no persistence, cluster bus on a second
free port (``cluster-port``), ``cluster-node-timeout`` 1500 ms, so a dead master is replaced
by its replica in about 3 s. Roles and slot ranges change as tests fail nodes over and move
slots: helpers always read the current topology (``masters()``, ``node_for_slot()``...) and
never assume which port is a master.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot
from redis.retry import Retry

from . import _control
from ._proc import LOG_DIR, ServiceError, free_port, log, scratch_dir, tail
from .redis_server import RedisServer, ensure_redis_server

HOST = "127.0.0.1"
SLOTS = 16384
NODE_TIMEOUT_MS = 1500
_BAD_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


def ensure_redis_cli() -> str:
    """Path of redis-cli (Debian's redis-tools, a dependency of redis-server)."""
    try:
        ensure_redis_server()
    except ServiceError as exc:
        raise ServiceError(f"{exc} and VIEWKEEPER_TEST_REDIS_CLUSTER_URL") from exc
    found = shutil.which("redis-cli")
    if not found:
        raise ServiceError(
            "redis-cli not found: install Debian's redis-tools (sudo apt-get install -y "
            "redis-tools) or set VIEWKEEPER_TEST_REDIS_CLUSTER_URL"
        )
    return found


class ClusterNodeServer(RedisServer):
    """One cluster node: RedisServer plus ``cluster-enabled yes`` and its own bus port.

    stop()/kill() then start() brings it back on the same ports with the same nodes.conf
    (its node id and last known topology) but no data, like a cache node after a crash.
    """

    name = "redis-cluster"
    # No data worth a clean shutdown, and a node a test paused (SIGSTOP) ignores SIGTERM.
    death_signal = signal.SIGKILL

    def __init__(self, port: int | None = None, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        super().__init__(port)
        self.node_timeout_ms = node_timeout_ms
        self.cluster_port = 0

    def prepare(self) -> None:
        if self._dir is None:
            self._dir = scratch_dir("redis-cluster")

    def command(self) -> Sequence[str]:
        if self.start_seconds is None:  # until the first start succeeds: a fresh bus port
            self.cluster_port = free_port()
            while self.cluster_port == self.port:
                self.cluster_port = free_port()
        return [
            *super().command(),
            "--loglevel", "notice",  # failovers and slot moves in the log
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.cluster_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # a replica may always take over (its data is never "too old" here)
            "--cluster-replica-validity-factor", "0",
            "--repl-diskless-sync-delay", "0",  # a (re)started replica syncs at once, not in 5 s
            "--shutdown-timeout", "0",  # SIGTERM does not wait for replicas to catch up
        ]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "cluster_port": self.cluster_port,
            "dir": str(self.workdir()),
            "log": str(self.log_path),
        }


@dataclass(frozen=True)
class Node:
    """One line of CLUSTER NODES, as seen by one node at one moment."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    link_state: str
    slots: tuple[tuple[int, int], ...] = ()
    migrating: tuple[tuple[int, str], ...] = ()  # (slot, target id), only on "myself"
    importing: tuple[tuple[int, str], ...] = ()  # (slot, source id), only on "myself"

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    def slot_inside(self, offset: int) -> int:
        """A slot ``offset`` slots into the first of this master's ranges long enough (tests
        before may have moved single slots about: a range can be one slot long)."""
        for first, last in self.slots:
            if last - first >= offset:
                return first + offset
        raise ServiceError(f"{self} has no range of {offset + 1} slots: {self.slots}")

    @property
    def is_replica(self) -> bool:
        return "slave" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def owns(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.slots)

    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)

    def __str__(self) -> str:
        role = "master" if self.is_master else "replica"
        return f"{role} {HOST}:{self.port} ({self.node_id[:8]})"


def parse_cluster_nodes(text: str) -> list[Node]:
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, addr, flags, master, _ping, _pong, _epoch, link, *slot_words = parts
        host_port = addr.split("@", 1)[0]
        port = int(host_port.rsplit(":", 1)[1] or 0)
        slots: list[tuple[int, int]] = []
        migrating: list[tuple[int, str]] = []
        importing: list[tuple[int, str]] = []
        for word in slot_words:
            if word.startswith("["):
                body = word.strip("[]")
                if "->-" in body:
                    slot, other = body.split("->-")
                    migrating.append((int(slot), other))
                elif "-<-" in body:
                    slot, other = body.split("-<-")
                    importing.append((int(slot), other))
            elif "-" in word:
                start, end = word.split("-")
                slots.append((int(start), int(end)))
            else:
                slots.append((int(word), int(word)))
        nodes.append(
            Node(
                node_id=node_id,
                port=port,
                flags=frozenset(flags.split(",")),
                master_id=None if master == "-" else master,
                link_state=link,
                slots=tuple(sorted(slots)),
                migrating=tuple(migrating),
                importing=tuple(importing),
            )
        )
    return nodes


def _kv(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


@dataclass(frozen=True)
class ProcState:
    pid: int | None
    running: bool
    paused: bool


NodeRef = Node | int


class ClusterControl:
    """Topology queries and fault helpers; subclasses say how processes are signalled."""

    node_timeout_ms = NODE_TIMEOUT_MS
    admin_timeout = 1.0  # seconds per admin command: a paused node must not hang a helper

    # -- process operations (subclasses) ---------------------------------------------------

    def ports(self) -> list[int]:
        raise NotImplementedError

    def _status(self) -> dict[int, ProcState]:
        raise NotImplementedError

    def _kill(self, port: int) -> None:
        raise NotImplementedError

    def _start(self, port: int) -> None:
        raise NotImplementedError

    def _pause(self, port: int, seconds: float) -> None:
        raise NotImplementedError

    def _resume(self, port: int) -> None:
        raise NotImplementedError

    # -- addresses and clients --------------------------------------------------------------

    @property
    def url(self) -> str:
        """URL of the startup node (the first node; it may be a replica by now)."""
        return f"redis://{HOST}:{self.ports()[0]}/0"

    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode(HOST, port) for port in self.ports()]

    def cluster_client(self, **kwargs: Any) -> RedisClusterClient:
        """redis-py RedisCluster knowing every node, so a dead first node does not matter."""
        return RedisClusterClient(startup_nodes=self.startup_nodes(), **kwargs)

    def client(self, node: NodeRef, **kwargs: Any) -> redis.Redis:
        """A plain redis.Redis on one node (no redirections followed): caller closes it."""
        kwargs.setdefault("socket_timeout", self.admin_timeout)
        kwargs.setdefault("socket_connect_timeout", self.admin_timeout)
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host=HOST, port=self._port(node), **kwargs)

    def command(self, node: NodeRef, *args: Any) -> Any:
        """One command on one node, on a fresh connection, no retries; str for bytes."""
        with self.client(node) as conn:
            reply = conn.execute_command(*args)
        return reply.decode() if isinstance(reply, bytes) else reply

    def info(self, node: NodeRef, section: str) -> dict[str, str]:
        """One INFO section of one node, values as strings."""
        with self.client(node) as conn:
            return {str(k): str(v) for k, v in conn.info(section).items()}

    @staticmethod
    def _port(node: NodeRef) -> int:
        return node if isinstance(node, int) else node.port

    # -- topology -------------------------------------------------------------------------

    def live_ports(self) -> list[int]:
        """Nodes whose process is running and not paused (in ports() order)."""
        status = self._status()
        return [p for p in self.ports() if status[p].running and not status[p].paused]

    def view(self, node: NodeRef) -> list[Node]:
        """CLUSTER NODES as ``node`` sees it."""
        return parse_cluster_nodes(self.command(node, "CLUSTER", "NODES"))

    def nodes(self) -> list[Node]:
        """The topology as the first live node that answers sees it."""
        errors = []
        for port in self.live_ports():
            try:
                return self.view(port)
            except redis.RedisError as exc:
                errors.append(f"{port}: {exc!r}")
        raise ServiceError(f"no cluster node answers: {errors}")

    def node(self, ref: NodeRef) -> Node:
        port = self._port(ref)
        for node in self.nodes():
            if node.port == port:
                return node
        raise ServiceError(f"no node on port {port} in the cluster")

    def masters(self) -> list[Node]:
        """Masters that serve slots and are not failing."""
        return [n for n in self.nodes() if n.is_master and n.slots and not n.failing]

    def replicas(self) -> list[Node]:
        return [n for n in self.nodes() if n.is_replica and not n.failing]

    def replicas_of(self, master: NodeRef) -> list[Node]:
        master_id = self.node(master).node_id
        return [n for n in self.replicas() if n.master_id == master_id]

    def node_for_slot(self, slot: int) -> Node:
        for node in self.nodes():
            if node.is_master and node.owns(slot):
                return node
        raise ServiceError(f"no master owns slot {slot}")

    def node_for_key(self, key: str | bytes) -> Node:
        return self.node_for_slot(slot_of(key))

    # -- waiting ---------------------------------------------------------------------------

    def _cluster_problems(self, full: bool) -> list[str]:
        """Why the cluster is not ok yet ([] = ok). ``full`` = all six up, replicas attached."""
        status = self._status()
        live = [p for p in self.ports() if status[p].running and not status[p].paused]
        problems: list[str] = []
        if full and len(live) != len(self.ports()):
            problems.append(f"nodes down or paused: {sorted(set(self.ports()) - set(live))}")
        views: dict[int, list[Node]] = {}
        for port in live:
            try:
                info = _kv(self.command(port, "CLUSTER", "INFO"))
                views[port] = self.view(port)
            except redis.RedisError as exc:
                problems.append(f"{port}: {exc!r}")
                continue
            if info.get("cluster_state") != "ok":
                problems.append(f"{port}: cluster_state:{info.get('cluster_state')}")
            for key in ("cluster_slots_assigned", "cluster_slots_ok"):
                if info.get(key) != str(SLOTS):
                    problems.append(f"{port}: {key}:{info.get(key)}")
        slot_maps = {port: _slot_map(view) for port, view in views.items()}
        if len(set(slot_maps.values())) > 1:
            problems.append(f"nodes disagree on slot owners: {slot_maps}")
        live_ids = {n.node_id for v in views.values() for n in v if "myself" in n.flags}
        for port, slot_map in slot_maps.items():
            dead_owners = {owner for _s, _e, owner in slot_map} - live_ids
            if dead_owners:
                problems.append(f"{port}: slots owned by nodes not up: {dead_owners}")
        if full and not problems:
            problems += self._replica_problems(views)
        return problems

    def _replica_problems(self, views: dict[int, list[Node]]) -> list[str]:
        problems = []
        signatures = {port: _signature(view) for port, view in views.items()}
        if len(set(signatures.values())) > 1:
            problems.append(f"nodes disagree on roles: {signatures}")
        for port, view in views.items():
            bad = [
                f"{n.port}:{','.join(sorted(n.flags & _BAD_FLAGS))}:{n.link_state}"
                for n in view
                if n.flags & _BAD_FLAGS or n.link_state != "connected"
            ]
            if len(view) != len(self.ports()) or bad:
                problems.append(f"{port} sees {len(view)} nodes, not healthy: {bad}")
            for node in view:
                if "myself" in node.flags and (node.migrating or node.importing):
                    problems.append(f"{port}: open slots {node.migrating or node.importing}")
        view = next(iter(views.values()))
        masters = {n.node_id for n in view if n.is_master and n.slots}
        replicas = [n for n in view if n.is_replica]
        served = {n.master_id for n in replicas}
        shards = len(self.ports()) // 2
        if len(masters) != shards or len(replicas) != shards or not masters <= served:
            problems.append(f"want {shards} masters, each with a replica: {list(map(str, view))}")
        for node in replicas:
            repl = self.info(node, "replication")
            if repl.get("master_link_status") != "up" or repl.get("master_sync_in_progress") != "0":
                problems.append(f"replica {node.port}: link {repl.get('master_link_status')}")
        return problems

    def wait_until(self, what: str, check: Callable[[], list[str]], timeout: float) -> None:
        """Poll ``check`` (problems, [] = done) until it passes; ServiceError with the last
        problems after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                problems = check()
            except (redis.RedisError, ServiceError) as exc:
                problems = [repr(exc)]
            if not problems:
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"{what}: not done after {timeout:.0f}s: {problems}")
            time.sleep(0.05)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Every live node: cluster_state:ok, all slots served by live nodes, same slot map."""
        self.wait_until("cluster ok", lambda: self._cluster_problems(full=False), timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """wait_ok, and: all six nodes up and agreeing on roles, 3 masters each with an
        attached replica (replication link up), no slot mid-migration."""
        self.wait_until("cluster healthy", lambda: self._cluster_problems(full=True), timeout)

    # -- faults ----------------------------------------------------------------------------

    def kill(self, node: NodeRef) -> None:
        """SIGKILL the node's process; no waiting."""
        self._kill(self._port(node))

    def kill_master(self, node: NodeRef, timeout: float = 20.0) -> Node:
        """SIGKILL a master; wait until one of its replicas owns its slots and every live
        node says cluster_state:ok. Returns the promoted replica."""
        master = self.node(node)
        if not (master.is_master and master.slots):
            raise ServiceError(f"{master} is not a master with slots")
        candidates = {n.port for n in self.replicas_of(master)}
        if not candidates:
            raise ServiceError(f"{master} has no replica to take over")
        self._kill(master.port)
        probe = master.slots[0][0]

        def promoted() -> list[str]:
            owner = self.node_for_slot(probe)
            if owner.port not in candidates or owner.failing:
                return [f"slot {probe} still on {owner}"]
            return self._cluster_problems(full=False)

        self.wait_until(f"failover after killing {master}", promoted, timeout)
        return self.node_for_slot(probe)

    def restart_as_replica(self, node: NodeRef, timeout: float = 20.0) -> Node:
        """Start a killed node again (same port, same nodes.conf, no data) and wait until it
        is a replica of the node that took over, in sync, and the cluster is ok."""
        port = self._port(node)
        if self._status()[port].running:
            raise ServiceError(f"node {port} is running: kill it first")
        self._start(port)

        def attached() -> list[str]:
            repl = self.info(port, "replication")
            if repl.get("role") != "slave" or repl.get("master_link_status") != "up":
                return [f"{port}: role {repl.get('role')}, link {repl.get('master_link_status')}"]
            me = self.node(port)
            seen_as = [
                n
                for p in self.live_ports()
                if p != port
                for n in self.view(p)
                if n.node_id == me.node_id
            ]
            if any(n.failing or not n.is_replica for n in seen_as):
                return [f"not every node sees {port} as a healthy replica yet"]
            return self._cluster_problems(full=False)

        self.wait_until(f"node {port} back as a replica", attached, timeout)
        return self.node(port)

    def failover(self, replica: NodeRef, option: str = "", timeout: float = 20.0) -> Node:
        """CLUSTER FAILOVER [FORCE|TAKEOVER] on a replica; wait until it is the master, its
        old master is its replica with the link up, and the cluster is ok."""
        before = self.node(replica)
        if not before.is_replica or before.master_id is None:
            raise ServiceError(f"{before} is not a replica")
        old_master_id = before.master_id
        self.command(before.port, "CLUSTER", "FAILOVER", *([option] if option else []))

        def switched() -> list[str]:
            view = self.nodes()
            me = next(n for n in view if n.node_id == before.node_id)
            old = next(n for n in view if n.node_id == old_master_id)
            if not me.is_master or not me.slots:
                return [f"{before.port} not master yet"]
            if old.master_id != me.node_id:
                return [f"old master {old.port} not a replica of {before.port} yet"]
            if self._status()[old.port].running:
                repl = self.info(old.port, "replication")
                if repl.get("master_link_status") != "up":
                    return [f"{old.port}: link {repl.get('master_link_status')}"]
            return self._cluster_problems(full=False)

        self.wait_until(f"failover to {before.port}", switched, timeout)
        return self.node(before.port)

    @contextlib.contextmanager
    def replica_cut_off(self, master: NodeRef) -> Iterator[Node]:
        """The first replica of ``master`` cut off from it while inside: the master drops its
        replication link (CLIENT KILL TYPE replica) and a wrong ``masterauth`` keeps the
        replica from syncing again (a replica merely paused would find the stream in its
        socket buffer when it wakes up), so the master acknowledges writes the replica never
        gets. Yields the replica; its ``masterauth`` is put back on the way out."""
        replica = self.replicas_of(master)[0]
        try:
            yield self.cut_off_replica(master, replica)
        finally:
            self.reattach_replica(replica)

    def cut_off_replica(self, master: NodeRef, replica: Node | None = None) -> Node:
        """As replica_cut_off, for a test that ends it itself (``reattach_replica``)."""
        replica = replica or self.replicas_of(master)[0]
        self.command(replica, "CONFIG", "SET", "masterauth", "not-the-masters-password")
        self.command(master, "CLIENT", "KILL", "TYPE", "replica")

        def cut() -> list[str]:
            status = self.info(replica, "replication").get("master_link_status")
            return [] if status == "down" else [f"link {status}"]

        self.wait_until(f"the replication link of {replica} to drop", cut, 10.0)
        return replica

    def reattach_replica(self, replica: NodeRef) -> None:
        """Undo cut_off_replica: the replica syncs again."""
        self.command(replica, "CONFIG", "SET", "masterauth", "")

    def pause(self, node: NodeRef, seconds: float) -> None:
        """SIGSTOP the node now; SIGCONT after ``seconds`` (or at ``resume()``/``heal()``).

        Returns at once. The timer that resumes it runs in the process owning the node (the
        launcher), so a test that dies mid-pause does not leave the node frozen.
        """
        self._pause(self._port(node), seconds)

    def resume(self, node: NodeRef) -> None:
        self._resume(self._port(node))

    def is_paused(self, node: NodeRef) -> bool:
        return self._status()[self._port(node)].paused

    def begin_migration(self, slot: int, target: NodeRef) -> SlotMigration:
        """Open a slot migration (IMPORTING on target, MIGRATING on source) and move no key:
        the slot is now mid-migration and clients get ASK for keys already moved."""
        source = self.node_for_slot(slot)
        dest = self.node(target)
        if not dest.is_master or dest.node_id == source.node_id:
            raise ServiceError(f"cannot migrate slot {slot} from {source} to {dest}")
        self.command(dest, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dest.node_id)
        return SlotMigration(self, slot, source, dest)

    def migrate_slot(self, slot: int, target: NodeRef) -> int:
        """Move a slot and its keys to ``target`` (a master); returns how many keys moved."""
        migration = self.begin_migration(slot, target)
        return migration.finish()

    def flush(self) -> None:
        """FLUSHALL on every master (replicas follow)."""
        for master in self.masters():
            self.command(master, "FLUSHALL", "SYNC")

    def heal(self, timeout: float = 30.0) -> None:
        """Undo what fault tests leave behind: resume paused nodes, start dead ones, finish
        open slot migrations; then wait_healthy(). Roles and slot ranges are NOT restored."""
        status = self._status()
        for port in self.ports():
            if status[port].paused:
                self._resume(port)
        for port in self.ports():
            if not status[port].running:
                self._start(port)
        self.wait_ok(timeout)
        self._close_open_slots()
        self.wait_healthy(timeout)

    def _myself(self, port: int) -> Node:
        return next(n for n in self.view(port) if "myself" in n.flags)

    def _close_open_slots(self) -> None:
        """Finish every migration a source still has open (the target is still IMPORTING,
        which MIGRATE needs); then clear an IMPORTING left without a source."""
        for master in self.masters():
            me = self._myself(master.port)
            for slot, target_id in me.migrating:
                target = next(n for n in self.nodes() if n.node_id == target_id)
                SlotMigration(self, slot, me, target).finish()
        for master in self.masters():
            for slot, _source_id in self._myself(master.port).importing:
                self.command(master, "CLUSTER", "SETSLOT", slot, "STABLE")


class SlotMigration:
    """A slot being moved from ``source`` to ``target`` (see ClusterControl.begin_migration)."""

    batch = 100

    def __init__(self, control: ClusterControl, slot: int, source: Node, target: Node) -> None:
        self.control = control
        self.slot = slot
        self.source = source
        self.target = target

    def keys_left(self) -> list[bytes]:
        """Keys of the slot still on the source."""
        with self.control.client(self.source) as conn:
            count = int(conn.execute_command("CLUSTER", "COUNTKEYSINSLOT", self.slot))
            return list(conn.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, count))

    def move_keys(self, keys: Iterable[str | bytes] | None = None) -> int:
        """MIGRATE these keys (default: all left) from source to target; returns the count."""
        todo = list(self.keys_left() if keys is None else keys)
        with self.control.client(self.source, socket_timeout=10.0) as conn:
            for i in range(0, len(todo), self.batch):
                chunk = todo[i : i + self.batch]
                conn.execute_command(
                    "MIGRATE", HOST, self.target.port, "", 0, 5000, "REPLACE", "KEYS", *chunk
                )
        return len(todo)

    def finish(self, timeout: float = 20.0) -> int:
        """Move the remaining keys, SETSLOT NODE on target, source and the other masters;
        wait until every live node agrees. Returns how many keys this call moved."""
        moved = self.move_keys()
        owner = ("CLUSTER", "SETSLOT", self.slot, "NODE", self.target.node_id)
        self.control.command(self.target, *owner)
        self.control.command(self.source, *owner)
        for master in self.control.masters():
            if master.node_id not in (self.target.node_id, self.source.node_id):
                self.control.command(master, *owner)

        def agreed() -> list[str]:
            for port in self.control.live_ports():
                owners = [n for n in self.control.view(port) if n.owns(self.slot)]
                if [n.node_id for n in owners] != [self.target.node_id]:
                    return [f"{port} sees slot {self.slot} on {[str(n) for n in owners]}"]
            return self.control._cluster_problems(full=False)

        self.control.wait_until(f"slot {self.slot} on {self.target}", agreed, timeout)
        return moved


def slot_of(key: str | bytes) -> int:
    return int(key_slot(key.encode() if isinstance(key, str) else key))


_TAGS: dict[int, str] = {}
_TAGS_TRIED = [0]


def key_for_slot(slot: int, name: str = "k") -> str:
    """A key that hashes to ``slot``: ``{tag}name`` with a hash tag found by trying."""
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot {slot} out of range")
    while slot not in _TAGS:
        tag = f"t{_TAGS_TRIED[0]}"
        _TAGS_TRIED[0] += 1
        _TAGS.setdefault(slot_of(tag), tag)
    return f"{{{_TAGS[slot]}}}{name}"


def _slot_map(view: list[Node]) -> tuple[tuple[int, int, str], ...]:
    ranges = [(s, e, n.node_id) for n in view if n.is_master for s, e in n.slots]
    return tuple(sorted(ranges))


def _signature(view: list[Node]) -> tuple[tuple[str, str, str, tuple[tuple[int, int], ...]], ...]:
    rows = [
        (n.node_id, "master" if n.is_master else "replica", n.master_id or "-", n.slots)
        for n in view
    ]
    return tuple(sorted(rows))


class RedisClusterServer(ClusterControl):
    """Six ClusterNodeServer processes made into a cluster with ``redis-cli --cluster create``.

    ``start()`` waits until it is healthy (every node cluster_state:ok, 16384 slots, 3
    replicas attached); ``close()`` stops every node and removes the scratch dirs, also when
    start() failed half-way. ``serve_control()`` opens the channel RemoteClusterControl uses.
    """

    name = "redis-cluster"
    start_timeout = 30.0

    def __init__(self, masters: int = 3, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        self.node_timeout_ms = node_timeout_ms
        self._servers = [ClusterNodeServer(None, node_timeout_ms) for _ in range(masters * 2)]
        self._by_port: dict[int, ClusterNodeServer] = {}
        self._paused: dict[int, threading.Timer | None] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._control: _control.ControlServer | None = None
        self.start_seconds: float | None = None

    def ports(self) -> list[int]:
        return [server.port for server in self._servers]

    def start(self) -> Self:
        began = time.monotonic()
        cli = ensure_redis_cli()
        try:
            for server in self._servers:  # launch all six, then wait for each
                server.start(wait=False)
            for server in self._servers:
                try:
                    server.wait_ready()
                except ServiceError:
                    server.start()  # once more; start() picks new ports if they were taken
            self._by_port = {server.port: server for server in self._servers}
            self._create(cli)
            self.wait_healthy(self.start_timeout)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _create(self, cli: str) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{self.name}-create-{self.ports()[0]}.log"
        nodes = [f"{HOST}:{port}" for port in self.ports()]
        command = [cli, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"]
        with open(log_path, "wb") as out:
            try:
                code = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=self.start_timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
        if code != 0:
            raise ServiceError(
                f"redis-cli --cluster create failed (exit {code}); log {log_path}:\n"
                f"{tail(log_path)}"
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for port in list(self._paused):
                self._resume(port)
            for server in self._servers:
                try:
                    server.close()
                except Exception as exc:  # keep stopping the others
                    log(f"stopping {server.name} {server.port} failed: {exc!r}")
        if self._control is not None:
            self._control.close()
            self._control = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- process operations ----------------------------------------------------------------

    def _server(self, port: int) -> ClusterNodeServer:
        if self._closed:
            raise ServiceError("the cluster was closed")
        try:
            return self._by_port[port]
        except KeyError:
            raise ServiceError(f"no cluster node on port {port}") from None

    def _status(self) -> dict[int, ProcState]:
        with self._lock:
            return {
                s.port: ProcState(s.pid, s.is_running(), s.port in self._paused)
                for s in self._servers
            }

    def _kill(self, port: int) -> None:
        with self._lock:
            server = self._server(port)
            self._cancel_pause(port)
            server.kill()

    def _start(self, port: int) -> None:
        with self._lock:
            self._server(port).start()

    def _pause(self, port: int, seconds: float) -> None:
        with self._lock:
            server = self._server(port)
            if not server.is_running() or server.pid is None:
                raise ServiceError(f"node {port} is not running")
            self._cancel_pause(port)
            os.kill(server.pid, signal.SIGSTOP)
            timer = threading.Timer(seconds, self._resume, args=(port,))
            timer.daemon = True
            self._paused[port] = timer
            timer.start()

    def _resume(self, port: int) -> None:
        with self._lock:
            if port not in self._paused:
                return
            self._cancel_pause(port)
            pid = self._by_port[port].pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def _cancel_pause(self, port: int) -> None:
        timer = self._paused.pop(port, None)
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    # -- the control channel ---------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "nodes": [server.describe() for server in self._servers],
            "node_timeout_ms": self.node_timeout_ms,
            "launcher_pid": os.getpid(),
        }

    def serve_control(self) -> str:
        """Open the control channel; returns the JSON for VIEWKEEPER_TEST_REDIS_CLUSTER_CONTROL.

        Call it from a thread that outlives the cluster (see _control.py)."""
        if self._control is None:
            self._control = _control.ControlServer(self._handle, name="redis-cluster-control")
        host, port = self._control.address
        return json.dumps(
            {**self.describe(), "control": f"{host}:{port}", "token": self._control.token}
        )

    def _handle(self, op: str, args: list[Any]) -> Any:
        if op == "status":
            return {port: (s.pid, s.running, s.paused) for port, s in self._status().items()}
        actions: dict[str, Callable[..., None]] = {
            "kill": self._kill,
            "start": self._start,
            "pause": self._pause,
            "resume": self._resume,
        }
        if op not in actions:
            raise ServiceError(f"unknown operation {op!r}")
        actions[op](*args)
        return None


class RemoteClusterControl(ClusterControl):
    """pytest's handle on the cluster the launcher started, rebuilt from the JSON in
    VIEWKEEPER_TEST_REDIS_CLUSTER_CONTROL: process operations go to the launcher."""

    def __init__(self, description: str) -> None:
        data = json.loads(description)
        host, port = str(data["control"]).rsplit(":", 1)
        self._address = (host, int(port))
        self._token = str(data["token"])
        self._ports = [int(node["port"]) for node in data["nodes"]]
        self.node_timeout_ms = int(data.get("node_timeout_ms", NODE_TIMEOUT_MS))
        self.description = data

    def ports(self) -> list[int]:
        return list(self._ports)

    def _call(self, op: str, *args: Any) -> Any:
        return _control.call(self._address, self._token, op, *args)

    def _status(self) -> dict[int, ProcState]:
        raw = self._call("status")
        return {int(port): ProcState(*state) for port, state in raw.items()}

    def _kill(self, port: int) -> None:
        self._call("kill", port)

    def _start(self, port: int) -> None:
        self._call("start", port)

    def _pause(self, port: int, seconds: float) -> None:
        self._call("pause", port, seconds)

    def _resume(self, port: int) -> None:
        self._call("resume", port)
