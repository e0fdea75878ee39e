"""Rebuild: items/s of :func:`viewkeeper.runtime.rebuild.rebuild` (generation handshake with no
live worker, parallel scan, project, apply, final sweep) into the REAL Redis and the REAL
OpenSearch, from a synthetic scan source and through moto.

- **Synthetic source** (:class:`ScanSource`): :data:`ITEMS` orders (``bench.common``'s
  12-attribute items) served as recorded Scan response bodies (DynamoDB JSON), split into
  4 segments of 500-item pages; each ``scan`` call decodes its body with
  :func:`~viewkeeper.stream.client.parse_scan`, exactly what the HTTP client does with a
  response. So the figure is viewkeeper's own cost: decode, project, apply, sweep.
  Each sink is rebuilt twice: the first build (empty sink) and a rebuild over that build
  (every item rewritten at the new generation, nothing left to sweep).
- **Through moto**: :data:`MOTO_ITEMS` items written with ``batch_write_item``, then rebuilt
  with 4 segments through :class:`~viewkeeper.stream.http.HttpStreamClient` into Redis.
  Baseline: the same client scanning the same table with the same 4 threads and page size
  and doing nothing with the items — moto's own Scan rate, the ceiling here.

Wall time, one run each (the rebuild reports its own duration, sweep included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, cast

import orjson

from bench.common import Row, make_item, rate
from bench.redis_pipeline import (
    ENV_DYNAMODB,
    ENV_OPENSEARCH,
    redis_client,
    service_url,
)

ITEMS = 50_000
MOTO_ITEMS = 5_000
SEGMENTS = 4
PAGE = 500  # RebuildSettings.batch_size: the Scan Limit
TABLE = "orders"


class ScanSource:
    """The two calls a rebuild makes (``describe_table``, ``scan``), over Scan response
    bodies built once: ``items`` DynamoDB-JSON items spread over ``segments`` by index."""

    def __init__(self, items: list[dict[str, Any]], segments: int, page: int) -> None:
        self.count = len(items)
        self.segments = segments
        self.pages: dict[tuple[int, str | None], bytes] = {}
        for seg in range(segments):
            mine = items[seg::segments]
            start: str | None = None
            for lo in range(0, len(mine), page):
                chunk = mine[lo : lo + page]
                body: dict[str, Any] = {
                    "Items": chunk,
                    "Count": len(chunk),
                    "ScannedCount": len(chunk),
                    "ConsumedCapacity": {"TableName": TABLE, "CapacityUnits": len(chunk) / 2},
                }
                if lo + page < len(mine):
                    body["LastEvaluatedKey"] = {"order_id": chunk[-1]["order_id"]}
                self.pages[(seg, start)] = orjson.dumps(body)
                start = chunk[-1]["order_id"]["S"]

    def describe_table(self, table: str) -> Any:
        from viewkeeper.stream.client import TableInfo

        return TableInfo(table, ("order_id",), None, None, "ACTIVE", self.count)

    def scan(
        self,
        table: str,
        segment: int,
        total_segments: int,
        exclusive_start_key: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> Any:
        from viewkeeper.stream.client import parse_scan

        if total_segments != self.segments or limit != PAGE:
            raise ValueError(f"built for {self.segments} segments of {PAGE} items")
        start = None if not exclusive_start_key else str(exclusive_start_key["order_id"])
        return parse_scan(orjson.loads(self.pages[(segment, start)]))


def _items(count: int, seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_item(rng, n, rng.randint(1, 9)) for n in range(count)]


def _rebuild(view: Any, sink: Any, client: Any, store: Any) -> Any:
    """One rebuild of ``view``; ``store`` keeps the generations between rebuilds."""
    from viewkeeper.projection.registry import ViewRegistry
    from viewkeeper.runtime.pipeline import Pipeline
    from viewkeeper.runtime.rebuild import RebuildSettings, rebuild

    registry = ViewRegistry()
    registry.add(view)
    sinks = {(view.kind, view.connection): sink}

    def factory(generation_of: Callable[[str], int]) -> Pipeline:
        return Pipeline(registry, sinks, store, generation_of)

    settings = RebuildSettings(segments=SEGMENTS, batch_size=PAGE, progress_every=60.0)
    report = rebuild([view], registry, cast(Any, client), store, factory, settings,
                     out=io.StringIO())  # fmt: skip
    if report.dead_lettered or report.applied < report.scanned:
        raise AssertionError(report.summary())
    return report


def _twice(label: str, view: Any, sink: Any, source: ScanSource) -> list[Row]:
    from viewkeeper.coordination.memory import MemoryStore

    store = MemoryStore()
    first = _rebuild(view, sink, source, store)
    again = _rebuild(view, sink, source, store)  # generation 2: every item rewritten
    return [
        Row(f"rebuild: {first.scanned:,} items -> {label}, first build",
            first.items_per_second, "items/s"),
        Row(f"rebuild: {again.scanned:,} items -> {label}, over an existing build",
            again.items_per_second, "items/s"),
    ]  # fmt: skip


def _synthetic(count: int) -> list[Row]:
    from opensearchpy import OpenSearch

    from bench.opensearch_pipeline import make_view as doc_view
    from bench.redis_pipeline import _card, make_view
    from viewkeeper.sinks.opensearch import OpenSearchSink
    from viewkeeper.sinks.redis import RedisSink

    source = ScanSource(_items(count), SEGMENTS, PAGE)
    rows: list[Row] = []
    client = redis_client()
    client.flushall()
    try:
        rows += _twice("Redis (Value view)", make_view(_card, "card"), RedisSink("cache", client),
                       source)  # fmt: skip
    finally:
        client.flushall()
        client.close()

    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    os_client = OpenSearch(hosts=[service_url(ENV_OPENSEARCH)], timeout=120)
    sink = OpenSearchSink("search", os_client, index_prefix=prefix)
    try:
        rows += _twice("OpenSearch (6-field doc)", doc_view(), sink, source)
    finally:
        from opensearchpy.exceptions import TransportError

        tp = os_client.transport
        for path, params in (
            (f"/_all/_alias/{prefix}*", None),
            (f"/{prefix}*", {"expand_wildcards": "all"}),
            (f"/_scripts/{sink.script_id}", None),
        ):
            with contextlib.suppress(TransportError):
                tp.perform_request("DELETE", path, params=params)
        sink.close()
        os_client.close()
    return rows


def _wire(item: dict[str, Any]) -> dict[str, Any]:
    """bench.common's wire-form item as boto3 wants it (B as bytes, not base64 text)."""
    import base64

    out = dict(item)
    out["checksum"] = {"B": base64.b64decode(item["checksum"]["B"])}
    return out


def _moto(count: int) -> list[Row]:
    import boto3
    from botocore.config import Config

    from bench.redis_pipeline import _card, make_view
    from viewkeeper.coordination.memory import MemoryStore
    from viewkeeper.sinks.redis import RedisSink
    from viewkeeper.stream.http import HttpStreamClient

    url = service_url(ENV_DYNAMODB)
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    db = session.client("dynamodb", endpoint_url=url, config=Config(retries={"max_attempts": 5}))
    table = f"bench-rebuild-{uuid.uuid4().hex[:6]}"
    db.create_table(
        TableName=table,
        AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    db.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1})
    client = redis_client()
    http = HttpStreamClient("us-east-1", url, session)
    try:
        items = _items(count, seed=12)
        t0 = time.monotonic()
        for lo in range(0, count, 25):
            requests = [{"PutRequest": {"Item": _wire(i)}} for i in items[lo : lo + 25]]
            left: Any = {table: requests}
            while left:
                left = db.batch_write_item(RequestItems=left).get("UnprocessedItems")
        written = rate(count, time.monotonic() - t0)

        scanned = [0]
        lock = threading.Lock()

        def scan_segment(seg: int) -> None:
            start: dict[str, Any] | None = None
            while True:
                page = http.scan(table, seg, SEGMENTS, start, PAGE)
                with lock:
                    scanned[0] += len(page.items)
                start = page.last_evaluated_key
                if not start:
                    return

        t0 = time.monotonic()
        threads = [threading.Thread(target=scan_segment, args=(s,)) for s in range(SEGMENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        raw = rate(scanned[0], time.monotonic() - t0)
        if scanned[0] != count:
            raise AssertionError(f"the raw scan saw {scanned[0]} items, want {count}")

        client.flushall()
        view = make_view(_card, "card")
        view = type(view)(**{**view.__dict__, "table": table})
        report = _rebuild(view, RedisSink("cache", client), http, MemoryStore())
    finally:
        client.flushall()
        client.close()
        http.close()
        try:
            db.delete_table(TableName=table)
        except Exception as exc:  # best effort: moto is thrown away after the run
            print(f"  could not delete {table}: {exc}", file=sys.stderr)
    return [
        Row.compare(f"rebuild: {count:,} items via moto (4 segments) -> Redis vs raw scan",
                    report.items_per_second, "items/s", raw, None),
        Row("rebuild: moto batch_write_item (writing those items)", written, "items/s"),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    rows = _synthetic(ITEMS // 5 if quick else ITEMS)
    rows += _moto(MOTO_ITEMS // 5 if quick else MOTO_ITEMS)
    return rows


if __name__ == "__main__":  # .venv/bin/python -m bench.rebuild [--quick]
    from bench.common import print_table

    print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
