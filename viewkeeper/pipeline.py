"""The apply step: change records → projections → one batch per sink → outcomes.

Shared by the shard worker, the Lambda handler and dead-letter replay. Every (record, view)
pair ends in exactly one outcome, counted: ``applied``, ``stale`` (the sink held an equal or
newer version, or a newer record of the same item in the same batch superseded it) or
``dead_lettered`` (stored durably with its error). Nothing is dropped silently.

A malformed record (one that :func:`~viewkeeper.stream.records.decode_records` marked
``invalid``) is dead-lettered once for every view on its table, with its raw record, its
decode error and its sequence (``"0"`` when it has none), and counted ``dead_lettered`` for
each view, so ``applied + stale + dead_lettered == records x views`` holds for every page.

A sink that is unavailable raises :class:`~viewkeeper.sinks.base.SinkUnavailable` out of
:meth:`Pipeline.process`; the caller retries the whole batch and does not checkpoint
(sinks are idempotent, so re-applying what already landed is harmless).

The generation belongs to the record, not to the applier: a version is ``(generation,
sequence)`` where the generation is the view's generation *when the record was read*
(``generations=`` of :meth:`Pipeline.process`: the shard worker passes the map it held
when GetRecords answered, dead-letter replay the one stored with the dead letter, the
Lambda handler the one it read at the start of the invocation). A record read before a
rebuild's handshake therefore loses to the rebuild's scan write ``(G, 0)`` wherever and
whenever it is applied — right, because the scan read the item after the record was
written — and one read after beats it. Only callers that apply records the moment they
read them (tests, benchmarks) may leave ``generations`` out: the pipeline then stamps the
current generation (``generation_of``).
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from viewkeeper.coordination.model import CoordinationStore, DeadLetter
from viewkeeper.ops import metrics
from viewkeeper.projection.api import View
from viewkeeper.projection.project import ProjectionError, project
from viewkeeper.projection.registry import ViewRegistry
from viewkeeper.sinks.base import Change, Outcome, Sink
from viewkeeper.stream.records import ChangeRecord, DecodeError, encode_key
from viewkeeper.versions import Version

__all__ = ["BatchReport", "HaltShard", "Pipeline"]

log = logging.getLogger("viewkeeper.pipeline")


class HaltShard(Exception):
    """on_error=halt: a record could not be applied; stop the shard without checkpointing."""


@dataclass
class BatchReport:
    applied: int = 0
    stale: int = 0
    dead_lettered: int = 0
    collisions: int = 0
    failed_sequences: set[str] = field(default_factory=set)

    def add(self, other: BatchReport) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.dead_lettered += other.dead_lettered
        self.collisions += other.collisions
        self.failed_sequences |= other.failed_sequences


@dataclass
class _Pending:
    change: Change
    record: ChangeRecord | None


SinkKey = tuple[str, str]  # (kind, connection name)


class Pipeline:
    def __init__(
        self,
        registry: ViewRegistry,
        sinks: Mapping[SinkKey, Sink],
        store: CoordinationStore,
        generation_of: Callable[[str], int],
        *,
        on_error: str = "deadletter",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.sinks = sinks
        self.store = store
        self.generation_of = generation_of
        self.on_error = on_error
        self.clock = clock

    def sink_for(self, view: View) -> Sink:
        return self.sinks[(view.kind, view.connection)]

    # ------------------------------------------------------------------------------------
    def process(
        self,
        table: str,
        key_names: tuple[str, ...],
        records: Sequence[ChangeRecord],
        only: Sequence[str] | None = None,
        *,
        generations: Mapping[str, int] | None = None,
    ) -> BatchReport:
        """Project and apply one page of records of ``table`` to every view on it (or to the
        views named in ``only``: dead-letter replay), versioned with the views'
        ``generations`` when the records were read (see the module doc)."""
        report = BatchReport()
        per_sink: dict[SinkKey, list[_Pending]] = defaultdict(list)
        invalid = [r for r in records if r.invalid is not None]
        invalid_keys: list[str] = []
        if invalid:  # malformed records (decode_records): dead-lettered for every view
            records = [r for r in records if r.invalid is None]
            invalid_keys = [self._key_or_unknown(r, key_names) for r in invalid]
        for view in self.registry.by_table(table):
            if only is not None and view.name not in only:
                continue
            generation = (
                generations.get(view.name, 0)
                if generations is not None
                else self.generation_of(view.name)
            )
            for rec, item_key in zip(invalid, invalid_keys, strict=True):
                self._dead(
                    report, view, table, item_key, rec, DecodeError(str(rec.invalid)), generation
                )
            latest: dict[str, list[ChangeRecord]] = {}
            for rec in records:
                try:
                    item_key = encode_key(rec.keys, key_names)
                except DecodeError as exc:
                    self._dead(report, view, table, "?", rec, exc, generation)
                    continue
                latest.setdefault(item_key, []).append(rec)
            for item_key, recs in latest.items():
                pending = self._newest_projectable(
                    report, view, table, item_key, recs, key_names, generation
                )
                if pending is not None:
                    per_sink[(view.kind, view.connection)].append(pending)
        for key, pendings in per_sink.items():
            self._apply(report, self.sinks[key], pendings, table)
        return report

    @staticmethod
    def _key_or_unknown(rec: ChangeRecord, key_names: tuple[str, ...]) -> str:
        """The item key of a malformed record for its dead letter, when its Keys decoded."""
        try:
            return encode_key(rec.keys, key_names) if rec.keys else "?"
        except DecodeError:
            return "?"

    def _newest_projectable(
        self,
        report: BatchReport,
        view: View,
        table: str,
        item_key: str,
        recs: list[ChangeRecord],
        key_names: tuple[str, ...],
        generation: int,
    ) -> _Pending | None:
        """Walk an item's records newest first; the first that projects is applied, the
        failing ones after it are dead-lettered, the older ones are superseded (stale)."""
        for i in range(len(recs) - 1, -1, -1):
            rec = recs[i]
            try:
                if rec.event == "REMOVE":
                    entries = []
                elif rec.new_image is None:
                    raise ProjectionError(
                        view,
                        item_key,
                        "the stream record has no NewImage; set the table's "
                        "stream view type to NEW_IMAGE or NEW_AND_OLD_IMAGES",
                    )
                else:
                    entries = project(view, rec.new_image, item_key, key_names)
            except ProjectionError as exc:
                self._dead(report, view, table, item_key, rec, exc, generation)
                continue
            superseded = i
            report.stale += superseded
            if superseded:
                metrics.RECORDS.labels(view.name, "stale").inc(superseded)
            version = Version(generation, rec.sequence)
            return _Pending(Change(view, item_key, version, entries), rec)
        return None

    def _apply(self, report: BatchReport, sink: Sink, pendings: list[_Pending], table: str) -> None:
        results = sink.apply([p.change for p in pendings])
        counted: Counter[tuple[str, str]] = Counter()  # the metric moves once per view
        for pending, result in zip(pendings, results, strict=True):
            view = pending.change.view
            if result.outcome is Outcome.APPLIED:
                report.applied += 1
                counted[view.name, "applied"] += 1
            elif result.outcome is Outcome.STALE:
                report.stale += 1
                counted[view.name, "stale"] += 1
            else:
                metrics.SINK_ERRORS.labels(sink.name, "rejected").inc()
                self._dead(
                    report,
                    view,
                    table,
                    pending.change.item_key,
                    pending.record,
                    RuntimeError(result.error or "rejected by the sink"),
                    pending.change.version.generation,
                )
            for col in result.collisions:
                report.collisions += 1
                metrics.COLLISIONS.labels(view.name).inc()
                log.warning(
                    "view %s: items %r and %r both claim entry %s; this is a bug in the view "
                    "function (%s): make the entry key depend on the item key",
                    view.name,
                    pending.change.item_key,
                    col.other_item,
                    col.entry,
                    view.where,
                )
        for (name, outcome), n in counted.items():
            metrics.RECORDS.labels(name, outcome).inc(n)

    def project_item(
        self,
        report: BatchReport,
        view: View,
        table: str,
        item: dict[str, object],
        key_names: tuple[str, ...],
        version: Version,
    ) -> Change | None:
        """Project one scanned item (the rebuild); a failure is dead-lettered, not raised."""
        try:
            item_key = encode_key(item, key_names)
            entries = project(view, dict(item), item_key, key_names)
        except (ProjectionError, DecodeError) as exc:
            self._dead(
                report,
                view,
                table,
                "?" if isinstance(exc, DecodeError) else exc.item_key,
                None,
                exc,
                version.generation,
                scanned=item,
            )
            return None
        return Change(view, item_key, version, entries)

    def apply_changes(self, changes: Sequence[Change], table: str) -> BatchReport:
        """Apply ready-made changes (the rebuild scan), grouped by sink."""
        report = BatchReport()
        per_sink: dict[SinkKey, list[_Pending]] = defaultdict(list)
        for ch in changes:
            per_sink[(ch.view.kind, ch.view.connection)].append(_Pending(ch, None))
        for key, pendings in per_sink.items():
            self._apply(report, self.sinks[key], pendings, table)
        return report

    def _dead(
        self,
        report: BatchReport,
        view: View,
        table: str,
        item_key: str,
        rec: ChangeRecord | None,
        exc: BaseException,
        generation: int,
        scanned: Mapping[str, object] | None = None,
    ) -> None:
        if self.on_error == "halt":
            raise HaltShard(f"view {view.name}: {exc}") from exc
        seq = rec.sequence if rec is not None else "0"
        dl = DeadLetter(
            id=f"{int(self.clock() * 1000):015d}-{uuid.uuid4().hex[:12]}",
            view=view.name,
            table=table,
            item_key=item_key,
            sequence=seq,
            error=str(exc),
            traceback="".join(traceback.format_exception(exc))[-8000:],
            created_at=self.clock(),
            record=dict(rec.raw)
            if rec is not None and rec.raw
            else {"scanned_item": dict(scanned)}
            if scanned is not None
            else None,
            generation=generation,
        )
        self.store.put_deadletter(dl)
        report.dead_lettered += 1
        if rec is not None:
            report.failed_sequences.add(rec.sequence)
        metrics.RECORDS.labels(view.name, "dead_lettered").inc()
        log.error("dead-lettered record %s of %s for view %s: %s", seq, item_key, view.name, exc)
