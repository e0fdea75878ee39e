"""Running a view function on one item and checking what it gives back.

Where a record is projected. The same code serves the stream and the rebuild scan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from viewkeeper.projection.api import View
from viewkeeper.projection.changelog import StreamChange, changelog_body
from viewkeeper.projection.entries import (
    Counter,
    Document,
    Entry,
    HashField,
    SetMember,
    SortedSetCounter,
    SortedSetMember,
    Value,
)
from viewkeeper.projection.keys import encode_key

__all__ = ["ProjectionError", "map_change", "project", "shown"]

_REDIS_TYPES = (Value, HashField, SetMember, SortedSetMember, Counter, SortedSetCounter)


_SHOWN = 100  # characters of an item key or id shown in a message
_EXC_SHOWN = 1000  # characters of the message of an exception the view raised
_MAX_ID_BYTES = 512  # OpenSearch's limit on a document _id


def shown(value: object) -> str:
    """``value`` for an error message: its repr, cut after about :data:`_SHOWN` characters
    (an item key may be 2 KB, a value megabytes)."""
    if isinstance(value, str):
        if len(value) <= _SHOWN:
            return repr(value)
        return f"{value[:_SHOWN]!r}… ({len(value)} characters)"
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        return f"<{type(value).__name__} object, repr failed: {type(exc).__name__}>"
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


class ProjectionError(Exception):
    """The view function raised, or gave back something that is not an entry.

    The message shows at most the first 100 characters of the item key; ``item_key`` holds
    all of it.
    """

    def __init__(self, view: View, item_key: str, message: str) -> None:
        super().__init__(f"view {view.name!r} ({view.where}) on item {shown(item_key)}: {message}")
        self.view = view
        self.item_key = item_key


def project(
    view: View, item: dict[str, Any], item_key: str, key_names: tuple[str, ...]
) -> list[Entry]:
    """The entries ``item`` owns in ``view``; an empty list when it owns nothing.

    Raises :class:`ProjectionError` (the record is then dead-lettered) when the function
    raises or returns something that is not an entry of the view's sink.
    """
    try:
        result = view.func(item)
        if view.kind == "opensearch":
            return _document(view, item, item_key, key_names, result)
        return _redis_entries(view, item_key, result)
    except ProjectionError:
        raise
    except Exception as exc:
        raise _raised(view, item_key, exc) from exc


def map_change(view: View, change: StreamChange, item_key: str) -> dict[str, Any] | None:
    """The entry a change-log view makes of one change (a dict), or None for none.

    Raises :class:`ProjectionError` (the record is then dead-lettered) when the function
    raises or returns something else than a dict or None.
    """
    try:
        result = cast(Callable[[StreamChange], Any], view.func)(change)
    except Exception as exc:
        raise _raised(view, item_key, exc) from exc
    try:
        return changelog_body(view, result)
    except (TypeError, ValueError) as exc:
        raise ProjectionError(view, item_key, str(exc)) from exc


def _raised(view: View, item_key: str, exc: Exception) -> ProjectionError:
    text = str(exc)
    if len(text) > _EXC_SHOWN:  # the dead letter keeps the traceback
        text = text[:_EXC_SHOWN] + f"… ({len(text)} characters)"
    return ProjectionError(view, item_key, f"raised {type(exc).__name__}: {text}")


def _redis_entries(view: View, item_key: str, result: Any) -> list[Entry]:
    if result is None:
        return []
    items: Iterable[Any] = (result,) if isinstance(result, _REDIS_TYPES) else result
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise ProjectionError(
            view,
            item_key,
            f"returned {type(result).__name__}; a redis_view yields Value, HashField, "
            "SetMember, SortedSetMember, Counter or SortedSetCounter entries (or nothing)",
        )
    entries: list[Entry] = []
    for entry in items:
        if not isinstance(entry, _REDIS_TYPES):
            raise ProjectionError(
                view,
                item_key,
                f"yielded {shown(entry)}; a redis_view yields Value, HashField, SetMember, "
                "SortedSetMember, Counter or SortedSetCounter",
            )
        if view.ttl is not None and isinstance(entry, Value) and entry.ttl is None:
            entry = Value(entry.key, entry.value, view.ttl)
        entries.append(entry)
    return entries


def _document(
    view: View, item: dict[str, Any], item_key: str, key_names: tuple[str, ...], result: Any
) -> list[Entry]:
    if result is None:
        return []
    if not isinstance(result, Mapping):
        raise ProjectionError(
            view,
            item_key,
            f"returned {type(result).__name__}; an opensearch_view returns one document "
            "(a dict) or None",
        )
    bad = [k for k in result if not isinstance(k, str) or not k or k.startswith("_")]
    if bad:
        raise ProjectionError(
            view,
            item_key,
            f"document field names {shown(bad)} are not allowed; use non-empty names that do not "
            "start with '_' (reserved for OpenSearch and viewkeeper)",
        )
    if view.doc_id is None:
        doc_id = item_key
        size = _id_size(view, item_key, doc_id)
        if size > _MAX_ID_BYTES:
            raise ProjectionError(
                view,
                item_key,
                f"item key of {size} bytes exceeds OpenSearch's {_MAX_ID_BYTES}-byte _id "
                "(the document id is the item key by default); give the view doc_id= (a "
                "function of the item returning a shorter unique id, e.g. a hash of the key)",
            )
    else:
        doc_id = view.doc_id(item)
        if not isinstance(doc_id, str) or not doc_id:
            raise ProjectionError(
                view,
                item_key,
                f"doc_id= returned {shown(doc_id)}; "
                f"it must return a non-empty str of at most {_MAX_ID_BYTES} bytes",
            )
        size = _id_size(view, item_key, doc_id)
        if size > _MAX_ID_BYTES:
            raise ProjectionError(
                view,
                item_key,
                f"doc_id= returned {shown(doc_id)}, {size} bytes: more than OpenSearch's "
                f"{_MAX_ID_BYTES}-byte _id; return a shorter id (e.g. a hash of it)",
            )
    del key_names
    return [Document(doc_id, dict(result))]


def _id_size(view: View, item_key: str, doc_id: str) -> int:
    """The size of a document id in UTF-8 bytes."""
    try:
        return len(doc_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ProjectionError(
            view,
            item_key,
            f"document id {shown(doc_id)} holds a lone surrogate at position {exc.start}, which "
            "is not valid UTF-8; give the view a doc_id= that returns valid text",
        ) from None


def item_key_of(keys: Mapping[str, Any], key_names: tuple[str, ...]) -> str:
    return encode_key(keys, key_names)
