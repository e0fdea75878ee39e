"""Scale: 500 idle shards in one process, and memory while draining a 1M-record backlog.

Both run a real :class:`~viewkeeper.runtime.supervisor.Supervisor` (leases in a
:class:`~viewkeeper.coordination.memory.MemoryStore`, one worker thread per shard) on the
in-process :class:`~viewkeeper.stream.fake.FakeStream`, applying a ``Value`` view to the
REAL Redis through :class:`~viewkeeper.sinks.redis.RedisSink`.

1. **Idle shards.** A table with 500 open shards and no writes. From the start of the
   supervisor until all 500 leases are held and every worker has read an empty page: the
   time it takes, the RSS it adds (VmRSS of /proc/self/status, after - before, both after a
   full collection) and the CPU the process then burns over :data:`IDLE_SECONDS` s of
   idling (user + system time / wall time, in % of one core). Each idle worker polls every
   ``poll_interval`` (0.25 s): 2,000 GetRecords a second against the fake here, which is
   cheaper per call than a signed HTTPS request to AWS would be.
2. **Backlog.** :data:`BACKLOG` records (100k with ``--quick``) written to a 4-shard
   ``NEW_IMAGE`` stream over 10,000 items before the supervisor starts at TRIM_HORIZON; RSS
   is sampled every 10 ms until it has caught up. The peak growth is compared with the
   bound the design gives: each shard worker holds one page (≤ 1000 records) at a time and
   the body of the next one, read ahead but not decoded yet, so memory ~ shards x (one
   GetRecords body + its decoded records + one more body) — measured here with tracemalloc
   on one page. The drain rate is reported too (4 worker threads, one GIL).

The fake stream stores each record as an ``orjson.dumps`` result; orjson 3.13 returns bytes
objects that keep a 4 KiB allocation however short the JSON (measured: a 441-byte body holds
4,097 bytes), which would make a 1M-record backlog cost ~4.5 GB before viewkeeper reads it.
The backlog is therefore written with :func:`_compact_dumps` swapped in, which copies each
body into an exact-size bytes object (the same bytes, so nothing viewkeeper sees changes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import orjson

from bench.common import Row, rate
from bench.redis_pipeline import redis_client

IDLE_SHARDS = 500
IDLE_SECONDS = 20.0
BACKLOG = 1_000_000
BACKLOG_SHARDS = 4
ITEMS = 10_000


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS), in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def _view(table: str) -> Any:
    from viewkeeper import Value, redis_view
    from viewkeeper.projection.api import view_of

    def card(item: dict[str, Any]) -> Value:
        return Value(f"{table}:{item['pk']}", {"status": item["status"], "n": item["n"]})

    card.__name__ = f"card_{table}"
    return view_of(redis_view(table=table, redis="cache")(card))


def _supervisor(fake: Any, table: str, client: Any, position: str) -> Any:
    from viewkeeper.coordination.memory import MemoryStore
    from viewkeeper.projection.registry import ViewRegistry
    from viewkeeper.runtime.pipeline import Pipeline
    from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
    from viewkeeper.sinks.redis import RedisSink

    view = _view(table)
    registry = ViewRegistry()
    registry.add(view)
    sink = RedisSink("cache", client)
    sink.prepare([view])
    store = MemoryStore()

    def pipeline(generation_of: Callable[[str], int]) -> Pipeline:
        return Pipeline(registry, {("redis", "cache"): sink}, store, generation_of)

    settings = SupervisorSettings(starting_positions={table: position})
    return Supervisor([table], fake, store, pipeline, settings, worker_id="bench")


def _idle(client: Any, seconds: float) -> list[Row]:
    from viewkeeper.stream.fake import FakeStream

    fake = FakeStream()
    fake.create_table("idle", ("pk",), shards=IDLE_SHARDS)
    sup = _supervisor(fake, "idle", client, "LATEST")
    gc.collect()
    before = rss_bytes()
    threads_before = threading.active_count()
    t0 = time.monotonic()
    daemon = threading.Thread(target=sup.run, name="supervisor", daemon=True)
    daemon.start()
    deadline = t0 + 120
    while True:
        running = list(sup.running.values())
        full = len(sup.held) == IDLE_SHARDS and len(running) == IDLE_SHARDS
        if full and all(r.worker.caught_up for r in running):
            break
        if time.monotonic() > deadline:
            sup.request_stop()
            raise RuntimeError(
                f"after 120 s: {len(sup.held)} leases held, {len(running)} workers running"
            )
        time.sleep(0.05)
    ready = time.monotonic() - t0
    gc.collect()
    after = rss_bytes()
    threads = threading.active_count() - threads_before
    c0, w0 = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    cpu = (cpu_seconds() - c0) / (time.monotonic() - w0) * 100
    polls = fake.calls["get_records"]
    sup.request_stop()
    daemon.join(60)
    grown = after - before
    return [
        Row(f"scale: {IDLE_SHARDS} shards leased and idle after", ready, "s"),
        Row(f"scale: RSS added by {IDLE_SHARDS} idle shards ({threads} threads)",
            grown / 2**20, "MiB"),
        Row("scale: RSS per idle shard", grown / IDLE_SHARDS / 1024, "KiB"),
        Row(f"scale: CPU with {IDLE_SHARDS} idle shards ({seconds:.0f} s, "
            f"{polls / (time.monotonic() - t0):,.0f} polls/s)", cpu, "% core"),
    ]  # fmt: skip


def _compact_dumps(obj: Any, *args: Any, **kwargs: Any) -> bytes:
    return bytes(memoryview(orjson.dumps(obj, *args, **kwargs)))


@contextlib.contextmanager
def _compact_fake_records() -> Iterator[None]:
    """See the module doc: exact-size copies of the fake's stored record bodies."""
    import types

    from viewkeeper.stream import fake as fake_module

    real = getattr(fake_module, "orjson", None)
    if real is None:  # the fake changed: write as it does (memory will show it)
        yield
        return
    shim = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if n[0] != "_"})
    shim.dumps = _compact_dumps
    setattr(fake_module, "orjson", shim)  # noqa: B010 - a module global, swapped back below
    try:
        yield
    finally:
        setattr(fake_module, "orjson", real)  # noqa: B010


def _page_bytes(fake: Any) -> tuple[int, int]:
    """Memory one worker holds for one full page: the GetRecords body and its decoded
    records (tracemalloc, allocations alive while the page is); and the body's size."""
    from viewkeeper.stream.client import parse_records

    arn = fake.stream_arn("backlog")
    shard = fake.open_shards("backlog")[0]
    page = fake.get_records(fake.get_shard_iterator(arn, shard, "TRIM_HORIZON"), 1000)
    body = orjson.dumps({"Records": [r.raw for r in page.records]})
    del page
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    raw = bytes(memoryview(body))
    decoded = parse_records(raw)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del decoded, raw
    return used, len(body)


def _backlog(client: Any, records: int) -> list[Row]:
    from viewkeeper.stream.fake import FakeStream

    fake = FakeStream()
    fake.create_table("backlog", ("pk",), shards=BACKLOG_SHARDS, stream="NEW_IMAGE")
    t0 = time.monotonic()
    with _compact_fake_records():
        for i in range(records):
            fake.put_item(
                "backlog",
                {
                    "pk": f"item-{i % ITEMS:06d}",
                    "status": ("NEW", "PAID", "SHIPPED")[i % 3],
                    "n": i,
                    "total": Decimal(f"{i % 9973}.{i % 100:02d}"),
                    "customer": f"c-{i % 977:04d}",
                },
            )
    log(f"  backlog of {records:,} records written in {time.monotonic() - t0:.0f} s")
    page, body = _page_bytes(fake)
    sup = _supervisor(fake, "backlog", client, "TRIM_HORIZON")
    gc.collect()
    start = rss_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    t0 = time.monotonic()
    sup.run(until_caught_up=True)
    drained = time.monotonic() - t0
    done.set()
    sampler.join()
    applied = int(client.dbsize())
    if applied < ITEMS:
        raise AssertionError(f"only {applied} keys in Redis after the backlog, want {ITEMS}+")
    growth = peak[0] - start
    bound = BACKLOG_SHARDS * (page + body)  # a page in hand, the next one's body read ahead
    return [
        Row(f"scale: {records:,} record backlog drained ({BACKLOG_SHARDS} shards -> Redis)",
            rate(records, drained), "rec/s"),
        Row.compare(f"scale: peak RSS growth draining it vs {BACKLOG_SHARDS} x (page + next body)",
                    growth / 2**20, "MiB", bound / 2**20, None),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    client = redis_client()
    client.flushall()
    try:
        rows = _idle(client, 5.0 if quick else IDLE_SECONDS)
        client.flushall()
        rows += _backlog(client, BACKLOG // 10 if quick else BACKLOG)
    finally:
        client.flushall()
        client.close()
    return rows


if __name__ == "__main__":  # .venv/bin/python -m bench.scale [--quick]
    from bench.common import print_table

    print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
