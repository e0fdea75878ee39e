"""The chaos harness: services, proxies, daemons, faults and the final check, in one place.

Layout (everything on 127.0.0.1)::

    writer (boto3) ───────────────────────────────────────────────► moto (shared)
    daemon a ── dynamodb proxy a ─┐                                    ▲
    daemon b ── dynamodb proxy b ─┴────────────────────────────────────┘
    daemon a, b ───────────────────────────────────────────────────► Redis (the test's own)
    daemon a, b ── opensearch proxy ───────────────────────────────► OpenSearch (shared)

Each daemon reaches DynamoDB (stream and coordination table) through its own proxy, so one
daemon can be partitioned from the lease table while the other takes its lease over. The
final drain and the rebuilds use the services directly.

Faults are methods here; the ones with a duration schedule their own end (``pending``), and
:meth:`Harness.tick` runs what is due and restarts daemons that died on their own (as
systemd's ``Restart=`` would), counting those exits. A background rebuild (``jobs``) is
watched by ``tick`` too: it acts when the rebuild reaches its phase, and asserts its exit
status when it ends. Services are started and stopped from the calling (main) thread only:
the test bed's processes die with the thread that forked them (the second Redis that the
READONLY fault fails over to included).

Cluster mode (``redis_cluster=`` the test bed's cluster control instead of ``redis_server``):
the ``cache`` connection is the Redis Cluster (``cluster: true``), the checks read it through
the cluster sink (its live entry claims too), and the cluster's own faults replace the
standalone Redis ones: a manual failover, a slot migrating step by step (ASK, TRYAGAIN),
a master unreachable (SIGSTOP, shorter or longer than the node timeout) and a master
killed (SIGKILL, back later as a replica). They do not overlap each other or a background
rebuild, as the Redis faults do not.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
import yaml
from opensearchpy import OpenSearch

from tests.chaos.checker import CheckReport, check_sinks
from tests.chaos.daemons import CliJob, Daemon, run_cli
from tests.chaos.proxy import CutMode, TcpProxy
from tests.chaos.workload import OWNERS, STATUSES
from tests.testbed import ClusterControl, RedisServer, SlotMigration, slot_of
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.model import Lease, LeaseState
from viewkeeper.projection.registry import ViewRegistry, load_views
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.redis_cluster import RedisClusterSink

__all__ = ["VIEWS_MODULE", "Harness"]

VIEWS_MODULE = "tests.views_e2e.chaos_views"
TABLE = "chaos-items"
KEY_NAMES = ("pk", "sk")
LEASE_SECONDS = 2.0
CHECKPOINT_WRITE = b"checkpoint = :seq"  # the UpdateExpression of DynamoDBStore.checkpoint


@dataclass
class _Pending:
    due: float
    what: str
    action: Callable[[], None]
    tag: str = ""  # "redis": the end of a fault of the chaos Redis


@dataclass
class _Job:
    """A background rebuild: ``action`` runs once its output shows ``marker``."""

    cli: CliJob
    phase: str
    marker: str
    action: Callable[[], None] | None
    owner_at_start: str | None


@dataclass
class Figures:
    faults: Counter[str] = field(default_factory=Counter)
    timeline: list[str] = field(default_factory=list)
    # what the faults did: refusals Redis answered, rebuilds and the leases they saw move
    effects: Counter[str] = field(default_factory=Counter)


class Harness:
    def __init__(
        self,
        workdir: Path,
        *,
        db: Any,
        dynamodb_url: str,
        opensearch_url: str,
        os_prefix: str,
        redis_server: RedisServer | None,
        rng: random.Random,
        slots: tuple[str, ...] = ("a", "b"),
        redis_cluster: ClusterControl | None = None,
    ) -> None:
        assert (redis_server is None) != (redis_cluster is None), "a Redis or a cluster"
        self.workdir = workdir
        self.db = db
        self.dynamodb_url = dynamodb_url
        self.opensearch_url = opensearch_url
        self.os_prefix = os_prefix
        self.redis_server = redis_server
        self.redis_cluster = redis_cluster
        self.rng = rng
        self.t0 = time.monotonic()
        self.figures = Figures()
        self.pending: list[_Pending] = []
        self.coord_table = f"vk-coord-chaos-{uuid.uuid4().hex[:8]}"
        self.store = DynamoDBStore(db, self.coord_table)
        self.registry: ViewRegistry = load_views([VIEWS_MODULE])
        self.redis: Any
        self.redis_sink: RedisClusterSink | None = None  # the checker's reader in cluster mode
        if redis_cluster is not None:
            self.redis = redis_cluster.cluster_client()
            self.redis_sink = RedisClusterSink("cache", self.redis)
        else:
            assert redis_server is not None
            self.redis = redis.Redis.from_url(redis_server.url)
        self.os_client = OpenSearch(hosts=[opensearch_url], timeout=30)
        self.os_sink = OpenSearchSink("search", self.os_client, index_prefix=os_prefix)
        self.os_proxy = TcpProxy(opensearch_url, name="opensearch").start()
        self.ddb_proxies = {s: TcpProxy(dynamodb_url, name=f"dynamodb-{s}").start() for s in slots}
        self.daemons = {
            s: Daemon(s, workdir / f"vk-{s}.yaml", workdir / f"daemon-{s}.log") for s in slots
        }
        self.direct_config = self.write_config(workdir / "vk-direct.yaml", direct=True)
        self.tool_log = workdir / "tools.log"
        self.jobs: list[_Job] = []
        self.redis_second: RedisServer | None = None  # started by the first READONLY fault
        self._rebuilds = 0
        self.checkpoints: list[str] = []
        self._polled = 0.0
        self._owner: str | None = None
        self.working: str | None = None  # refreshed by tick(): the slot processing the shard

    # --- configs ---------------------------------------------------------------------------------
    def write_config(
        self,
        path: Path,
        *,
        direct: bool = False,
        slot: str | None = None,
        batch_size: int = 100,
        worker_id: str | None = None,
        http_compress: bool = True,
    ) -> Path:
        endpoint = self.dynamodb_url if direct or slot is None else self.ddb_proxies[slot].url
        search = self.opensearch_url if direct else self.os_proxy.url
        worker: dict[str, Any] = {
            "poll_interval": 0.05,
            "lease_duration": LEASE_SECONDS,
            "batch_size": batch_size,
        }
        if worker_id:
            worker["worker_id"] = worker_id
        if self.redis_cluster is not None:
            cache = {"url": self._cluster_url(), "cluster": True}
        else:
            assert self.redis_server is not None
            cache = {"url": self.redis_server.url}
        cfg = {
            "aws": {"region": "us-east-1", "endpoint_url": endpoint},
            "tables": {TABLE: {"starting_position": "TRIM_HORIZON"}},
            "views": [VIEWS_MODULE],
            "redis": {"cache": {**cache, "socket_timeout": 3, "connect_timeout": 1}},
            "opensearch": {
                "search": {
                    "hosts": [search],
                    "index_prefix": self.os_prefix,
                    "timeout": 3,
                    "max_retries": 0,
                    "http_compress": http_compress,  # off: the proxy can see the bodies
                }
            },
            "coordination": {"table": self.coord_table},
            "worker": worker,
            "metrics": {"port": None},
            "logging": {"level": "INFO"},
        }
        part = path.with_name(path.name + ".part")  # whole or not at all: a Lambda cold start
        part.write_text(yaml.safe_dump(cfg))  # may read it while a fault rewrites it
        part.replace(path)
        return path

    # --- bookkeeping -----------------------------------------------------------------------------
    def note(self, what: str) -> None:
        self.figures.timeline.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def fault(self, kind: str, detail: str = "") -> None:
        self.figures.faults[kind] += 1
        self.note(f"FAULT {kind} {detail}".rstrip())

    def later(self, delay: float, what: str, action: Callable[[], None], tag: str = "") -> None:
        self.pending.append(_Pending(time.monotonic() + delay, what, action, tag))

    def busy(self) -> bool:
        """A fault with a duration, or a background rebuild, is still in progress."""
        return bool(self.pending or self.jobs)

    def redis_busy(self) -> bool:
        """The chaos Redis is down or in a fault, or a rebuild (which must write it) runs:
        Redis faults do not overlap each other or a background rebuild."""
        return (
            (self.redis_server is not None and not self.redis_server.is_running())
            or any(p.tag == "redis" for p in self.pending)
            or bool(self.jobs)
        )

    def tick(self) -> None:
        """Run the due ends of faults; restart daemons that exited on their own."""
        now = time.monotonic()
        due = [p for p in self.pending if p.due <= now]
        self.pending = [p for p in self.pending if p.due > now]
        for p in due:
            self.note(p.what)
            p.action()
        for slot, d in self.daemons.items():
            code = d.check_exit()
            if code is not None:  # as systemd's Restart=on-failure, RestartSec=1
                self.note(f"daemon {slot} EXITED on its own: {d.unexpected_exits[-1]}")
                self.later(1.0, f"restart daemon {slot} after its exit", partial(self.start, slot))
        self._watch_jobs()
        if now - self._polled >= 0.3:
            self._polled = now
            lease = self.lease()
            if lease is not None and lease.checkpoint and lease.checkpoint not in self.checkpoints:
                self.checkpoints.append(lease.checkpoint)
            owner = lease.owner if lease is not None else None
            if owner != self._owner:
                self._owner = owner
                self.note(f"lease owner now {owner} (checkpoint {lease and lease.checkpoint})")
            self.working = self._working(owner)

    def _working(self, owner: str | None) -> str | None:
        """The slot whose live, running process holds the lease."""
        for slot, d in self.daemons.items():
            if owner == f"{slot}{d.starts}" and d.alive() and not d.paused:
                return slot
        return None

    def finish_pending(self) -> None:
        """Run every scheduled end of a fault now (restore proxies, resume, restart)."""
        while self.pending:  # an action may schedule another (a kill, its restart)
            todo, self.pending = sorted(self.pending, key=lambda p: p.due), []
            for p in todo:
                self.note(f"{p.what} (early)")
                p.action()

    def _watch_jobs(self) -> None:
        for job in list(self.jobs):
            if job.action is not None and job.marker in job.cli.output():
                action, job.action = job.action, None
                action()
            if job.cli.poll() is not None:
                self.jobs.remove(job)
                self._rebuild_ended(job)

    def wait_jobs(self, timeout: float = 180.0) -> None:
        """Tick until the background rebuilds have ended (each asserted)."""

        def ended() -> bool:
            self.tick()
            return not self.jobs

        self.wait_for(ended, timeout, "the rebuilds to end")

    def finish_jobs(self, timeout: float = 180.0) -> None:
        """Let the background rebuilds end, acting on no more daemons."""
        for job in self.jobs:
            if job.action is not None:
                job.action = None
                self.note(f"rebuild: its {job.phase} comes after the faults: no handover")
        self.wait_jobs(timeout)

    # --- daemons ---------------------------------------------------------------------------------
    def start(self, slot: str) -> None:
        d = self.daemons[slot]
        self.write_config(
            d.config,
            slot=slot,
            batch_size=self.rng.choice((5, 17, 50, 200)),
            worker_id=f"{slot}{d.starts + 1}",
        )
        d.start()
        self.note(f"daemon {slot} started (#{d.starts}, pid {d.pid})")

    def start_all(self) -> None:
        for slot in self.daemons:
            self.start(slot)

    def lease(self) -> Lease | None:
        try:
            leases = self.store.list_leases(TABLE)
        except Exception:  # the coordination table is created by the first daemon
            return None
        return leases[0] if leases else None

    def holder(self) -> str | None:
        lease = self.lease()
        if lease is None or lease.owner is None:
            return None
        owner = lease.owner
        return next((s for s, d in self.daemons.items() if owner == f"{s}{d.starts}"), None)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        """Until a daemon holds the lease and reported itself caught up at the last renewal."""

        def caught() -> bool:
            lease = self.lease()
            return bool(lease and lease.owner and lease.caught_up)

        self.wait_for(caught, timeout, "a daemon to hold the lease and catch up")

    def stop_all(self) -> None:
        for slot, d in self.daemons.items():
            if d.alive():
                code = d.terminate()
                self.note(f"daemon {slot} terminated (exit {code})")

    # --- faults ----------------------------------------------------------------------------------
    def kill(self, slot: str, down_for: float) -> None:
        self.fault("kill -9 daemon", f"{slot} (holder: {self.holder()}), down {down_for:.1f}s")
        self.daemons[slot].kill()
        self.later(down_for, f"restart daemon {slot}", lambda: self.start(slot))

    def terminate(self, slot: str, down_for: float) -> None:
        self.fault("SIGTERM daemon", f"{slot}, down {down_for:.1f}s")
        code = self.daemons[slot].terminate(timeout=10.0)  # systemd: TimeoutStopSec, SIGKILL
        self.note(f"daemon {slot} exit {'SIGKILL after 10 s' if code is None else code}")
        self.later(down_for, f"restart daemon {slot}", lambda: self.start(slot))

    def pause(self, slot: str, seconds: float) -> None:
        self.fault("SIGSTOP daemon", f"{slot} (holder: {self.holder()}) for {seconds:.1f}s")
        d = self.daemons[slot]
        d.pause()
        self.later(seconds, f"SIGCONT daemon {slot}", d.resume)

    def redis_restart(self, how: str, down_for: float) -> None:
        self.fault(f"redis {how}", f"down {down_for:.1f}s")
        if how == "kill -9":
            self.redis_server.kill()
        else:
            self.redis_server.stop()
        self.later(down_for, "redis started", self._redis_start, tag="redis")

    def _redis_start(self) -> None:
        self.redis_server.start()

    def cut_opensearch(self, mode: CutMode, seconds: float) -> None:
        self.fault(f"opensearch {mode}", f"for {seconds:.1f}s")
        self.os_proxy.cut(mode)
        self.later(seconds, "opensearch restored", self.os_proxy.restore)

    def cut_dynamodb(self, slot: str, mode: CutMode, seconds: float) -> None:
        self.fault(f"dynamodb {mode}", f"daemon {slot} (holder: {self.holder()}) {seconds:.1f}s")
        proxy = self.ddb_proxies[slot]
        proxy.cut(mode)
        self.later(seconds, f"dynamodb restored for {slot}", proxy.restore)

    def rewind(self, to: str | None) -> None:
        """Kill every daemon, move the checkpoint back (None: TRIM_HORIZON), restart them."""
        self.fault("checkpoint rewind", f"to {to or 'TRIM_HORIZON'}")
        for d in self.daemons.values():
            d.kill()
        lease = self.lease()
        assert lease is not None
        self.store.reset_lease(TABLE, lease.shard_id, to, LeaseState.ACTIVE)
        self.start_all()

    def wipe_redis_and_rebuild(self) -> None:
        """Redis loses everything (bookkeeping included); `viewkeeper rebuild` repairs it
        while the writer and the daemons keep going."""
        self.fault("redis data loss + rebuild")
        self.redis_server.stop()
        for name in ("appendonlydir", "dump.rdb"):
            path = self.redis_server.workdir() / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.redis_server.start()  # empty: the daemons write what the stream brings next
        self.rebuild()

    # --- the chaos Redis refusing writes -----------------------------------------------------
    # What the two faults below rely on, tried by hand against Redis 7.0.15 (the test bed's):
    # - REPLICAOF host port makes a server a replica: it drops its data and loads the
    #   primary's (a full sync, diskless by default, which the primary starts only after
    #   repl-diskless-sync-delay: 5 s unless set, so it is set to 0 first). The replica is
    #   in sync once the primary's INFO replication lists it with state=online.
    # - FAILOVER TO host port TIMEOUT ms, sent to a primary, answers OK at once and works in
    #   the background (INFO's master_failover_state: waiting-for-sync, failover-in-progress,
    #   no-failover). It pauses its clients' writes (as CLIENT PAUSE WRITE: a write, or a
    #   script that may write, waits; it does not fail) until the target replica has
    #   acknowledged every write, then turns itself into a replica of the target and makes
    #   the target a primary (PSYNC ... FAILOVER); it then resyncs from it partially (same
    #   data, nothing flushed). From then on every write to it, EVALSHA of viewkeeper's
    #   apply script included (a ``#!lua`` shebang without no-writes: refused whole, before
    #   it runs), answers "READONLY You can't write against a read only replica."; reads
    #   work. The writes paused while it waited for the target are answered READONLY too.
    #   A target that does not catch up within TIMEOUT aborts it (no FORCE): the primary
    #   stays one and the paused writes go through. The target must be an online replica.
    # - FAILOVER TO <chaos Redis> sent to the new primary fails back the same way; then
    #   REPLICAOF NO ONE detaches the second server (it keeps its copy, unused).
    # - CONFIG SET maxmemory N with maxmemory-policy noeviction: once used_memory passes N,
    #   every command that may grow memory (SET, HSET, EVALSHA of a script that may write,
    #   again refused whole before it runs) answers "OOM command not allowed when used
    #   memory > 'maxmemory'."; reads and DEL work. CONFIG SET maxmemory 0 lifts the limit.
    # - INFO errorstats counts the error replies by code (errorstat_READONLY,
    #   errorstat_OOM) since the server started: how a test knows the daemons were refused.
    def refusals(self, code: str) -> int:
        """Error replies ``code`` (READONLY, OOM) the chaos Redis has sent since it started."""
        stats = self.redis.info("errorstats").get(f"errorstat_{code}") or {}
        return int(stats.get("count", 0)) if isinstance(stats, dict) else 0

    def _role(self, client: redis.Redis) -> str:
        return str(client.info("replication")["role"])

    def redis_read_only(self, seconds: float) -> bool:
        """A real failover: a second Redis becomes a replica of the chaos Redis, and once it
        is in sync ``FAILOVER TO`` it makes the chaos Redis a read-only replica of it (every
        write answers READONLY: the daemons must hold their batches). After ``seconds`` the
        chaos Redis is failed back to (see :meth:`_fail_back`). False, and nothing changed,
        when the replica did not get in sync or the failover was aborted."""
        if self.redis_second is None:
            self.redis_second = RedisServer()  # no persistence: it only lends its role
        second = self.redis_second
        second.start()
        primary = self.redis
        replica = redis.Redis.from_url(second.url, socket_timeout=5)
        try:
            primary.config_set("repl-diskless-sync-delay", 0)  # reset by a Redis restart
            replica.execute_command("REPLICAOF", "127.0.0.1", self.redis_server.port)

            def in_sync() -> bool:
                info = primary.info("replication")
                return any(
                    isinstance(v, dict)
                    and v.get("port") == second.port
                    and v.get("state") == "online"
                    for k, v in info.items()
                    if k.startswith("slave")
                )

            synced = _poll(in_sync, 10.0)
            if synced:
                primary.execute_command("FAILOVER", "TO", "127.0.0.1", second.port, "TIMEOUT", 3000)
                synced = _poll(lambda: self._role(primary) == "slave", 6.0)
            if not synced:
                self.note(
                    "redis READONLY fault skipped: the replica did not sync, or FAILOVER aborted"
                )
                replica.execute_command("REPLICAOF", "NO", "ONE")
                return False
        finally:
            replica.close()
        self.fault(
            "redis READONLY (failover)", f"to the replica on port {second.port} for {seconds:.1f}s"
        )
        self.later(
            seconds,
            "redis failback",
            partial(self._fail_back, self.refusals("READONLY")),
            tag="redis",
        )
        return True

    def _fail_back(self, refused_before: int) -> None:
        """``FAILOVER TO`` the chaos Redis, sent to the second one; waits until the chaos
        Redis is a primary again (``REPLICAOF NO ONE`` on it if the failover does not get
        there: it holds what the second one holds, which no one else writes), then detaches
        the second one."""
        assert self.redis_second is not None
        refused = self.refusals("READONLY") - refused_before
        self.figures.effects["READONLY replies"] += refused
        second = redis.Redis.from_url(self.redis_second.url, socket_timeout=5)
        try:
            second.execute_command(
                "FAILOVER", "TO", "127.0.0.1", self.redis_server.port, "TIMEOUT", 3000
            )
            if not _poll(lambda: self._role(self.redis) == "master", 8.0):
                self.note("redis failback did not complete: REPLICAOF NO ONE on the chaos Redis")
                self.redis.execute_command("REPLICAOF", "NO", "ONE")
            second.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            second.close()
        self.note(f"redis is a primary again ({refused} READONLY replies while it was not)")

    def redis_oom(self, seconds: float, headroom: int) -> None:
        """``maxmemory`` set ``headroom`` bytes above used_memory (below it when negative)
        with ``noeviction``: writes pass until the memory reaches it, then answer OOM (the
        daemons must hold their batches, never dead-letter them); lifted after ``seconds``."""
        self.redis.config_set("maxmemory-policy", "noeviction")
        used = int(self.redis.info("memory")["used_memory"])
        limit = max(1, used + headroom)
        self.redis.config_set("maxmemory", limit)
        self.fault(
            "redis OOM (maxmemory)", f"{limit} bytes, {headroom:+d} over used, for {seconds:.1f}s"
        )
        self.later(
            seconds,
            "redis maxmemory 0",
            partial(self._lift_maxmemory, self.refusals("OOM")),
            tag="redis",
        )

    def _lift_maxmemory(self, refused_before: int) -> None:
        refused = self.refusals("OOM") - refused_before
        self.figures.effects["OOM replies"] += refused
        self.redis.config_set("maxmemory", 0)
        self.note(f"redis maxmemory lifted ({refused} OOM replies under it)")

    # --- the cluster's faults (cluster mode) ----------------------------------------------------
    @property
    def cluster(self) -> ClusterControl:
        assert self.redis_cluster is not None, "not in cluster mode"
        return self.redis_cluster

    def _cluster_url(self) -> str:
        """A node whose process runs and is not paused now: the one node a config names
        (redis-py finds the others); rewritten at each daemon start and before each use of
        the direct config, so that it names none that a fault took down meanwhile."""
        return f"redis://127.0.0.1:{self.cluster.live_ports()[0]}/0"

    def refresh_direct_config(self) -> None:
        if self.redis_cluster is not None:
            self.write_config(self.direct_config, direct=True)

    def hot_slots(self) -> list[int]:
        """Slots of the chaos views' shared keys (a sorted set and a hash per owner, a set
        per status: most changes write some of them) and of the busiest owner-record bucket."""
        keys = [f"chaos:owner:{o}:{kind}" for o in OWNERS for kind in ("by-n", "status")]
        slots = {slot_of(k) for k in [*keys, *(f"chaos:status:{s}" for s in STATUSES)]}
        buckets = list(self.redis.scan_iter(match=b"vk:{*}:o:*", count=1000))
        if buckets:
            slots.add(slot_of(max(buckets, key=lambda k: (self.redis.hlen(k), k))))
        return sorted(slots)

    def redirections(self) -> Counter[str]:
        """ASK and TRYAGAIN replies the masters have sent (INFO errorstats)."""
        out: Counter[str] = Counter()
        for master in self.cluster.masters():
            with self.cluster.client(master) as conn:
                stats = conn.info("errorstats")
            for code in ("ASK", "TRYAGAIN"):
                found = stats.get(f"errorstat_{code}")
                out[code] += int(found["count"]) if isinstance(found, dict) else 0
        return out

    def cluster_failover(self, rng: random.Random) -> None:
        """CLUSTER FAILOVER on the replica of a hot slot's master (waits until it is done:
        a manual failover loses no write)."""
        slot = rng.choice(self.hot_slots())
        master = self.cluster.node_for_slot(slot)
        replica = self.cluster.replicas_of(master)[0]
        self.fault("cluster failover", f"{master.port} -> {replica.port} (slot {slot})")
        self.cluster.failover(replica)
        self.note(f"cluster failover done: {replica.port} is the master of slot {slot}")

    def cluster_migrate(self, rng: random.Random, seconds: float) -> None:
        """A hot slot migrates to another master: half its keys now (calls get ASK for them,
        TRYAGAIN for keys on both sides), the rest and the hand-over after ``seconds``."""
        slot = rng.choice(self.hot_slots())
        source = self.cluster.node_for_slot(slot)
        target = rng.choice([m for m in self.cluster.masters() if m.node_id != source.node_id])
        before = self.redirections()
        migration = self.cluster.begin_migration(slot, target)
        # the slot's bookkeeping hash first: a call for keys not on the source then gets ASK
        left = sorted(migration.keys_left(), key=lambda k: not k.endswith(b"}:c"))
        moved = migration.move_keys(left[: (len(left) + 1) // 2])
        self.fault(
            "cluster slot migration",
            f"slot {slot} {source.port} -> {target.port}: {moved} of {len(left)} keys now, the "
            f"rest in {seconds:.1f}s",
        )
        self.later(
            seconds,
            f"slot {slot} handed over",
            partial(self._end_migration, migration, before),
            tag="redis",
        )

    def _end_migration(self, migration: SlotMigration, before: Counter[str]) -> None:
        moved = migration.finish()
        after = self.redirections()
        for code in ("ASK", "TRYAGAIN"):
            self.figures.effects[f"{code} replies"] += after[code] - before[code]
        self.note(f"slot {migration.slot} on {migration.target.port} ({moved} more keys moved)")

    def cluster_pause(self, rng: random.Random, seconds: float) -> None:
        """A master stops answering (SIGSTOP) for ``seconds``: shorter than the node timeout,
        calls time out and are sent again; longer, its replica takes over and it comes back
        as a replica."""
        master = rng.choice(self.cluster.masters())
        failover = seconds * 1000 > self.cluster.node_timeout_ms
        self.cluster.pause(master, seconds)
        self.refresh_direct_config()  # for a Lambda cold start meanwhile
        self.fault(
            f"cluster master unreachable{' (failover)' if failover else ''}",
            f"{master.port} SIGSTOPped for {seconds:.1f}s",
        )
        self.later(seconds, f"cluster node {master.port} resumed", self._cluster_healthy, "redis")

    def cluster_kill_master(self, rng: random.Random, down_for: float) -> None:
        """SIGKILL of a master; waits until its replica took over; it is started again
        ``down_for`` seconds later (empty: it becomes a replica of the new master)."""
        master = rng.choice(self.cluster.masters())
        self.fault("cluster master kill -9", f"{master.port}, started again {down_for:.1f}s later")
        promoted = self.cluster.kill_master(master)
        self.refresh_direct_config()
        self.note(f"cluster: {promoted.port} took over from {master.port}")
        self.later(
            down_for,
            f"cluster node {master.port} restarted",
            partial(self._restart_node, master.port),
            tag="redis",
        )

    def _restart_node(self, port: int) -> None:
        self.cluster.restart_as_replica(port)
        self._cluster_healthy()

    def _cluster_healthy(self) -> None:
        """Until every node is up, each master has a synced replica and no slot migrates
        (the next cluster fault needs them)."""
        self.cluster.wait_healthy(30.0)
        self.refresh_direct_config()

    def lost_views(self) -> list[str]:
        """Views marked needs_rebuild: a loss a sink noticed (in cluster mode: writes a
        killed or failed-over master acknowledged but never replicated)."""
        return sorted(n for n, s in self.store.view_states().items() if s.needs_rebuild)

    # --- rebuilds --------------------------------------------------------------------------------
    def rebuild_handover(
        self, how: str, phase: str, down_for: float, items_per_second: float
    ) -> None:
        """`viewkeeper rebuild --all` in the background (its scan slowed to
        ``items_per_second``); once it is in ``phase`` -- "handshake": it raised the
        generation and waits for the readers to acknowledge it; "scan": the handshake is done
        -- the lease holder of that moment gets ``how`` ("kill -9": restarted after
        ``down_for``; "SIGSTOP": resumed after ``down_for``), so the lease moves while the
        rebuild runs. Its exit status is asserted when it ends (:meth:`tick`)."""
        self.fault("rebuild + lease handover", f"{how} of the holder in the {phase}")
        self.refresh_direct_config()
        args = ["rebuild", "--all", "-c", str(self.direct_config)]
        args += ["--max-items-per-second", f"{items_per_second:.1f}"]
        self._rebuilds += 1
        job = CliJob(args, out=self.workdir / f"rebuild-{self._rebuilds}.out", log=self.tool_log)
        marker = "raised generation" if phase == "handshake" else "handshake done"
        lease = self.lease()
        self.jobs.append(
            _Job(
                job,
                phase,
                marker,
                partial(self._hand_over, how, phase, down_for),
                lease.owner if lease is not None else None,
            )
        )
        self.note(f"rebuild started in the background (pid {job.pid})")

    def _hand_over(self, how: str, phase: str, down_for: float) -> None:
        slot = self.holder()
        d = self.daemons[slot] if slot is not None else None
        if d is None or not d.alive() or d.paused:
            self.note(f"rebuild in its {phase}: no live lease holder to take the lease from")
            return
        self.note(f"rebuild in its {phase}: {how} of the lease holder {slot} for {down_for:.1f}s")
        self.figures.effects[f"holder {how} during a rebuild"] += 1
        if how == "kill -9":
            d.kill()
            self.later(down_for, f"restart daemon {slot}", partial(self.start, slot))
        else:
            d.pause()
            self.later(down_for, f"SIGCONT daemon {slot}", d.resume)

    def _rebuild_ended(self, job: _Job) -> None:
        self.figures.effects["background rebuilds"] += 1
        if job.action is not None:
            self.note(f"rebuild ended before its {job.phase} was seen: no handover")
        out = job.cli.output()
        lines = [x for x in out.splitlines() if x.startswith(("rebuilt ", "handshake done"))]
        lease = self.lease()
        owner = lease.owner if lease is not None else None
        moved = owner != job.owner_at_start
        self.figures.effects["rebuilds that saw the lease move"] += moved
        self.figures.effects["leases revoked by a rebuild"] += sum("; revoked " in x for x in lines)
        self.note(
            f"rebuild exit {job.cli.returncode} in {job.cli.seconds:.1f}s, lease "
            f"{job.owner_at_start} -> {owner}: {' / '.join(lines) or out[-300:]}"
        )
        assert job.cli.returncode == 0, (
            f"rebuild failed (exit {job.cli.returncode}):\n{out[-3000:]}"
        )

    def rebuild(self) -> None:
        self.refresh_direct_config()
        started = time.monotonic()
        res = run_cli(["rebuild", "--all", "-c", str(self.direct_config)], log=self.tool_log)
        self.note(
            f"rebuild exit {res.returncode} in {time.monotonic() - started:.1f}s: "
            f"{res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-300:]}"
        )
        assert res.returncode == 0, f"rebuild failed:\n{res.stdout}\n{res.stderr}"

    # --- the end ---------------------------------------------------------------------------------
    def restore_everything(self) -> None:
        self.finish_pending()
        self.finish_jobs()
        self.finish_pending()  # what a rebuild's handover scheduled
        self.os_proxy.restore()
        for proxy in self.ddb_proxies.values():
            proxy.restore()
        if self.redis_server is not None and not self.redis_server.is_running():
            self.redis_server.start()
        if self.redis_cluster is not None:  # resumed, started, migrations finished, healthy
            self.redis_cluster.heal()
        for d in self.daemons.values():
            d.resume()

    def drain(self, timeout: float = 180.0) -> None:
        """One `viewkeeper run --until-caught-up` against the services directly."""
        self.refresh_direct_config()
        started = time.monotonic()
        res = run_cli(
            ["run", "-c", str(self.direct_config), "--until-caught-up"],
            log=self.tool_log,
            timeout=timeout,
        )
        self.note(f"drain exit {res.returncode} in {time.monotonic() - started:.1f}s")
        assert res.returncode == 0, f"drain failed:\n{res.stderr[-3000:]}"

    def deadletters(self) -> list[dict[str, Any]]:
        res = run_cli(["deadletters", "list", "-c", str(self.direct_config), "--json"])
        assert res.returncode == 0, res.stderr
        out: list[dict[str, Any]] = json.loads(res.stdout)
        return out

    def check(self) -> CheckReport:
        return check_sinks(
            db=self.db,
            table=TABLE,
            key_names=KEY_NAMES,
            registry=self.registry,
            redis_client=self.redis,
            opensearch=self.os_sink,
            redis_sink=self.redis_sink,
        )

    def stream_records(self) -> Iterator[dict[str, Any]]:
        """Every record in the table's stream, oldest first."""
        from tests.testbed.dynamo import boto3_client

        streams = boto3_client("dynamodbstreams", self.dynamodb_url)
        arn = self.db.describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
        shard = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"][0]
        it = streams.get_shard_iterator(
            StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while it:
            page = streams.get_records(ShardIterator=it, Limit=1000)
            yield from page["Records"]
            if not page["Records"]:
                break
            it = page.get("NextShardIterator")

    def stream_end(self) -> str | None:
        """The newest sequence number in the table's stream (None while it is empty)."""
        last = None
        for r in self.stream_records():
            last = r["dynamodb"]["SequenceNumber"]
        return last

    def stream_history(self, pk: str, sk: int) -> list[str]:
        """The item's records in the stream, oldest first: sequence, event, new image."""
        out: list[str] = []
        for r in self.stream_records():
            d = r["dynamodb"]
            if d["Keys"]["pk"]["S"] != pk or int(d["Keys"]["sk"]["N"]) != sk:
                continue
            image = {k: next(iter(v.values())) for k, v in d.get("NewImage", {}).items()}
            image = {k: v for k, v in image.items() if k not in ("pk", "sk")}
            out.append(f"{d['SequenceNumber']} {r['eventName']:<6} {image}")
        return out

    def diagnose(self, report: CheckReport) -> str:
        """For each OpenSearch difference: the stored document (with ``_vk``), the item's
        owner record, and the item's history in the stream."""
        lines: list[str] = []
        for where in report.opensearch.where:
            alias, _, doc_id = where.partition("/")
            view = next(v for v in self.registry if v.index == alias)
            names = self.os_sink.indexes(view)
            doc = self.os_client.get(index=names.alias, id=doc_id, ignore=404)
            meta = (doc.get("_source") or {}).get("_vk", {})
            item = meta.get("item") or doc_id
            owner = self.os_client.get(index=names.owners, id=item, ignore=404)
            pk, _, sk = item.partition("|")
            lines.append(f"{where}: stored _vk {meta}; owner record {owner.get('_source')}")
            lines += [f"    {h}" for h in self.stream_history(pk, int(sk or 0))]
        return "\n".join(lines)

    def log_counts(self) -> Counter[str]:
        """What the daemons' logs say happened (all lives of every slot)."""
        marks = {
            "leases taken": "took lease",
            "leases lost": "lost lease",
            "pages retried (sink down)": "retrying the page",
            "worker crashes": "crashed",
            "checkpoints retried (table down)": "not written (",
            "dead-lettered": "dead-lettered",
            "GetRecords retried": "backing off",
            "sink data lost reported": "SINK DATA LOST",
        }
        counts: Counter[str] = Counter()
        for d in self.daemons.values():
            with contextlib.suppress(OSError):
                text = d.log.read_text(errors="replace")
                for name, mark in marks.items():
                    counts[name] += text.count(mark)
        return counts

    def logs(self) -> str:
        parts = [f"--- daemon {s} ---\n{d.tail(80)}" for s, d in self.daemons.items()]
        tools = self.tool_log.read_text()[-4000:] if self.tool_log.exists() else ""
        return "\n".join([*parts, f"--- tools ---\n{tools}"])

    def close(self) -> None:
        (self.workdir / "timeline.txt").write_text("\n".join(self.figures.timeline) + "\n")
        for job in self.jobs:
            job.cli.kill()
        for d in self.daemons.values():
            d.close()
        if self.redis_second is not None:
            self.redis_second.close()
        with contextlib.suppress(Exception):
            self.os_proxy.close()
        for proxy in self.ddb_proxies.values():
            with contextlib.suppress(Exception):
                proxy.close()
        self.redis.close()
        self.os_client.close()
        with contextlib.suppress(Exception):
            self.db.delete_table(TableName=self.coord_table)


def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Whether ``predicate`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
