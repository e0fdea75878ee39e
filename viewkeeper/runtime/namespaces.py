"""One sink namespace, one source: claims, data a sink lost, and take-over.

Versions compare records of one item's history. Two sources writing one namespace (an
OpenSearch index, a view's Redis bookkeeping) compare versions of unrelated streams, and the
newer-looking one wins; a sink that lost its data (a Redis restarted without persistence, a
replaced node, a deleted index) silently misses every item that does not change again; a
coordination table deleted and made again restarts generations at 0, so every write after
it is stale against what the sink holds. Each is caught here, through the :class:`Claim`
every namespace carries (:mod:`viewkeeper.sinks.base`) and the view records of the
coordination table (:class:`~viewkeeper.coordination.model.ViewState`).

At start (:meth:`Namespaces.claim`, for ``run``, ``check``, ``rebuild``, dead-letter replay
and the Lambda handler), per view:

- no claim, and the coordination table never marked one: a new namespace. Claim it, with a
  marker every process of the deployment derives alike (processes starting together agree).
- no claim, but the coordination table remembers a marker: the sink lost the view's data.
  Report it (below), then claim it again with a new marker.
- a claim of another owner — another source table, coordination table, or the same
  coordination table's name made again (its id differs): refused, in one line naming both
  owners and the fix (another index or view name, or ``viewkeeper rebuild --take-over``).
- our claim at a generation the coordination table has not reached: refused (the table was
  restored from an old backup, or its generation records were lost).
- our claim with another marker than the one recorded: another process re-armed it after a
  loss it may not have recorded: recorded now, and adopted.

While running, sinks check the marker with their writes (the Redis script, atomically, per
call; OpenSearch through :meth:`Namespaces.verify` every few seconds) and raise
:class:`NamespaceLost`; :meth:`Namespaces.lost` then re-arms the namespace the same way, or
stops the process when another deployment took it over (:class:`NamespaceOwned`).

Reporting a loss is loud: an ERROR naming the view, the sink and the fix; the view marked
``needs_rebuild`` in the coordination table (``status`` shows it); the metric
``viewkeeper_sink_data_lost_total``; and, with ``worker.on_sink_loss: rebuild``, a rebuild
of the view started by the daemon. The stream keeps being applied meanwhile (items that
change are right at once); the rebuild restores the rest and clears the mark — only if no
other loss was recorded while it ran (the recorded marker and the count of marks are still
what it started with: a stream gap marks a view without a new marker).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from viewkeeper.coordination.model import CoordinationStore, ViewState
from viewkeeper.projection.api import View
from viewkeeper.projection.registry import ViewRegistry
from viewkeeper.runtime import metrics
from viewkeeper.sinks.base import Claim, NamespaceLost, Owner, Sink, SinkError

__all__ = ["NamespaceOwned", "Namespaces", "TakeOver"]

log = logging.getLogger("viewkeeper.runtime.namespaces")

SinkKey = tuple[str, str]


class NamespaceOwned(SinkError):
    """A namespace this deployment would write belongs to another owner (or is ahead of
    this coordination table): a configuration problem, reported in one line with the fix."""


@dataclass(frozen=True)
class TakeOver:
    """A namespace ``rebuild --take-over`` claimed from another owner."""

    view: str
    previous: Owner
    marker: str


def first_marker(owner: Owner, view: str) -> str:
    """The marker of a view's first claim by a deployment: derived, not drawn, so that two
    processes claiming a new namespace at once write the same claim. Every later marker (a
    re-arm after a loss, a take-over) is random: it must differ from every one before."""
    seed = f"{owner.deployment}\0{owner.coordination}\0{owner.source}\0{view}\0first".encode()
    return hashlib.sha256(seed).hexdigest()[:32]


def _where(sink: Sink, view: View) -> str:
    target = f"index {view.index!r}" if view.kind == "opensearch" else "bookkeeping"
    return f"{view.kind} connection {sink.name!r} ({getattr(sink, 'where', '?')}) {target}"


class Namespaces:
    """The claims of every view of one deployment (see the module doc). Thread-safe:
    shard workers report losses from their threads."""

    def __init__(
        self,
        registry: ViewRegistry,
        sinks: Mapping[SinkKey, Sink],
        store: CoordinationStore,
        owners: Mapping[str, Owner],
        *,
        on_loss: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.sinks = sinks
        self.store = store
        self.owners = owners  # source table -> this deployment's owner of its views
        self.on_loss = on_loss
        self.clock = clock
        self.markers: dict[str, str] = {}  # view -> the marker its namespace must carry
        self.fatal: str | None = None  # set when another deployment took a namespace over
        self._lock = threading.RLock()

    def sink_of(self, view: View) -> Sink:
        return self.sinks[(view.kind, view.connection)]

    # --- at start -----------------------------------------------------------------------
    def claim(
        self, views: Iterable[View] | None = None, *, take_over: Collection[str] = ()
    ) -> list[TakeOver]:
        """Claim the namespaces of ``views`` (default: every view), re-arming lost ones;
        raise NamespaceOwned for one of another owner unless its view is in
        ``take_over`` — those are claimed for this deployment (their data is the other
        deployment's: the caller wipes and rebuilds them) and returned."""
        taken: list[TakeOver] = []
        with self._lock:
            states = self.store.view_states()
            gens = self.store.generations()
            for view in views if views is not None else list(self.registry):
                sink = self.sink_of(view)
                mine = self.owners[view.table]
                held = sink.read_claim(view)
                recorded = states.get(view.name)
                gen = gens.get(view.name, 0)
                if held is None:
                    if recorded is None or recorded.marker is None:
                        self._fresh(view, sink, mine, gen)
                    else:
                        self._rearm(view, sink, mine, gen, self._lost_text(view, sink))
                elif held.owner != mine or held.generation > gen:
                    if view.name not in take_over:
                        raise NamespaceOwned(
                            self._owned_text(view, sink, held.owner, mine)
                            if held.owner != mine
                            else self._behind_text(view, sink, held.generation, gen)
                        )
                    # this deployment's generation goes above the other's, so that its
                    # rebuild beats whatever of the other lands late (a paused daemon's
                    # request after the wipe) and its sweep removes it
                    while gen <= held.generation:
                        gen = self.store.raise_generation(view.name)
                    marker = uuid.uuid4().hex
                    sink.write_claim(view, Claim(mine, marker, gen))
                    self.store.mark_needs_rebuild(
                        view.name, f"taken over from {held.owner.describe()}", self.clock(), marker
                    )
                    self._expect(view, sink, marker)
                    taken.append(TakeOver(view.name, held.owner, marker))
                elif self._first_over_recorded(view, held, recorded):
                    self._rearm(view, sink, mine, gen, self._first_again_text(view, sink))
                else:
                    if recorded is None or recorded.marker != held.marker:
                        if recorded is not None and recorded.marker is not None:
                            self._report(view, sink, held.marker, self._rearmed_text(view, sink))
                        else:
                            self.store.set_marker(view.name, held.marker)
                    self._expect(view, sink, held.marker)
        return taken

    def _fresh(self, view: View, sink: Sink, mine: Owner, gen: int) -> None:
        """The sink first, then the coordination table (and :meth:`claim` reads them the
        other way round): "a recorded marker but no claim" then only ever means lost data,
        never another process's claim half made. The marker of a first claim is the same for
        every process of the deployment (:func:`first_marker`): processes that start together
        all find nothing and all claim, and their writes, in any order, agree."""
        recorded = self.store.view_states().get(view.name)
        if recorded is not None and recorded.marker is not None:
            # a marker was recorded since claim() read the table (another process claimed,
            # or re-armed a loss): decide again on what is there now
            self.claim([view])
            return
        marker = first_marker(mine, view.name)
        sink.write_claim(view, Claim(mine, marker, gen))
        kept = self.store.record_first_marker(view.name, marker)
        if kept != marker:
            # recorded between the read above and this write (a loss re-armed, a take-over):
            # that claim is the namespace's; ours overwrote it in the sink, so put it back
            sink.write_claim(view, Claim(mine, kept, gen))
            self._expect(view, sink, kept)
            return
        self._expect(view, sink, marker)
        log.info("view %s: claimed %s for %s", view.name, _where(sink, view), mine.describe())

    def _first_over_recorded(self, view: View, held: Claim, recorded: ViewState | None) -> bool:
        """The sink holds the view's first claim, but the coordination table recorded another
        marker since: a first claim made on a stale read wrote over a later one (a re-arm),
        or the sink went back to a state from before that marker (a snapshot restore).
        Either way what the recorded marker stood for is gone from the sink: a loss, never
        a marker to adopt (a rebuild that started with the first marker would then clear a
        later loss's mark)."""
        return (
            recorded is not None
            and recorded.marker is not None
            and recorded.marker != held.marker
            and held.marker == first_marker(self.owners[view.table], view.name)
        )

    def _expect(self, view: View, sink: Sink, marker: str) -> None:
        self.markers[view.name] = marker
        sink.expect(view, marker)

    def inspect(self, view: View, sink: Sink) -> tuple[bool, str]:
        """What :meth:`claim` would do for ``view`` on ``sink``, without writing: (ok, one
        line). For ``viewkeeper check``."""
        held = sink.read_claim(view)
        mine = self.owners[view.table]
        recorded = self.store.view_states().get(view.name)
        gen = self.store.generations().get(view.name, 0)
        if held is None:
            if recorded is not None and recorded.marker is not None:
                return True, "LOST: " + self._lost_text(view, sink) + " (reported on `run`)"
            return True, "not claimed yet: `run` claims it for this deployment"
        if held.owner != mine:
            return False, self._owned_text(view, sink, held.owner, mine)
        if held.generation > gen:
            return False, self._behind_text(view, sink, held.generation, gen)
        if self._first_over_recorded(view, held, recorded):
            return True, "LOST: " + self._first_again_text(view, sink) + " (reported on `run`)"
        state = " (needs_rebuild)" if recorded is not None and recorded.needs_rebuild else ""
        return True, f"claimed by this deployment{state}"

    # --- while running ------------------------------------------------------------------
    def lost(self, sink: Sink, exc: NamespaceLost) -> None:
        """A sink refused writes of ``exc.views``: their claim is not the expected one.
        Re-arm (and report) a lost namespace, adopt one another process re-armed, or stop
        for one another deployment took over (``fatal``, NamespaceOwned raised)."""
        with self._lock:
            states = self.store.view_states()
            gens = self.store.generations()
            for name in exc.views:
                view = self.registry.get(name)
                mine = self.owners[view.table]
                held = sink.read_claim(view)
                gen = gens.get(view.name, 0)
                if held is None:
                    self._rearm(view, sink, mine, gen, self._lost_text(view, sink))
                elif held.owner != mine:
                    self.fatal = (
                        f"view {view.name}: {_where(sink, view)} was taken over by "
                        f"{held.owner.describe()}; this deployment ({mine.describe()}) no "
                        f"longer writes it: remove the view from this config"
                    )
                    raise NamespaceOwned(self.fatal)
                elif held.marker != self.markers.get(view.name):
                    recorded = states.get(view.name)
                    if self._first_over_recorded(view, held, recorded):
                        self._rearm(view, sink, mine, gen, self._first_again_text(view, sink))
                        continue
                    if recorded is None or recorded.marker != held.marker:
                        if recorded is not None and recorded.needs_rebuild:
                            # another process re-armed a loss that is reported already
                            self.store.set_marker(view.name, held.marker)
                        else:
                            self._report(view, sink, held.marker, self._rearmed_text(view, sink))
                    self._expect(view, sink, held.marker)

    def verify(self) -> None:
        """Compare every claim with what is expected (for sinks that cannot check with each
        write, and for quiet streams); handle what changed as :meth:`lost` does."""
        by_sink: dict[SinkKey, list[str]] = {}
        for view in self.registry:
            expected = self.markers.get(view.name)
            if expected is None:
                continue
            held = self.sink_of(view).read_claim(view)
            if held is None or held.marker != expected or held.owner != self.owners[view.table]:
                by_sink.setdefault((view.kind, view.connection), []).append(view.name)
        for key, names in by_sink.items():
            self.lost(self.sinks[key], NamespaceLost("claim changed", names))

    def announce(self, view: View, generation: int) -> str:
        """A rebuild of ``view`` at ``generation`` begins: record the generation in its claim
        (so a coordination table that falls behind it is noticed); return what the rebuild
        starts with, ``MARKER@LOSSES`` (see :meth:`rebuilt`)."""
        with self._lock:
            sink = self.sink_of(view)
            mine = self.owners[view.table]
            held = sink.read_claim(view)
            recorded = self.store.view_states().get(view.name)
            if (
                held is None
                or held.owner != mine
                or recorded is None
                or (recorded.marker != held.marker)
            ):
                # settled first, as at start: a lost claim re-armed (and counted), a table
                # that disagrees with the sink brought in line, so that the marker and the
                # count the rebuild starts with are the ones its end will compare
                self.claim([view])
                held = sink.read_claim(view)
                assert held is not None
                recorded = self.store.view_states().get(view.name)
            sink.write_claim(view, Claim(mine, held.marker, max(generation, held.generation)))
            losses = recorded.losses if recorded is not None else 0
            return f"{held.marker}@{losses}"

    def rebuilt(self, view: View, started: str) -> bool:
        """A rebuild of ``view`` that started with ``started`` (:meth:`announce`'s
        ``MARKER@LOSSES``, or a bare marker) is done: clear its needs_rebuild mark, unless a
        loss was handled (the marker changed) or marked (a stream gap: the count of marks
        grew) while it ran. True when cleared."""
        marker, _, losses = started.partition("@")
        cleared = self.store.clear_needs_rebuild(view.name, marker, int(losses) if losses else None)
        if cleared:
            metrics.VIEW_NEEDS_REBUILD.labels(view.name).set(0)
        return cleared

    # --- reporting ----------------------------------------------------------------------
    def _rearm(self, view: View, sink: Sink, mine: Owner, gen: int, why: str) -> None:
        """A new marker in the sink, then the report (marked with it): a crash in between
        is found again, as a marker the coordination table does not know."""
        marker = uuid.uuid4().hex
        sink.write_claim(view, Claim(mine, marker, gen))
        self._report(view, sink, marker, why)
        self._expect(view, sink, marker)

    def _report(self, view: View, sink: Sink, marker: str, why: str) -> None:
        self.store.mark_needs_rebuild(view.name, why, self.clock(), marker)
        metrics.SINK_DATA_LOST.labels(view.name).inc()
        if view.changelog:  # the marker and the count are recorded; there is nothing to rebuild
            state = self.store.view_states().get(view.name)
            self.store.clear_needs_rebuild(view.name, marker, state.losses if state else None)
            log.error(
                "CHANGE-LOG ENTRIES LOST: view %s: %s. The entries it appended before are gone "
                "and nothing can append them again (a change-log view's history is not in the "
                "table); it goes on appending from the stream.",
                view.name,
                why,
            )
            return
        metrics.VIEW_NEEDS_REBUILD.labels(view.name).set(1)
        log.error(
            "SINK DATA LOST: view %s: %s. Items that do not change again are missing or "
            "stale there until the view is rebuilt: run `viewkeeper rebuild %s` (or set "
            "worker.on_sink_loss: rebuild). The stream goes on being applied meanwhile.",
            view.name,
            why,
            view.name,
        )
        if self.on_loss is not None:
            self.on_loss([view.name])

    @staticmethod
    def _lost_text(view: View, sink: Sink) -> str:
        return (
            f"{_where(sink, view)} lost the view's data (its claim is gone: the server "
            "restarted without persistence, was replaced or flushed, or the index was deleted)"
        )

    @staticmethod
    def _first_again_text(view: View, sink: Sink) -> str:
        return (
            f"{_where(sink, view)} holds the view's first claim again after a later one was "
            "recorded (restored from an old snapshot, or claimed anew by a process that had "
            "not seen the later claim)"
        )

    @staticmethod
    def _rearmed_text(view: View, sink: Sink) -> str:
        return (
            f"{_where(sink, view)} was re-armed by another process after losing its data "
            "(its marker changed)"
        )

    @staticmethod
    def _owned_text(view: View, sink: Sink, theirs: Owner, mine: Owner) -> str:
        if (theirs.source, theirs.coordination) == (mine.source, mine.coordination):
            why = (
                f"coordination table {mine.coordination} was deleted and made again (its id "
                f"was {theirs.deployment[:8]}, is {mine.deployment[:8]}): generations started "
                "again at 0 and every write would be stale"
            )
        else:
            why = f"it is written by {theirs.describe()}, not by {mine.describe()}"
        name = "index=" if view.kind == "opensearch" else "view name (name=)"
        return (
            f"view {view.name}: refusing to write {_where(sink, view)}: {why}. Fix: give the "
            f"view another {name}, or take the namespace over with `viewkeeper rebuild "
            f"{view.name} --take-over` (it deletes what the other deployment wrote there "
            "and rebuilds the view from this table)"
        )

    @staticmethod
    def _behind_text(view: View, sink: Sink, held: int, known: int) -> str:
        return (
            f"view {view.name}: {_where(sink, view)} holds generation {held} but the "
            f"coordination table knows generation {known}: it was restored from an older "
            "backup or lost its records, and every write would be stale. Fix: `viewkeeper "
            f"rebuild {view.name} --take-over` rebuilds the view from scratch"
        )
