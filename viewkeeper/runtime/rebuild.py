"""Rebuild views from a full table scan while the stream keeps flowing (I6).

The generation handshake (see ARCHITECTURE.md):

1. Raise each view's generation ``G`` in the coordination table.
2. Handshake (:func:`handshake`): wait until no process can still *read* a record of the
   views' tables and stamp it with an older generation. Records carry the generation
   their reader's lease showed when GetRecords answered (:mod:`viewkeeper.runtime.pipeline`,
   :mod:`viewkeeper.runtime.supervisor`), so only the leases matter: every lease of the tables
   that may still be read must show ``G`` (``Lease.gens``). A holder publishes it with its
   next renewal after it adopted it; a free lease gets it written here, so whoever takes
   it starts from it; a held lease whose counter stayed the same for a lease duration on
   *this* process's clock (the rule takers use: no wall clock is compared, so skew cannot
   fool it) is revoked with it in the same write: its holder stopped renewing, its own
   lease guard already refuses pages that arrive after that, and its next renewal fails.
   Then one more lease duration: a holder stamps with what its lease shows only once its
   renewal's answer is back, and until then its lease guard refuses pages that arrive after
   a lease duration without one. A holder that lost its lease to a steal cannot publish
   any more, and its taker started from what it had published: its stamps never exceed
   the shard's newer holder's. Appliers that hold no lease (the Lambda handler) read the
   generations at the start of each invocation, after its records were read, and need no
   handshake.
3. Scan the table in parallel segments; project each item and apply it at ``(G, 0)``.
   A record read after the handshake carries ``(G, seq)`` and beats it; one read before
   carries ``G - 1`` and loses — right, since the scan read the item after it.
4. Sweep: retract whatever owner records of generations older than ``G`` still own — items
   that no longer exist, entries that a changed projection no longer yields, strays.

A rebuild that crashes is simply run again: it raises the generation once more and reaches
the same end state. Shards marked ``needs_rebuild`` (trimmed stream data) are reset to read
from the oldest record still in the stream when every view of their table is rebuilt.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from viewkeeper.coordination.model import CoordinationStore, Lease, LeaseState, WorkerInfo
from viewkeeper.projection.api import View
from viewkeeper.projection.registry import ViewRegistry
from viewkeeper.projection.versions import Version
from viewkeeper.runtime.namespaces import Namespaces
from viewkeeper.runtime.pipeline import BatchReport, Pipeline
from viewkeeper.sinks.base import Change, NamespaceLost, SinkUnavailable
from viewkeeper.stream.client import StreamClient
from viewkeeper.stream.errors import ThrottlingError

__all__ = ["HandshakeTimeout", "RebuildReport", "RebuildSettings", "handshake", "rebuild"]

log = logging.getLogger("viewkeeper.runtime.rebuild")


MAX_KEPT = 10_000  # items a sweep leaves be (failed scans); beyond it the sweep is skipped


class HandshakeTimeout(Exception):
    """Workers reading the tables did not acknowledge the new generation in time."""


@dataclass(frozen=True)
class RebuildSettings:
    segments: int = 4
    batch_size: int = 500
    max_items_per_second: float | None = None  # read-capacity guard; None = as fast as it goes
    handshake_timeout: float = 60.0
    # worker.lease_duration of the daemons: a lease unchanged this long is revoked
    lease_duration: float = 10.0
    progress_every: float = 1.0


@dataclass
class RebuildReport:
    views: list[str]
    generations: dict[str, int]
    scanned: int = 0
    applied: int = 0
    stale: int = 0
    dead_lettered: int = 0
    retracted: int = 0
    consumed_capacity: float = 0.0
    seconds: float = 0.0
    reset_shards: list[str] = field(default_factory=list)
    # (view, item key) of items the scan could not project or write: dead-lettered, and
    # kept as they are by the sweep (as the stream keeps an item whose record fails)
    failed_items: set[tuple[str, str]] = field(default_factory=set)
    unswept: list[str] = field(default_factory=list)

    @property
    def items_per_second(self) -> float:
        return self.scanned / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"rebuilt {', '.join(self.views)} (generation "
            f"{', '.join(f'{v}={g}' for v, g in self.generations.items())}): "
            f"{self.scanned} items scanned in {self.seconds:.1f}s "
            f"({self.items_per_second:,.0f} items/s); applied {self.applied}, stale "
            f"{self.stale}, retracted {self.retracted}, dead-lettered {self.dead_lettered}; "
            f"consumed {self.consumed_capacity:,.1f} read capacity units"
        )


class _RateLimiter:
    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_at = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            wait = self.next_at - now
            self.next_at = max(self.next_at, now) + n / self.rate
        if wait > 0:
            time.sleep(wait)


@dataclass
class _Seen:
    counter: int
    owner: str | None
    since: float  # time.monotonic() when this counter was first read


def handshake(
    store: CoordinationStore,
    tables: Sequence[str],
    wanted: dict[str, int],
    settings: RebuildSettings,
    out: TextIO,
) -> None:
    """Return once every lease of ``tables`` that may still be read shows ``wanted`` in its
    generations (see the module doc): a held lease once its holder published them (its
    next renewal after it adopted them), or revoked with them once its counter stayed
    unchanged for a lease duration; a free lease gets them written; then wait one more
    lease duration. Raise HandshakeTimeout naming the holders that did neither in
    ``handshake_timeout``."""
    deadline = time.monotonic() + settings.handshake_timeout
    seen: dict[tuple[str, str], _Seen] = {}
    revoked: list[str] = []
    holders: set[str] = set()
    while True:
        behind: dict[str, list[Lease]] = {}
        for table in tables:
            leases = store.list_leases(table)
            read_at = time.monotonic()  # expiry counts from the read, never from before it
            for lease in leases:
                if lease.state is LeaseState.ENDED or _shows(lease, wanted):
                    if lease.owner is not None:
                        holders.add(lease.owner)
                    continue
                if lease.owner is None:
                    store.publish_generations(lease, wanted)  # a taker starts from these
                    behind.setdefault("(free, being marked)", []).append(lease)
                    continue
                key = (table, lease.shard_id)
                prev = seen.get(key)
                if prev is None or (prev.counter, prev.owner) != (lease.counter, lease.owner):
                    seen[key] = _Seen(lease.counter, lease.owner, read_at)
                elif read_at - prev.since >= settings.lease_duration and store.revoke_lease(
                    lease, wanted
                ):
                    revoked.append(f"{table}/{lease.shard_id} of {lease.owner}")
                    log.warning(
                        "rebuild: revoked lease %s/%s of %s: it neither published generation "
                        "%s nor renewed its lease for %.0fs",
                        table,
                        lease.shard_id,
                        lease.owner,
                        wanted,
                        settings.lease_duration,
                    )
                    continue
                behind.setdefault(lease.owner, []).append(lease)
        if not behind:
            # A holder stamps with what its lease shows only once its renewal's answer is
            # back; until then it stamps the generations before, or its lease guard refuses
            # its pages (no renewal for a lease duration): after one more, it does neither.
            time.sleep(settings.lease_duration)
            print(
                f"handshake done: {len(holders)} reading worker(s) took up the new "
                "generation" + (f"; revoked {', '.join(revoked)}" if revoked else ""),
                file=out,
            )
            return
        if time.monotonic() > deadline:
            workers = {w.worker_id: w for w in store.list_workers()}
            names = "; ".join(
                _describe_worker(owner, workers.get(owner), leases, wanted)
                for owner, leases in sorted(behind.items())
            )
            raise HandshakeTimeout(
                f"rebuild waited {settings.handshake_timeout:.0f}s for the workers reading "
                f"{', '.join(tables)} to take up generation {wanted}; not taken up by: "
                f"{names}. They renew their leases but do not publish the new generation: "
                "check that they run this viewkeeper version and are healthy (or stop "
                "them), then run the rebuild again"
            )
        time.sleep(0.2)


def _shows(lease: Lease, wanted: dict[str, int]) -> bool:
    return all(lease.gens.get(view, 0) >= gen for view, gen in wanted.items())


def _describe_worker(
    owner: str, worker: WorkerInfo | None, leases: list[Lease], wanted: dict[str, int]
) -> str:
    shards = ", ".join(lease.shard_id for lease in leases[:3]) + (
        f" and {len(leases) - 3} more" if len(leases) > 3 else ""
    )
    if worker is None:
        return f"{owner} (no worker record; holds {shards})"
    acked = {v: worker.acked.get(v, 0) for v in wanted}
    return f"{owner} (host {worker.host}, pid {worker.pid}, acked {acked}, holds {shards})"


def rebuild(
    views: Sequence[View],
    registry: ViewRegistry,
    client: StreamClient,
    store: CoordinationStore,
    pipeline_factory: Callable[[Callable[[str], int]], Pipeline],
    settings: RebuildSettings,
    *,
    out: TextIO = sys.stderr,
    namespaces: Namespaces | None = None,
) -> RebuildReport:
    """Rebuild ``views`` (all of one table, or some) from a scan of their tables. With
    ``namespaces``, each view's claim records the new generation before the scan, and the
    view's needs_rebuild mark (lost sink data) is cleared at the end unless another loss was
    recorded meanwhile."""
    refused = [v.name for v in views if v.changelog]
    if refused:
        raise ValueError(changelog_refusal(refused))
    tables = sorted({v.table for v in views})
    started = time.monotonic()
    store.ensure()
    generations: dict[str, int] = {}
    pipeline = pipeline_factory(lambda name: generations.get(name, 0))
    for view in views:  # before the generation is raised: see Sink.begin_rebuild
        floor = store.generations().get(view.name, 0)  # read last: the newest
        pipeline.sink_for(view).begin_rebuild(view, floor)
    generations.update({v.name: store.raise_generation(v.name) for v in views})
    markers = (
        {v.name: namespaces.announce(v, generations[v.name]) for v in views}
        if namespaces is not None
        else {}
    )
    report = RebuildReport([v.name for v in views], generations)
    print(f"raised generation: {generations}; waiting for the readers to acknowledge", file=out)
    handshake(store, tables, generations, settings, out)
    for table in tables:
        table_views = [v for v in views if v.table == table]
        info = client.describe_table(table)
        _scan_table(
            table,
            info.key_names,
            getattr(info, "item_count", None),
            table_views,
            client,
            pipeline,
            settings,
            report,
            out,
        )
        for view in table_views:
            keep = {item for name, item in report.failed_items if name == view.name}
            if len(keep) > MAX_KEPT:
                report.unswept.append(view.name)
                print(
                    f"view {view.name}: the sweep was skipped: {len(keep)} items could not be "
                    "projected or written (see `viewkeeper deadletters list`); entries of "
                    "items deleted from the table stay until the view is fixed and rebuilt",
                    file=out,
                )
                continue
            report.retracted += _sweep(pipeline, view, generations[view.name], keep)
        # only now that the scan and the sweep are done: a rebuild that fails before keeps
        # the mark, and the shard stays unread until one succeeds
        every = {v.name for v in registry.by_table(table) if not v.changelog}
        all_views = every <= {v.name for v in table_views}
        _resume_trimmed_shards(table, info.stream_arn, all_views, client, store, report, out)
        if namespaces is not None:
            for view in table_views:
                if namespaces.rebuilt(view, markers[view.name]):
                    print(f"view {view.name}: needs_rebuild cleared", file=out)
    report.seconds = time.monotonic() - started
    print(report.summary(), file=out)
    return report


def changelog_refusal(names: Sequence[str]) -> str:
    """Why change-log views cannot be rebuilt, naming them."""
    return (
        f"view(s) {', '.join(names)}: a change-log view cannot be rebuilt: its entries are the "
        "history of the table's changes, which a scan of the table does not hold. Leave it "
        "out (rebuild --table and --all skip change-log views)"
    )


def _sweep(pipeline: Pipeline, view: View, generation: int, keep: set[str]) -> int:
    """The sink's sweep; a namespace found lost on the way (the sink's claim changed) is
    handed to the pipeline's handler — it re-arms and reports it, and this rebuild will not
    clear the view's mark — and the sweep goes on."""
    sink = pipeline.sink_for(view)
    for attempt in range(4):
        try:
            return sink.sweep(view, generation, time.time(), keep)
        except NamespaceLost as exc:
            if pipeline.on_lost is None or attempt == 3:
                raise
            pipeline.on_lost(sink, exc)
    raise AssertionError("unreachable")


def _resume_trimmed_shards(
    table: str,
    stream_arn: str | None,
    all_views: bool,
    client: StreamClient,
    store: CoordinationStore,
    report: RebuildReport,
    out: TextIO,
) -> None:
    """Shards marked needs_rebuild (trimmed data) resume once every view of their table is
    rebuilt: one still in the stream is read again from its oldest record (read after the
    handshake, its records carry the new generation; its children wait for it as usual);
    one DynamoDB trimmed away entirely is ended, which lets its children start — the scan
    covered whatever it held."""
    marked = [x for x in store.list_leases(table) if x.state is LeaseState.NEEDS_REBUILD]
    if not marked:
        return
    if not all_views:
        for lease in marked:
            print(
                f"shard {table}/{lease.shard_id} needs a rebuild of every view of {table}; "
                f"rebuild them all (viewkeeper rebuild --table {table}) to resume it",
                file=out,
            )
        return
    listed: set[str] = set()
    if stream_arn is not None:
        listed = {s.shard_id for s in client.list_shards(stream_arn)}
    for lease in marked:
        if lease.stream_arn == stream_arn and lease.shard_id in listed:
            store.reset_lease(table, lease.shard_id, None, LeaseState.ACTIVE)
            report.reset_shards.append(f"{table}/{lease.shard_id}")
        else:
            store.reset_lease(table, lease.shard_id, lease.checkpoint, LeaseState.ENDED)
            report.reset_shards.append(f"{table}/{lease.shard_id} (gone: ended)")


def _scan_table(
    table: str,
    key_names: tuple[str, ...],
    item_count: int | None,
    views: list[View],
    client: StreamClient,
    pipeline: Pipeline,
    settings: RebuildSettings,
    report: RebuildReport,
    out: TextIO,
) -> None:
    limiter = _RateLimiter(settings.max_items_per_second)
    lock = threading.Lock()
    errors: list[BaseException] = []
    t0 = time.monotonic()

    def segment(n: int) -> None:
        start_key: dict[str, Any] | None = None
        while True:
            try:
                page = client.scan(table, n, settings.segments, start_key, settings.batch_size)
            except ThrottlingError:
                time.sleep(1.0)  # the client already backed off; slow the whole segment
                continue
            limiter.take(len(page.items))
            batch = BatchReport()
            changes: list[Change] = []
            items: list[dict[str, Any]] = []
            for item in page.items:
                for view in views:
                    ch = pipeline.project_item(
                        batch,
                        view,
                        table,
                        item,
                        key_names,
                        Version(pipeline.generation_of(view.name), "0"),
                    )
                    if ch is not None:
                        changes.append(ch)
                        items.append(item)
            if changes:
                batch.add(_apply_with_retry(pipeline, changes, table, items))
            pipeline.flush(batch)  # the items whose projection failed
            with lock:
                report.scanned += len(page.items)
                report.applied += batch.applied
                report.stale += batch.stale
                report.dead_lettered += batch.dead_lettered
                report.failed_items |= batch.failed_items
                report.consumed_capacity += page.consumed_capacity or 0.0
            start_key = page.last_evaluated_key
            if not start_key:
                return

    remaining = [settings.segments]
    done = threading.Event()

    def guarded(n: int) -> None:
        try:
            segment(n)
        except BaseException as exc:
            errors.append(exc)
        finally:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    threads = [
        threading.Thread(target=guarded, args=(n,), name=f"scan-{n}")
        for n in range(settings.segments)
    ]
    for t in threads:
        t.start()
    while not done.wait(settings.progress_every):
        elapsed = time.monotonic() - t0
        rate = report.scanned / elapsed if elapsed else 0.0
        eta = ""
        if item_count and rate:
            left = max(0, item_count - report.scanned)
            eta = f", ~{left / rate:.0f}s left of ~{item_count} items"
        print(
            f"  {table}: {report.scanned} items, {rate:,.0f} items/s{eta}, "
            f"{report.consumed_capacity:,.1f} RCU",
            file=out,
        )
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _apply_with_retry(
    pipeline: Pipeline, changes: list[Change], table: str, items: list[dict[str, Any]]
) -> BatchReport:
    delay = 0.2
    for _ in range(30):
        try:
            return pipeline.apply_changes(changes, table, items)
        except SinkUnavailable as exc:
            log.warning("rebuild: %s; retrying in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    return pipeline.apply_changes(changes, table, items)
