"""Listing and replaying dead letters.

Replay decodes the stored stream record and runs it through the same pipeline, for its view
only, at the generation the record was stamped with when it was read (stored with the dead
letter), never at today's: a rebuild since then wrote the item at ``(G, 0)`` from a scan
that read it after the record, and must win. A replay is as safe as any stream delivery: if
the item changed since, the newer version already in the sink makes the replay ``stale``. A record
that fails again is dead-lettered again (a new entry) and the old entry is removed; if a sink
is unavailable, nothing is removed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from viewkeeper.coordination.model import CoordinationStore, DeadLetter
from viewkeeper.pipeline import Pipeline
from viewkeeper.stream.records import DecodeError, decode_record

__all__ = ["ReplayReport", "format_deadletters", "replay"]


@dataclass
class ReplayReport:
    replayed: int = 0
    applied: int = 0
    stale: int = 0
    failed_again: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def format_deadletters(dls: list[DeadLetter]) -> str:
    if not dls:
        return "no dead letters"
    lines = [f"{'id':<29} {'when (UTC)':<20} {'view':<18} {'item':<20} {'sequence':<24} error"]
    for d in dls:
        when = dt.datetime.fromtimestamp(d.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        err = d.error.splitlines()[0] if d.error else ""
        lines.append(
            f"{d.id:<29} {when:<20} {d.view:<18} {d.item_key[:20]:<20} {d.sequence:<24} {err[:120]}"
        )
    return "\n".join(lines)


def replay(
    store: CoordinationStore,
    pipeline: Pipeline,
    key_names_of: Callable[[str], tuple[str, ...]],
    ids: set[str] | None = None,
) -> ReplayReport:
    report = ReplayReport()
    for dl in store.list_deadletters():
        if ids is not None and dl.id not in ids:
            continue
        raw = dl.record or {}
        if "dynamodb" not in raw:
            report.skipped += 1  # a rebuild-scan item: re-run `viewkeeper rebuild` for it
            continue
        try:
            rec = decode_record(raw)
        except DecodeError:
            report.skipped += 1
            continue
        if dl.generation is None:
            report.skipped += 1
            report.notes.append(
                f"{dl.id}: written by a viewkeeper that did not store the record's generation, "
                f"so it cannot be replayed safely; run `viewkeeper rebuild {dl.view}` instead"
            )
            continue
        batch = pipeline.process(
            dl.table,
            key_names_of(dl.table),
            [rec],
            only=[dl.view],
            generations={dl.view: dl.generation},
        )
        store.delete_deadletter(dl.id)
        report.replayed += 1
        report.applied += batch.applied
        report.stale += batch.stale
        report.failed_again += batch.dead_lettered
    return report
