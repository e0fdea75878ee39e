"""The apply step: change records → projections → one batch per sink → outcomes.

Shared by the shard worker, the Lambda handler and dead-letter replay. Every (record, view)
pair ends in exactly one outcome, counted: ``applied``, ``stale`` (the sink held an equal or
newer version, or a newer record of the same item in the same batch superseded it) or
``dead_lettered`` (stored durably with its error). Nothing is dropped silently.

Dead letters are written once the page went through: a record that fails is collected while
the page is projected and applied, and stored after every sink acknowledged the page (so a
page retried during a sink outage does not store it again). Its id is derived from the
record (table, view, sequence number), so the same record failing again — a page read
again after a crash, a replay that fails — is the same dead letter, keeping the time of
its first failure.

A malformed record (one that :func:`~viewkeeper.stream.records.decode_records` marked
``invalid``) is dead-lettered once for every view on its table, with its raw record, its
decode error and its sequence (``"0"`` when it has none), and counted ``dead_lettered`` for
each view, so ``applied + stale + dead_lettered == records x views`` holds for every page.

A change-log view (``View.changelog``) maps every record, not only an item's newest, to at
most one entry (:func:`~viewkeeper.projection.project.map_change`), sent in stream order
with the record's ``shard`` to ``Sink.append``, which appends each record once (applied;
``stale``: appended before). A change the function maps to None is counted applied (it
asks for nothing). Dead-letter replay passes no shard: the sink then remembers the record
itself.

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

import hashlib
import logging
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from viewkeeper.coordination.model import CoordinationStore, DeadLetter
from viewkeeper.projection.api import View
from viewkeeper.projection.keys import ItemKeyError, encode_key
from viewkeeper.projection.project import ProjectionError, map_change, project
from viewkeeper.projection.registry import ViewRegistry
from viewkeeper.projection.versions import Version, padded_sequence
from viewkeeper.runtime import metrics
from viewkeeper.runtime.changelog import note_of, stream_change
from viewkeeper.sinks.base import Append, Change, NamespaceLost, Outcome, Result, Sink
from viewkeeper.stream.records import NO_SEQUENCE, ChangeRecord, DecodeError

__all__ = ["BatchReport", "HaltShard", "Pipeline", "deadletter_id"]

log = logging.getLogger("viewkeeper.runtime.pipeline")


class HaltShard(Exception):
    """on_error=halt: a record could not be applied; stop the shard without checkpointing."""


@dataclass
class BatchReport:
    applied: int = 0
    stale: int = 0
    dead_lettered: int = 0
    collisions: int = 0
    failed_sequences: set[str] = field(default_factory=set)
    # (view, item key) of what was dead-lettered (the rebuild's sweep leaves those items be)
    failed_items: set[tuple[str, str]] = field(default_factory=set)
    # collected while the page is processed; stored (and counted) by Pipeline.flush
    letters: list[DeadLetter] = field(default_factory=list)

    def add(self, other: BatchReport) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.dead_lettered += other.dead_lettered
        self.collisions += other.collisions
        self.failed_sequences |= other.failed_sequences
        self.failed_items |= other.failed_items


@dataclass
class _Pending:
    change: Change
    record: ChangeRecord | None
    scanned: Mapping[str, object] | None = None  # the rebuild's item, for its dead letter


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
        on_lost: Callable[[Sink, NamespaceLost], None] | None = None,
    ) -> None:
        self.registry = registry
        self.sinks = sinks
        self.store = store
        self.generation_of = generation_of
        self.on_error = on_error
        self.clock = clock
        # a sink refused a batch because a namespace's claim changed (lost data, a take-over:
        # runtime/namespaces.py); the handler re-arms it (or raises) and the batch is re-sent
        self.on_lost = on_lost

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
        shard: str = "",
    ) -> BatchReport:
        """Project and apply one page of records of ``table`` to every view on it (or to the
        views named in ``only``: dead-letter replay), versioned with the views'
        ``generations`` when the records were read (see the module doc). ``shard``: the
        shard the page was read from, in order ("" when the records are not a shard's, in
        order: the change-log views' sinks then remember each record)."""
        report = BatchReport()
        per_sink: dict[SinkKey, list[_Pending]] = defaultdict(list)
        appends: dict[SinkKey, list[tuple[Append, ChangeRecord]]] = defaultdict(list)
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
                if view.changelog:
                    self._note(appends, view, shard, rec, item_key)
            if view.changelog:
                self._map_changes(report, view, table, records, key_names, shard, appends)
                continue
            latest: dict[str, list[ChangeRecord]] = {}
            for rec in records:
                try:
                    item_key = encode_key(rec.keys, key_names)
                except ItemKeyError as exc:
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
        for key, todo in appends.items():
            self._append(report, self.sinks[key], todo, table)
        self.flush(report)
        return report

    def _map_changes(
        self,
        report: BatchReport,
        view: View,
        table: str,
        records: Sequence[ChangeRecord],
        key_names: tuple[str, ...],
        shard: str,
        appends: dict[SinkKey, list[tuple[Append, ChangeRecord]]],
    ) -> None:
        """Every record, in order, mapped by a change-log view: an Append, nothing (None:
        counted applied) or a dead letter."""
        out = appends[(view.kind, view.connection)]
        nothing = 0
        for rec in records:
            try:
                item_key = encode_key(rec.keys, key_names)
            except ItemKeyError as exc:
                self._dead(report, view, table, "?", rec, exc, 0)
                self._note(appends, view, shard, rec, "?")
                continue
            try:
                change = stream_change(view, rec)
            except DecodeError as unreadable:
                self._dead(report, view, table, item_key, rec, unreadable, 0)
                self._note(appends, view, shard, rec, item_key)
                continue
            try:
                body = map_change(view, change, item_key)
            except ProjectionError as exc:
                self._dead(report, view, table, exc.item_key, rec, exc, 0)
                self._note(appends, view, shard, rec, exc.item_key)
                continue
            if body is None:
                nothing += 1
                continue
            out.append((Append(view, shard, rec.sequence, item_key, body, rec.created_at), rec))
        if nothing:
            report.applied += nothing
            metrics.RECORDS.labels(view.name, "applied").inc(nothing)

    @staticmethod
    def _note(
        appends: dict[SinkKey, list[tuple[Append, ChangeRecord]]],
        view: View,
        shard: str,
        rec: ChangeRecord,
        item_key: str,
    ) -> None:
        """A record dead-lettered for a change-log view: its note, for its sink."""
        note = note_of(view, shard, rec, item_key)
        if note is not None:
            appends[(view.kind, view.connection)].append((note, rec))

    def _append(
        self,
        report: BatchReport,
        sink: Sink,
        todo: list[tuple[Append, ChangeRecord]],
        table: str,
    ) -> None:
        """``sink.append`` (re-sent after a changed claim, as changes are); outcomes counted."""
        if not todo:
            return
        batch = [a for a, _ in todo]
        results = self._send(sink, lambda: sink.append(batch))
        counted: Counter[tuple[str, str]] = Counter()
        for (a, rec), result in zip(todo, results, strict=True):
            if a.failed:  # dead-lettered already; the sink only noted it
                continue
            if result.outcome is Outcome.APPLIED:
                report.applied += 1
                counted[a.view.name, "applied"] += 1
            elif result.outcome is Outcome.STALE:
                report.stale += 1
                counted[a.view.name, "stale"] += 1
            else:
                metrics.SINK_ERRORS.labels(sink.name, "rejected").inc()
                error = RuntimeError(result.error or "rejected by the sink")
                self._dead(report, a.view, table, a.item_key, rec, error, 0)
        for (name, outcome), n in counted.items():
            metrics.RECORDS.labels(name, outcome).inc(n)

    @staticmethod
    def _key_or_unknown(rec: ChangeRecord, key_names: tuple[str, ...]) -> str:
        """The item key of a malformed record for its dead letter, when its Keys decoded."""
        try:
            return encode_key(rec.keys, key_names) if rec.keys else "?"
        except ItemKeyError:
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

    def _send(self, sink: Sink, call: Callable[[], list[Result]]) -> list[Result]:
        """``call()`` (``sink.apply`` or ``sink.append``); a batch refused for a changed claim
        (nothing written) is handed to ``on_lost`` and sent again, a few times (another
        process may re-arm meanwhile)."""
        for attempt in range(4):
            try:
                return call()
            except NamespaceLost as exc:
                if self.on_lost is None or attempt == 3:
                    raise
                self.on_lost(sink, exc)
        raise AssertionError("unreachable")

    def _apply(self, report: BatchReport, sink: Sink, pendings: list[_Pending], table: str) -> None:
        changes = [p.change for p in pendings]
        results = self._send(sink, lambda: sink.apply(changes))
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
                    scanned=pending.scanned,
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
        except (ProjectionError, ItemKeyError) as exc:
            self._dead(
                report,
                view,
                table,
                "?" if isinstance(exc, ItemKeyError) else exc.item_key,
                None,
                exc,
                version.generation,
                scanned=item,
            )
            return None
        return Change(view, item_key, version, entries)

    def apply_changes(
        self,
        changes: Sequence[Change],
        table: str,
        items: Sequence[Mapping[str, object]] | None = None,
    ) -> BatchReport:
        """Apply ready-made changes (the rebuild scan: ``items`` are the scanned items the
        changes came from, for the dead letters of the ones the sink rejects), grouped by
        sink."""
        report = BatchReport()
        per_sink: dict[SinkKey, list[_Pending]] = defaultdict(list)
        for i, ch in enumerate(changes):
            pending = _Pending(ch, None, items[i] if items is not None else None)
            per_sink[(ch.view.kind, ch.view.connection)].append(pending)
        for key, pendings in per_sink.items():
            self._apply(report, self.sinks[key], pendings, table)
        self.flush(report)
        return report

    def flush(self, report: BatchReport) -> None:
        """Store the dead letters ``report`` collected, and count them: called once the
        sinks took the page (or the rebuild's batch)."""
        letters, report.letters = report.letters, []
        for dl in letters:
            self.store.put_deadletter(dl)
            report.dead_lettered += 1
            report.failed_items.add((dl.view, dl.item_key))
            if dl.sequence != NO_SEQUENCE:
                report.failed_sequences.add(dl.sequence)
            metrics.RECORDS.labels(dl.view, "dead_lettered").inc()
            log.error(
                "dead-lettered record %s of %s for view %s: %s",
                dl.sequence,
                dl.item_key,
                dl.view,
                dl.error.splitlines()[0] if dl.error else "",
            )

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
        seq = rec.sequence if rec is not None else NO_SEQUENCE
        raw = dict(rec.raw) if rec is not None and rec.raw else None
        now = self.clock()
        report.letters.append(
            DeadLetter(
                id=deadletter_id(table, view.name, seq, raw, item_key, generation, scanned),
                view=view.name,
                table=table,
                item_key=item_key,
                sequence=seq,
                error=str(exc),
                traceback="".join(traceback.format_exception(exc))[-8000:],
                created_at=now,
                record=raw
                if raw is not None
                else {"scanned_item": dict(scanned)}
                if scanned is not None
                else None,
                generation=generation,
            )
        )


def deadletter_id(
    table: str,
    view: str,
    sequence: str,
    raw: Mapping[str, object] | None,
    item_key: str,
    generation: int,
    scanned: Mapping[str, object] | None = None,
) -> str:
    """The id of the dead letter of a record (or scanned item) for one view: the same
    record is always the same dead letter. ``TABLE/VIEW/SEQUENCE`` with the sequence
    zero-padded (ids list in stream order); a record without a sequence number is named
    by a digest of its raw form, a scanned item by its generation and key."""
    if scanned is not None:
        digest = hashlib.sha1(item_key.encode("utf-8", "surrogatepass")).hexdigest()[:20]
        return f"{table}/{view}/scan-g{generation}-{digest}"
    pad = padded_sequence(sequence) if sequence != NO_SEQUENCE else None
    if pad is not None:
        return f"{table}/{view}/{pad}"
    blob = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS, default=str)
    return f"{table}/{view}/x-{hashlib.sha1(blob).hexdigest()[:20]}"
