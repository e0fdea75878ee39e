"""The contract between the shard worker and the sinks.

A worker turns change records into :class:`Change` objects (one per view and item) and hands
a batch to each sink's :meth:`Sink.apply`. The sink applies each change atomically and
idempotently, guarded by the version, and reports one :class:`Result` per change, in order.

- ``APPLIED``: the change is now what the sink holds for that item.
- ``STALE``: the sink already holds an equal or newer version (counted, not an error).
- ``ERROR``: this change alone cannot be applied (an entry the sink rejects as invalid):
  the worker dead-letters the record and goes on.

A transient failure of the whole sink (connection refused, 5xx, 429 after retries) raises
:class:`SinkUnavailable`: the worker retries the batch and the checkpoint does not move.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Entry
from viewkeeper.versions import Version

__all__ = ["Change", "Collision", "Outcome", "Result", "Sink", "SinkError", "SinkUnavailable"]


class SinkError(Exception):
    """Base of sink errors."""


class SinkUnavailable(SinkError):
    """The sink cannot take the batch now; retry later, do not checkpoint."""


class Outcome(enum.Enum):
    APPLIED = "applied"
    STALE = "stale"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Collision:
    """Another item already owns an entry this item claims (a view bug)."""

    entry: str
    other_item: str


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one change. Immutable: :data:`APPLIED` and :data:`STALE` are shared."""

    outcome: Outcome
    error: str | None = None
    collisions: Sequence[Collision] = ()


APPLIED = Result(Outcome.APPLIED)
STALE = Result(Outcome.STALE)


@dataclass(slots=True)
class Change:
    """What one item should own in one view, at one version.

    ``entries`` empty means the item owns nothing: it was removed, or its projection gave
    nothing. The sink retracts everything the item owned and keeps a tombstone (the version)
    so a late stale change cannot bring the entries back.
    """

    view: View
    item_key: str
    version: Version
    entries: Sequence[Entry]


class Sink(Protocol):
    """One named connection of the config (``redis: {cache: ...}``), serving many views."""

    name: str

    def prepare(self, views: Sequence[View]) -> None:
        """Make the sink ready for these views (scripts, templates, indexes, aliases)."""

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        """Apply the changes; one Result per change, in order. Raises SinkUnavailable."""

    def sweep(self, view: View, generation: int, now: float) -> int:
        """Retract what items of generations older than ``generation`` still own (rebuild)."""

    def purge_tombstones(self, view: View, older_than: float) -> int:
        """Forget tombstones written before ``older_than`` (epoch seconds)."""

    def ping(self) -> None:
        """Raise SinkUnavailable with a clear message when the service cannot be reached."""

    def close(self) -> None: ...
