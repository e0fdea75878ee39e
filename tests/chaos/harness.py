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
systemd's ``Restart=`` would), counting those exits. Services are started and stopped from
the calling (main) thread only: the test bed's processes die with the thread that forked
them.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
import yaml
from opensearchpy import OpenSearch

from tests.chaos.checker import CheckReport, check_sinks
from tests.chaos.daemons import Daemon, run_cli
from tests.chaos.proxy import CutMode, TcpProxy
from tests.testbed import RedisServer
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.model import Lease, LeaseState
from viewkeeper.projection.registry import ViewRegistry, load_views
from viewkeeper.sinks.opensearch import OpenSearchSink

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


@dataclass
class Figures:
    faults: Counter[str] = field(default_factory=Counter)
    timeline: list[str] = field(default_factory=list)


class Harness:
    def __init__(
        self,
        workdir: Path,
        *,
        db: Any,
        dynamodb_url: str,
        opensearch_url: str,
        os_prefix: str,
        redis_server: RedisServer,
        rng: random.Random,
        slots: tuple[str, ...] = ("a", "b"),
    ) -> None:
        self.workdir = workdir
        self.db = db
        self.dynamodb_url = dynamodb_url
        self.opensearch_url = opensearch_url
        self.os_prefix = os_prefix
        self.redis_server = redis_server
        self.rng = rng
        self.t0 = time.monotonic()
        self.figures = Figures()
        self.pending: list[_Pending] = []
        self.coord_table = f"vk-coord-chaos-{uuid.uuid4().hex[:8]}"
        self.store = DynamoDBStore(db, self.coord_table)
        self.registry: ViewRegistry = load_views([VIEWS_MODULE])
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
        cfg = {
            "aws": {"region": "us-east-1", "endpoint_url": endpoint},
            "tables": {TABLE: {"starting_position": "TRIM_HORIZON"}},
            "views": [VIEWS_MODULE],
            "redis": {
                "cache": {"url": self.redis_server.url, "socket_timeout": 3, "connect_timeout": 1}
            },
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
        path.write_text(yaml.safe_dump(cfg))
        return path

    # --- bookkeeping -----------------------------------------------------------------------------
    def note(self, what: str) -> None:
        self.figures.timeline.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def fault(self, kind: str, detail: str = "") -> None:
        self.figures.faults[kind] += 1
        self.note(f"FAULT {kind} {detail}".rstrip())

    def later(self, delay: float, what: str, action: Callable[[], None]) -> None:
        self.pending.append(_Pending(time.monotonic() + delay, what, action))

    def busy(self) -> bool:
        """A fault with a duration is still in progress."""
        return bool(self.pending)

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
        self.later(down_for, "redis started", self._redis_start)

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

    def rebuild(self) -> None:
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
        self.os_proxy.restore()
        for proxy in self.ddb_proxies.values():
            proxy.restore()
        if not self.redis_server.is_running():
            self.redis_server.start()
        for d in self.daemons.values():
            d.resume()

    def drain(self, timeout: float = 180.0) -> None:
        """One `viewkeeper run --until-caught-up` against the services directly."""
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
        )

    def stream_history(self, pk: str, sk: int) -> list[str]:
        """The item's records in the stream, oldest first: sequence, event, new image."""
        from tests.testbed.dynamo import boto3_client

        streams = boto3_client("dynamodbstreams", self.dynamodb_url)
        arn = self.db.describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
        shard = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"][0]
        it = streams.get_shard_iterator(
            StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        out: list[str] = []
        while it:
            page = streams.get_records(ShardIterator=it, Limit=1000)
            for r in page["Records"]:
                d = r["dynamodb"]
                if d["Keys"]["pk"]["S"] != pk or int(d["Keys"]["sk"]["N"]) != sk:
                    continue
                image = {k: next(iter(v.values())) for k, v in d.get("NewImage", {}).items()}
                image = {k: v for k, v in image.items() if k not in ("pk", "sk")}
                out.append(f"{d['SequenceNumber']} {r['eventName']:<6} {image}")
            if not page["Records"]:
                break
            it = page.get("NextShardIterator")
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
        for d in self.daemons.values():
            d.close()
        with contextlib.suppress(Exception):
            self.os_proxy.close()
        for proxy in self.ddb_proxies.values():
            with contextlib.suppress(Exception):
                proxy.close()
        self.redis.close()
        self.os_client.close()
        with contextlib.suppress(Exception):
            self.db.delete_table(TableName=self.coord_table)
