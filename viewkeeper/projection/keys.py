"""An item's identity: the stable text id of an item, from its key values.

It names an item everywhere a view keeps something per item: the Redis owner records, the
OpenSearch owner records and default document ids, dead letters, the rebuild's sweep. It is
part of the view model, not of any wire format: the stream's decoder and the rebuild's scan
both give plain values, and this turns them into the id.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

__all__ = ["ItemKeyError", "encode_key"]


class ItemKeyError(ValueError):
    """An item whose key attributes cannot make an id (missing, or of a type DynamoDB keys
    cannot have)."""


def _key_part(value: Any) -> str:
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("|", "\\|")
    if isinstance(value, bool):
        raise ItemKeyError("a key attribute cannot be BOOL")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        normalized = value.normalize()
        if normalized == normalized.to_integral_value():
            return str(int(normalized))
        return format(normalized, "f")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise ItemKeyError(f"key value {value!r} is not a string, number or binary")


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
        raise ItemKeyError(f"item lacks key attribute {exc}; key schema is {key_names}") from None
