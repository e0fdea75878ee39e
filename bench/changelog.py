"""Change-log views on Redis: records/s of ``Pipeline.process`` → ``RedisSink.append``
against the ``Value`` view of :mod:`bench.redis_pipeline`, on the same pages, same Redis.

The pages are :mod:`bench.redis_pipeline`'s (:func:`~bench.redis_pipeline.steady_pages`:
1000 records, ~1.4 KB each, 80 % MODIFY / 15 % INSERT / 5 % REMOVE, on a
:data:`~bench.redis_pipeline.KEY_SPACE`-item table), every round's sequence numbers shifted
above everything stored, so no round is a replay. Three contenders, each its own
``Pipeline`` and ``RedisSink`` on the one Redis (disjoint keys), warmed once with
:func:`~bench.redis_pipeline.warm_pages` (untimed), run interleaved round by round; each
figure is the best of its rounds (wall clock: Redis' own work is part of the price):

- ``value``: the ``Value`` view of the other Redis rows (``order:{id}`` → 4 fields; the
  newest record of each item per page, versioned, owner bookkeeping). The baseline.
- ``changelog``: ``@changelog_view(redis="cache", stream="bench:events",
  maxlen=1_000_000)`` mapping every record to a 4-field entry (event, order id, status,
  total): one ``XADD`` per record, the shard's high-water mark checked and moved in the
  same script call (``shard=`` set, as the shard worker passes it).
- ``replay``: the same function as a second view (its own stream, ``bench:events:replay``,
  so its memory is its own) processed with ``shard=""``, as dead-letter replay and the
  Lambda handler do: each record is looked up and written as a replay key of its own (with
  a TTL) instead of the high-water mark.

Every contender goes through the same loop: ``parse_records`` on the body, then
``Pipeline.process(..., shard=...)`` with the collector paused for the page (as the shard
worker pauses it); the loop and not the ``ShardWorker``, because the worker cannot pass
``shard=""``. Memory: ``MEMORY USAGE ... SAMPLES 0`` of the stream, its high-water hash and
its replay keys, over ``XLEN``, after all rounds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import PAGE_RECORDS, Row, rate
from bench.redis_pipeline import (
    KEY_NAMES,
    KEY_SPACE,
    QUICK_KEY_SPACE,
    SEQ_STEP,
    TABLE,
    _card,
    best_times,
    make_view,
    redis_client,
    shift_sequences,
    steady_pages,
    warm_pages,
)

SHARD = "shardId-00000001700000000000-bench"
STREAM = "bench:events"
MAXLEN = 1_000_000


def _event(change: Any) -> dict[str, Any]:
    """The change-log function: 4 fields per change."""
    image = change.new if change.new is not None else change.old
    return {
        "event": change.event,
        "order_id": change.keys["order_id"],
        "status": image["status"] if image is not None else "",
        "total": image["total"] if image is not None else 0,
    }


def changelog_view(name: str, stream: str) -> Any:
    from viewkeeper.projection.api import view_of
    from viewkeeper.projection.changelog import changelog_view as declare

    def func(change: Any) -> dict[str, Any]:
        return _event(change)

    func.__name__ = name
    return view_of(declare(table=TABLE, redis="cache", stream=stream, maxlen=MAXLEN)(func))


class _Contender:
    """One view in its own Pipeline and RedisSink, fed page by page with ``shard``."""

    def __init__(self, client: Any, view: Any, shard: str) -> None:
        from viewkeeper.coordination.memory import MemoryStore
        from viewkeeper.projection.registry import ViewRegistry
        from viewkeeper.runtime.pipeline import Pipeline
        from viewkeeper.sinks.redis import RedisSink

        registry = ViewRegistry()
        registry.add(view)
        self.view = view
        self.sink = RedisSink("cache", client)
        self.sink.prepare([view])
        self.pipeline = Pipeline(registry, {("redis", "cache"): self.sink}, MemoryStore(), _zero)
        self.shard = shard
        self.applied = self.stale = 0

    def feed(self, pages: Sequence[bytes]) -> Callable[[], None]:
        from viewkeeper.stream.client import gc_paused, parse_records

        def run() -> None:
            for body in pages:
                with gc_paused():
                    page = parse_records(body)
                    report = self.pipeline.process(TABLE, KEY_NAMES, page.records, shard=self.shard)
                    del page
                self.applied += report.applied
                self.stale += report.stale
                if report.dead_lettered:
                    raise AssertionError(f"{report.dead_lettered} records dead-lettered")

        return run


def _zero(view: str) -> int:
    return 0


def _memory(client: Any, contender: _Contender) -> tuple[int, int, int]:
    """(entries in the stream, bytes of the stream, bytes of its bookkeeping: the
    high-water hash and the replay keys)."""
    stream, hw, rp = contender.sink.changelog_keys(contender.view)
    used = [int(client.memory_usage(k, samples=0) or 0) for k in (stream, hw)]
    pattern = rp.replace(b"[", b"\\[").replace(b"]", b"\\]") + b"*"
    for key in client.scan_iter(match=pattern, count=1000):
        used[1] += int(client.memory_usage(key, samples=0) or 0)
    return int(client.xlen(stream)), used[0], used[1]


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    client = redis_client()
    npages = 6 if quick else 20
    nrounds = 2 if quick else 3
    key_space = QUICK_KEY_SPACE if quick else KEY_SPACE
    base = steady_pages(npages, key_space=key_space)
    count = npages * PAGE_RECORDS

    client.flushall()
    contenders = {
        "value": _Contender(client, make_view(_card, "card"), SHARD),
        "changelog": _Contender(client, changelog_view("events", STREAM), SHARD),
        "replay": _Contender(client, changelog_view("events_replay", STREAM + ":replay"), ""),
    }
    warm = warm_pages(key_space)
    for c in contenders.values():
        c.feed(warm)()
        c.applied = c.stale = 0
    del warm
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    step = 0
    for _ in range(nrounds):
        for name, c in contenders.items():
            step += 1  # pages newer than anything stored: no round is a replay
            pages = shift_sequences(base, SEQ_STEP * step)
            w, u = best_times([c.feed(pages)], _gc_collect)
            wall[name] = min(wall.get(name, float("inf")), w)
            cpu[name] = min(cpu.get(name, float("inf")), u)
    for name, c in contenders.items():
        want = count * nrounds
        if name != "value" and (c.applied != want or c.stale):
            raise AssertionError(f"{name}: {c.applied} of {want} appended, {c.stale} stale")
        if name == "value" and c.applied < 0.8 * want:
            raise AssertionError(f"value: only {c.applied} of {want} applied, {c.stale} stale")
    memory = {n: _memory(client, contenders[n]) for n in ("changelog", "replay")}
    client.flushall()
    client.close()

    rates = {n: rate(count, w) for n, w in wall.items()}
    cpus = {n: rate(count, c) for n, c in cpu.items()}
    rows = [
        Row("changelog: pages -> Value view -> Redis (shard set; baseline)", rates["value"],
            "rec/s"),
        Row.compare("changelog: change-log view (XADD, high-water) vs Value view",
                    rates["changelog"], "rec/s", rates["value"], None),
        Row.compare("changelog: same, dead-letter replay mode (shard '', replay keys) "
                    "vs shard mode", rates["replay"], "rec/s", rates["changelog"], None),
        Row.compare("changelog: client CPU only, change-log vs Value (rec per CPU-second)",
                    cpus["changelog"], "rec/s", cpus["value"], None),
        Row.compare("changelog: client CPU only, replay mode vs shard mode",
                    cpus["replay"], "rec/s", cpus["changelog"], None),
    ]  # fmt: skip
    for name, label in (("changelog", "shard mode"), ("replay", "replay mode")):
        entries, stream, books = memory[name]
        rows.append(
            Row(f"changelog: Redis memory per entry, {label} (stream {stream / entries:.1f} "
                f"+ high-water hash and replay keys {books / entries:.1f}; {entries:,} entries)",
                (stream + books) / entries, "B/entry")
        )  # fmt: skip
    return rows


def _gc_collect() -> None:
    import gc

    gc.collect()


if __name__ == "__main__":  # .venv/bin/python -m bench.changelog [--quick]
    from bench.common import print_table

    print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
