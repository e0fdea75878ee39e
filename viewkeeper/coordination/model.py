"""The records of the coordination table and the store interface both backends implement."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CoordinationStore",
    "CoordinationUnavailable",
    "DeadLetter",
    "Lease",
    "LeaseState",
    "ViewState",
    "WorkerInfo",
    "merge_generations",
]


class LeaseState(enum.StrEnum):
    ACTIVE = "active"  # being read (or waiting for its parents)
    ENDED = "ended"  # SHARD_END reached and every record applied: children may start
    NEEDS_REBUILD = "needs_rebuild"  # trimmed data: records were lost to the stream's retention
    HALTED = "halted"  # on_error=halt stopped it on a bad record; see the dead letters


@dataclass(slots=True)
class Lease:
    """One shard of one table's stream.

    ``counter`` rises on every renewal by the owner; another worker that sees it unchanged for
    the lease duration (measured on its own clock) may take the lease, with a conditional
    write on the counter it saw. ``token`` is new on every take and unchanged by renewals:
    a checkpoint is written only by the take that holds it (a worker thread of an earlier
    take by the same owner is fenced off), and never below the stored one.

    ``checkpoint`` is the sequence number of the last record every sink acknowledged, or a
    position: None / ``TRIM_HORIZON`` (read from the oldest record), ``LATEST`` (the shard
    was first seen at LATEST). ``checkpoint_at`` is when every record created before it is
    known to be read up to the checkpoint (epoch seconds: the lease's creation for a shard
    read from TRIM_HORIZON, every checkpoint write, and renewals with the time the reader
    last saw the end of the shard — an empty GetRecords page); for ``LATEST`` it is also
    where reading starts again after a restart (see the shard worker), and None means the
    shard was never opened.

    ``gens`` are the views' generations the holder stamps the records it reads with (see
    :mod:`viewkeeper.runtime.pipeline`): a holder publishes a generation here (its take or a
    renewal) before it stamps a record with it, a taker starts from what the lease says,
    and the rebuild's handshake waits until every lease of its tables says its new
    generation. So the stamps of the records of a shard never go down when the shard
    changes hands: a record read by a new holder never loses to an older one read by the
    holder before it.
    """

    table: str
    shard_id: str
    stream_arn: str
    parents: tuple[str, ...] = ()
    owner: str | None = None
    counter: int = 0
    checkpoint: str | None = None
    state: LeaseState = LeaseState.ACTIVE
    lag: float | None = None
    caught_up: bool = False
    updated_at: float = 0.0
    error: str | None = None
    token: str | None = None
    checkpoint_at: float | None = None
    gens: dict[str, int] = field(default_factory=dict)


def merge_generations(*maps: Mapping[str, int]) -> dict[str, int]:
    """Per view, the highest of the generations in ``maps``."""
    out: dict[str, int] = {}
    for m in maps:
        for view, gen in m.items():
            if gen > out.get(view, -1):
                out[view] = gen
    return out


@dataclass(slots=True)
class WorkerInfo:
    """A live viewkeeper process: its heartbeat and the view generations it acknowledged."""

    worker_id: str
    heartbeat_at: float
    acked: dict[str, int] = field(default_factory=dict)
    host: str = ""
    pid: int = 0
    leases: int = 0
    started_at: float = 0.0


@dataclass(slots=True)
class DeadLetter:
    """A record that could not be applied to one view, stored durably with its error."""

    id: str
    view: str
    table: str
    item_key: str
    sequence: str
    error: str
    traceback: str
    created_at: float
    record: dict[str, Any] | None  # the raw stream record (wire form), for replay
    # the view's generation the record was stamped with when it was read (replay applies it
    # at that generation, never at today's); None: written by a viewkeeper before 0.2
    generation: int | None = None


@dataclass(slots=True)
class ViewState:
    """What the deployment knows about one view's sink namespace (see
    :mod:`viewkeeper.runtime.namespaces`): the marker it last wrote there, and whether the view
    needs a rebuild because the sink lost its data (``reason``, since ``since``); ``losses``
    counts every mark ever made (a rebuild clears the mark only if none came while it ran)."""

    view: str
    marker: str | None = None
    needs_rebuild: bool = False
    reason: str | None = None
    since: float | None = None
    losses: int = 0


class LeaseLost(Exception):
    """A conditional write showed that another worker, or another take of the same worker,
    holds the lease now (or that the write would move the checkpoint backwards)."""


class CoordinationUnavailable(Exception):
    """The coordination table could not be reached, or answered with a transient error
    (throttling, 5xx), after the client's own retries: the write may be tried again."""


class CoordinationStore(Protocol):
    def ensure(self) -> None:
        """Create the table when missing; check its schema."""

    # leases
    def list_leases(self, table: str) -> list[Lease]: ...
    def create_lease(self, lease: Lease) -> bool: ...
    def take_lease(
        self, lease: Lease, owner: str, gens: Mapping[str, int] | None = None
    ) -> Lease | None:
        """Take ``lease`` as seen (its counter and owner); its ``gens`` become the merge of
        the lease's and ``gens``. None when it changed since."""
        ...

    def renew_lease(
        self,
        lease: Lease,
        lag: float | None,
        caught_up: bool,
        *,
        tip_at: float | None = None,
        gens: Mapping[str, int] | None = None,
    ) -> Lease | None:
        """Renew (raise the counter); publish ``gens`` (merged with the lease's); when
        ``tip_at`` is given, the reader saw the end of the shard then: ``checkpoint_at``
        moves to it. None when the lease was lost."""
        ...

    def checkpoint(
        self,
        lease: Lease,
        sequence: str | None,
        state: LeaseState | None = None,
        error: str | None = None,
    ) -> None:
        """Raise LeaseLost when the take that ``lease`` came from (``owner`` and ``token``)
        no longer holds it, or when ``sequence`` is below the stored checkpoint;
        CoordinationUnavailable when the table cannot be written now."""

    def release_lease(self, lease: Lease) -> None: ...
    def revoke_lease(self, lease: Lease, gens: Mapping[str, int] | None = None) -> bool:
        """Free ``lease`` if its owner and counter are still the ones seen (the rebuild's
        handshake, for a holder that stopped renewing): its holder's next renewal and
        checkpoint fail. ``gens`` are merged into the lease's in the same write. False when
        the lease changed since it was seen."""
        ...

    def publish_generations(self, lease: Lease, gens: Mapping[str, int]) -> bool:
        """Merge ``gens`` into an unowned lease as seen (no owner, the same counter), raising
        its counter: whoever takes it next stamps at least these. False when it changed."""
        ...

    def reset_lease(
        self, table: str, shard_id: str, checkpoint: str | None, state: LeaseState
    ) -> None: ...
    def delete_lease(self, table: str, shard_id: str) -> None: ...

    # workers and generations
    def put_worker(self, info: WorkerInfo) -> None: ...
    def list_workers(self) -> list[WorkerInfo]: ...
    def delete_worker(self, worker_id: str) -> None: ...
    def generations(self) -> dict[str, int]: ...
    def raise_generation(self, view: str) -> int: ...

    # the deployment and its views' namespaces
    def deployment(self) -> str:
        """This coordination table's id, made once with it: a table deleted and made again
        is another deployment (its generations started again at 0)."""
        ...

    def view_states(self) -> dict[str, ViewState]: ...
    def set_marker(self, view: str, marker: str) -> None: ...
    def record_first_marker(self, view: str, marker: str) -> str:
        """Record ``marker`` unless another marker is recorded already (conditionally, in
        one write); return the marker recorded now."""
        ...

    def mark_needs_rebuild(self, view: str, reason: str, at: float, marker: str | None) -> None:
        """Mark ``view`` as needing a rebuild and record its namespace's new ``marker`` (None:
        the marker stays), in one write that also counts the mark (``losses``); a view
        already marked keeps its first reason and time."""

    def clear_needs_rebuild(self, view: str, marker: str, losses: int | None = None) -> bool:
        """Clear the mark if the recorded marker is still ``marker`` and, when given, the
        count of marks still ``losses`` (what a rebuild started with: no loss was handled
        or marked since). True when it was cleared."""
        ...

    # dead letters
    def put_deadletter(self, dl: DeadLetter) -> None:
        """Store ``dl``; a dead letter of the same id (the same record and view) is
        replaced, keeping its ``created_at`` (the first failure) and the highest
        ``generation`` it was stored with (two readers of one shard, during a lease
        handover, stamp the same record; the newer stamp is the one that must win)."""

    def list_deadletters(self, limit: int = 1000) -> list[DeadLetter]: ...
    def get_deadletter(self, dl_id: str) -> DeadLetter | None: ...
    def delete_deadletter(self, dl_id: str) -> None: ...
