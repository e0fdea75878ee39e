"""Redis pipeline: GetRecords page bodies → ``ShardWorker`` (``parse_records`` →
``Pipeline.process`` → checkpoint, as in the daemon; :mod:`bench.shard`) →
:class:`~viewkeeper.sinks.redis.RedisSink` on the REAL Redis, in one process.

The pages are :func:`bench.common.make_pages` pages (1000 records, ~12 attributes with a
nested map, a list of maps, a string set, 21-digit sequence numbers; 80 % MODIFY, 15 %
INSERT, 5 % REMOVE), remapped by :func:`steady_pages` onto a key space of
:data:`KEY_SPACE` items with a stable customer per item. Redis is first filled with one
version of every item (untimed), so the timed pages are the steady state of a cache:
mostly updates of items Redis already holds, each one newer than what is stored.

Figures (wall clock: Redis' own work is part of the price):

- ``Value`` view (one entry per item): target ≥ :data:`TARGET_RATE` records/s, and
  ≥ :data:`TARGET_RATIO` x the naive consumer.
- ``SortedSetMember`` view (``customer:{id}:orders``, member = order id).
- The naive consumer (the baseline): boto3's GetRecords parsing (botocore's JSON parser with
  the ``dynamodbstreams`` output shape, on the same bytes, as ``bench/decode.py`` does) +
  ``TypeDeserializer`` + the same view function + one round trip per record running a small
  version-checking Lua script (EVALSHA): what a hand-written Lambda-style consumer does.
- Raw pipelined EVALSHA of a trivial CAS script, 1000 per redis-py pipeline: the ceiling of
  "one script per record" from one Python process; viewkeeper's share of it is reported.

All contenders share one database (disjoint keys: the naive consumer writes under
``naive:``), are warmed once, and run interleaved, round after round, so that a noisy
moment on this shared machine hits every one of them; each figure is the best of its N
rounds. Every round uses pages whose sequence numbers are above everything already stored
(:func:`shift_sequences`), so no round is a cheap replay. More rows show design choices
measured in the same run: the worker keeping the garbage collector paused for a page's
whole life (decode, project, apply, free) against a loop pausing it for the decode only;
and the worker's read-ahead (``worker.prefetch``), off, and on and off with every GetRecords
answering after :data:`WIRE_DELAY` — a modelled round trip to the AWS service (a full 1 MB
page over the network), which this machine cannot measure: moto answers on loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import orjson

from bench.common import PAGE_RECORDS, Row, make_pages, rate
from bench.shard import Outcomes, worker_feed

__all__ = [
    "ENV_DYNAMODB",
    "ENV_OPENSEARCH",
    "ENV_REDIS",
    "KEY_SPACE",
    "QUICK_KEY_SPACE",
    "best_times",
    "redis_client",
    "service_url",
    "shift_sequences",
    "steady_pages",
    "warm_pages",
]

ENV_REDIS = "VIEWKEEPER_TEST_REDIS_URL"
ENV_OPENSEARCH = "VIEWKEEPER_TEST_OPENSEARCH_URL"
ENV_DYNAMODB = "VIEWKEEPER_TEST_DYNAMODB_URL"
KEY_SPACE = 20_000
QUICK_KEY_SPACE = 5_000  # --quick: a smaller table, so the untimed warm-up is short
TARGET_RATE = 40_000.0
TARGET_RATIO = 8.0
TABLE = "orders"
KEY_NAMES = ("order_id",)
SEQ_STEP = 10**12  # added per round: 21-digit sequence numbers stay 21 digits
WIRE_DELAY = 0.025  # seconds: a modelled GetRecords round trip to the service (not measured)

CAS_SCRIPT = b"""
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and #cur >= #ARGV[1] and cur >= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
return 1
"""
TRIVIAL_SCRIPT = b"""
local cur = redis.call('GET', KEYS[1])
if cur and cur >= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


# --- shared with the other bench modules ---------------------------------------------------
def service_url(var: str) -> str:
    """The URL of a test-bed service, or a clear error saying how to start them."""
    url = os.environ.get(var, "").strip()
    if not url:
        raise RuntimeError(
            f"{var} is not set. Run the benchmarks with the test bed, which starts Redis, "
            "OpenSearch and moto and exports their URLs:\n"
            "    .venv/bin/python -m tests.testbed run -- .venv/bin/python bench/run.py\n"
            "or keep them up with `.venv/bin/python -m tests.testbed serve` and paste its "
            "export lines."
        )
    return url


def redis_client() -> Any:
    """A redis-py client (bytes replies) on the test bed's Redis."""
    import redis

    return redis.Redis.from_url(service_url(ENV_REDIS), socket_timeout=60)


def steady_pages(
    pages: int, seed: int = 20260101, key_space: int = KEY_SPACE, customers: int = 5_000
) -> list[bytes]:
    """:func:`bench.common.make_pages` remapped onto ``key_space`` items: order ``n`` becomes
    ``o-{n % key_space}`` and gets one customer for life (``c-{n % customers}``), as a real
    order does; everything else (sizes, types, the event mix, sequence numbers) is kept."""
    out = []
    for body in make_pages(pages, seed):
        data = orjson.loads(body)
        for rec in data["Records"]:
            d = rec["dynamodb"]
            no = int(d["Keys"]["order_id"]["S"][2:]) % key_space
            oid = {"S": f"o-{no:08d}"}
            d["Keys"]["order_id"] = oid
            for image in ("NewImage", "OldImage"):
                if image in d:
                    d[image]["order_id"] = oid
                    d[image]["customer_id"] = {"S": f"c-{no % customers:06d}"}
            rec["dynamodb"]["SizeBytes"] = len(orjson.dumps(d))
        out.append(orjson.dumps(data))
    return out


def warm_pages(key_space: int = KEY_SPACE, seed: int = 7) -> list[bytes]:
    """One record per item of the key space, in order (REMOVEs turned into INSERTs of their
    old image): the cache's state before the timed rounds, whose sequence numbers are
    shifted above these by :data:`SEQ_STEP`."""
    pages = steady_pages(-(-key_space // PAGE_RECORDS), seed, key_space)
    out = []
    n = 0
    for body in pages:
        data = orjson.loads(body)
        for rec in data["Records"]:
            d = rec["dynamodb"]
            oid = {"S": f"o-{n % key_space:08d}"}
            if "NewImage" not in d:
                d["NewImage"] = d.pop("OldImage")
                rec["eventName"] = "INSERT"
            d["Keys"]["order_id"] = d["NewImage"]["order_id"] = oid
            d["NewImage"]["customer_id"] = {"S": f"c-{n % key_space % 5_000:06d}"}
            n += 1
        out.append(orjson.dumps(data))
    return out


def shift_sequences(pages: Sequence[bytes], offset: int) -> list[bytes]:
    """The same pages with every SequenceNumber raised by ``offset`` (a later round)."""
    out = []
    for body in pages:
        data = orjson.loads(body)
        for rec in data["Records"]:
            d = rec["dynamodb"]
            d["SequenceNumber"] = str(int(d["SequenceNumber"]) + offset)
        out.append(orjson.dumps(data))
    return out


def best_times(
    rounds: Sequence[Callable[[], object]], setup: Callable[[], object] | None = None
) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds of this process) over the round functions, each
    run once after ``setup``. Wall time is the figure (Redis' and OpenSearch's own work is
    part of the price); CPU time shows what the client itself costs on a busy machine. The
    best, not the mean: a busy neighbour only ever adds time."""
    wall = cpu = float("inf")
    for fn in rounds:
        if setup is not None:
            setup()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def _gc_setup() -> None:
    import gc

    gc.collect()


# --- the views -----------------------------------------------------------------------------
def _card(order: dict[str, Any]) -> Any:
    from viewkeeper import Value

    return Value(
        f"order:{order['order_id']}",
        {
            "status": order["status"],
            "total": order["total"],
            "customer_id": order["customer_id"],
            "created_at": order["created_at"],
        },
    )


def _by_customer(order: dict[str, Any]) -> Any:
    from viewkeeper import SortedSetMember

    return SortedSetMember(
        f"customer:{order['customer_id']}:orders",
        member=order["order_id"],
        score=order["created_at"],
    )


def _by_status(order: dict[str, Any]) -> Any:
    from viewkeeper import SortedSetMember

    return SortedSetMember(
        f"status:{order['status']}", member=order["order_id"], score=order["created_at"]
    )


def make_view(func: Callable[[dict[str, Any]], Any], name: str) -> Any:
    from viewkeeper import redis_view
    from viewkeeper.projection.api import view_of

    func.__name__ = name
    decorated = redis_view(table=TABLE, redis="cache", name=name)(func)
    return view_of(decorated)


class _Ours:
    """viewkeeper's path: parse_records → Pipeline.process → RedisSink."""

    def __init__(self, client: Any, view: Any) -> None:
        from viewkeeper.coordination.memory import MemoryStore
        from viewkeeper.projection.registry import ViewRegistry
        from viewkeeper.runtime.pipeline import Pipeline
        from viewkeeper.sinks.redis import RedisSink

        registry = ViewRegistry()
        registry.add(view)
        self.sink = RedisSink("cache", client)
        self.sink.prepare([view])
        self.store = MemoryStore()
        self.pipeline = Pipeline(registry, {("redis", "cache"): self.sink}, self.store, lambda v: 0)
        self.outcomes = Outcomes(self.pipeline)
        self.applied = 0
        self.stale = 0

    def feed(self, pages: Sequence[bytes]) -> Callable[[], None]:
        from viewkeeper.stream.client import parse_records

        def run() -> None:
            for body in pages:
                page = parse_records(body)
                report = self.pipeline.process(TABLE, KEY_NAMES, page.records)
                self.applied += report.applied
                self.stale += report.stale
                if report.dead_lettered:
                    raise AssertionError(f"{report.dead_lettered} records dead-lettered")

        return run

    def worker(
        self, pages: Sequence[bytes], prefetch: bool = True, delay: float = 0.0
    ) -> Callable[[], None]:
        """The daemon's path: a ShardWorker reads the pages as one shard (the collector
        paused for each page's whole life, the next page read ahead)."""
        return worker_feed(self.outcomes, TABLE, KEY_NAMES, pages, prefetch=prefetch, delay=delay)


class _Naive:
    """The baseline consumer: botocore + TypeDeserializer + one EVALSHA round trip each."""

    def __init__(self, client: Any) -> None:
        import botocore.parsers
        import botocore.session
        from boto3.dynamodb.types import TypeDeserializer

        model = botocore.session.get_session().get_service_model("dynamodbstreams")
        self.shape: Any = model.operation_model("GetRecords").output_shape
        self.parser = botocore.parsers.create_parser("json")
        self.deserialize = TypeDeserializer().deserialize
        self.client = client
        self.sha = client.script_load(CAS_SCRIPT)

    def warm(self, key_space: int) -> None:
        """Every item stored once, at a version below the timed rounds (pipelined)."""
        low = str(10**20).zfill(40)
        for lo in range(0, key_space, 1000):
            pipe = self.client.pipeline(transaction=False)
            for n in range(lo, min(lo + 1000, key_space)):
                pipe.evalsha(self.sha, 1, f"naive:order:o-{n:08d}", low, "{}")
            pipe.execute()

    def feed(self, pages: Sequence[bytes]) -> Callable[[], None]:
        import json

        des, client, sha = self.deserialize, self.client, self.sha

        def default(o: object) -> object:
            if isinstance(o, Decimal):
                return str(o)
            raise TypeError(type(o).__name__)

        def run() -> None:
            for body in pages:
                parsed: Any = self.parser.parse(
                    {"body": body, "headers": {}, "status_code": 200}, self.shape
                )
                for rec in parsed["Records"]:
                    d = rec["dynamodb"]
                    keys = {k: des(v) for k, v in d["Keys"].items()}
                    seq = d["SequenceNumber"].zfill(40)
                    if "NewImage" in d and rec["eventName"] != "REMOVE":
                        item = {k: des(v) for k, v in d["NewImage"].items()}
                        entry = _card(item)
                        value = json.dumps(entry.value, default=default)
                        key = entry.key
                    else:
                        value, key = "", f"order:{keys['order_id']}"
                    client.evalsha(sha, 1, "naive:" + key, seq, value)

        return run


def _raw_evalsha(client: Any, n: int) -> Callable[[], None]:
    """redis-py pipelined EVALSHA of a trivial CAS script, 1000 per pipeline, ``n`` ops."""
    sha = client.script_load(TRIVIAL_SCRIPT)
    keys = [f"raw:{i % KEY_SPACE}" for i in range(n)]
    rounds = [0]

    def run() -> None:
        rounds[0] += 1
        for lo in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for i in range(lo, min(lo + 1000, n)):
                pipe.evalsha(sha, 1, keys[i], f"{rounds[0]:04d}{i:09d}")
            pipe.execute()

    return run


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    client = redis_client()
    npages = 6 if quick else 20
    nrounds = 2 if quick else 3
    nb = 2 if quick else 5  # the naive consumer is ~5-10x slower: fewer pages
    key_space = QUICK_KEY_SPACE if quick else KEY_SPACE
    base = steady_pages(npages, key_space=key_space)
    count = npages * PAGE_RECORDS
    size = sum(len(p) for p in base) / count

    # Every contender lives in the same database at once (disjoint keys), warmed once, and
    # the rounds are interleaved: a noisy moment on this shared machine hits all of them.
    client.flushall()
    warm = warm_pages(key_space)
    views = {
        "value": _Ours(client, make_view(_card, "card")),
        "zset": _Ours(client, make_view(_by_customer, "by_customer")),
        "zmove": _Ours(client, make_view(_by_status, "by_status")),
    }
    if quick:
        del views["zmove"]
    for ours in views.values():
        ours.feed(warm)()
        ours.applied = ours.stale = 0
    value = views["value"]
    wire_pages = 8 if quick else 12  # the modelled wait makes these rounds slower
    del warm
    naive = _Naive(client)
    naive.warm(key_space)
    nraw = 20_000 if quick else 50_000
    raw_fn = _raw_evalsha(client, nraw)
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        w, c = best_times([fn], _gc_setup)
        wall[name] = min(wall.get(name, float("inf")), w)
        cpu[name] = min(cpu.get(name, float("inf")), c)

    step = 0

    def fresh() -> list[bytes]:  # pages newer than anything stored: no round is a replay
        nonlocal step
        step += 1
        return shift_sequences(base, SEQ_STEP * step)

    for _ in range(nrounds):
        # "value" is the shard worker's path: the collector paused for the whole page
        # (ShardWorker._page); "decode_only" pauses it around the decode alone (before)
        timed("value", value.worker(fresh()))
        timed("decode_only", value.feed(fresh()))
        timed("serial", value.worker(fresh(), prefetch=False))
        timed("wire", value.worker(fresh()[:wire_pages], delay=WIRE_DELAY))
        timed("wire_serial", value.worker(fresh()[:wire_pages], prefetch=False, delay=WIRE_DELAY))
        for name in ("zset", "zmove"):
            if name in views:
                timed(name, views[name].worker(fresh()))
        timed("naive", naive.feed(fresh()[:nb]))
        timed("raw", raw_fn)
    for name, ours in views.items():
        # value: 3 full rounds (worker, decode only, serial) + 2 rounds of wire_pages
        want = (3 * count + 2 * wire_pages * PAGE_RECORDS if name == "value" else count) * nrounds
        applied = ours.applied + ours.outcomes.applied
        if applied < 0.8 * want:  # a replay would come back stale
            stale = ours.stale + ours.outcomes.stale
            raise AssertionError(f"{name}: only {applied} of {want} applied, {stale} stale")
    client.flushall()
    client.close()

    value_rate, value_cpu = rate(count, wall["value"]), rate(count, cpu["value"])
    naive_rate = rate(nb * PAGE_RECORDS, wall["naive"])
    raw = rate(nraw, wall["raw"])
    rows = [
        Row(f"redis: pages ({size:,.0f} B/rec) -> Value view -> Redis", value_rate, "rec/s",
            None, None, TARGET_RATE, value_rate >= TARGET_RATE),
        Row.compare("redis: Value view vs naive consumer", value_rate, "rec/s", naive_rate,
                    TARGET_RATIO),
        Row.compare("redis: Value view, share of raw pipelined EVALSHA", value_rate, "rec/s",
                    raw, None),
        Row("redis: Value view, client CPU only (rec per CPU-second)", value_cpu, "rec/s"),
        Row.compare("redis: Value view, GC paused per page (worker) vs decode only",
                    value_rate, "rec/s", rate(count, wall["decode_only"]), None),
        Row.compare("redis: Value view, worker's read-ahead off (worker.prefetch: false)",
                    rate(count, wall["serial"]), "rec/s", value_rate, None),
        Row.compare(f"redis: Value view, GetRecords {WIRE_DELAY * 1000:.0f} ms (modelled), "
                    "read-ahead on vs off", rate(wire_pages * PAGE_RECORDS, wall["wire"]),
                    "rec/s", rate(wire_pages * PAGE_RECORDS, wall["wire_serial"]), None),
        Row.compare("redis: SortedSetMember customer:{id}:orders vs naive",
                    rate(count, wall["zset"]), "rec/s", naive_rate, None),
    ]  # fmt: skip
    if "zmove" in wall:
        rows.append(Row.compare("redis: SortedSetMember status:{s} (moves every update) vs naive",
                                rate(count, wall["zmove"]), "rec/s", naive_rate, None))  # fmt: skip
    rows += [
        Row("redis: naive consumer (botocore+TypeDeserializer+EVALSHA/rec)", naive_rate,
            "rec/s"),
        Row("redis: raw pipelined EVALSHA (trivial CAS, 1000/pipeline)", raw, "ops/s"),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":  # .venv/bin/python -m bench.redis_pipeline [--quick]
    from bench.common import print_table

    print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
