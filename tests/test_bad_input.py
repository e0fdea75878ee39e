"""Bad input, end to end: every case ends in a clear error and nothing is lost.

Record cases go through :meth:`Pipeline.process` with the real Redis and OpenSearch sinks of
the test bed and a memory coordination store, and check that the counts add up:
``applied + stale + dead_lettered == records x views``, with every dead letter stored with
its error and its raw record. Start-up cases drive the ``viewkeeper`` command. The table of
cases is tests/BAD_INPUTS.md (input -> what happens -> test).
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from opensearchpy import OpenSearch

from tests.helpers import registry_of, view_for, vk, write_config
from tests.testbed import OpenSearchNode, RedisServer, free_port
from tests.views_e2e import bad_views
from viewkeeper import SetMember, opensearch_view, redis_view
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import Lease, LeaseState
from viewkeeper.projection.entries import Value
from viewkeeper.projection.keys import encode_key
from viewkeeper.runtime.pipeline import BatchReport, Pipeline
from viewkeeper.runtime.worker import ShardWorker, WorkerSettings
from viewkeeper.sinks.base import Sink
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.client import RecordsPage, parse_records
from viewkeeper.stream.records import ChangeRecord, DecodeError, decode_record
from viewkeeper.stream.values import encode_image

TABLE = bad_views.TABLE
KEYS = ("pk",)
_SEQ = itertools.count(10**20 + 1)  # 21 digits, like DynamoDB's


CARD = view_for(bad_views.bad_card)
DOC = view_for(bad_views.bad_doc)


# --- building records ----------------------------------------------------------------------


def raw_record(
    item: Mapping[str, Any],
    *,
    event: str = "INSERT",
    seq: int | None = None,
    keys: Mapping[str, Any] | None = None,
    new_image: bool = True,
) -> dict[str, Any]:
    """One stream record in wire form (what GetRecords or a Lambda event carries)."""
    body: dict[str, Any] = {
        "Keys": encode_image(keys if keys is not None else {"pk": item["pk"]}),
        "SequenceNumber": str(next(_SEQ) if seq is None else seq),
        "SizeBytes": 100,
        "ApproximateCreationDateTime": time.time(),
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if event != "REMOVE" and new_image:
        body["NewImage"] = encode_image(item)
    return {"eventID": "1", "eventName": event, "eventSource": "aws:dynamodb", "dynamodb": body}


def record(item: Mapping[str, Any], **kwargs: Any) -> ChangeRecord:
    return decode_record(raw_record(item, **kwargs))


# --- fixtures: real sinks, memory store -------------------------------------------------------


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def redis_sink(redis_client: redis.Redis) -> Iterator[RedisSink]:
    sink = RedisSink("cache", redis_client, retry_seconds=2)
    sink.prepare([CARD])
    yield sink
    sink.close()


@pytest.fixture
def os_sink(os_client: OpenSearch, os_prefix: str) -> Iterator[OpenSearchSink]:
    sink = OpenSearchSink(
        "search", os_client, index_prefix=os_prefix, index_settings={"number_of_replicas": 0}
    )
    sink.prepare([DOC])
    yield sink
    sink.close()


@pytest.fixture
def pipeline(redis_sink: RedisSink, os_sink: OpenSearchSink, store: MemoryStore) -> Pipeline:
    sinks: dict[tuple[str, str], Sink] = {("redis", "cache"): redis_sink}
    sinks[("opensearch", "search")] = os_sink
    return Pipeline(registry_of(CARD, DOC), sinks, store, lambda view: 0)


def accounted(report: BatchReport, records: int, views: int, store: MemoryStore) -> None:
    """I5: every (record, view) pair ended applied, stale or dead-lettered, and every dead
    letter is stored with its error and the raw record (so it can be replayed)."""
    total = report.applied + report.stale + report.dead_lettered
    assert total == records * views, report
    letters = store.list_deadletters()
    assert len(letters) == report.dead_lettered, [d.error for d in letters]
    for dl in letters:
        assert dl.error.strip(), dl
        assert dl.record is not None and "dynamodb" in dl.record, dl


def letter_for(store: MemoryStore, view: str, item_key: str) -> str:
    found = [d.error for d in store.list_deadletters() if (d.view, d.item_key) == (view, item_key)]
    assert len(found) == 1, [(d.view, d.item_key, d.error) for d in store.list_deadletters()]
    return found[0]


def card(client: redis.Redis, pk: str) -> Any:
    raw = client.get(f"card:{pk}")
    return None if raw is None else json.loads(raw)


# ==== 1. malformed records ====================================================================

GOOD = {"pk": "a", "v": 1}
SEQ_OF_GOOD = "100000000000000000777"


def _without(path: tuple[str, ...]) -> dict[str, Any]:
    rec = raw_record(GOOD, seq=int(SEQ_OF_GOOD))
    target: Any = rec
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return rec


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    rec = raw_record(GOOD, seq=int(SEQ_OF_GOOD))
    target: Any = rec
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return rec


MALFORMED: list[tuple[str, Any, list[str]]] = [
    # (case, raw record, what the message must name)
    ("no dynamodb", _without(("dynamodb",)), ["dynamodb"]),
    ("no Keys", _without(("dynamodb", "Keys")), ["Keys", SEQ_OF_GOOD]),
    ("no SequenceNumber", _without(("dynamodb", "SequenceNumber")), ["SequenceNumber"]),
    ("no eventName", _without(("eventName",)), ["eventName", SEQ_OF_GOOD]),
    ("wrong eventName", _with(("eventName",), "UPSERT"), ["UPSERT", "INSERT", SEQ_OF_GOOD]),
    ("SequenceNumber not digits", _with(("dynamodb", "SequenceNumber"), "12ab"), ["'12ab'"]),
    ("dynamodb is null", _with(("dynamodb",), None), ["dynamodb", "None"]),
    ("record is not a map", "INSERT a", ["'INSERT a'"]),
]


@pytest.mark.parametrize(
    ("raw", "must_name"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_record_is_refused_naming_the_record_and_what_is_wrong(
    raw: Any, must_name: list[str]
) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_record(raw)
    message = str(caught.value)
    for word in must_name:
        assert word in message, message
    assert "NoneType" not in message and "subscriptable" not in message, message
    assert "\n" not in message


UNKNOWN_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("top level", {"x": {"X": "1"}}, "NewImage.x"),
    ("inside a map", {"x": {"M": {"y": {"Q": "1"}}}}, "NewImage.x.y"),
    ("inside a list", {"x": {"L": [{"S": "ok"}, {"Q": "1"}]}}, "NewImage.x[1]"),
    ("inside a list in a map", {"x": {"M": {"y": {"L": [{"S": "a"}, {"Q": 1}]}}}}, "x.y[1]"),
]


@pytest.mark.parametrize(
    ("extra", "path"), [c[1:] for c in UNKNOWN_TYPES], ids=[c[0] for c in UNKNOWN_TYPES]
)
def test_unknown_attribute_type_names_its_path_and_the_known_types(
    extra: dict[str, Any], path: str
) -> None:
    raw = raw_record(GOOD, seq=int(SEQ_OF_GOOD))
    raw["dynamodb"]["NewImage"].update(extra)
    with pytest.raises(DecodeError) as caught:
        decode_record(raw)
    message = str(caught.value)
    assert SEQ_OF_GOOD in message and path in message and "unknown" in message, message
    assert "S, N, B, SS, NS, BS, M, L, NULL, BOOL" in message, message


class PageStream:
    """The StreamClient calls a ShardWorker makes, on one page of raw records. The page goes
    through ``parse_records``, the same decoding the HTTP client applies to a GetRecords
    body, so a malformed record reaches the worker exactly as it would from DynamoDB."""

    def __init__(self, raw_records: list[dict[str, Any]]) -> None:
        self.raw_records = raw_records
        self.served = False

    def get_shard_iterator(
        self, stream_arn: str, shard_id: str, iterator_type: str, sequence: str | None = None
    ) -> str:
        return "after-" + (sequence or iterator_type)

    def get_records(self, iterator: str, limit: int = 1000) -> RecordsPage:
        if self.served:
            return parse_records({"Records": [], "NextShardIterator": None})
        self.served = True
        return parse_records({"Records": self.raw_records, "NextShardIterator": None})


def test_malformed_records_in_a_page_are_dead_lettered_and_the_shard_goes_on(
    redis_sink: RedisSink, redis_client: redis.Redis, store: MemoryStore
) -> None:
    """One bad record must not stop the shard (I5): the good records of the page are applied,
    the bad ones dead-lettered with their error and raw record, and the checkpoint moves past
    them. (A new DynamoDB attribute type would otherwise stall the shard forever: the worker
    crashes on the page, the supervisor restarts it on the same page, and so on.)"""
    unknown_type = raw_record({"pk": "b"})
    unknown_type["dynamodb"]["NewImage"]["x"] = {"X": "1"}
    no_keys = raw_record({"pk": "c"})
    del no_keys["dynamodb"]["Keys"]
    bad_event = raw_record({"pk": "d"})
    bad_event["eventName"] = "UPSERT"
    page = [raw_record({"pk": "a"}), unknown_type, no_keys, bad_event, raw_record({"pk": "e"})]
    bad_seqs = {r["dynamodb"]["SequenceNumber"] for r in (unknown_type, no_keys, bad_event)}

    pipe = Pipeline(registry_of(CARD), {("redis", "cache"): redis_sink}, store, lambda v: 0)
    lease = Lease(TABLE, "shardId-0001", "arn:stream", owner="me")
    store.create_lease(lease)
    worker = ShardWorker(
        lease,
        PageStream(page),  # type: ignore[arg-type]
        pipe,
        store,
        KEYS,
        WorkerSettings(poll_interval=0.01),
        stop=threading.Event(),
    )
    worker.run_guarded()

    assert worker.crashed is None, worker.crashed
    assert worker.finished
    assert card(redis_client, "a") == {"pk": "a", "v": None}
    assert card(redis_client, "e") == {"pk": "e", "v": None}
    letters = {d.sequence: d for d in store.list_deadletters()}
    assert set(letters) == bad_seqs
    assert "'X'" in letters[unknown_type["dynamodb"]["SequenceNumber"]].error
    assert "Keys" in letters[no_keys["dynamodb"]["SequenceNumber"]].error
    assert "UPSERT" in letters[bad_event["dynamodb"]["SequenceNumber"]].error
    for dl in letters.values():
        assert dl.record is not None and dl.record.get("dynamodb"), dl  # kept for replay
    (done,) = store.list_leases(TABLE)
    assert done.checkpoint == page[-1]["dynamodb"]["SequenceNumber"]
    assert done.state is LeaseState.ENDED


def test_a_record_without_new_image_is_dead_lettered_naming_the_stream_view_type(
    pipeline: Pipeline, store: MemoryStore, redis_client: redis.Redis
) -> None:
    recs = [
        record({"pk": "a"}),
        record({"pk": "b"}, event="MODIFY", new_image=False),  # a KEYS_ONLY stream
    ]
    report = pipeline.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 2, store)
    assert report.dead_lettered == 2
    for view in ("bad_card", "bad_doc"):
        error = letter_for(store, view, "b")
        assert "NewImage" in error and "NEW_AND_OLD_IMAGES" in error, error
    assert card(redis_client, "a") is not None


def test_keys_without_the_table_key_attribute_are_dead_lettered_naming_the_key_schema(
    pipeline: Pipeline, store: MemoryStore
) -> None:
    recs = [record({"pk": "a"}), record({"pk": "b"}, keys={"id": "b"})]
    report = pipeline.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 2, store)
    assert report.dead_lettered == 2 and report.applied == 2
    for dl in store.list_deadletters():
        assert "'pk'" in dl.error and "key schema" in dl.error, dl.error


def test_superseded_and_replayed_records_are_counted_stale(
    pipeline: Pipeline, store: MemoryStore, redis_client: redis.Redis
) -> None:
    """Two records of one item in a batch, the newer one failing in bad_card: the newer is
    dead-lettered there, the older applied; in bad_doc the newer is applied and the older
    superseded (stale). The same batch again: what was applied is now stale."""
    recs = [record({"pk": "x", "v": 1}), record({"pk": "x", "v": 2, "redis": "raise"})]
    first = pipeline.process(TABLE, KEYS, recs)
    accounted(first, len(recs), 2, store)
    assert (first.applied, first.stale, first.dead_lettered) == (2, 1, 1)
    assert card(redis_client, "x") == {"pk": "x", "v": 1}

    again = pipeline.process(TABLE, KEYS, recs)
    assert again.applied + again.stale + again.dead_lettered == len(recs) * 2
    assert (again.applied, again.stale, again.dead_lettered) == (0, 3, 1)


def test_a_remove_of_an_item_never_seen_is_accounted_for(
    pipeline: Pipeline, store: MemoryStore
) -> None:
    recs = [record({"pk": "ghost"}, event="REMOVE"), record({"pk": "ghost"}, event="REMOVE")]
    report = pipeline.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 2, store)
    assert report.dead_lettered == 0


# ==== 2. projections that raise or return what cannot be written ============================

PROJECTION_CASES: list[tuple[str, str, dict[str, Any], list[str]]] = [
    # (case, failing view, item fields, what the dead letter's error must say)
    ("redis raises", "bad_card", {"redis": "raise"}, ["ValueError", "cannot make a card"]),
    ("redis object", "bad_card", {"redis": "object"}, ["Opaque", "obj", "return str"]),
    ("redis NaN Decimal", "bad_card", {"redis": "nan"}, ["NaN", "total"]),
    ("redis returns dict", "bad_card", {"redis": "dict"}, ["returned dict", "Value"]),
    ("redis returns str", "bad_card", {"redis": "string"}, ["returned str", "Value"]),
    ("redis empty key", "bad_card", {"redis": "empty_key"}, ["non-empty", "''", "f-string"]),
    ("redis bookkeeping key", "bad_card", {"redis": "prefix"}, ["'vk:", "another key"]),
    ("redis NaN score", "bad_card", {"redis": "bad_score"}, ["NaN", "score", "scores"]),
    ("search raises", "bad_doc", {"search": "raise"}, ["KeyError", "missing_attribute"]),
    ("search returns list", "bad_doc", {"search": "list"}, ["returned list", "dict"]),
    ("search object", "bad_doc", {"search": "object"}, ["Opaque", "obj"]),
    ("search NaN Decimal", "bad_doc", {"search": "nan"}, ["NaN", "total"]),
    ("search _id field", "bad_doc", {"search": "underscore"}, ["'_id'", "'_'"]),
]


@pytest.mark.parametrize(
    ("failing", "fields", "must_say"),
    [c[1:] for c in PROJECTION_CASES],
    ids=[c[0] for c in PROJECTION_CASES],
)
def test_a_bad_projection_is_dead_lettered_with_a_clear_error_and_nothing_else_is_lost(
    pipeline: Pipeline,
    store: MemoryStore,
    redis_client: redis.Redis,
    os_sink: OpenSearchSink,
    failing: str,
    fields: dict[str, Any],
    must_say: list[str],
) -> None:
    recs = [record({"pk": "a", "v": 1}), record({"pk": "bad", **fields}), record({"pk": "c"})]
    report = pipeline.process(TABLE, KEYS, recs)

    accounted(report, len(recs), 2, store)
    assert (report.applied, report.dead_lettered) == (5, 1), report
    error = letter_for(store, failing, "bad")
    assert failing in error and "'bad'" in error, error  # the view and the item
    for words in must_say:
        assert words in error, error
    # the neighbours and the other view of the same record were applied
    assert card(redis_client, "a") == {"pk": "a", "v": 1}
    assert card(redis_client, "c") == {"pk": "c", "v": None}
    docs = os_sink.live_documents(DOC)
    assert {"a", "c"} <= set(docs)
    if failing == "bad_doc":
        assert card(redis_client, "bad") is not None and "bad" not in docs
    else:
        assert card(redis_client, "bad") is None and "bad" in docs


@pytest.mark.parametrize("failing", ["bad_card", "bad_doc"])
def test_a_float_nan_is_refused_not_stored_as_null(
    pipeline: Pipeline,
    store: MemoryStore,
    redis_client: redis.Redis,
    os_sink: OpenSearchSink,
    failing: str,
) -> None:
    """JSON has no NaN; orjson writes ``null`` for it, which silently replaces the value."""
    mode = {"redis": "float_nan"} if failing == "bad_card" else {"search": "float_nan"}
    report = pipeline.process(TABLE, KEYS, [record({"pk": "r", **mode})])
    accounted(report, 1, 2, store)
    assert report.dead_lettered == 1, (card(redis_client, "r"), os_sink.live_documents(DOC))
    error = letter_for(store, failing, "r")
    assert "nan" in error.lower() and "ratio" in error, error


def test_a_38_digit_number_is_written_exactly(
    pipeline: Pipeline, store: MemoryStore, redis_client: redis.Redis
) -> None:
    """DynamoDB numbers have up to 38 digits; JSON encoding must not be limited to 64 bits."""
    big = 10**37 + 1
    recs = [
        record({"pk": "big", "redis": "bigint", "n": big}),
        record({"pk": "neg", "redis": "bigint", "n": -(10**30)}),
    ]
    report = pipeline.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 2, store)
    assert report.dead_lettered == 0, [d.error for d in store.list_deadletters()]
    assert redis_client.get("card:big") == b'{"n":%d}' % big
    assert redis_client.get("card:neg") == b'{"n":-%d}' % 10**30


@redis_view(table=TABLE, redis="cache", name="ttl_card")
def ttl_card(item: dict[str, Any]) -> Iterator[Any]:
    """A member first, then a Value whose ttl comes from the item."""
    yield SetMember("ttl_cards", item["pk"])
    yield Value(f"ttl_card:{item['pk']}", item["pk"], ttl=item.get("ttl", 60))


TTL_CARD = view_for(ttl_card)


def test_a_huge_ttl_is_dead_lettered_naming_it_and_leaves_nothing_behind(
    redis_sink: RedisSink, redis_client: redis.Redis, store: MemoryStore
) -> None:
    """``ttl=10**16`` passed the view API, and Redis refused the SET ... EX inside the apply
    script after the change's SADD: the member stayed with no owner record, and survived
    the item's delete. The view API now bounds ttl (100 years) where the Value is built."""
    pipe = Pipeline(registry_of(TTL_CARD), {("redis", "cache"): redis_sink}, store, lambda v: 0)
    recs = [
        record({"pk": "a"}),
        record({"pk": "huge", "ttl": 10**16}),
        record({"pk": "c", "ttl": 3600}),
    ]
    report = pipe.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 1, store)
    assert redis_client.smembers("ttl_cards") == {b"a", b"c"}  # nothing of 'huge'
    assert (report.applied, report.dead_lettered) == (2, 1)
    error = letter_for(store, "ttl_card", "huge")
    for words in ("'huge'", "ttl", str(10**16), "3153600000", "None"):
        assert words in error, error
    assert 0 < redis_client.ttl("ttl_card:c") <= 3600
    report = pipe.process(TABLE, KEYS, [record({"pk": "huge"}, event="REMOVE")])
    assert report.applied == 1
    assert redis_client.smembers("ttl_cards") == {b"a", b"c"}  # no orphan after the delete


# ==== 3. entries too large ==================================================================


def test_a_20_mb_redis_value_is_stored_verbatim_next_to_small_ones(
    pipeline: Pipeline, store: MemoryStore, redis_client: redis.Redis
) -> None:
    """Decision: viewkeeper sets no limit of its own below Redis's (proto-max-bulk-len,
    512 MB by default). A 20 MB value is written as it is, in the same batch as others."""
    blob = ("0123456789abcdef" * (20 * 2**20 // 16))[:-3] + "end"
    recs = [record({"pk": "a"}), record({"pk": "big", "redis": "big", "blob": blob})]
    report = pipeline.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 2, store)
    assert report.dead_lettered == 0
    assert redis_client.strlen("card:big") == len(blob)
    assert redis_client.get("card:big") == blob.encode()
    assert card(redis_client, "a") is not None


class SmallBulkRedis(RedisServer):
    """A Redis whose largest accepted argument is 1 MB (``proto-max-bulk-len``, the minimum):
    the realistic stand-in for a value above the 512 MB default."""

    def __init__(self) -> None:
        super().__init__(extra_args=["--proto-max-bulk-len", "1mb"])


def test_a_value_over_the_redis_bulk_limit_is_dead_lettered_alone(store: MemoryStore) -> None:
    with SmallBulkRedis() as server:
        client = redis.Redis.from_url(server.url)
        sink = RedisSink("cache", client, retry_seconds=2)
        sink.prepare([CARD])
        pipe = Pipeline(registry_of(CARD), {("redis", "cache"): sink}, store, lambda v: 0)
        recs = [
            record({"pk": "a"}),
            record({"pk": "big", "redis": "big", "blob": "x" * (2 * 2**20)}),
            record({"pk": "c"}),
        ]
        report = pipe.process(TABLE, KEYS, recs)
        accounted(report, len(recs), 1, store)
        assert (report.applied, report.dead_lettered) == (2, 1)
        error = letter_for(store, "bad_card", "big")
        assert "'big'" in error and "bulk length" in error, error
        assert client.get("card:a") and client.get("card:c") and not client.get("card:big")
        # the connection recovered: the next batch goes through
        assert pipe.process(TABLE, KEYS, [record({"pk": "d"})]).applied == 1
        client.close()


@pytest.fixture(scope="module")
def small_opensearch() -> Iterator[OpenSearchNode]:
    """A node of its own with ``http.max_content_length: 1mb`` (the default is 100 MB)."""
    node = OpenSearchNode()
    config = node.home / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "opensearch.yml").write_text("http.max_content_length: 1mb\n")
    with node:
        yield node


def test_a_document_over_http_max_content_length_is_dead_lettered_alone(
    small_opensearch: OpenSearchNode, store: MemoryStore
) -> None:
    client = OpenSearch(hosts=[small_opensearch.url], timeout=30)
    sink = OpenSearchSink("search", client, index_settings={"number_of_replicas": 0})
    sink.prepare([DOC])
    pipe = Pipeline(registry_of(DOC), {("opensearch", "search"): sink}, store, lambda v: 0)
    recs = [
        record({"pk": "a"}),
        record({"pk": "big", "search": "big", "blob": "x" * (2 * 2**20)}),
        record({"pk": "c"}),
    ]
    try:
        report = pipe.process(TABLE, KEYS, recs)
        accounted(report, len(recs), 1, store)
        assert (report.applied, report.dead_lettered) == (2, 1)
        error = letter_for(store, "bad_doc", "big")
        assert "'big'" in error and "max_content_length" in error, error
        assert set(sink.live_documents(DOC)) == {"a", "c"}
    finally:
        sink.close()
        client.close()


def test_a_keyword_over_32766_bytes_fails_that_document_only(
    pipeline: Pipeline,
    store: MemoryStore,
    os_client: OpenSearch,
    os_prefix: str,
    os_sink: OpenSearchSink,
) -> None:
    """``tag`` mapped as keyword (a mapping of the user's): Lucene refuses a term over
    32766 bytes with a 400 for that document; the rest of the bulk request is applied."""
    live = os_sink.indexes(DOC).live
    os_client.indices.put_mapping(index=live, body={"properties": {"tag": {"type": "keyword"}}})
    recs = [
        record({"pk": "a"}),
        record({"pk": "huge", "search": "keyword", "tag": "é" * 20_000}),  # 40000 bytes
        record({"pk": "short", "search": "keyword", "tag": "fine"}),
    ]
    report = pipeline.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 2, store)
    assert (report.applied, report.dead_lettered) == (5, 1)
    error = letter_for(store, "bad_doc", "huge")
    assert "HTTP 400" in error and "tag" in error and "32766" in error, error
    assert set(os_sink.live_documents(DOC)) == {"a", "short"}


# ==== 4. keys ===============================================================================

LONG_KEY = "k" * 2048  # DynamoDB's largest partition key


def test_a_2_kb_item_key_is_applied_in_redis_and_its_collisions_name_it(
    redis_sink: RedisSink,
    redis_client: redis.Redis,
    store: MemoryStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipe = Pipeline(registry_of(CARD), {("redis", "cache"): redis_sink}, store, lambda v: 0)
    other = "o" * 2000
    recs = [
        record({"pk": LONG_KEY}),
        record({"pk": other, "redis": "hostile", "key": "shared", "value": "1"}),
        record({"pk": LONG_KEY + "2", "redis": "hostile", "key": "shared", "value": "2"}),
    ]
    with caplog.at_level(logging.WARNING, "viewkeeper.runtime.pipeline"):
        report = pipe.process(TABLE, KEYS, recs)
    accounted(report, len(recs), 1, store)
    assert report.applied == 3 and report.collisions >= 1
    assert card(redis_client, LONG_KEY) == {"pk": LONG_KEY, "v": None}
    assert sorted(redis_sink.owned_entries(CARD, LONG_KEY) or []) == [
        ("S", "cards", LONG_KEY),
        ("V", f"card:{LONG_KEY}", ""),
    ]
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert other in warning and LONG_KEY + "2" in warning  # both items, in full


def test_a_2_kb_item_key_in_an_opensearch_view_is_dead_lettered_with_the_fix(
    pipeline: Pipeline, store: MemoryStore
) -> None:
    """An OpenSearch ``_id`` holds at most 512 bytes; the default id is the item key."""
    report = pipeline.process(TABLE, KEYS, [record({"pk": LONG_KEY}), record({"pk": "a"})])
    accounted(report, 2, 2, store)
    assert report.dead_lettered == 1
    error = letter_for(store, "bad_doc", LONG_KEY)
    assert "512" in error, error
    assert "doc_id=" in error, error  # the fix: give the view a doc_id function
    assert len(error) < 1200, f"the 2 KB key is echoed in full: {len(error)} characters"


@opensearch_view(
    table=TABLE,
    opensearch="search",
    index="long-keys",
    doc_id=lambda item: f"doc-{item['pk'][:8]}-{len(item['pk'])}",
)
def long_key_doc(item: dict[str, Any]) -> dict[str, Any]:
    """A doc_id= view: the document id is short whatever the key."""
    return {"size": len(item["pk"])}


LONG_DOC = view_for(long_key_doc)


def test_a_2_kb_item_key_is_removed_from_an_opensearch_view_and_lives_in_a_doc_id_view(
    os_sink: OpenSearchSink,
) -> None:
    """The sink stores an item key over 512 bytes under a digest ``_id`` (owner records,
    tombstones, default document ids). The put of such an item in a default-id view is
    still dead-lettered by the projection (above); its REMOVE writes a tombstone and is
    applied, and a doc_id= view takes the item like any other: insert and remove applied,
    in the same pages as short keys."""
    views = registry_of(DOC, LONG_DOC)
    store = MemoryStore()
    pipe = Pipeline(views, {("opensearch", "search"): os_sink}, store, lambda v: 0)
    report = pipe.process(TABLE, KEYS, [record({"pk": LONG_KEY}), record({"pk": "a"})])
    accounted(report, 2, 2, store)
    assert (report.applied, report.dead_lettered) == (3, 1), report
    assert letter_for(store, "bad_doc", LONG_KEY)  # the projection's rule, not the sink's
    assert os_sink.live_documents(LONG_DOC) == {
        "doc-kkkkkkkk-2048": {"size": 2048},
        "doc-a-1": {"size": 1},
    }
    store = MemoryStore()
    pipe = Pipeline(views, {("opensearch", "search"): os_sink}, store, lambda v: 0)
    removed = [record({"pk": LONG_KEY}, event="REMOVE"), record({"pk": "b"})]
    report = pipe.process(TABLE, KEYS, removed)
    accounted(report, 2, 2, store)
    assert (report.applied, report.dead_lettered) == (4, 0), [
        d.error for d in store.list_deadletters()
    ]
    assert LONG_KEY in os_sink.tombstones(DOC) and LONG_KEY in os_sink.tombstones(LONG_DOC)
    assert set(os_sink.live_documents(LONG_DOC)) == {"doc-a-1", "doc-b-1"}


def test_an_empty_redis_key_is_refused_where_the_view_builds_it() -> None:
    with pytest.raises(TypeError, match=r"Value key must be a non-empty str, got ''"):
        Value("", "x")


# ==== 5. view modules that cannot be loaded =================================================


HEADER = "from viewkeeper import SetMember, Value, opensearch_view, redis_view\n\n"
VIEW_MODULES: list[tuple[str, dict[str, str], list[str], bool]] = [
    # (case, {module: source}, what stderr must say, one line?)
    (
        "two views named alike in one module",
        {
            "dup_views": """
            @redis_view(table="t1", redis="cache", name="card")
            def card_a(item):
                return Value("a:" + item["pk"], 1)

            @redis_view(table="t1", redis="cache", name="card")
            def card_b(item):
                return Value("b:" + item["pk"], 2)
            """
        },
        ["two views are named 'card'", "dup_views.card_a", "dup_views.card_b", "name="],
        True,
    ),
    (
        "two views named alike in two modules",
        {
            "one_views": """
            @redis_view(table="t1", redis="cache")
            def card(item):
                return Value("a:" + item["pk"], 1)
            """,
            "two_views": """
            @opensearch_view(table="t1", opensearch="search", index="cards")
            def card(item):
                return {"pk": item["pk"]}
            """,
        },
        ["two views are named 'card'", "one_views.card", "two_views.card"],
        True,
    ),
    (
        "a view defined twice under one function name",
        {
            "redef_views": """
            @redis_view(table="t1", redis="cache")
            def card(item):
                return Value("a:" + item["pk"], 1)

            @redis_view(table="t1", redis="cache")
            def card(item):  # noqa: F811 - the first definition is silently replaced
                return Value("b:" + item["pk"], 2)
            """
        },
        ["'card'", "redef_views", "twice"],
        False,
    ),
    (
        "a decorated object that is not callable",
        {"noncall_views": 'card = redis_view(table="t1", redis="cache")(42)\n'},
        ["noncall_views", "must decorate a function", "42", 'noncall_views.py", line 3'],
        False,
    ),
    (
        "the decorator used without arguments",
        {
            "bare_views": """
            @redis_view
            def card(item):
                return Value("a:" + item["pk"], 1)
            """
        },
        ["bare_views", "@redis_view(", "table="],
        False,
    ),
    (
        "a connection the config does not declare",
        {
            "conn_views": """
            @redis_view(table="t1", redis="sessions")
            def card(item):
                return Value("a:" + item["pk"], 1)
            """
        },
        ["conn_views.card", "redis='sessions'", "add redis.sessions"],
        True,
    ),
    (
        "a module that fails on import",
        {"boom_views": "import os\n\nTABLE = os.environ['VK_NO_SUCH_VARIABLE']\n"},
        ["boom_views", "KeyError", "VK_NO_SUCH_VARIABLE", 'boom_views.py", line 5'],
        False,
    ),
    (
        "a module without views",
        {"empty_views": "TABLE = 't1'\n"},
        ["empty_views", "declares no view", "@redis_view"],
        True,
    ),
    ("a module that does not exist", {}, ["no_such_views", "cannot import"], True),
]


def offline_config(tmp_path: Path, views: list[str], **sections: Any) -> Path:
    """A viewkeeper.yaml for ``check --offline`` (no service is contacted): ``views`` and
    placeholder connections, any section replaced by ``sections``."""
    cfg: dict[str, Any] = {
        "aws": {"region": "us-east-1"},
        "views": views,
        "redis": {"cache": {"url": "redis://127.0.0.1:6379/0"}},
        "opensearch": {"search": {"hosts": ["http://127.0.0.1:9200"]}},
        **sections,
    }
    path = tmp_path / "viewkeeper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("modules", "must_say", "one_line"),
    [c[1:] for c in VIEW_MODULES],
    ids=[c[0] for c in VIEW_MODULES],
)
def test_a_hostile_view_module_stops_at_load_with_exit_78(
    tmp_path: Path, modules: dict[str, str], must_say: list[str], one_line: bool
) -> None:
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(HEADER + textwrap.dedent(source))
    config = offline_config(tmp_path, list(modules) or ["no_such_views"])
    res = vk("check", "--offline", "-c", str(config))
    assert res.returncode == 78, res.stdout + res.stderr
    for words in must_say:
        assert words in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("viewkeeper: "), res.stderr
    if one_line:
        assert len(lines) == 1, res.stderr


# ==== 6. invalid config values through the CLI ==============================================

CONFIG_VALUES: list[tuple[str, str, Any, list[str]]] = [
    # (case, section, value, what the line must say: key path, value, fix)
    ("batch_size too big", "worker", {"batch_size": 5000}, ["worker.batch_size", "5000", "1000"]),
    ("on_error unknown", "worker", {"on_error": "skip"}, ["worker.on_error", "'skip'", "halt"]),
    (
        "on_sink_loss unknown",
        "worker",
        {"on_sink_loss": "ignore"},
        ["worker.on_sink_loss", "'ignore'", "rebuild"],
    ),
    ("metrics port", "metrics", {"port": 70000}, ["metrics.port", "70000", "65535"]),
    ("processes zero", "worker", {"processes": 0}, ["worker.processes", "0", "auto"]),
    ("processes text", "worker", {"processes": "all"}, ["worker.processes", "'all'", "auto"]),
    (
        "redis url scheme",
        "redis",
        {"cache": {"url": "http://127.0.0.1:6379"}},
        ["redis.cache.url", "'http://127.0.0.1:6379'", "redis://"],
    ),
    (
        "starting position",
        "tables",
        {TABLE: {"starting_position": "EARLIEST"}},
        [f"tables.{TABLE}.starting_position", "'EARLIEST'", "TRIM_HORIZON"],
    ),
    (
        "tombstones shorter than the stream",
        "tombstones",
        {"retention_hours": 1},
        ["tombstones.retention_hours", "1", "at least 24"],
    ),
    (
        "boolean written as text",
        "coordination",
        {"create_if_missing": "no"},
        ["coordination.create_if_missing", "'no'", "true"],
    ),
    (
        "opensearch auth type",
        "opensearch",
        {"search": {"hosts": ["http://127.0.0.1:9200"], "auth": {"type": "bearer"}}},
        ["opensearch.search.auth.type", "'bearer'", "sigv4"],
    ),
    (
        "metrics host that is no address",
        "metrics",
        {"host": "metrics host!", "port": 9464},
        ["metrics.host", "'metrics host!'", "127.0.0.1"],
    ),
]


@pytest.mark.parametrize(
    ("section", "value", "must_say"),
    [c[1:] for c in CONFIG_VALUES],
    ids=[c[0] for c in CONFIG_VALUES],
)
def test_an_invalid_config_value_is_one_line_and_exit_78(
    tmp_path: Path, section: str, value: Any, must_say: list[str]
) -> None:
    path = offline_config(tmp_path, ["tests.views_e2e.bad_views"], **{section: value})
    res = vk("check", "--offline", "-c", str(path))
    assert res.returncode == 78, res.stdout + res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"viewkeeper: {path}:"), line  # the file and the line
    for words in must_say:
        assert words in line, line


# ==== 7. services unreachable at start ======================================================


def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture
def bad_items_table(dynamodb: Any, make_table: Callable[..., tuple[str, str]]) -> str:
    make_table(dynamodb, TABLE, hash_key="pk")
    return TABLE


def service_config(
    tmp_path: Path,
    *,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
    os_prefix: str,
    **extra: Any,
) -> Path:
    return write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.bad_views"],
        tables={TABLE: {"starting_position": "TRIM_HORIZON"}},
        opensearch={"search": {"hosts": [opensearch_url], "index_prefix": os_prefix}},
        **extra,
    )


@pytest.fixture
def down_config(
    tmp_path: Path,
    bad_items_table: str,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
    os_client: OpenSearch,
    os_prefix: str,
) -> Callable[[str], tuple[Path, str]]:
    """``down_config(service)`` -> (config path, "127.0.0.1:PORT" of the closed service)."""

    def make(service: str) -> tuple[Path, str]:
        port = closed_port()
        urls = {"dynamodb": dynamodb_url, "redis": redis_url, "opensearch": opensearch_url}
        urls[service] = {
            "dynamodb": f"http://127.0.0.1:{port}",
            "redis": f"redis://127.0.0.1:{port}/0",
            "opensearch": f"http://127.0.0.1:{port}",
        }[service]
        path = service_config(
            tmp_path,
            dynamodb_url=urls["dynamodb"],
            redis_url=urls["redis"],
            opensearch_url=urls["opensearch"],
            os_prefix=os_prefix,
        )
        return path, f"127.0.0.1:{port}"

    return make


SERVICES = ["redis", "opensearch", "dynamodb"]


def quiet(stderr: str, limit: int = 15) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(stderr.strip().splitlines()) <= limit, stderr[-3000:]


@pytest.mark.parametrize("service", SERVICES)
def test_check_names_the_unreachable_service_without_traceback_spam(
    down_config: Callable[[str], tuple[Path, str]], service: str
) -> None:
    path, where = down_config(service)
    res = vk("check", "-c", str(path), timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    failed = [line for line in res.stdout.splitlines() if "FAILED" in line]
    assert failed and any(where in line for line in failed), res.stdout
    assert "1 check(s) failed" in res.stdout or service == "dynamodb", res.stdout
    quiet(res.stderr)


def test_check_reports_every_service_even_when_one_is_down(
    down_config: Callable[[str], tuple[Path, str]],
) -> None:
    path, where = down_config("redis")
    res = vk("check", "-c", str(path), timeout=120)
    assert res.returncode == 1
    assert where in res.stdout
    assert "opensearch search: ok" in res.stdout, res.stdout  # checked despite Redis


@pytest.mark.parametrize("service", SERVICES)
def test_run_exits_with_one_clear_line_when_a_service_is_unreachable(
    down_config: Callable[[str], tuple[Path, str]], service: str
) -> None:
    path, where = down_config(service)
    started = time.monotonic()
    res = vk("run", "--until-caught-up", "-c", str(path), timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    assert time.monotonic() - started < 90
    assert where in res.stderr, res.stderr[-3000:]
    quiet(res.stderr)


def test_run_with_the_metrics_port_taken_warns_once_and_runs_without_metrics(
    tmp_path: Path,
    bad_items_table: str,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
    os_client: OpenSearch,
    os_prefix: str,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = service_config(
            tmp_path,
            dynamodb_url=dynamodb_url,
            redis_url=redis_url,
            opensearch_url=opensearch_url,
            os_prefix=os_prefix,
            metrics={"port": port},
        )
        res = vk("run", "--until-caught-up", "-c", str(path), timeout=120)
    # a second instance on one host must run (issue #14): one WARNING, no exit
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(warnings) == 1, res.stderr[-3000:]
    (line,) = warnings
    assert "WARNING" in line and "running without a metrics endpoint" in line, line
    assert "metrics.port" in line and "--processes" in line, line  # the fixes
    assert "Traceback" not in res.stderr


# ==== 8. the coordination table =============================================================


@pytest.fixture
def coordination(
    tmp_path: Path,
    dynamodb: Any,
    bad_items_table: str,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
    os_client: OpenSearch,
    os_prefix: str,
    make_table: Callable[..., tuple[str, str]],
) -> Callable[[str], tuple[Path, str]]:
    """``coordination(case)`` -> (config path, table name) for a missing table that may not
    be created, or a table with the wrong key schema."""

    def make(case: str) -> tuple[Path, str]:
        name = f"vk-coord-{case}-{tmp_path.name[-8:]}".replace("_", "-")
        if case == "wrong_schema":
            make_table(dynamodb, name, hash_key="id", stream=False)
        path = service_config(
            tmp_path,
            dynamodb_url=dynamodb_url,
            redis_url=redis_url,
            opensearch_url=opensearch_url,
            os_prefix=os_prefix,
            coordination={"table": name, "create_if_missing": case != "missing"},
        )
        return path, name

    return make


COORDINATION_FIX = {
    "missing": ["does not exist", "create_if_missing: true"],
    "wrong_schema": ["key schema", "pk", "sk", "coordination.table"],
}


@pytest.mark.parametrize("case", ["missing", "wrong_schema"])
def test_check_explains_a_bad_coordination_table(
    coordination: Callable[[str], tuple[Path, str]], case: str
) -> None:
    path, name = coordination(case)
    res = vk("check", "-c", str(path))
    assert res.returncode == 1
    (line,) = [x for x in res.stdout.splitlines() if "coordination table" in x]
    assert "FAILED" in line and repr(name) in line, line
    for words in COORDINATION_FIX[case]:
        assert words in line, line
    quiet(res.stderr)


@pytest.mark.parametrize("command", ["run", "status", "deadletters"])
@pytest.mark.parametrize("case", ["missing", "wrong_schema"])
def test_commands_explain_a_bad_coordination_table_in_one_line(
    coordination: Callable[[str], tuple[Path, str]], case: str, command: str
) -> None:
    path, name = coordination(case)
    args = {
        "run": ["run", "--until-caught-up"],
        "status": ["status"],
        "deadletters": ["deadletters", "list"],
    }[command]
    res = vk(*args, "-c", str(path))
    assert res.returncode in (1, 78), res.stdout + res.stderr
    quiet(res.stderr, limit=3)
    assert repr(name) in res.stderr, res.stderr
    for words in COORDINATION_FIX[case]:
        assert words in res.stderr, res.stderr


# ==== 9. through the daemon: moto stream -> DynamoDB store -> dead letters ==================


def test_bad_records_through_the_daemon_end_applied_or_dead_lettered_and_listed(
    tmp_path: Path,
    dynamodb: Any,
    bad_items_table: str,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
    redis_client: redis.Redis,
    os_client: OpenSearch,
    os_prefix: str,
) -> None:
    items: list[dict[str, Any]] = [
        {"pk": "ok-1", "v": 1},
        {"pk": "r-raise", "redis": "raise"},
        {"pk": "r-dict", "redis": "dict"},
        {"pk": "r-empty", "redis": "empty_key"},
        {"pk": "s-list", "search": "list"},
        {"pk": "s-object", "search": "object"},
        {"pk": "both", "redis": "string", "search": "underscore"},
        {"pk": "ok-2", "v": 2},
    ]
    for item in items:
        dynamodb.put_item(TableName=TABLE, Item=encode_image(item))
    path = service_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        opensearch_url=opensearch_url,
        os_prefix=os_prefix,
    )
    res = vk("run", "--until-caught-up", "-c", str(path))
    assert res.returncode == 0, res.stderr[-3000:]

    listed = vk("deadletters", "list", "--json", "-c", str(path))
    assert listed.returncode == 0, listed.stderr
    letters = {(d["view"], d["item_key"]): d for d in json.loads(listed.stdout)}
    assert set(letters) == {
        ("bad_card", "r-raise"),
        ("bad_card", "r-dict"),
        ("bad_card", "r-empty"),
        ("bad_doc", "s-list"),
        ("bad_doc", "s-object"),
        ("bad_card", "both"),
        ("bad_doc", "both"),
    }
    for dl in letters.values():
        assert dl["error"] and dl["record"]["dynamodb"]["Keys"], dl
    assert "cannot make a card" in letters[("bad_card", "r-raise")]["error"]
    # every other (item, view) pair was applied
    redis_cards = {k.decode() for k in redis_client.scan_iter("card:*")}
    assert redis_cards == {f"card:{i['pk']}" for i in items if (i.get("redis", "ok")) == "ok"}
    alias = f"{os_prefix}bad-docs"
    os_client.indices.refresh(index=alias)
    hits = os_client.search(index=alias, body={"size": 100})["hits"]["hits"]
    assert {h["_id"] for h in hits} == {
        encode_key(i, KEYS) for i in items if i.get("search", "ok") == "ok"
    }
    table = vk("deadletters", "list", "-c", str(path)).stdout
    assert "r-raise" in table and "cannot make a card" in table
