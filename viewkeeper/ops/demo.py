"""`viewkeeper demo`: the product in one minute, with nothing but Python installed.

A local DynamoDB with a stream (moto's server, in this process, on loopback), fakeredis
unless ``--redis-url`` is given (a Redis Cluster with ``--redis-cluster``: any of its nodes'
URLs), OpenSearch only with ``--opensearch-url``. It creates an
``orders`` table, runs the daemon on the example views in ``views/orders.py``, then writes,
changes and deletes orders and prints, after each step, what changed in the views — then
replays the whole stream to show that nothing changes twice.

Pointed at a Redis or OpenSearch of the user's, it never writes the user's names: every key
the views write gets the prefix :data:`REDIS_PREFIX` (``entry_prefix``, bookkeeping under it
too) and every index :data:`INDEX_PREFIX` (``index_prefix``), so an ``orders`` index or an
``order:o-1001`` key of an application is left alone. It removes what an earlier demo left
under those names before it starts (a new demo is a new deployment, whose claims would
otherwise refuse them), and removes its own at the end unless ``keep``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from viewkeeper.app import App
    from viewkeeper.projection.registry import ViewRegistry

__all__ = ["INDEX_PREFIX", "REDIS_PREFIX", "run_demo"]

REDIS_PREFIX = "viewkeeper-demo:"
INDEX_PREFIX = "viewkeeper-demo-"

BOLD, DIM, GREEN, RED, YELLOW, RESET = (
    "\033[1m",
    "\033[2m",
    "\033[32m",
    "\033[31m",
    "\033[33m",
    "\033[0m",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _colors(enabled: bool) -> None:
    global BOLD, DIM, GREEN, RED, YELLOW, RESET
    if not enabled:
        BOLD = DIM = GREEN = RED = YELLOW = RESET = ""


def _redis_snapshot(client: Any) -> dict[str, str]:
    """Every key the views own (the demo's prefix taken off, bookkeeping left out),
    rendered for humans."""
    out: dict[str, str] = {}
    for raw in sorted(client.scan_iter(match=REDIS_PREFIX + "*", count=1000)):
        full = raw.decode() if isinstance(raw, bytes) else raw
        key = full[len(REDIS_PREFIX) :]
        if key.startswith("vk:"):
            continue
        kind = client.type(full)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            v = client.get(full)
            out[key] = v.decode() if isinstance(v, bytes) else str(v)
        elif kind == "zset":
            members = client.zrange(full, 0, -1, withscores=True)
            out[key] = "[" + ", ".join(f"{m.decode()}@{s:.0f}" for m, s in members) + "]"
        elif kind == "set":
            out[key] = "{" + ", ".join(sorted(m.decode() for m in client.smembers(full))) + "}"
        elif kind == "hash":
            out[key] = str({k.decode(): v.decode() for k, v in client.hgetall(full).items()})
        elif kind == "stream":  # a change-log view: how many events, and the newest
            last = client.xrevrange(full, count=1)
            newest = {k.decode(): v.decode() for k, v in last[0][1].items()} if last else {}
            out[key] = f"{client.xlen(full)} events, newest {newest}"
    return out


def _remove_demo_names(rclient: Any, opensearch_url: str | None) -> int:
    """Delete every key under REDIS_PREFIX and every index and stored script named
    INDEX_PREFIX...: the demo's own names, nothing else. Returns how many were removed."""
    removed = 0
    batch: list[Any] = []
    for key in rclient.scan_iter(match=REDIS_PREFIX + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += rclient.delete(*batch)
            batch = []
    if batch:
        removed += rclient.delete(*batch)
    if opensearch_url:
        from viewkeeper.sinks.connect import opensearch_client
        from viewkeeper.sinks.opensearch import SCRIPT_NAME

        client = opensearch_client([opensearch_url])
        try:
            found = client.indices.get(index=INDEX_PREFIX + "*", expand_wildcards="all")
            for index in found:
                client.indices.delete(index=index)
                removed += 1
            client.delete_script(id=INDEX_PREFIX + SCRIPT_NAME, ignore=[404])
        finally:
            client.close()
    return removed


def _records_accounted(registry: ViewRegistry) -> int:
    """(record, view) pairs the daemon has accounted for so far (viewkeeper_records_total):
    one record a demo step writes adds one per view."""
    from prometheus_client import REGISTRY

    total = 0.0
    for view in registry:
        for outcome in ("applied", "stale", "dead_lettered"):
            labels = {"view": view.name, "outcome": outcome}
            total += REGISTRY.get_sample_value("viewkeeper_records_total", labels) or 0.0
    return int(total)


def _print_diff(before: dict[str, str], after: dict[str, str]) -> None:
    changed = False
    for key in sorted(set(before) | set(after)):
        if key not in before:
            print(f"    {GREEN}+ {key:<28} {after[key]}{RESET}")
        elif key not in after:
            print(f"    {RED}- {key:<28} (was {before[key]}){RESET}")
        elif before[key] != after[key]:
            print(f"    {YELLOW}~ {key:<28} {after[key]}{RESET}  {DIM}(was {before[key]}){RESET}")
        else:
            continue
        changed = True
    if not changed:
        print(f"    {DIM}(no change){RESET}")


def run_demo(
    redis_url: str | None = None,
    opensearch_url: str | None = None,
    pace: float = 0.6,
    out: Any = None,
    keep: bool = False,
    redis_cluster: bool = False,
) -> int:
    """Run the demo (see the module doc); 0 when it ran, 2 when views/orders.py is not
    importable from the current directory, or ``redis_cluster`` does not fit ``redis_url``
    (asked for without one: the embedded fakeredis is a standalone Redis; a standalone Redis
    with it, a cluster without it)."""
    import logging

    if redis_cluster and not redis_url:
        print(
            "viewkeeper demo: --redis-cluster needs --redis-url (a node of your Redis "
            "Cluster, like redis://127.0.0.1:7000/0): the demo's embedded Redis is standalone",
            file=sys.stderr,
        )
        return 2

    from moto.server import ThreadedMotoServer

    from viewkeeper.ops.logs import setup_logging

    _colors(sys.stdout.isatty() and out is None)
    setup_logging("text", "WARNING")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    registry = _demo_views(with_opensearch=bool(opensearch_url))
    if registry is None:
        return 2
    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        demo = _Demo(
            f"http://127.0.0.1:{port}", redis_url, opensearch_url, pace, registry, redis_cluster
        )
        demo.run(keep)
        return 0
    except _WrongRedis as exc:
        print(f"viewkeeper demo: {exc}", file=sys.stderr)
        return 2
    finally:
        moto.stop()


class _WrongRedis(Exception):
    """--redis-url is a cluster without --redis-cluster, or the other way round."""


def _demo_views(with_opensearch: bool) -> ViewRegistry | None:
    """The example views of views/orders.py (the OpenSearch one only with an OpenSearch)."""
    from viewkeeper.projection.registry import ViewLoadError, ViewRegistry, load_views

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        all_views = load_views(["views.orders"])
    except ViewLoadError as exc:
        print(
            f"viewkeeper demo: {exc}\nRun the demo from the repository root, where "
            "views/orders.py lives.",
            file=sys.stderr,
        )
        return None
    registry = ViewRegistry()
    for view in all_views:
        if view.kind == "redis" or with_opensearch:
            registry.add(view)
    return registry


class _Demo:
    """One run: the table, the daemon on it, the story told step by step."""

    def __init__(
        self,
        endpoint: str,
        redis_url: str | None,
        opensearch_url: str | None,
        pace: float,
        registry: ViewRegistry,
        redis_cluster: bool = False,
    ) -> None:
        import boto3

        self.endpoint = endpoint
        self.redis_url = redis_url
        self.redis_cluster = redis_cluster
        self.opensearch_url = opensearch_url
        self.pace = pace
        self.registry = registry
        self.db = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")
        self.rclient: Any = None
        self.step = 0

    def run(self, keep: bool) -> None:
        print(
            f"{BOLD}viewkeeper demo{RESET}: DynamoDB (moto) on {self.endpoint}; Redis: "
            f"{self._redis_shown()}; OpenSearch: "
            f"{self.opensearch_url or 'off (give --opensearch-url)'}"
        )
        print(f"views from views/orders.py: {', '.join(v.name for v in self.registry)}")
        self._create_table()
        self.rclient = self._redis()
        left = _remove_demo_names(self.rclient, self.opensearch_url)
        print(
            f"the demo writes only its own names: Redis keys '{REDIS_PREFIX}...'"
            + (f", OpenSearch indexes '{INDEX_PREFIX}...'" if self.opensearch_url else "")
            + (f" (removed {left} left by an earlier demo)" if left else "")
        )
        app = self._app()
        sup = app.supervisor()
        thread = threading.Thread(target=sup.run, name="supervisor", daemon=True)
        thread.start()
        self._changes()
        sup.request_stop()
        thread.join(15)
        self._replay(app)
        if self.opensearch_url:
            self._documents(app)
        app.close()
        if keep:
            print(f"\nkept the demo's keys ('{REDIS_PREFIX}...') and indexes")
        else:
            _remove_demo_names(self.rclient, self.opensearch_url)
        self.rclient.close()
        print(
            f"\n{BOLD}Done.{RESET} The views are plain functions in views/orders.py; try "
            "`viewkeeper --help`."
        )

    # -- setting up ----------------------------------------------------------------------
    def _create_table(self) -> None:
        self.db.create_table(
            TableName="orders",
            BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}],
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )

    def _redis_shown(self) -> str:
        """The Redis the demo writes to, for its first line (never a password)."""
        if not self.redis_url:
            return "fakeredis (in-process)"
        from viewkeeper.sinks.connect import describe_target

        where = describe_target(self.redis_url)
        return f"Redis Cluster at {where}" if self.redis_cluster else where

    def _redis(self) -> Any:
        """The demo's client; a Redis Cluster without ``--redis-cluster`` (or a standalone
        Redis with it) is :class:`_WrongRedis`, saying which flag to change."""
        from viewkeeper.sinks.connect import NotACluster, describe_target

        where = describe_target(self.redis_url or "")
        if self.redis_url and self.redis_cluster:
            from viewkeeper.sinks.connect import redis_cluster_client

            try:
                return redis_cluster_client(self.redis_url)
            except NotACluster as exc:
                said = f" ({exc.reply})" if exc.reply else ""
                raise _WrongRedis(
                    f"--redis-url {where} is not a Redis Cluster{said}; drop --redis-cluster"
                ) from None
        if self.redis_url:
            from viewkeeper.sinks.connect import redis_client

            client = redis_client(self.redis_url)
            try:
                cluster = client.info("cluster").get("cluster_enabled")
            except Exception:  # unreachable, or INFO refused: the demo's first write says
                cluster = False
            if cluster:
                client.close()
                raise _WrongRedis(f"--redis-url {where} is a Redis Cluster; add --redis-cluster")
            return client
        import fakeredis

        return fakeredis.FakeRedis()

    def _app(self) -> App:
        """The daemon's assembly on the demo's config; the Redis sink is the demo's own
        client (fakeredis unless a Redis was given; the cluster sink on a Redis Cluster)."""
        from viewkeeper.app import App
        from viewkeeper.config import parse_config

        raw: dict[str, Any] = {
            "aws": {"region": "us-east-1", "endpoint_url": self.endpoint},
            "tables": {"orders": {"starting_position": "TRIM_HORIZON"}},
            "views": ["views.orders"],
            "redis": {
                "cache": {
                    "url": self.redis_url or "redis://127.0.0.1:6379/0",
                    "entry_prefix": REDIS_PREFIX,
                    "key_prefix": REDIS_PREFIX + "vk:",
                    "cluster": self.redis_cluster,
                }
            },
            "coordination": {"table": "viewkeeper-coordination"},
            "worker": {"poll_interval": 0.05, "lease_duration": 3.0},
            "metrics": {"port": None},
        }
        if self.opensearch_url:
            raw["opensearch"] = {
                "search": {"hosts": [self.opensearch_url], "index_prefix": INDEX_PREFIX}
            }
        config = parse_config(raw, "demo")
        # the sinks as the daemon builds them (the cluster sink with cluster: true), the
        # Redis one on the demo's own client
        builder = App(config, registry=self.registry, sinks={})
        sinks: dict[Any, Any] = {
            ("redis", "cache"): builder.build_sink("redis", "cache", client=self.rclient)
        }
        if self.opensearch_url:
            sinks[("opensearch", "search")] = builder.build_sink("opensearch", "search")
        for (kind, _), sink in sinks.items():
            sink.prepare([v for v in self.registry if v.kind == kind])
        return App(config, registry=self.registry, sinks=sinks)

    # -- the story -----------------------------------------------------------------------
    def _say(self, title: str) -> None:
        self.step += 1
        print(f"\n{BOLD}{self.step}. {title}{RESET}")

    def _changes(self) -> None:
        """Writes to the table, each followed by what changed in the views."""

        def settle(records_before: int) -> None:
            """Until the step's record is accounted for by every view (applied, appended,
            stale or dead-lettered: all written by then), at most 10 s. A fixed wait after
            the first change showed a slower sink's (a cluster's) last writes a step late."""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if _records_accounted(self.registry) >= records_before + len(self.registry):
                    break
                time.sleep(0.05)
            time.sleep(0.05)

        def act(title: str, write: Callable[[], None]) -> None:
            self._say(title)
            before = _redis_snapshot(self.rclient)
            records_before = _records_accounted(self.registry)
            write()
            settle(records_before)
            _print_diff(before, _redis_snapshot(self.rclient))
            time.sleep(self.pace)

        def put(order_id: str, customer: str, status: str, total: str, ts: int) -> None:
            self.db.put_item(
                TableName="orders",
                Item={
                    "order_id": {"S": order_id},
                    "customer_id": {"S": customer},
                    "status": {"S": status},
                    "total": {"N": total},
                    "created_at": {"N": str(ts)},
                },
            )

        act(
            "Alice orders a lamp: put_item o-1001",
            lambda: put("o-1001", "alice", "new", "42.50", 1700000001),
        )
        act(
            "Bob orders two books: put_item o-1002",
            lambda: put("o-1002", "bob", "new", "19.99", 1700000002),
        )
        act(
            "Alice orders tea: put_item o-1003",
            lambda: put("o-1003", "alice", "new", "7.25", 1700000003),
        )
        act(
            "o-1001 is paid: its status set moves, the counts per status follow "
            "(no invalidation code in the views)",
            lambda: put("o-1001", "alice", "paid", "42.50", 1700000001),
        )
        act(
            "o-1002 is reassigned to Carol: Bob's index entry and spend are retracted",
            lambda: put("o-1002", "carol", "new", "19.99", 1700000002),
        )
        act(
            "Alice cancels her tea: delete_item o-1003 retracts everything it owned",
            lambda: self.db.delete_item(TableName="orders", Key={"order_id": {"S": "o-1003"}}),
        )

    def _replay(self, app: App) -> None:
        """Every lease back to the start of the stream, read again: nothing changes."""
        from prometheus_client import REGISTRY

        from viewkeeper.coordination.model import LeaseState

        self._say("A crash replays the stream from the start: every record again, nothing changes")
        before = _redis_snapshot(self.rclient)
        for lease in app.store.list_leases("orders"):
            app.store.reset_lease("orders", lease.shard_id, None, LeaseState.ACTIVE)
        app.supervisor().run(until_caught_up=True)
        _print_diff(before, _redis_snapshot(self.rclient))

        def count(outcome: str) -> int:
            total = 0.0
            for v in self.registry:
                labels = {"view": v.name, "outcome": outcome}
                total += REGISTRY.get_sample_value("viewkeeper_records_total", labels) or 0.0
            return int(total)

        print(
            f"    {DIM}records across views: applied {count('applied')}, stale (replays "
            f"discarded by version) {count('stale')}, dead-lettered "
            f"{count('dead_lettered')}{RESET}"
        )

    def _documents(self, app: App) -> None:
        self._say(f"OpenSearch index '{INDEX_PREFIX}orders' at {self.opensearch_url}")
        osink = app.sinks[("opensearch", "search")]
        view = self.registry.get("order_doc")
        for doc_id, body in sorted(osink.live_documents(view).items()):  # type: ignore[attr-defined]
            print(f"    {doc_id}: {body}")
