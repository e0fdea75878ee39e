"""Running a view function on one item and checking what it gives back.

Where a record is projected. The same code serves the stream and the rebuild scan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from viewkeeper.projection.api import View
from viewkeeper.projection.entries import (
    Document,
    Entry,
    HashField,
    SetMember,
    SortedSetMember,
    Value,
)
from viewkeeper.stream.records import encode_key

__all__ = ["ProjectionError", "project"]

_REDIS_TYPES = (Value, HashField, SetMember, SortedSetMember)


class ProjectionError(Exception):
    """The view function raised, or gave back something that is not an entry."""

    def __init__(self, view: View, item_key: str, message: str) -> None:
        super().__init__(f"view {view.name!r} ({view.where}) on item {item_key!r}: {message}")
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
        raise ProjectionError(view, item_key, f"raised {type(exc).__name__}: {exc}") from exc


def _redis_entries(view: View, item_key: str, result: Any) -> list[Entry]:
    if result is None:
        return []
    items: Iterable[Any] = (result,) if isinstance(result, _REDIS_TYPES) else result
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise ProjectionError(
            view,
            item_key,
            f"returned {type(result).__name__}; a redis_view yields Value, HashField, "
            "SetMember or SortedSetMember entries (or nothing)",
        )
    entries: list[Entry] = []
    for entry in items:
        if not isinstance(entry, _REDIS_TYPES):
            raise ProjectionError(
                view,
                item_key,
                f"yielded {entry!r}; a redis_view yields Value, HashField, SetMember or "
                "SortedSetMember",
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
            f"document field names {bad!r} are not allowed; use non-empty names that do not "
            "start with '_' (reserved for OpenSearch and viewkeeper)",
        )
    doc_id = item_key if view.doc_id is None else view.doc_id(item)
    if not isinstance(doc_id, str) or not doc_id or len(doc_id.encode()) > 512:
        raise ProjectionError(
            view, item_key, f"doc_id {doc_id!r} must be a non-empty str of at most 512 bytes"
        )
    del key_names
    return [Document(doc_id, dict(result))]


def item_key_of(keys: Mapping[str, Any], key_names: tuple[str, ...]) -> str:
    return encode_key(keys, key_names)
