"""The contract between the shard worker and the sinks.

A worker turns change records into :class:`Change` objects (one per view and item) and hands
a batch to each sink's :meth:`Sink.apply`. The sink applies each change atomically and
idempotently, guarded by the version, and reports one :class:`Result` per change, in order.

- ``APPLIED``: the change is now what the sink holds for that item.
- ``STALE``: the sink already holds an equal or newer version (counted, not an error).
- ``ERROR``: this change alone cannot be applied (an entry the sink rejects as invalid):
  the worker dead-letters the record and goes on.

Change-log views (``View.changelog``) are written through :meth:`Sink.append` instead: one
:class:`Append` per (view, record), appended at most once per record however often it
is sent (``APPLIED``: appended now; ``STALE``: it was appended before, a duplicate).

A transient failure of the whole sink (connection refused, 5xx, 429 after retries) raises
:class:`SinkUnavailable`: the worker retries the batch and the checkpoint does not move.

Every namespace a view writes (an OpenSearch index, a view's Redis bookkeeping) carries a
:class:`Claim`: which source and deployment write it, and a marker that changes whenever
its data had to be started again. A sink told to :meth:`Sink.expect` a marker checks it
with its writes and raises :class:`NamespaceLost` — writing nothing — when the claim is
gone or changed (the server came back empty, the index was deleted, another process
re-armed it after such a loss, or another deployment took it over).
:mod:`viewkeeper.runtime.namespaces` decides what that means.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.versions import Version

__all__ = [
    "Append",
    "Change",
    "Claim",
    "Collision",
    "NamespaceLost",
    "Outcome",
    "Owner",
    "Result",
    "Sink",
    "SinkError",
    "SinkUnavailable",
]


class SinkError(Exception):
    """Base of sink errors."""


class SinkUnavailable(SinkError):
    """The sink cannot take the batch now; retry later, do not checkpoint."""


class NamespaceLost(SinkError):
    """The claim of these views' namespaces is not the one expected: nothing was written."""

    def __init__(self, message: str, views: Sequence[str]) -> None:
        super().__init__(message)
        self.views = list(views)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who may write a namespace: one source table, through one deployment (a coordination
    table, identified by the id made with it: a table deleted and made again is another
    deployment, whose generations started again at 0)."""

    source: str  # the source table's ARN, or REGION/TABLE when no ARN is known
    coordination: str  # the coordination table's name
    deployment: str  # the coordination table's id

    def describe(self) -> str:
        return (
            f"table {self.source} with coordination table {self.coordination} "
            f"(deployment {self.deployment[:8]})"
        )


@dataclass(frozen=True, slots=True)
class Claim:
    """What a namespace says about itself: its owner, the marker of its current data and
    the highest generation a rebuild announced there."""

    owner: Owner
    marker: str
    generation: int = 0


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


@dataclass(frozen=True, slots=True)
class Append:
    """One change of an item for a change-log view: the entry its function gave.

    How a sink keeps it to one entry per record: records of one shard are sent in stream
    order, so a sink may keep, per (view, shard), the highest sequence it appended and
    append only above it, in the same atomic step as the entry. ``shard`` is empty when the
    record is not sent in its shard's order (dead-letter replay): the sink then remembers
    the record itself (by ``sequence``). An OpenSearch document's id is derived from
    ``sequence``, which is enough on its own.

    ``failed``: the record was dead-lettered for this view (its function failed): nothing is
    appended, but a sink that dedups by shard notes it, so that the record is appended once
    whether its dead letter is replayed or a re-read with the view fixed gets it first.
    """

    view: View
    shard: str
    sequence: str  # the record's SequenceNumber, decimal text
    item_key: str
    body: Mapping[str, Any]
    created_at: float  # ApproximateCreationDateTime, epoch seconds (0.0 when absent)
    failed: bool = False


class Sink(Protocol):
    """One named connection of the config (``redis: {cache: ...}``), serving many views."""

    name: str

    def prepare(self, views: Sequence[View]) -> None:
        """Make the sink ready for these views (scripts, templates, indexes, aliases)."""

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        """Apply the changes; one Result per change, in order. Raises SinkUnavailable."""

    def append(self, appends: Sequence[Append]) -> list[Result]:
        """Append the change-log entries, each at most once per record (see Append); one
        Result per append, in order. Raises SinkUnavailable."""

    def begin_rebuild(self, view: View, floor: int) -> None:
        """A rebuild of ``view`` begins, before it raises the generation above ``floor``:
        entries the sink recomputes from all items (Redis counters) start being summed
        again from what items write at generations above ``floor``; :meth:`sweep` ends it."""

    def sweep(self, view: View, generation: int, now: float, keep: Collection[str] = ()) -> int:
        """Retract what items of generations older than ``generation`` still own (rebuild),
        except the items in ``keep`` (those the rebuild's scan could not project or write:
        they keep their last good entries); then settle what :meth:`begin_rebuild` began.
        Raises SinkError when some retraction stays refused."""

    def purge_tombstones(self, view: View, older_than: float) -> int:
        """Forget tombstones written before ``older_than`` (epoch seconds)."""

    def ping(self) -> None:
        """Raise SinkUnavailable with a clear message when the service cannot be reached."""

    def read_claim(self, view: View) -> Claim | None:
        """The claim stored in ``view``'s namespace, or None when it has none (new, or its
        data was lost)."""

    def write_claim(self, view: View, claim: Claim) -> None:
        """Store ``claim`` in ``view``'s namespace (replacing any)."""

    def expect(self, view: View, marker: str | None) -> None:
        """From now on, writes of ``view`` check that its namespace's marker is ``marker``
        (None: no check) and raise NamespaceLost otherwise, having written nothing."""

    def wipe(self, view: View) -> int:
        """Retract every entry of ``view``'s namespace and forget its bookkeeping (a
        take-over); returns the number of entries retracted."""

    def close(self) -> None: ...
