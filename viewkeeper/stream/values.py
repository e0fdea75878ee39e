"""DynamoDB JSON values to plain Python values, and back.

Number policy: an ``N`` value becomes an ``int`` when it is integral as written (no ``.``,
``e`` or ``E``), otherwise a :class:`decimal.Decimal` — never a float, so no precision is lost.
``NS`` becomes a ``set`` of those. ``B`` becomes ``bytes`` (base64 on the wire and in Lambda
events; raw bytes when the record came through boto3). ``SS``/``BS`` become ``set``s, ``L`` a
``list``, ``M`` a ``dict``, ``NULL`` ``None``, ``BOOL`` ``bool``.

Speed matters here: this decoder runs on every attribute of every record, and it replaces
botocore's response parser, which costs ~100 µs per record (``bench/decode.py`` measures
both). Hence :func:`_image`, a hand-inlined loop for the common types (S, N, M, BOOL, NULL)
that calls out only for the rarer ones, and strict-but-cheap validation: a malformed value is
rejected with a message naming the attribute path, at no cost for well-formed input.

The encoder (plain values to DynamoDB JSON) serves the fake stream and scan start keys.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["DecodeError", "decode_image", "decode_value", "encode_image", "encode_value"]

_TYPES = "S, N, B, SS, NS, BS, M, L, NULL, BOOL"


class DecodeError(ValueError):
    """A change record or attribute value that is not valid DynamoDB JSON.

    ``path`` locates the bad value inside an image (``("address", "lines", 2, "qty")``,
    shown as ``address.lines[2].qty``); ``reason`` is the message without it.
    """

    def __init__(self, reason: str, path: tuple[str | int, ...] = ()) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{_path_text(path)}: {reason}" if path else reason)

    def within(self, *outer: str | int) -> DecodeError:
        """The same error, located inside ``outer`` (an attribute name or a list index)."""
        return DecodeError(self.reason, (*outer, *self.path))


def _path_text(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# --- scalar decoders -----------------------------------------------------------------------
def _number(text: Any) -> int | Decimal:
    """``N`` text → int when integral as written, else Decimal (see the module docstring).

    DynamoDB only ever sends its canonical syntax; Python's parsers are slightly laxer
    (``"+1"``, ``"1_0"``, surrounding spaces) and those harmless variants are accepted, but
    anything that is not a finite number, or not ASCII, is refused.
    """
    if type(text) is str and text.isascii():
        if "." in text or "e" in text or "E" in text:
            try:
                value = Decimal(text)
            except InvalidOperation:
                raise DecodeError(f"N value {text[:60]!r} is not a number") from None
            if value.is_finite():
                return value
            raise DecodeError(f"N value {text[:60]!r} is not a finite number")
        try:
            return int(text)
        except ValueError:
            raise DecodeError(f"N value {text[:60]!r} is not a number") from None
    if isinstance(text, int | Decimal) and not isinstance(text, bool):
        if isinstance(text, Decimal) and not text.is_finite():
            raise DecodeError(f"N value {text!r} is not a finite number")
        return text  # already a number (a hand-built record)
    raise DecodeError(f"N value {text!r:.60} is not a string of digits")


def _binary(value: Any) -> bytes:
    if type(value) is str:
        try:
            return binascii.a2b_base64(value, strict_mode=True)
        except (ValueError, binascii.Error) as exc:
            raise DecodeError(f"B value {value[:40]!r} is not valid base64") from exc
    if isinstance(value, bytes | bytearray):
        return bytes(value)  # boto3's parsed form has already decoded the base64
    raise DecodeError(f"B value of type {type(value).__name__} is neither bytes nor base64 text")


def _list_of(tag: str, value: Any) -> list[Any] | tuple[Any, ...]:
    if type(value) is list or type(value) is tuple:
        return value
    raise DecodeError(f"{tag} value {value!r:.60} is not a list")


def _string_set(value: Any) -> set[str]:
    items = _list_of("SS", value)
    for v in items:
        if type(v) is not str:
            raise DecodeError(f"SS member {v!r:.60} is not a string")
    return set(items)


def _number_set(value: Any) -> set[int | Decimal]:
    return {_number(v) for v in _list_of("NS", value)}


def _binary_set(value: Any) -> set[bytes]:
    return {_binary(v) for v in _list_of("BS", value)}


def _string(value: Any) -> str:
    if type(value) is str:
        return value
    raise DecodeError(f"S value {value!r:.60} is not a string")


def _bool(value: Any) -> bool:
    if value is True or value is False:
        return value
    raise DecodeError(f"BOOL value {value!r:.60} is not true or false")


def _null(value: Any) -> None:
    return None


def _map(value: Any) -> dict[str, Any]:
    if type(value) is dict:
        return _image(value)
    if isinstance(value, Mapping):
        return _image(dict(value))
    raise DecodeError(f"M value {value!r:.60} is not a map")


def _list(value: Any) -> list[Any]:
    items = _list_of("L", value)
    try:
        return [_value(v) for v in items]
    except DecodeError:
        for i, v in enumerate(items):  # find the culprit's index for the message
            try:
                _value(v)
            except DecodeError as exc:
                raise exc.within(i) from None
        raise  # pragma: no cover - the loop above re-raises


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "S": _string,
    "N": _number,
    "M": _map,
    "L": _list,
    "BOOL": _bool,
    "NULL": _null,
    "SS": _string_set,
    "NS": _number_set,
    "B": _binary,
    "BS": _binary_set,
}


def _bad_value(av: Any) -> DecodeError:
    if isinstance(av, Mapping) and len(av) == 1:
        (tag,) = av
        return DecodeError(f"unknown DynamoDB attribute type {tag!r}; expected one of {_TYPES}")
    return DecodeError(
        f"attribute value {av!r:.80} must be a map with exactly one type key ({_TYPES})"
    )


def _value(av: Any) -> Any:
    """One attribute value (a list element); S, N and M inline, like :func:`_image`."""
    try:
        (tag,) = av
        value = av[tag]
    except (ValueError, TypeError, LookupError):  # LookupError: [x] gives an IndexError
        raise _bad_value(av) from None
    if tag == "S" and type(value) is str:
        return value
    if tag == "N" and type(value) is str and value.isdigit() and value.isascii():
        return int(value)
    if tag == "M" and type(value) is dict:
        return _image(value)
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise _bad_value(av)
    return decoder(value)


def _image(image: dict[str, Any]) -> dict[str, Any]:
    """The hot loop: one image (or M value) → plain dict. Inlines the common tags; the rest go
    through :data:`_DECODERS`. Errors are re-raised with the attribute's name prepended."""
    out: dict[str, Any] = {}
    name = ""
    try:
        for name, av in image.items():
            (tag,) = av
            value = av[tag]
            if tag == "S":
                if type(value) is not str:
                    raise DecodeError(f"S value {value!r:.60} is not a string")
                out[name] = value
            elif tag == "N":
                if type(value) is str and value.isascii():
                    if value.isdigit():
                        out[name] = int(value)
                    elif "." in value:  # cannot be NaN/Infinity; a bad one raises below
                        out[name] = Decimal(value)
                    else:
                        out[name] = _number(value)
                else:
                    out[name] = _number(value)
            elif tag == "M":
                out[name] = _image(value) if type(value) is dict else _map(value)
            elif tag == "BOOL":
                if value is not True and value is not False:
                    raise DecodeError(f"BOOL value {value!r:.60} is not true or false")
                out[name] = value
            elif tag == "NULL":
                out[name] = None
            else:
                decoder = _DECODERS.get(tag)
                if decoder is None:
                    raise _bad_value(av)
                out[name] = decoder(value)
    except DecodeError as exc:
        raise exc.within(name) from None
    except (ValueError, TypeError, LookupError, AttributeError, ArithmeticError):
        # the fast path only detects that something is wrong; say what, precisely
        if not isinstance(image, Mapping):
            raise DecodeError(f"image {image!r:.80} is not a map of attribute values") from None
        av = image.get(name)
        try:
            _value(av)
        except DecodeError as exc:
            raise exc.within(name) from None
        raise _bad_value(av).within(name) from None  # pragma: no cover - _value raised
    return out


# --- the public decoder --------------------------------------------------------------------
def decode_value(av: Mapping[str, Any]) -> Any:
    """Decode one DynamoDB attribute value (``{"S": "x"}``) to a plain Python value."""
    return _value(av)


def decode_image(image: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a whole item image (``Keys``, ``NewImage``, ``OldImage`` or a Scan item)."""
    if type(image) is dict:
        return _image(image)
    if isinstance(image, Mapping):
        return _image(dict(image))
    raise DecodeError(f"image {image!r:.80} is not a map of attribute values")


# --- encoding (the fake stream, scan start keys) -------------------------------------------
def encode_value(value: Any) -> dict[str, Any]:
    """A plain Python value → DynamoDB JSON in wire form (B as base64 text).

    The inverse of :func:`decode_value` for the types it produces: str, int, Decimal, bytes,
    bool, None, list/tuple, dict, and non-empty sets of one kind (str, numbers or bytes).
    A float is refused, as boto3 does: its decimal expansion is ambiguous.
    """
    if type(value) is str:
        return {"S": value}
    if value is True or value is False:
        return {"BOOL": value}
    if value is None:
        return {"NULL": True}
    if isinstance(value, int | Decimal):
        return {"N": _number_text(value)}
    if isinstance(value, bytes | bytearray):
        return {"B": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return {"M": {str(k): encode_value(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"L": [encode_value(v) for v in value]}
    if isinstance(value, set | frozenset):
        if not value:
            raise DecodeError("an empty set cannot be stored in DynamoDB")
        if all(type(v) is str for v in value):
            return {"SS": sorted(value)}
        if all(isinstance(v, int | Decimal) and not isinstance(v, bool) for v in value):
            return {"NS": sorted(_number_text(v) for v in value)}
        if all(isinstance(v, bytes | bytearray) for v in value):
            return {"BS": sorted(base64.b64encode(v).decode("ascii") for v in value)}
        raise DecodeError(f"set {value!r:.80} mixes types; DynamoDB sets are SS, NS or BS")
    if isinstance(value, float):
        raise DecodeError(f"float {value!r} is not supported; use int or Decimal")
    raise DecodeError(f"cannot encode {type(value).__name__} {value!r:.60} as DynamoDB JSON")


def encode_image(item: Mapping[str, Any]) -> dict[str, Any]:
    """A plain item → an image in DynamoDB JSON wire form."""
    return {name: encode_value(v) for name, v in item.items()}


def _number_text(value: int | Decimal) -> str:
    if isinstance(value, Decimal) and not value.is_finite():
        raise DecodeError(f"N value {value} is not a finite number")
    return str(value)
