"""JSON encoding of entry values and documents (orjson on the hot path).

Decimal becomes an exact JSON number, sets become sorted lists (so equal sets encode equally),
bytes become base64 text. ``str`` and ``bytes`` Redis values are stored verbatim, not as JSON.
"""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["EncodeError", "dumps", "redis_value"]


class EncodeError(ValueError):
    """A value a view produced that cannot be written as JSON."""


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise TypeError(f"Decimal {obj} is not finite")
        return orjson.Fragment(str(obj).encode())
    if isinstance(obj, set | frozenset):
        try:
            return sorted(obj)
        except TypeError:
            return sorted(obj, key=repr)
    if isinstance(obj, bytes | bytearray):
        return base64.b64encode(obj).decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_OPTS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=_default, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise EncodeError(
            f"cannot encode {type(value).__name__} value as JSON ({exc}); return str, int, "
            "Decimal, float, bool, None, bytes, list, dict or set from the view"
        ) from exc


def redis_value(value: Any) -> bytes:
    """The bytes a Redis ``Value`` or ``HashField`` stores."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return dumps(value)
