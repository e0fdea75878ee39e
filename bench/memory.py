"""Redis memory: viewkeeper's bookkeeping per item, for a one-entry ``Value`` view.

N = :data:`ITEMS` items are written through :class:`~viewkeeper.sinks.redis.RedisSink`
(each owns one ``Value`` key, ``order:o-00000001`` → ~60 bytes of JSON, version = a
21-digit sequence number) into a FLUSHALL'd database; ``INFO memory`` ``used_memory`` is
read before and after. Then the same N keys with the same values are written with plain
``SET`` into a FLUSHALL'd database. Overhead per item = (viewkeeper's delta - the plain
delta) / N: the owner record (``vk:{view}:o:{bucket}`` hash field) and the claim
(``vk:c:{bucket}`` hash field) of each item, plus the bucket hashes themselves.
Target: ≤ :data:`TARGET` bytes/item with the default ``owner_buckets`` (4096).

How the figure depends on items per bucket: a Redis hash stays *listpack*-encoded (a
compact array, ~2-3 bytes of overhead per field and value) while it holds at most
``hash-max-listpack-entries`` fields (512 by default in Redis 7; read from the server here)
of at most ``hash-max-listpack-value`` (64) bytes; past either it becomes a *hashtable* (a
dict entry plus two SDS strings per field: tens of bytes more per field). With 100k items,
4096 buckets hold ~24 items each (listpack); the other rows show ~50 per bucket (the sink's
advice: ``owner_buckets`` ≈ items / 50), ~2x the listpack limit per bucket (hashtable) and
~1.5 per bucket (a hash key per item or two: the per-key overhead dominates).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.common import Row
from bench.redis_pipeline import redis_client

ITEMS = 100_000
TARGET = 100.0
DEFAULT_BUCKETS = 4096
BATCH = 1000


def _used(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def _view() -> Any:
    from viewkeeper import Value, redis_view
    from viewkeeper.projection.api import view_of

    def card(item: dict[str, Any]) -> Value:
        return Value(f"order:{item['order_id']}", item["card"])

    return view_of(redis_view(table="orders", redis="cache", name="card")(card))


def _value(i: int) -> bytes:
    status = ("NEW", "PAID", "PACKED", "SHIPPED")[i % 4]
    return b'{"status":"%s","total":%d.%02d,"customer_id":"c-%06d"}' % (
        status.encode(),
        i % 99_991,
        i % 100,
        i % 50_000,
    )


def _through_sink(client: Any, buckets: int, n: int) -> tuple[int, str]:
    """used_memory growth for ``n`` items written through the sink, and the owner
    buckets' encoding (listpack or hashtable)."""
    from viewkeeper.projection.entries import Value
    from viewkeeper.projection.versions import Version
    from viewkeeper.sinks.base import Change
    from viewkeeper.sinks.redis import RedisSink

    client.flushall()
    view = _view()
    sink = RedisSink("cache", client, owner_buckets=buckets)
    sink.prepare([view])
    before = _used(client)
    seq = 10**20 + 4_000_000_000
    for lo in range(0, n, BATCH):
        changes = [
            Change(view, key, Version(0, str(seq + i * 7)), [Value(f"order:{key}", _value(i))])
            for i in range(lo, min(lo + BATCH, n))
            for key in (f"o-{i:08d}",)
        ]
        results = sink.apply(changes)
        if any(r.outcome.value != "applied" for r in results):
            raise AssertionError(f"not every change applied: {results[:3]!r}")
    grown = _used(client) - before
    bucket = next(iter(client.scan_iter(match=b"vk:card:o:*", count=1000)))
    encoding = client.object("encoding", bucket).decode()
    client.flushall()
    return grown, encoding


def _plain(client: Any, n: int) -> int:
    client.flushall()
    before = _used(client)
    for lo in range(0, n, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(lo + BATCH, n)):
            pipe.set(f"order:o-{i:08d}", _value(i))
        pipe.execute()
    grown = _used(client) - before
    client.flushall()
    return grown


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    client = redis_client()
    n = ITEMS
    plain = _plain(client, n)
    rows: list[Row] = []
    limit = int(client.config_get("hash-max-listpack-entries")["hash-max-listpack-entries"])
    configs = [DEFAULT_BUCKETS]
    if not quick:
        configs += [n // 50, max(1, n // (2 * limit)), 65_536]
    for buckets in configs:
        grown, encoding = _through_sink(client, buckets, n)
        per_item = (grown - plain) / n
        per_bucket = n / buckets
        if buckets == DEFAULT_BUCKETS:
            rows.append(
                Row(f"memory: bookkeeping per item, owner_buckets={buckets} (default, "
                    f"{per_bucket:.0f}/bucket, {encoding}; target <= {TARGET:.0f} B)",
                    per_item, "B/item", met=per_item <= TARGET)
            )  # fmt: skip
        else:
            rows.append(
                Row(f"memory: same, owner_buckets={buckets} ({per_bucket:.1f}/bucket, "
                    f"{encoding}, listpack limit {limit})", per_item, "B/item")
            )  # fmt: skip
    rows.append(Row(f"memory: plain SET of the same {n:,} keys and values, per item",
                    plain / n, "B/item"))  # fmt: skip
    client.close()
    return rows


if __name__ == "__main__":  # .venv/bin/python -m bench.memory [--quick]
    from bench.common import print_table

    print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
