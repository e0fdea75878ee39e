"""JSON encoding of entry values and documents (orjson on the hot path).

Decimal becomes an exact JSON number, sets become sorted lists (so equal sets encode equally),
bytes become base64 text. ``str`` and ``bytes`` Redis values are stored verbatim, not as JSON.

The fast path is one ``orjson.dumps`` call. Two things it does not do right on its own are
handled off that path:

- orjson refuses integers beyond 64 bits, but a DynamoDB number has up to 38 digits. When
  ``orjson.dumps`` fails, the value is walked: such integers become ``orjson.Fragment``
  (the exact digits, never a float) and the value is encoded again.
- orjson writes a float NaN or +/-Infinity as ``null``, which would silently replace the
  value. JSON has no such numbers, so they are refused; the value is only walked for them
  when the output contains ``null`` (it always does when one was there).

Whatever cannot be encoded raises :class:`EncodeError` naming the field path (``lines[2].price``),
the value and the fix; the sinks turn it into an error of that one change (a dead letter).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import re
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["EncodeError", "dumps", "redis_value"]


class EncodeError(ValueError):
    """A value a view produced that cannot be written as JSON."""


_OPTS = orjson.OPT_NON_STR_KEYS
_INT_MIN = -(2**63)  # orjson encodes integers in [-2**63, 2**64)
_INT_END = 2**64
_MAX_DEPTH = 254  # orjson's recursion limit: deeper containers are refused
_REPR_MAX = 100
_TYPES = "str, int, Decimal, float, bool, None, bytes, list, dict or set"
_FIX_TYPE = f"return {_TYPES} from the view"
_FIX_NUMBER = "return None, a finite number or a string for it (JSON has no NaN or Infinity)"
_find = bytes.find
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _sorted(obj: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(obj)
    except Exception:  # mixed types (TypeError), Decimal NaN (InvalidOperation), ...
        return sorted(obj, key=repr)


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise TypeError(f"Decimal {obj} is not finite")
        return orjson.Fragment(str(obj).encode())
    if isinstance(obj, set | frozenset):
        return _sorted(obj)
    if isinstance(obj, bytes | bytearray):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, float):  # a float subclass (numpy.float64): orjson takes plain floats
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON; raises :class:`EncodeError` naming the field that cannot
    be encoded."""
    try:
        out = orjson.dumps(value, default=_default, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        return _slow_dumps(value, exc)
    if _find(out, b"null") >= 0 and _has_nonfinite(value):
        try:
            _prepare(value, 0)
        except _Bad as bad:
            raise bad.error() from None
    return out


def redis_value(value: Any) -> bytes:
    """The bytes a Redis ``Value`` or ``HashField`` stores."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return dumps(value)


# --- off the fast path ------------------------------------------------------------------------


def _has_nonfinite(value: Any) -> bool:
    """Whether ``value`` may hold a float NaN or +/-Infinity (which orjson writes as
    ``null``): a quick loop over the usual shapes, True for anything unusual (non-str keys,
    subclasses, dataclasses...), which the full walk then decides."""
    stack = [value]
    while stack:
        x = stack.pop()
        t = type(x)
        items: Any
        if t is dict:
            for k in x:
                if type(k) is not str:
                    return True  # a float key NaN is written as "null" too
            items = x.values()
        elif t is list or t is tuple or t is set or t is frozenset:
            items = x
        else:
            items = (x,)
        for v in items:
            tv = type(v)
            if tv is str or tv is int or v is None or tv is bool or tv is Decimal or tv is bytes:
                continue
            if tv is float:
                if v - v != 0.0:  # nan - nan and inf - inf are nan; 0.0 for a finite v
                    return True
            elif tv is dict or tv is list or tv is tuple or tv is set or tv is frozenset:
                stack.append(v)
            else:
                return True
    return False


class _Bad(Exception):
    """What JSON cannot hold, and where: ``steps`` are collected innermost first while the
    exception leaves the walk (no path is built while nothing is wrong)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem, fix)
        self.problem, self.fix = problem, fix
        self.steps: list[tuple[str, Any]] = []

    def error(self) -> EncodeError:
        path = "".join(_step(kind, key) for kind, key in reversed(self.steps)).lstrip(".")
        path = path if len(path) <= _REPR_MAX else path[:_REPR_MAX] + "…"
        where = f"field {path!r}" if path else "the value"
        return EncodeError(f"cannot encode {where} as JSON: {self.problem}; {self.fix}")


def _step(kind: str, key: Any) -> str:
    if kind == "key":
        if isinstance(key, str) and _NAME_RE.match(key):
            return "." + key
        return f"[{_short(key)}]"
    if kind == "index":
        return f"[{key}]"
    return "{…}"  # a member of a set


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object, repr failed: {type(exc).__name__}>"
    return text if len(text) <= _REPR_MAX else text[:_REPR_MAX] + "…"


def _not_finite(kind: str, value: Any, extra: str = "", fix: str = _FIX_NUMBER) -> _Bad:
    return _Bad(f"{kind}{_short(value)} is not a finite number{extra}", fix)


def _slow_dumps(value: Any, exc: Exception) -> bytes:
    """orjson refused ``value``: find why (raising a precise error) or fix it (integers over
    64 bits) and encode again."""
    try:
        fixed = _prepare(value, 0)
        if fixed is not value:
            return orjson.dumps(fixed, default=_default, option=_OPTS)
    except _Bad as bad:
        raise bad.error() from exc
    except (TypeError, orjson.JSONEncodeError) as again:
        exc = again
    raise EncodeError(
        f"cannot encode {type(value).__name__} value as JSON ({exc}); {_FIX_TYPE}"
    ) from exc


def _prepare(value: Any, depth: int) -> Any:
    """``value`` ready for orjson: itself when nothing needs changing, else a copy with the
    integers beyond 64 bits as exact JSON number fragments. Raises :class:`_Bad` for what
    JSON cannot hold."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        _check_str(value)
        return value
    if isinstance(value, int):
        if _INT_MIN <= value < _INT_END:
            return value
        return orjson.Fragment(int.__str__(value))  # the exact digits (no float, no subclass)
    if isinstance(value, float):
        if value - value != 0.0:
            raise _not_finite("float ", value, " (it would be stored as null)")
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise _not_finite("", value)
        return value
    if isinstance(value, bytes | bytearray):
        return value
    if depth >= _MAX_DEPTH:
        raise _Bad(
            f"it is nested more than {_MAX_DEPTH} levels deep (or contains itself)",
            "flatten the value the view returns",
        )
    if isinstance(value, dict):
        return _prepare_dict(value, depth + 1)
    if isinstance(value, list | tuple):
        return _prepare_seq(value, depth + 1, "index")
    if isinstance(value, set | frozenset):
        items = _sorted(value)
        fixed = _prepare_seq(items, depth + 1, "member")
        return value if fixed is items else fixed
    if isinstance(value, enum.Enum):
        fixed = _prepare(value.value, depth + 1)
        return value if fixed is value.value else fixed
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        fixed = _prepare_dict(fields, depth + 1)
        return value if fixed is fields else fixed
    try:  # what orjson encodes natively (datetime, UUID, ...) encodes alone as well
        orjson.dumps(value, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError):
        raise _Bad(
            f"{type(value).__qualname__} value {_short(value)} is not JSON serializable",
            _FIX_TYPE,
        ) from None
    return value


def _check_str(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Bad(
            f"str {_short(text)} holds a lone surrogate at position {exc.start} (not valid UTF-8)",
            "decode the bytes it came from with errors='replace', or return them as bytes",
        ) from None


def _prepare_dict(value: dict[Any, Any], depth: int) -> Any:
    out: dict[Any, Any] | None = None
    for n, (key, item) in enumerate(value.items()):
        try:
            new_key = _prepare_key(key)
            new_item = _prepare(item, depth)
        except _Bad as bad:
            bad.steps.append(("key", key))
            raise
        if out is None and (new_key is not key or new_item is not item):
            out = dict(list(value.items())[:n])
        if out is not None:
            out[new_key] = new_item
    return value if out is None else out


def _prepare_key(key: Any) -> Any:
    if isinstance(key, str):
        _check_str(key)
        return key
    if isinstance(key, bool) or key is None:
        return key
    if isinstance(key, int):
        return key if _INT_MIN <= key < _INT_END else int.__str__(key)
    if isinstance(key, float) and key - key != 0.0:
        raise _not_finite(
            "the dict key float ", key, ' (it would be written as "null")', "use str keys"
        )
    try:
        orjson.dumps({key: None}, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError):
        raise _Bad(
            f"the dict key {_short(key)} ({type(key).__qualname__}) cannot be a JSON object key",
            "use str keys",
        ) from None
    return key


def _prepare_seq(value: list[Any] | tuple[Any, ...], depth: int, kind: str) -> Any:
    out: list[Any] | None = None
    for i, item in enumerate(value):
        try:
            new = _prepare(item, depth)
        except _Bad as bad:
            bad.steps.append((kind, i))
            raise
        if new is not item:
            if out is None:
                out = list(value)
            out[i] = new
    return value if out is None else out
