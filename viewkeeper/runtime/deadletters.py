"""Listing, replaying and dropping dead letters.

Replay decodes the stored stream record and runs it through the same pipeline, for its view
only, at the generation the record was stamped with when it was read (stored with the dead
letter), never at today's: a rebuild since then wrote the item at ``(G, 0)`` from a scan
that read it after the record, and must win. A replay is as safe as any stream delivery: if
the item changed since, the newer version already in the sink makes the replay ``stale``.
A record that fails again stays dead-lettered (the same entry: its id is derived from the
record, and it keeps the time of its first failure); one that was applied or found stale
is removed; if a sink is unavailable, nothing is removed.

One rule bounds replay: a dead letter older than the tombstone retention (``tombstones:
retention_hours``, 48 h), less :data:`SKEW_MARGIN` for the clocks of different hosts, is not
replayed. A delete of its item after it was dead-lettered left a tombstone, and tombstones
are purged after the retention; without it, the old record would bring the deleted item
back (I3). Such a dead letter stays listed as ``EXPIRED`` for inspection: rebuild its view
instead, then remove it with ``viewkeeper deadletters drop --expired``. Items a rebuild's
scan could not project are dead-lettered too, and are not replayed (the stored item is a
copy for reading, not a typed record): rebuild the view again once it is fixed.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from viewkeeper.coordination.model import CoordinationStore, DeadLetter
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.stream.records import ChangeRecord, DecodeError, decode_record

__all__ = ["SKEW_MARGIN", "ReplayReport", "drop", "expired", "format_deadletters", "replay"]

SKEW_MARGIN = 3600.0  # seconds: hosts' clocks may disagree this much about a tombstone's age
DEFAULT_RETENTION = 48 * 3600.0


@dataclass
class ReplayReport:
    replayed: int = 0
    applied: int = 0
    stale: int = 0
    failed_again: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def expired(dl: DeadLetter, retention: float, now: float | None = None) -> bool:
    """Whether ``dl`` is too old to replay safely (see the module doc)."""
    now = time.time() if now is None else now
    return now - dl.created_at > retention - SKEW_MARGIN


def format_deadletters(
    dls: list[DeadLetter], retention: float = DEFAULT_RETENTION, now: float | None = None
) -> str:
    if not dls:
        return "no dead letters"
    now = time.time() if now is None else now
    lines = [f"{'id':<44} {'when (UTC)':<20} {'item':<20} {'sequence':<24} error"]
    for d in sorted(dls, key=lambda d: (d.created_at, d.id)):
        when = dt.datetime.fromtimestamp(d.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        err = d.error.splitlines()[0] if d.error else ""
        mark = "EXPIRED " if expired(d, retention, now) else ""
        lines.append(
            f"{d.id:<44} {when:<20} {d.item_key[:20]:<20} {d.sequence:<24} {mark}{err[:120]}"
        )
    n = sum(expired(d, retention, now) for d in dls)
    if n:
        lines.append(
            f"{n} EXPIRED: older than the tombstone retention ({retention / 3600:g} h), they "
            "cannot be replayed safely; rebuild their views, then `viewkeeper deadletters "
            "drop --expired`"
        )
    return "\n".join(lines)


def replay(
    store: CoordinationStore,
    pipeline: Pipeline,
    key_names_of: Callable[[str], tuple[str, ...]],
    ids: set[str] | None = None,
    *,
    retention: float = DEFAULT_RETENTION,
    now: float | None = None,
) -> ReplayReport:
    report = ReplayReport()
    now = time.time() if now is None else now
    for dl in store.list_deadletters():
        if ids is not None and dl.id not in ids:
            continue
        # a change-log append brings no deleted item back: no tombstone to outlive
        changelog = dl.view in pipeline.registry and pipeline.registry.get(dl.view).changelog
        why, rec = _replayable(dl, retention, now, expires=not changelog)
        if rec is not None and dl.view not in pipeline.registry:
            why, rec = (
                (
                    f"view {dl.view} is not in this config (renamed, or another config's view): "
                    "replay it with the config that declares it, or drop it"
                ),
                None,
            )
        if rec is None or dl.generation is None:
            report.skipped += 1
            report.notes.append(f"{dl.id}: {why}")
            continue
        batch = pipeline.process(
            dl.table,
            key_names_of(dl.table),
            [rec],
            only=[dl.view],
            generations={dl.view: dl.generation},
        )
        report.replayed += 1
        report.applied += batch.applied
        report.stale += batch.stale
        report.failed_again += batch.dead_lettered
        if batch.applied + batch.stale == 1 and not batch.dead_lettered:
            store.delete_deadletter(dl.id)  # it ended: applied, or stale against newer data
    return report


def _replayable(
    dl: DeadLetter, retention: float, now: float, *, expires: bool = True
) -> tuple[str, ChangeRecord | None]:
    """(why not, None) for a dead letter that must not be replayed, else ("", its record).
    ``expires``: whether it may be too old (not for a change-log view's)."""
    rebuild = f"`viewkeeper rebuild {dl.view}`"
    if dl.record is None:
        return f"its record was too large to keep; run {rebuild}, then drop it", None
    if "dynamodb" not in dl.record:
        return (
            f"an item the rebuild's scan could not project; fix the view and run {rebuild} "
            "again, then drop it"
        ), None
    if expires and expired(dl, retention, now):
        return (
            f"older than the tombstone retention ({retention / 3600:g} h): replaying it could "
            f"bring back an item deleted since; run {rebuild} instead, then "
            "`viewkeeper deadletters drop --expired`"
        ), None
    if dl.generation is None:
        return (
            "written by a viewkeeper that did not store the record's generation, so it cannot "
            f"be replayed safely; run {rebuild} instead"
        ), None
    try:
        return "", decode_record(dl.record)
    except DecodeError as exc:
        return f"the stored record does not decode ({exc})", None


def drop(
    store: CoordinationStore,
    *,
    ids: Iterable[str] = (),
    expired_only: bool = False,
    retention: float = DEFAULT_RETENTION,
    now: float | None = None,
) -> int:
    """Remove the dead letters named in ``ids``, or (``expired_only``) every expired one;
    return how many were removed."""
    wanted = set(ids)
    now = time.time() if now is None else now
    dropped = 0
    for dl in store.list_deadletters(limit=1_000_000):
        if dl.id in wanted or (expired_only and expired(dl, retention, now)):
            store.delete_deadletter(dl.id)
            dropped += 1
    return dropped
