"""FakeStream: an in-process DynamoDB table + stream with the behaviours moto lacks.

moto serves the wire protocol well but has one shard that never closes, iterators that never
expire and no trimming (ARCHITECTURE.md § Test bed). Shard lineage, rollover, expiry and
trimming are what the shard worker and the supervisor must get right, so they are tested
against this fake, which implements the same
:class:`~viewkeeper.stream.client.StreamClient` interface.

Behaviour, as documented for the tests that rely on it:

- ``create_table(name, key_names, shards=N)``: N open shards share the key-hash space. Every
  write (``put_item``/``update``/``delete_item``) stores the item and appends one INSERT,
  MODIFY or REMOVE record — with the images of the stream's view type (default
  NEW_AND_OLD_IMAGES) and ApproximateCreationDateTime from ``clock`` — to the open shard
  owning ``crc32(encode_key(key))``. A write that changes nothing emits nothing (as in
  DynamoDB; moto emits a MODIFY).
- Sequence numbers are one strictly increasing counter per fake, starting at
  ``first_sequence`` (21 digits by default) with seeded gaps of 1..``sequence_gap``. Start it
  at ``10**21 - 5`` to cross from 21 to 22 digits.
- ``split_shard`` closes a shard (``ending_sequence`` set) and opens two children that share
  its hash range; ``rollover`` opens one; ``close_all_and_rollover`` rolls every open shard.
  Children start after the parent's ending sequence.
- ``get_records`` returns at most ``limit`` records (and ≤ 1 MB). On a closed shard, the page
  that returns its last records — or an empty page when none remain — has
  ``next_iterator=None`` (SHARD_END); with ``end_with_last_records=False`` the last records
  come with an iterator and the SHARD_END page after them is empty (a reader must handle
  both). An open shard always gives a next iterator.
- Iterators expire ``iterator_max_age`` seconds (of ``clock``) after they were issued, or at
  once with ``expire_iterators()``: ExpiredIteratorError. Any iterator may be reused until then.
- ``trim(before=t)`` drops records created before t. An iterator, AT_/AFTER_SEQUENCE_NUMBER
  position that would skip dropped records raises TrimmedDataAccessError; TRIM_HORIZON
  starts at the oldest kept record. A closed shard with nothing left, closed before t,
  disappears from DescribeStream (its children then have an unknown parent, as in AWS).
- ``disable_stream``: DescribeStream says DISABLED, open shards close (still readable), the
  table reports no stream; ``enable_stream`` makes a new stream with a new ARN.
  ``delete_table``: the table and its stream are gone (ResourceNotFoundError).
- ``inject(method, exc, times=n)`` makes the next n calls of ``method`` raise ``exc``;
  ``probability=p`` makes each call fail with probability p (seeded RNG) instead.
  ``calls`` counts calls per method.

Over 500 lines: a test double of a whole service (a table, its stream, shard lineage,
iterators, trimming, fault injection) behind one interface; its parts share the shards'
state and one lock, and the documented behaviour above is easier to check against one file.
"""

from __future__ import annotations

import bisect
import copy
import datetime as _dt
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from viewkeeper.projection.keys import encode_key
from viewkeeper.stream.client import (
    ITERATOR_TYPES,
    PendingPage,
    RecordsPage,
    ScanPage,
    ShardInfo,
    StreamClient,
    StreamPage,
    TableInfo,
)
from viewkeeper.stream.errors import (
    ExpiredIteratorError,
    ResourceNotFoundError,
    TrimmedDataAccessError,
    ValidationError,
)
from viewkeeper.stream.records import PageHead
from viewkeeper.stream.values import encode_image

__all__ = ["FakeStream", "ManualClock"]

_HASH_SPACE = 1 << 32
_MAX_PAGE_BYTES = 1 << 20
_VIEW_TYPES = ("KEYS_ONLY", "NEW_IMAGE", "OLD_IMAGE", "NEW_AND_OLD_IMAGES")
_INJECTABLE = ("describe_table", "describe_stream", "get_shard_iterator", "get_records", "scan")


def _seq_of(record: tuple[int, float, bytes]) -> int:
    return record[0]


class ManualClock:
    """A clock for tests: ``clock()`` returns the time, ``clock.advance(s)`` moves it."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self.now += seconds
            return self.now


@dataclass
class _Shard:
    shard_id: str
    parent_id: str | None
    lo: int  # the hash range [lo, hi) of keys this shard takes while open
    hi: int
    start: int
    end: int | None = None
    closed_at: float | None = None
    records: list[tuple[int, float, bytes]] = field(default_factory=list)  # seq, time, JSON
    trimmed_through: int = -1  # highest sequence number dropped by trim()
    gone: bool = False  # trimmed away entirely: no longer listed


@dataclass
class _Stream:
    arn: str
    view_type: str
    shards: list[_Shard] = field(default_factory=list)
    status: str = "ENABLED"
    deleted: bool = False


@dataclass
class _Table:
    name: str
    key_names: tuple[str, ...]
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    stream: _Stream | None = None


@dataclass(frozen=True)
class _Iterator:
    stream_arn: str
    shard_id: str
    after: int  # the next record returned is the first with a sequence number > after
    issued_at: float
    epoch: int


@dataclass
class _Injection:
    exc: BaseException | Callable[[], BaseException]
    times: int | None
    probability: float | None


class FakeStream(StreamClient):
    """In-process, deterministic, thread-safe :class:`StreamClient` (see the module doc)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        first_sequence: int = 4 * 10**20,
        sequence_gap: int = 100,
        iterator_max_age: float = 15 * 60.0,
        describe_page_size: int = 100,
        scan_page_size: int = 100,
        region: str = "us-east-1",
        seed: int = 0,
        end_with_last_records: bool = True,
    ) -> None:
        self.clock = clock
        self.end_with_last_records = end_with_last_records
        self.iterator_max_age = iterator_max_age
        self.describe_page_size = describe_page_size
        self.scan_page_size = scan_page_size
        self.region = region
        self.calls: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._seq = first_sequence - 1  # the last sequence number handed out
        self._last_record = ""  # the sequence number of the newest record
        self._gap = max(1, sequence_gap)
        self._tables: dict[str, _Table] = {}
        self._streams: dict[str, _Stream] = {}
        self._iterators: dict[str, _Iterator] = {}
        self._epoch = 0
        self._n = 0  # ids for shards, streams, iterators, events
        self._injections: dict[str, list[_Injection]] = {}

    # --- set-up and the write side -----------------------------------------------------
    def create_table(
        self,
        name: str,
        key_names: Iterable[str] = ("pk",),
        *,
        shards: int = 1,
        stream: str | None = "NEW_AND_OLD_IMAGES",
    ) -> TableInfo:
        """A table keyed by ``key_names`` (hash, then range) with a stream of ``shards``
        open shards (``stream=None``: no stream)."""
        with self._lock:
            if name in self._tables:
                raise ValidationError(f"table {name} already exists", code="ResourceInUseException")
            table = _Table(name, tuple(key_names))
            self._tables[name] = table
            if stream is not None:
                self._new_stream(table, stream, shards)
            return self._describe_table(name)

    def _new_stream(self, table: _Table, view_type: str, shards: int) -> None:
        if view_type not in _VIEW_TYPES:
            raise ValidationError(f"stream view type {view_type!r} is not one of {_VIEW_TYPES}")
        stamp = _dt.datetime.fromtimestamp(self.clock(), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        self._n += 1
        arn = (
            f"arn:aws:dynamodb:{self.region}:123456789012:table/{table.name}/stream/"
            f"{stamp}.{self._n:03d}"
        )
        table.stream = self._streams[arn] = _Stream(arn, view_type)
        width = _HASH_SPACE // max(1, shards)
        for i in range(max(1, shards)):
            hi = _HASH_SPACE if i == shards - 1 else (i + 1) * width
            self._open_shard(table.stream, None, i * width, hi)

    def _open_shard(self, stream: _Stream, parent: str | None, lo: int, hi: int) -> _Shard:
        self._n += 1
        self._seq += 1  # children start strictly after their parent's end
        shard = _Shard(
            f"shardId-{self._n:020d}-{zlib.crc32(stream.arn.encode()):08x}",
            parent,
            lo,
            hi,
            start=self._seq,
        )
        stream.shards.append(shard)
        return shard

    def _table(self, name: str) -> _Table:
        table = self._tables.get(name)
        if table is None:
            raise ResourceNotFoundError(f"Requested resource not found: Table: {name} not found")
        return table

    def _key_of(self, table: _Table, item: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        missing = [k for k in table.key_names if k not in item]
        if missing:
            raise ValidationError(f"item lacks key attribute(s) {missing} of table {table.name}")
        key = {k: item[k] for k in table.key_names}
        return key, encode_key(key, table.key_names)

    def put_item(self, table: str, item: Mapping[str, Any]) -> None:
        """Store ``item`` (plain Python values) and emit INSERT or MODIFY."""
        with self._lock:
            t = self._table(table)
            encode_image(item)  # refuse floats, empty sets... before storing anything
            key, id_ = self._key_of(t, item)
            self._write(t, key, id_, copy.deepcopy(dict(item)))

    def update(
        self,
        table: str,
        key: Mapping[str, Any],
        changes: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Upsert (like UpdateItem): set ``changes`` and drop ``remove`` on the item at ``key``,
        creating it if missing; returns the new item."""
        with self._lock:
            t = self._table(table)
            k, id_ = self._key_of(t, key)
            item = copy.deepcopy(t.items.get(id_, k))
            item.update(copy.deepcopy(dict(changes or {})))
            for name in remove:
                if name in t.key_names:
                    raise ValidationError(f"cannot remove key attribute {name}")
                item.pop(name, None)
            encode_image(item)
            self._write(t, k, id_, item)
            return copy.deepcopy(item)

    def delete_item(self, table: str, key: Mapping[str, Any]) -> None:
        """Delete the item at ``key`` and emit REMOVE (nothing if there was no item)."""
        with self._lock:
            t = self._table(table)
            k, id_ = self._key_of(t, key)
            self._write(t, k, id_, None)

    def _write(self, t: _Table, key: dict[str, Any], id_: str, new: dict[str, Any] | None) -> None:
        old = t.items.get(id_)
        if old == new:
            return  # an unchanged item (or deleting a missing one) writes no stream record
        if new is None:
            del t.items[id_]
        else:
            t.items[id_] = new
        stream = t.stream
        if stream is None or stream.status != "ENABLED":
            return
        h = zlib.crc32(id_.encode())
        shard = next(s for s in stream.shards if s.end is None and s.lo <= h < s.hi)
        self._seq += self._rng.randint(1, self._gap)
        self._last_record = str(self._seq)
        self._n += 1
        now = round(self.clock(), 3)
        body: dict[str, Any] = {"ApproximateCreationDateTime": now, "Keys": encode_image(key)}
        if new is not None and stream.view_type in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES"):
            body["NewImage"] = encode_image(new)
        if old is not None and stream.view_type in ("OLD_IMAGE", "NEW_AND_OLD_IMAGES"):
            body["OldImage"] = encode_image(old)
        body.update(SequenceNumber=str(self._seq), SizeBytes=0, StreamViewType=stream.view_type)
        body["SizeBytes"] = len(orjson.dumps(body))
        event = "INSERT" if old is None else ("REMOVE" if new is None else "MODIFY")
        record = {
            "eventID": f"{self._n:032x}",
            "eventName": event,
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": self.region,
            "dynamodb": body,
        }
        shard.records.append((self._seq, now, orjson.dumps(record)))

    # --- shard lifecycle, expiry, trimming -----------------------------------------------
    def _shard(self, stream_arn: str, shard_id: str) -> tuple[_Stream, _Shard]:
        stream = self._stream(stream_arn)
        for shard in stream.shards:
            if shard.shard_id == shard_id and not shard.gone:
                return stream, shard
        raise ResourceNotFoundError(f"Requested resource not found: Shard: {shard_id} not found")

    def _open(self, shard_id: str) -> tuple[_Stream, _Shard]:
        for stream in self._streams.values():
            for shard in stream.shards:
                if shard.shard_id == shard_id:
                    if shard.end is not None:
                        raise ValidationError(f"shard {shard_id} is already closed")
                    return stream, shard
        raise ResourceNotFoundError(f"shard {shard_id} not found")

    def _close(self, shard: _Shard) -> None:
        shard.end = max(self._seq, shard.start)
        shard.closed_at = self.clock()

    def split_shard(self, shard_id: str) -> tuple[str, str]:
        """Close ``shard_id``; two children take its key range. Returns their ids."""
        with self._lock:
            stream, shard = self._open(shard_id)
            self._close(shard)
            mid = (shard.lo + shard.hi) // 2
            a = self._open_shard(stream, shard_id, shard.lo, mid)
            b = self._open_shard(stream, shard_id, mid, shard.hi)
            return a.shard_id, b.shard_id

    def rollover(self, shard_id: str) -> str:
        """Close ``shard_id``; one child takes its key range (DynamoDB's ~4 h rollover)."""
        with self._lock:
            stream, shard = self._open(shard_id)
            self._close(shard)
            return self._open_shard(stream, shard_id, shard.lo, shard.hi).shard_id

    def close_all_and_rollover(self, table: str | None = None) -> list[str]:
        """Roll over every open shard (of ``table``, or of every table); the new ids."""
        with self._lock:
            open_ids: list[str] = []
            for name in [table] if table is not None else list(self._tables):
                open_ids += self.open_shards(name)
            return [self.rollover(i) for i in open_ids]

    def expire_iterators(self) -> None:
        """Every iterator issued so far is expired from now on."""
        with self._lock:
            self._epoch += 1

    def trim(self, before: float) -> int:
        """Drop records created before ``before`` (epoch seconds); how many were dropped."""
        dropped = 0
        with self._lock:
            for stream in self._streams.values():
                for shard in stream.shards:
                    keep = [r for r in shard.records if r[1] >= before]
                    if len(keep) != len(shard.records):
                        shard.trimmed_through = max(r[0] for r in shard.records if r[1] < before)
                        dropped += len(shard.records) - len(keep)
                        shard.records = keep
                    if not keep and shard.closed_at is not None and shard.closed_at < before:
                        shard.gone = True
        return dropped

    def disable_stream(self, table: str) -> None:
        """Stream DISABLED, open shards closed but readable; the table reports no stream."""
        with self._lock:
            stream = self._table(table).stream
            if stream is None or stream.status != "ENABLED":
                raise ValidationError(f"table {table} has no enabled stream")
            stream.status = "DISABLED"
            for shard in stream.shards:
                if shard.end is None:
                    self._close(shard)

    def enable_stream(
        self, table: str, view_type: str = "NEW_AND_OLD_IMAGES", shards: int = 1
    ) -> str:
        """A new stream (new ARN) for ``table``; returns its ARN."""
        with self._lock:
            t = self._table(table)
            if t.stream is not None and t.stream.status == "ENABLED":
                raise ValidationError(f"table {table} already has an enabled stream")
            self._new_stream(t, view_type, shards)
            assert t.stream is not None
            return t.stream.arn

    def delete_table(self, table: str) -> None:
        """The table and its stream are gone: every call about them is ResourceNotFound."""
        with self._lock:
            t = self._tables.pop(table, None)
            if t is None:
                raise ResourceNotFoundError(f"Requested resource not found: Table: {table}")
            if t.stream is not None:
                t.stream.deleted = True

    # --- error injection -----------------------------------------------------------------
    def inject(
        self,
        method: str,
        exc: BaseException | Callable[[], BaseException],
        times: int | None = 1,
        probability: float | None = None,
    ) -> None:
        """Make calls of ``method`` (``"get_records"``, ...) raise ``exc`` (an exception, or a
        factory of one): the next ``times`` calls, or — with ``probability`` — each call with
        that probability (seeded), at most ``times`` times (None: no limit)."""
        if method not in _INJECTABLE:
            raise ValueError(f"cannot inject into {method!r}; choose one of {_INJECTABLE}")
        with self._lock:
            self._injections.setdefault(method, []).append(_Injection(exc, times, probability))

    def clear_injections(self) -> None:
        with self._lock:
            self._injections.clear()

    def _enter(self, method: str) -> None:
        """Count the call; raise an injected error if one is due (called under the lock)."""
        self.calls[method] += 1
        for inj in self._injections.get(method, []):
            if inj.times is not None and inj.times <= 0:
                continue
            if inj.probability is not None and self._rng.random() >= inj.probability:
                continue
            if inj.times is not None:
                inj.times -= 1
            if isinstance(inj.exc, BaseException):
                raise copy.copy(inj.exc)
            raise inj.exc()

    # --- the StreamClient interface ------------------------------------------------------
    def _describe_table(self, table: str) -> TableInfo:
        t = self._table(table)
        on = t.stream is not None and t.stream.status == "ENABLED"
        return TableInfo(
            t.name,
            t.key_names,
            t.stream.arn if on and t.stream else None,
            t.stream.view_type if on and t.stream else None,
            "ACTIVE",
            len(t.items),
            f"arn:aws:dynamodb:{self.region}:123456789012:table/{t.name}",
        )

    def describe_table(self, table: str) -> TableInfo:
        with self._lock:
            self._enter("describe_table")
            return self._describe_table(table)

    def _stream(self, stream_arn: str) -> _Stream:
        stream = self._streams.get(stream_arn)
        if stream is None or stream.deleted:
            raise ResourceNotFoundError(f"Requested resource not found: Stream: {stream_arn}")
        return stream

    def describe_stream(
        self, stream_arn: str, exclusive_start_shard_id: str | None = None
    ) -> StreamPage:
        with self._lock:
            self._enter("describe_stream")
            stream = self._stream(stream_arn)
            ids = [s.shard_id for s in stream.shards]
            first = 0
            if exclusive_start_shard_id is not None:
                if exclusive_start_shard_id not in ids:
                    raise ValidationError(f"unknown shard {exclusive_start_shard_id}")
                first = ids.index(exclusive_start_shard_id) + 1
            page = stream.shards[first : first + self.describe_page_size]
            more = first + self.describe_page_size < len(stream.shards)
            shards = [
                ShardInfo(
                    s.shard_id, s.parent_id, str(s.start), None if s.end is None else str(s.end)
                )
                for s in page
                if not s.gone
            ]
            return StreamPage(stream.status, shards, page[-1].shard_id if more else None)

    def get_shard_iterator(
        self,
        stream_arn: str,
        shard_id: str,
        iterator_type: str,
        sequence: str | None = None,
    ) -> str:
        with self._lock:
            self._enter("get_shard_iterator")
            _, shard = self._shard(stream_arn, shard_id)
            if iterator_type not in ITERATOR_TYPES:
                raise ValidationError(
                    f"iterator type {iterator_type!r} is not one of {ITERATOR_TYPES}"
                )
            if iterator_type == "TRIM_HORIZON":
                after = max(shard.start - 1, shard.trimmed_through)
            elif iterator_type == "LATEST":
                after = self._seq if shard.end is None else shard.end
            else:
                if not sequence or not sequence.isdigit():
                    raise ValidationError(f"{iterator_type} needs a sequence number")
                seq = int(sequence)
                if seq < shard.start or (shard.end is not None and seq > shard.end):
                    raise ValidationError(f"sequence number {sequence} is not in shard {shard_id}")
                after = seq - 1 if iterator_type == "AT_SEQUENCE_NUMBER" else seq
                self._check_trimmed(shard, after)
            return self._issue(stream_arn, shard_id, after)

    def _issue(self, stream_arn: str, shard_id: str, after: int) -> str:
        self._n += 1
        token = f"{stream_arn}|fake-iterator|{self._n:012d}"
        self._iterators[token] = _Iterator(stream_arn, shard_id, after, self.clock(), self._epoch)
        return token

    @staticmethod
    def _check_trimmed(shard: _Shard, after: int) -> None:
        if after < shard.trimmed_through:
            raise TrimmedDataAccessError(
                f"records of shard {shard.shard_id} after sequence number {after} are beyond "
                f"the retention: trimmed through {shard.trimmed_through}"
            )

    def get_records(self, iterator: str, limit: int = 1000) -> RecordsPage:
        return self.read_records(iterator, limit).decode()

    def read_records(self, iterator: str, limit: int = 1000) -> PendingPage:
        with self._lock:
            self._enter("get_records")
            if not 1 <= limit <= 1000:
                raise ValidationError(f"limit {limit} is outside 1..1000")
            it = self._iterators.get(iterator)
            if it is None:
                raise ValidationError("Invalid ShardIterator")
            if it.epoch != self._epoch or self.clock() - it.issued_at > self.iterator_max_age:
                raise ExpiredIteratorError(
                    "Iterator expired. The iterator was created at time "
                    f"{_dt.datetime.fromtimestamp(it.issued_at, _dt.UTC):%c} while right now "
                    f"it is {_dt.datetime.fromtimestamp(self.clock(), _dt.UTC):%c} which is "
                    "further in the future than the tolerated delay of 900000 milliseconds."
                )
            _, shard = self._shard(it.stream_arn, it.shard_id)
            self._check_trimmed(shard, it.after)
            rest = shard.records[bisect.bisect_right(shard.records, it.after, key=_seq_of) :]
            page: list[bytes] = []
            size = 0
            for _seq, _when, blob in rest[:limit]:
                if page and size + len(blob) > _MAX_PAGE_BYTES:
                    break
                page.append(blob)
                size += len(blob)
            after = rest[len(page) - 1][0] if page else it.after
            drained = len(page) == len(rest) and (self.end_with_last_records or not page)
            if shard.end is not None and drained:
                next_iterator = None
            else:
                next_iterator = self._issue(it.stream_arn, it.shard_id, after)
            body = b'{"Records":[' + b",".join(page) + b"]}"
        return PendingPage.of(PageHead(body), next_iterator)

    def scan(
        self,
        table: str,
        segment: int,
        total_segments: int,
        exclusive_start_key: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> ScanPage:
        with self._lock:
            self._enter("scan")
            if not 0 <= segment < total_segments:
                raise ValidationError(f"segment {segment} is outside 0..{total_segments - 1}")
            t = self._table(table)
            ids = sorted(i for i in t.items if zlib.crc32(i.encode()) % total_segments == segment)
            if exclusive_start_key:
                start = encode_key(exclusive_start_key, t.key_names)
                ids = [i for i in ids if i > start]
            size = limit or self.scan_page_size
            chosen = ids[:size]
            items = [copy.deepcopy(t.items[i]) for i in chosen]
            last = None
            if len(ids) > size:
                last = {k: items[-1][k] for k in t.key_names}
            return ScanPage(items, last, 0.5 * len(items))

    # --- inspection helpers for tests ----------------------------------------------------
    def items(self, table: str) -> list[dict[str, Any]]:
        """The table's current items (copies), ordered by their encoded key."""
        with self._lock:
            t = self._table(table)
            return [copy.deepcopy(t.items[i]) for i in sorted(t.items)]

    def get_item(self, table: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            t = self._table(table)
            item = t.items.get(self._key_of(t, key)[1])
            return copy.deepcopy(item) if item is not None else None

    def contents(self, table: str) -> dict[str, dict[str, Any]]:
        """The table's items by :func:`encode_key` id — what every view must converge to."""
        with self._lock:
            t = self._table(table)
            return {i: copy.deepcopy(v) for i, v in t.items.items()}

    def stream_arn(self, table: str) -> str:
        with self._lock:
            stream = self._table(table).stream
            if stream is None:
                raise ResourceNotFoundError(f"table {table} has no stream")
            return stream.arn

    def open_shards(self, table: str) -> list[str]:
        with self._lock:
            stream = self._table(table).stream
            return [s.shard_id for s in stream.shards if s.end is None] if stream else []

    def record_count(self, table: str) -> int:
        """Records currently kept in the table's stream (after trimming)."""
        with self._lock:
            stream = self._table(table).stream
            return sum(len(s.records) for s in stream.shards) if stream else 0

    @property
    def last_sequence(self) -> str:
        """The sequence number of the newest record written ("" before the first)."""
        return self._last_record
