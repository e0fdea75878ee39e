"""What a change-log view is handed, and what its sink notes when a record fails.

Used by :mod:`viewkeeper.runtime.pipeline`'s change-log path (``Pipeline._map_changes``):
a record becomes a :class:`~viewkeeper.projection.changelog.StreamChange` here, and a record
dead-lettered for a change-log view becomes a note (``Append.failed``) for its sink, so that
whichever way comes later — its replay, or a re-read once it can be mapped — appends it once.
"""

from __future__ import annotations

import datetime as dt

from viewkeeper.projection.api import View
from viewkeeper.projection.changelog import StreamChange
from viewkeeper.sinks.base import Append
from viewkeeper.stream.records import NO_SEQUENCE, ChangeRecord, DecodeError

__all__ = ["note_of", "stream_change"]


def stream_change(view: View, rec: ChangeRecord) -> StreamChange:
    """The change ``rec`` is, for ``view``; its OldImage is decoded here, for the first
    time. Raises :class:`DecodeError` naming the view when it cannot be read."""
    try:
        return StreamChange(
            event=rec.event,
            keys=rec.keys,
            old=rec.old_image,
            new=None if rec.event == "REMOVE" else rec.new_image,
            sequence=rec.sequence,
            time=dt.datetime.fromtimestamp(rec.created_at, dt.UTC),
        )
    except (DecodeError, ValueError, OverflowError, OSError) as exc:
        raise DecodeError(
            f"change-log view {view.name}: the record cannot be read as a change "
            f"(its OldImage or ApproximateCreationDateTime): {exc}"
        ) from exc


def note_of(view: View, shard: str, rec: ChangeRecord, item_key: str) -> Append | None:
    """The note of a record dead-lettered for a change-log view (not counted: its dead
    letter is), or None for a record without a sequence number (never appended in order)."""
    if rec.sequence == NO_SEQUENCE:
        return None
    return Append(view, shard, rec.sequence, item_key, {}, rec.created_at, failed=True)
