"""Change records: where a record enters viewkeeper.

The raw ``Records`` of a GetRecords page (or of a Lambda event, or of boto3's parsed form)
become :class:`ChangeRecord` objects here, and nowhere else; their images are decoded by
:mod:`viewkeeper.stream.values`. The new image is decoded eagerly (every view needs it); the
old image is kept raw and decoded only when :attr:`ChangeRecord.old_image` is read (no view
reads it on the hot path).

A GetRecords body goes through :func:`decode_page`: msgspec parses the envelope into typed
structs and builds Python objects only for ``Keys`` and ``NewImage`` — the ``OldImage`` and
each record's raw text stay slices of the body (``msgspec.Raw``), parsed only if read (a
dead letter, a view of the old image). That halves the parse-and-free cost of a page
(measured: ``orjson.loads`` of the whole body and freeing it cost ~12 µs per record, the
typed parse ~4 µs). A record the typed parse refuses takes the general path
(``orjson`` + :func:`decode_record`), which names what is wrong.

A malformed record never fails a whole page: :func:`decode_records` returns it in its place
as a :class:`ChangeRecord` whose :attr:`~ChangeRecord.invalid` holds the error, so the
pipeline dead-letters it and the shard goes on (I5). :func:`decode_record`, for one record,
still raises :class:`DecodeError`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Literal

import msgspec
import orjson

from viewkeeper.stream.values import DecodeError, _image, decode_image

__all__ = [
    "NO_SEQUENCE",
    "ChangeRecord",
    "DecodeError",
    "EventName",
    "PageHead",
    "decode_page",
    "decode_record",
    "decode_records",
    "invalid_record",
]

EventName = Literal["INSERT", "MODIFY", "REMOVE"]
_EVENTS: dict[str, EventName] = {"INSERT": "INSERT", "MODIFY": "MODIFY", "REMOVE": "REMOVE"}

#: The sequence of an invalid record that has no usable SequenceNumber (none, or not a
#: decimal string). It cannot be ordered or checkpointed: it is dead-lettered under "0" (its
#: raw record is kept) and the checkpoint stays at the last record that has a sequence.
NO_SEQUENCE = "0"


def _epoch(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, _dt.datetime):
        return value.timestamp()  # boto3's parsed form
    if isinstance(value, Decimal):
        return float(value)  # a Lambda event read through a Decimal-preserving JSON parser
    if value is None:
        return 0.0
    raise DecodeError(f"ApproximateCreationDateTime {value!r} is neither epoch seconds nor a date")


class ChangeRecord:
    """One stream record, decoded. ``keys`` and ``new_image`` are plain Python values.

    ``sequence`` is the decimal SequenceNumber text (21 to 40 digits: compare as integers or
    zero-padded, never as text of unequal length); ``created_at`` is
    ApproximateCreationDateTime in epoch seconds (0.0 when absent); ``raw`` is the record as
    it came in, kept for dead-lettering and replay.

    ``invalid`` is None for a decoded record. For a malformed record of a page (see
    :func:`decode_records`) it is the error message, and the record is only a carrier for
    dead-lettering: ``raw`` is the record as it came (wrapped as ``{"malformed": value}`` when
    it is not even a map), ``sequence`` its SequenceNumber when that is a decimal string, else
    :data:`NO_SEQUENCE`; ``keys`` are its Keys when they decode, else empty; ``new_image`` is
    None and ``event`` is meaningless.
    """

    __slots__ = (
        "_old_image",
        "_old_raw",
        "_raw",
        "created_at",
        "event",
        "invalid",
        "keys",
        "new_image",
        "sequence",
        "size_bytes",
    )

    def __init__(
        self,
        event: EventName,
        sequence: str,
        keys: dict[str, Any],
        new_image: dict[str, Any] | None,
        old_raw: Mapping[str, Any] | msgspec.Raw | None,
        created_at: float,
        size_bytes: int,
        raw: Mapping[str, Any] | msgspec.Raw | None,
        invalid: str | None = None,
    ) -> None:
        self.event: EventName = event
        self.sequence = sequence
        self.keys = keys
        self.new_image = new_image
        self._old_raw = old_raw
        self._old_image: dict[str, Any] | None = None
        self.created_at = created_at
        self.size_bytes = size_bytes
        self._raw = raw
        self.invalid = invalid

    @property
    def raw(self) -> Mapping[str, Any] | None:
        """The record as it came in (parsed from its slice of the page on first use)."""
        raw = self._raw
        if isinstance(raw, msgspec.Raw):
            raw = self._raw = orjson.loads(memoryview(raw))
        return raw

    @property
    def old_image(self) -> dict[str, Any] | None:
        """The item before the change, decoded on first use (None when the stream has none)."""
        if self._old_image is None and self._old_raw is not None:
            old = self._old_raw
            try:
                if isinstance(old, msgspec.Raw):
                    old = self._old_raw = orjson.loads(memoryview(old))
                    if old is None:  # "OldImage": null
                        return None
                self._old_image = decode_image(old)
            except DecodeError as exc:
                raise _in_record(self.sequence, exc.within("OldImage")) from None
        return self._old_image

    def __repr__(self) -> str:
        if self.invalid is not None:
            return f"ChangeRecord(invalid seq={self.sequence}: {self.invalid})"
        return f"ChangeRecord({self.event} {self.keys!r} seq={self.sequence})"


def decode_record(rec: Mapping[str, Any]) -> ChangeRecord:
    """Decode one record of a GetRecords page, a Lambda event, or boto3's parsed form.

    Raises :class:`DecodeError` naming the record (its sequence number, else its eventID) and
    what is wrong, with the attribute path for a bad value
    (``record 1100…09: NewImage.address.zip: unknown DynamoDB attribute type 'X'``).
    """
    try:
        event = rec["eventName"]
        body = rec["dynamodb"]
        sequence = body["SequenceNumber"]
        raw_keys = body["Keys"]
    except (KeyError, TypeError, IndexError):
        raise _malformed(rec) from None
    if type(sequence) is not str or not sequence.isdigit() or not sequence.isascii():
        raise DecodeError(f"{_which(rec)}: SequenceNumber {sequence!r:.60} is not a decimal string")
    name = _EVENTS.get(event) if type(event) is str else None  # (unhashable: no TypeError)
    if name is None:
        raise DecodeError(
            f"record {sequence}: eventName {event!r:.40} is not INSERT, MODIFY or REMOVE"
        )
    created = body.get("ApproximateCreationDateTime")
    size = body.get("SizeBytes", 0)
    part = "Keys"
    try:
        if type(created) is not float:
            created = _epoch(created)
        if type(size) is not int:
            size = _size(size)
        keys = _image(raw_keys) if type(raw_keys) is dict else decode_image(raw_keys)
        part = "NewImage"
        new_raw = body.get("NewImage")
        if new_raw is None:
            new_image = None
        else:
            new_image = _image(new_raw) if type(new_raw) is dict else decode_image(new_raw)
    except DecodeError as exc:
        # Keys and NewImage errors are located in their image; envelope errors are not
        in_image = exc.path or exc.reason.startswith("image ")
        raise _in_record(sequence, exc.within(part) if in_image else exc) from None
    return ChangeRecord(name, sequence, keys, new_image, body.get("OldImage"), created, size, rec)


def _size(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise DecodeError(f"SizeBytes {value!r:.40} is not a number") from None


def _which(rec: Any) -> str:
    """How to name a record in a message: its sequence number, else its eventID."""
    body = rec.get("dynamodb") if isinstance(rec, Mapping) else None
    seq = body.get("SequenceNumber") if isinstance(body, Mapping) else None
    if isinstance(seq, str) and seq:
        return f"record {seq:.50}"
    event_id = rec.get("eventID") if isinstance(rec, Mapping) else None
    return f"record with eventID {event_id!r:.50}" if event_id else "change record"


def _malformed(rec: Any) -> DecodeError:
    """The message for a record whose envelope is incomplete: what is missing, and where."""
    shape = "expected {eventName, dynamodb: {Keys, SequenceNumber, NewImage, ...}}"
    if not isinstance(rec, Mapping):
        return DecodeError(f"change record {rec!r:.80} is not a map; {shape}")
    body = rec.get("dynamodb")
    if not isinstance(body, Mapping):
        what = "lacks dynamodb" if "dynamodb" not in rec else f"has dynamodb = {body!r:.60}"
        return DecodeError(f"{_which(rec)} {what}; {shape}")
    missing = [name for name in ("eventName",) if name not in rec]
    missing += [f"dynamodb.{name}" for name in ("SequenceNumber", "Keys") if name not in body]
    return DecodeError(f"{_which(rec)} lacks {', '.join(missing) or 'a field'}; {shape}")


def _in_record(sequence: str, exc: DecodeError) -> DecodeError:
    located = DecodeError(f"record {sequence}: {exc}")
    located.path = exc.path
    located.reason = exc.reason
    return located


def decode_records(records: Iterable[Mapping[str, Any]]) -> list[ChangeRecord]:
    """Decode a page of records, in order, one :class:`ChangeRecord` per record.

    Never raises for a malformed record: it is returned in its place marked
    :attr:`~ChangeRecord.invalid` (see :func:`invalid_record`), so that one bad record cannot
    stall a shard; the pipeline dead-letters it. (A ``try`` costs nothing when nothing is
    raised, so the well-formed path is as fast as before.)
    """
    return [_decode_one(rec) for rec in records]


def _decode_one(rec: Any) -> ChangeRecord:
    try:
        return decode_record(rec)
    except DecodeError as exc:
        return invalid_record(rec, str(exc))
    except Exception as exc:  # a decoder bug must not stall the shard either
        error = f"{_which(rec)}: cannot be decoded ({type(exc).__name__}: {exc})"
        return invalid_record(rec, error[:2000])


# --- GetRecords bodies: the typed fast path ------------------------------------------------
class _WireBody(msgspec.Struct, gc=False):
    """``dynamodb`` of a wire record: what viewkeeper reads, typed; the rest is skipped."""

    Keys: dict[str, Any]
    SequenceNumber: str
    NewImage: dict[str, Any] | None = None
    OldImage: msgspec.Raw = msgspec.Raw()  # empty: absent; parsed only if read
    ApproximateCreationDateTime: float | None = None
    SizeBytes: int = 0


class _WireRecord(msgspec.Struct, gc=False):
    eventName: EventName
    dynamodb: _WireBody


class _WirePage(msgspec.Struct, gc=False):
    Records: list[msgspec.Raw] | None = None
    NextShardIterator: str | None = None


_PAGE = msgspec.json.Decoder(_WirePage)
_RECORD = msgspec.json.Decoder(_WireRecord)


class PageHead:
    """A GetRecords body parsed as far as its envelope: ``count`` records (not decoded yet),
    ``next_iterator`` and ``size`` (bytes of the body; for an already decoded body, the sum
    of the records' SizeBytes). :meth:`records` decodes them. The shard worker reads the
    head in its read-ahead thread, to send the next call before this page is decoded."""

    __slots__ = ("_data", "_page", "count", "next_iterator", "size")

    def __init__(self, body: bytes | bytearray | memoryview | Mapping[str, Any]) -> None:
        self._page: _WirePage | None = None
        self._data: Mapping[str, Any] | None = None
        if isinstance(body, Mapping):
            self._data = body
        else:
            self.size = len(body)
            try:
                self._page = _PAGE.decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError):
                data = orjson.loads(body)  # the general path raises the usual errors
                if not isinstance(data, Mapping):
                    raise orjson.JSONDecodeError(
                        "a GetRecords body is a JSON object", str(data)[:80], 0
                    ) from None
                self._data = data
        self.next_iterator: str | None
        if self._page is not None:
            self.count = len(self._page.Records or ())
            self.next_iterator = self._page.NextShardIterator
            return
        assert self._data is not None
        records = self._data.get("Records")
        listed = records if isinstance(records, list) else []
        self.count = len(listed)
        nxt = self._data.get("NextShardIterator")
        self.next_iterator = nxt if isinstance(nxt, str) or nxt is None else str(nxt)
        if isinstance(body, Mapping):
            self.size = sum(_size_of(r) for r in listed if isinstance(r, Mapping))

    def records(self) -> list[ChangeRecord]:
        """The page's records, decoded in order (a malformed one comes back ``invalid``)."""
        if self._page is not None:
            return _decode_typed(self._page)[0]
        assert self._data is not None
        return decode_records(self._data.get("Records") or ())


def _size_of(record: Mapping[str, Any]) -> int:
    body = record.get("dynamodb")
    size = body.get("SizeBytes", 0) if isinstance(body, Mapping) else 0
    return size if isinstance(size, int) else 0


def decode_page(
    body: bytes | bytearray | memoryview | Mapping[str, Any],
) -> tuple[list[ChangeRecord], str | None]:
    """A GetRecords response body (bytes, or already JSON-decoded) → (its records in order,
    ``NextShardIterator``).

    For bytes, the same records, errors and messages as ``orjson.loads`` +
    :func:`decode_records`, for about half the work (see the module docstring). A body that
    is not JSON raises ``orjson.JSONDecodeError``, as before; a malformed record comes back
    ``invalid``.
    """
    head = PageHead(body)
    return head.records(), head.next_iterator


def _decode_typed(page: _WirePage) -> tuple[list[ChangeRecord], str | None]:
    out: list[ChangeRecord] = []
    append = out.append
    decode = _RECORD.decode
    for raw in page.Records or ():
        try:
            rec = decode(raw)
            body_ = rec.dynamodb
            sequence = body_.SequenceNumber
            if not sequence.isdigit() or not sequence.isascii():
                raise DecodeError("SequenceNumber")  # the general path says what is wrong
            new = body_.NewImage
            created = body_.ApproximateCreationDateTime
            append(
                ChangeRecord(
                    rec.eventName,
                    sequence,
                    _image(body_.Keys),
                    None if new is None else _image(new),
                    body_.OldImage if len(body_.OldImage) else None,
                    0.0 if created is None else created,
                    body_.SizeBytes,
                    raw,
                )
            )
        except Exception:  # refused by the typed parse or the decoder: say why, precisely
            append(_decode_one(orjson.loads(memoryview(raw))))
    return out, page.NextShardIterator


def invalid_record(rec: Any, error: str) -> ChangeRecord:
    """The stand-in for a malformed record: carries ``error``, the raw record and whatever
    of its sequence, keys and creation time can be read (see :class:`ChangeRecord`)."""
    body = rec.get("dynamodb") if isinstance(rec, Mapping) else None
    if not isinstance(body, Mapping):
        body = {}
    sequence = body.get("SequenceNumber")
    if type(sequence) is not str or not sequence.isdigit() or not sequence.isascii():
        sequence = NO_SEQUENCE
    try:
        keys = decode_image(body["Keys"])
    except Exception:
        keys = {}
    try:
        created = _epoch(body.get("ApproximateCreationDateTime"))
    except Exception:
        created = 0.0
    event = rec.get("eventName") if isinstance(rec, Mapping) else None
    name = _EVENTS.get(event, "MODIFY") if type(event) is str else "MODIFY"  # never applied
    raw = rec if isinstance(rec, Mapping) else {"malformed": rec}
    return ChangeRecord(
        name,
        sequence,
        keys,
        None,
        None,
        created,
        0,
        raw,
        invalid=error,
    )
