"""What viewkeeper needs from DynamoDB and DynamoDB Streams: the :class:`StreamClient`
interface the shard worker, the supervisor and the rebuild are written against, the data it
speaks, and the parsing of its answers.

:class:`viewkeeper.stream.http.HttpStreamClient` speaks to AWS (or moto), and
:class:`viewkeeper.stream.fake.FakeStream` is an in-process twin for the behaviours moto lacks
(shard lineage, rollover, iterator expiry, trimming).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from viewkeeper.stream.errors import ServiceError
from viewkeeper.stream.records import ChangeRecord, PageHead
from viewkeeper.stream.values import decode_image

__all__ = [
    "ITERATOR_TYPES",
    "IteratorType",
    "PendingPage",
    "RecordsPage",
    "ScanPage",
    "ShardInfo",
    "StreamClient",
    "StreamPage",
    "TableInfo",
    "gc_paused",
    "parse_records",
    "parse_scan",
    "parse_stream",
    "parse_table",
]

log = logging.getLogger("viewkeeper.stream.client")

IteratorType = Literal["TRIM_HORIZON", "LATEST", "AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"]
ITERATOR_TYPES: tuple[str, ...] = (
    "TRIM_HORIZON",
    "LATEST",
    "AT_SEQUENCE_NUMBER",
    "AFTER_SEQUENCE_NUMBER",
)


# --- the data the interface speaks ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TableInfo:
    """What DescribeTable says about a source table.

    ``key_names`` is the key schema in order (hash, then range), as :func:`encode_key` wants
    it. ``stream_arn`` is None when the table has no *enabled* stream (a disabled stream's
    ARN is still reported by DynamoDB, but nothing new will ever arrive on it). ``arn`` is
    the table's own ARN (account and region included: the source's identity).
    """

    name: str
    key_names: tuple[str, ...]
    stream_arn: str | None
    stream_view_type: str | None
    status: str
    item_count: int | None = None
    arn: str | None = None


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard of a stream. ``ending_sequence`` is set once the shard is closed: it will
    still yield its remaining records, then SHARD_END."""

    shard_id: str
    parent_shard_id: str | None
    starting_sequence: str
    ending_sequence: str | None = None

    @property
    def closed(self) -> bool:
        return self.ending_sequence is not None


@dataclass(frozen=True, slots=True)
class StreamPage:
    """One DescribeStream page. ``status`` is ENABLED, ENABLING, DISABLED or DISABLING;
    ``last_evaluated_shard_id`` is None on the last page."""

    status: str
    shards: list[ShardInfo]
    last_evaluated_shard_id: str | None = None


@dataclass(frozen=True, slots=True)
class RecordsPage:
    """One GetRecords page. ``next_iterator`` None means SHARD_END: the shard is closed and
    every record has been returned. ``millis_behind`` is always None for DynamoDB Streams
    (it has no lag figure; use now - ``created_at`` of the last record). ``records`` holds
    one entry per record of the response, malformed ones included (marked ``invalid``)."""

    records: list[ChangeRecord]
    next_iterator: str | None
    millis_behind: int | None = None
    size: int = 0  # bytes of the response body (0: not known)

    @property
    def shard_end(self) -> bool:
        return self.next_iterator is None


class PendingPage:
    """A GetRecords answer whose records are not decoded yet (:meth:`StreamClient.read_records`):
    how many there are, the next iterator and the body's size are known; :meth:`decode`
    builds the :class:`RecordsPage`, in whichever thread calls it."""

    __slots__ = ("_records", "count", "next_iterator", "size")

    def __init__(
        self,
        count: int,
        next_iterator: str | None,
        size: int,
        records: Callable[[], list[ChangeRecord]],
    ) -> None:
        self.count = count
        self.next_iterator = next_iterator
        self.size = size
        self._records = records

    @classmethod
    def of(cls, head: PageHead, next_iterator: str | None) -> PendingPage:
        return cls(head.count, next_iterator, head.size, head.records)

    def decode(self) -> RecordsPage:
        with gc_paused():
            records = self._records()
        return RecordsPage(records, self.next_iterator, size=self.size)


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One Scan page: items and ``last_evaluated_key`` as plain Python values (decoded like
    stream images); pass ``last_evaluated_key`` back as ``exclusive_start_key``, None means
    the segment is done. ``consumed_capacity`` in capacity units, when reported."""

    items: list[dict[str, Any]]
    last_evaluated_key: dict[str, Any] | None
    consumed_capacity: float | None = None


@runtime_checkable
class StreamClient(Protocol):
    """What viewkeeper needs from DynamoDB and DynamoDB Streams.

    Implementations are thread-safe: the supervisor calls one client from every worker
    thread. Every method raises only :class:`~viewkeeper.stream.errors.StreamError`
    subclasses for service failures. A stream record that is not valid DynamoDB JSON does not
    raise: :meth:`get_records` returns it in its place, marked
    :attr:`~viewkeeper.stream.records.ChangeRecord.invalid`, for the pipeline to dead-letter.
    """

    def describe_table(self, table: str) -> TableInfo:
        """The key schema and current stream of ``table`` (ResourceNotFoundError if none)."""
        ...

    def describe_stream(
        self, stream_arn: str, exclusive_start_shard_id: str | None = None
    ) -> StreamPage:
        """One page of the stream's shards, after ``exclusive_start_shard_id``."""
        ...

    def list_shards(self, stream_arn: str) -> list[ShardInfo]:
        """Every shard of the stream, following DescribeStream's pagination (parents are
        listed before their children, as DynamoDB does)."""
        shards: list[ShardInfo] = []
        seen: set[str] = set()
        start: str | None = None
        while True:
            page = self.describe_stream(stream_arn, start)
            for shard in page.shards:
                if shard.shard_id not in seen:
                    seen.add(shard.shard_id)
                    shards.append(shard)
            nxt = page.last_evaluated_shard_id
            if nxt is None:
                return shards
            if nxt == start:
                raise ServiceError(
                    f"DescribeStream returned LastEvaluatedShardId {nxt} twice; the shard "
                    "list would never end",
                    code="PaginationLoop",
                    operation="DescribeStream",
                )
            start = nxt

    def get_shard_iterator(
        self,
        stream_arn: str,
        shard_id: str,
        iterator_type: str,
        sequence: str | None = None,
    ) -> str:
        """An iterator for ``shard_id``: ``iterator_type`` is one of :data:`ITERATOR_TYPES`;
        ``sequence`` is required for AT_/AFTER_SEQUENCE_NUMBER. Iterators expire after
        15 minutes (ExpiredIteratorError from get_records)."""
        ...

    def get_records(self, iterator: str, limit: int = 1000) -> RecordsPage:
        """Up to ``limit`` (≤ 1000) records from ``iterator``, decoded."""
        ...

    def read_records(self, iterator: str, limit: int = 1000) -> PendingPage:
        """:meth:`get_records` in two halves: the call now (its errors, a body that is not
        JSON included, raised here) and the envelope read — how many records, the next
        iterator —, the records' decode when :meth:`PendingPage.decode` is called. The
        shard worker reads ahead with it: the wait for the service overlaps the current
        page in a helper thread, and the next call can leave before this page is decoded,
        while the decode — CPU work, which would only fight for the GIL — stays in the
        worker's thread. This default makes the whole call now."""
        page = self.get_records(iterator, limit)
        return PendingPage(len(page.records), page.next_iterator, page.size, lambda: page.records)

    def scan(
        self,
        table: str,
        segment: int,
        total_segments: int,
        exclusive_start_key: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> ScanPage:
        """One page of a parallel scan of ``table`` (segment ``segment`` of
        ``total_segments``), for the rebuild: a strongly consistent read (the rebuild's
        argument needs every item as of after the handshake; an eventually consistent
        Scan may return one from before a write the stream already delivered)."""
        ...


# --- parsing responses (pure functions: the benchmarks and tests call them directly) -------
def parse_table(data: Mapping[str, Any]) -> TableInfo:
    """A DescribeTable response (already JSON-decoded) → :class:`TableInfo`."""
    table = data["Table"]
    schema = table.get("KeySchema") or []
    hash_names = [k["AttributeName"] for k in schema if k.get("KeyType") == "HASH"]
    range_names = [k["AttributeName"] for k in schema if k.get("KeyType") == "RANGE"]
    spec = table.get("StreamSpecification") or {}
    enabled = bool(spec.get("StreamEnabled"))
    count = table.get("ItemCount")
    return TableInfo(
        name=table["TableName"],
        key_names=tuple(hash_names + range_names),
        stream_arn=table.get("LatestStreamArn") if enabled else None,
        stream_view_type=spec.get("StreamViewType") if enabled else None,
        status=table.get("TableStatus", "ACTIVE"),
        item_count=int(count) if count is not None else None,
        arn=table.get("TableArn"),
    )


def parse_stream(data: Mapping[str, Any]) -> StreamPage:
    """A DescribeStream response (JSON-decoded) → :class:`StreamPage`."""
    desc = data["StreamDescription"]
    shards = []
    for s in desc.get("Shards") or ():
        rng = s.get("SequenceNumberRange") or {}
        shards.append(
            ShardInfo(
                shard_id=s["ShardId"],
                parent_shard_id=s.get("ParentShardId"),
                starting_sequence=rng.get("StartingSequenceNumber", ""),
                ending_sequence=rng.get("EndingSequenceNumber"),
            )
        )
    return StreamPage(
        status=desc.get("StreamStatus", "ENABLED"),
        shards=shards,
        last_evaluated_shard_id=desc.get("LastEvaluatedShardId"),
    )


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False
_gc_paused_at = 0.0
_GC_MAX_PAUSE = 1.0  # seconds of back-to-back pauses (many threads) before a forced pass


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off while a page is parsed and decoded.

    Why: a 1000-record page allocates ~150,000 containers in one burst, all alive until the
    page is decoded. The collector, triggered by allocation counts, would traverse that
    young, acyclic tree again and again and promote it into full collections: measured,
    that doubles the cost of the whole parse path (``bench/decode.py``). Reference counting
    still frees everything; only the cycle search waits until the burst is over (the same
    technique as Mercurial's ``util.nogc``).

    Safe with threads: pauses nest through a counter, the collector comes back on when the
    last one ends (only if it was on before), and if pauses from many threads keep it off
    for more than a second, a young-generation pass is forced so garbage stays bounded.
    """
    global _gc_depth, _gc_was_enabled, _gc_paused_at
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            _gc_paused_at = time.monotonic()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0:
                if _gc_was_enabled:
                    gc.enable()
            elif time.monotonic() - _gc_paused_at > _GC_MAX_PAUSE:
                _gc_paused_at = time.monotonic()
                gc.collect(1)


def parse_records(body: bytes | Mapping[str, Any], *, pause_gc: bool = True) -> RecordsPage:
    """A GetRecords response body (bytes, or already JSON-decoded) → :class:`RecordsPage`.

    This is the hot path measured by ``bench/decode.py``: :class:`PageHead` (a typed
    msgspec parse and the hand-written decoder of :mod:`viewkeeper.stream.records`), nothing
    else, under :func:`gc_paused` unless ``pause_gc`` is False. A malformed record does not
    fail the page: it comes back marked ``invalid`` (:func:`decode_records`).
    """
    with gc_paused() if pause_gc else nullcontext():
        head = PageHead(body)
        records = head.records()
    return RecordsPage(records, head.next_iterator, size=head.size)


def parse_scan(data: Mapping[str, Any]) -> ScanPage:
    """A Scan response (JSON-decoded) → :class:`ScanPage` with decoded items."""
    items = [decode_image(i) for i in data.get("Items") or ()]
    last = data.get("LastEvaluatedKey")
    consumed = (data.get("ConsumedCapacity") or {}).get("CapacityUnits")
    return ScanPage(
        items=items,
        last_evaluated_key=decode_image(last) if last else None,
        consumed_capacity=float(consumed) if consumed is not None else None,
    )
