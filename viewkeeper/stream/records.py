"""Change records and the DynamoDB JSON decoder.

Where a record enters viewkeeper: the raw ``Records`` of a GetRecords page (or of a Lambda
event) become :class:`ChangeRecord` objects here, and nowhere else.

Number policy: an ``N`` value becomes an ``int`` when it is integral as written (no ``.``,
``e`` or ``E``), otherwise a :class:`decimal.Decimal` — never a float, so no precision is lost.
``NS`` becomes a ``set`` of those. ``B`` becomes ``bytes`` (base64 on the wire and in Lambda
events; raw bytes when the record came through boto3). ``SS``/``BS`` become ``set``s, ``L`` a
``list``, ``M`` a ``dict``, ``NULL`` ``None``, ``BOOL`` ``bool``.

The new image is decoded eagerly (every view needs it); the old image is kept raw and decoded
only when :attr:`ChangeRecord.old_image` is read.
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Literal

__all__ = [
    "ChangeRecord",
    "DecodeError",
    "EventName",
    "decode_image",
    "decode_record",
    "decode_records",
    "decode_value",
    "encode_key",
]

EventName = Literal["INSERT", "MODIFY", "REMOVE"]
_EVENTS = frozenset(("INSERT", "MODIFY", "REMOVE"))


class DecodeError(ValueError):
    """A change record or attribute value that is not valid DynamoDB JSON."""


def _number(text: Any) -> int | Decimal:
    if not isinstance(text, str):
        if isinstance(text, int | Decimal) and not isinstance(text, bool):
            return text
        raise DecodeError(f"N value {text!r} is not a string of digits")
    try:
        if "." in text or "e" in text or "E" in text:
            value = Decimal(text)
            if not value.is_finite():
                raise DecodeError(f"N value {text!r} is not a finite number")
            return value
        return int(text)
    except (ValueError, ArithmeticError) as exc:
        raise DecodeError(f"N value {text!r} is not a number") from exc


def _binary(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (ValueError, TypeError) as exc:
            raise DecodeError(f"B value {value[:40]!r} is not valid base64") from exc
    raise DecodeError(f"B value of type {type(value).__name__} is neither bytes nor base64 text")


def decode_value(av: Mapping[str, Any]) -> Any:
    """Decode one DynamoDB attribute value (``{"S": "x"}``) to a plain Python value."""
    try:
        ((tag, value),) = av.items()
    except (ValueError, AttributeError):
        raise DecodeError(
            f"attribute value {av!r} must be a map with exactly one type key (S, N, M, ...)"
        ) from None
    if tag == "S":
        if not isinstance(value, str):
            raise DecodeError(f"S value {value!r} is not a string")
        return value
    if tag == "N":
        return _number(value)
    if tag == "M":
        return {k: decode_value(v) for k, v in value.items()}
    if tag == "L":
        return [decode_value(v) for v in value]
    if tag == "BOOL":
        if not isinstance(value, bool):
            raise DecodeError(f"BOOL value {value!r} is not true or false")
        return value
    if tag == "NULL":
        return None
    if tag == "SS":
        return set(value)
    if tag == "NS":
        return {_number(v) for v in value}
    if tag == "B":
        return _binary(value)
    if tag == "BS":
        return {_binary(v) for v in value}
    raise DecodeError(
        f"unknown DynamoDB attribute type {tag!r}; expected one of S, N, B, SS, NS, BS, M, L, "
        "NULL, BOOL"
    )


def decode_image(image: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a whole item image (``Keys``, ``NewImage``, ``OldImage`` or a Scan item)."""
    return {name: decode_value(av) for name, av in image.items()}


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, Decimal):
        return float(value)
    if value is None:
        return 0.0
    raise DecodeError(f"ApproximateCreationDateTime {value!r} is neither epoch seconds nor a date")


class ChangeRecord:
    """One stream record, decoded. ``keys`` and ``new_image`` are plain Python values."""

    __slots__ = ("_old_image", "_old_raw", "created_at", "event", "keys", "new_image",
                 "raw", "sequence", "size_bytes")

    def __init__(
        self,
        event: EventName,
        sequence: str,
        keys: dict[str, Any],
        new_image: dict[str, Any] | None,
        old_raw: Mapping[str, Any] | None,
        created_at: float,
        size_bytes: int,
        raw: Mapping[str, Any] | None,
    ) -> None:
        self.event: EventName = event
        self.sequence = sequence
        self.keys = keys
        self.new_image = new_image
        self._old_raw = old_raw
        self._old_image: dict[str, Any] | None = None
        self.created_at = created_at
        self.size_bytes = size_bytes
        self.raw = raw

    @property
    def old_image(self) -> dict[str, Any] | None:
        """The item before the change, decoded on first use (None when the stream has none)."""
        if self._old_image is None and self._old_raw is not None:
            self._old_image = decode_image(self._old_raw)
        return self._old_image

    def __repr__(self) -> str:
        return f"ChangeRecord({self.event} {self.keys!r} seq={self.sequence})"


def decode_record(rec: Mapping[str, Any]) -> ChangeRecord:
    """Decode one record of a GetRecords page, a Lambda event, or boto3's parsed form."""
    try:
        event = rec["eventName"]
        body = rec["dynamodb"]
        sequence = body["SequenceNumber"]
        raw_keys = body["Keys"]
    except (KeyError, TypeError) as exc:
        raise DecodeError(
            f"change record lacks {exc}; expected eventName and dynamodb.{{Keys, SequenceNumber}}"
        ) from None
    if event not in _EVENTS:
        raise DecodeError(f"eventName {event!r} is not INSERT, MODIFY or REMOVE")
    if not isinstance(sequence, str) or not sequence.isdigit():
        raise DecodeError(f"SequenceNumber {sequence!r} is not a decimal string")
    new_raw = body.get("NewImage")
    return ChangeRecord(
        event=event,
        sequence=sequence,
        keys=decode_image(raw_keys),
        new_image=decode_image(new_raw) if new_raw is not None else None,
        old_raw=body.get("OldImage"),
        created_at=_epoch(body.get("ApproximateCreationDateTime")),
        size_bytes=int(body.get("SizeBytes", 0)),
        raw=rec,
    )


def decode_records(records: Iterable[Mapping[str, Any]]) -> list[ChangeRecord]:
    return [decode_record(r) for r in records]


def _key_part(value: Any) -> str:
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("|", "\\|")
    if isinstance(value, bool):
        raise DecodeError("a key attribute cannot be BOOL")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        normalized = value.normalize()
        if normalized == normalized.to_integral_value():
            return str(int(normalized))
        return format(normalized, "f")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise DecodeError(f"key value {value!r} is not a string, number or binary")


def encode_key(item: Mapping[str, Any], key_names: tuple[str, ...]) -> str:
    """The stable text id of an item: its key values in key-schema order (hash, then range).

    Strings are taken as they are with ``\\`` and ``|`` escaped by a backslash, numbers in
    canonical decimal form (``10``, ``1.5``), binary as base64; parts are joined by ``|``.
    A table keyed by ``order_id`` = ``"o-1"`` gives ``o-1``; with a range key ``2`` it gives
    ``o-1|2``. This is the default OpenSearch document id and the owner-record id in Redis.
    """
    try:
        if len(key_names) == 1:
            return _key_part(item[key_names[0]])
        return "|".join(_key_part(item[name]) for name in key_names)
    except KeyError as exc:
        raise DecodeError(f"item lacks key attribute {exc}; key schema is {key_names}") from None
