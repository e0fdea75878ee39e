"""What one apply carries for each change: its plan (:class:`_Plan`: what it still has to do
and what it has learnt), the ops built for it (:class:`_Op`), the live ops in flight
(:class:`_Live`), and readers of what a scripted put answered.

See README.md § One batch, step by step.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import orjson

from viewkeeper.projection.entries import Document
from viewkeeper.sinks.base import Change, Collision, Outcome
from viewkeeper.sinks.encoding import dumps
from viewkeeper.sinks.opensearch.layout import META, ViewIndexes, item_id


@dataclass(slots=True)
class _Plan:
    """What one change still has to do, and what it has learnt so far."""

    change: Change
    names: ViewIndexes
    doc: Document | None
    tracked: bool
    version: str
    outcome: Outcome | None = None
    error: str | None = None
    collisions: list[Collision] | None = None
    owner_moved: bool = False
    rec_v: str | None = None  # the owner record's version after the owner phase
    gone: list[str] | None = None  # documents to delete at rec_v (item-checked)
    later: list[str] | None = None  # a put's pending deletes: sent once the put is answered
    recorded: bool = False  # W1 wrote (or found) the owner record of this very change
    unpend: list[str] | None = None  # the record's pending ids: forget them once deleted
    acked: list[str] | None = None  # ids whose delete was acknowledged in this apply
    deleted: bool = False  # a delete of this change removed a document
    kept: bool = False  # a delete of this change found a newer or another item's document
    uuid: str | None = None  # the live index's uuid as known when its put was built
    key_id: str = field(default="", init=False)  # the _id of the item's owner record
    doc_key: str | None = field(default=None, init=False)  # the _id of the document put

    def __post_init__(self) -> None:
        self.key_id = item_id(self.change.item_key)
        if self.doc is not None:
            # a default id is the item key (as its owner record's id); one the view (or a
            # hand-built change) chose is used as it is
            self.doc_key = self.doc.doc_id if self.tracked else self.key_id

    def fail(self, message: str) -> None:
        self.outcome = Outcome.ERROR
        self.error = message


_Known = tuple[int, int, tuple[int, int, str], str]
"""What this sink last wrote to a document: seq_no, primary term, version key, item key."""

_Check = tuple[_Plan, str, str | None]
"""A put to post-check: its change, its document id, and the other item whose claim it
took the document from (or waits behind), to tell whether that is a collision."""


@dataclass(slots=True)
class _Op:
    plan: _Plan
    kind: str  # own | put | del | gone | fix | unpend
    doc_id: str
    lines: bytes
    payload: bytes | None = None  # a fast-path put's document, to resend it as the script
    path: str = "script"  # script | cas | create: how a put was finally sent
    cached: bool = False  # the put found this sink's last write of the document cached


@dataclass(slots=True)
class _Live:
    """Live ops built and (some) sent by :meth:`OpenSearchSink._live_send`."""

    todo: list[_Plan]
    ops: list[_Op]
    sent: list[tuple[int, int, Future[list[dict[str, Any]]]]]  # (start, end, answers)
    deadline: float


def _jstr(text: str) -> bytes:
    """A string as JSON (document ids, item keys): orjson directly, the general encoder for
    what orjson refuses (lone surrogates), so the error names the value."""
    try:
        return orjson.dumps(text)
    except orjson.JSONEncodeError:
        return dumps(text)


def _meta(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``_vk`` a scripted put read back (``get._source._vk``); empty if none."""
    meta = ((item.get("get") or {}).get("_source") or {}).get(META)
    return meta if isinstance(meta, Mapping) else {}


def _other_claim(item_key: str, item: Mapping[str, Any]) -> str | None:
    """The other item a put met on its document: the one it took the document from
    (``prev``), or the holder its claim waits behind (it is in ``parked``); None when
    the document is this item's alone."""
    meta = _meta(item)
    prev = meta.get("prev")
    if isinstance(prev, str) and prev != item_key:
        return prev
    holder = meta.get("item")
    parked = meta.get("parked")
    waits = isinstance(parked, list) and any(
        isinstance(c, Mapping) and c.get("item") == item_key for c in parked
    )
    return holder if waits and isinstance(holder, str) and holder != item_key else None
