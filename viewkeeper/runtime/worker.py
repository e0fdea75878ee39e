"""The shard worker: read a page, project and apply it, then move the checkpoint.

One worker runs per leased shard, in its own thread (see :mod:`viewkeeper.runtime.supervisor` for
why threads). The loop is the whole data path of ARCHITECTURE.md § Data flow::

    GetRecords → decode → Pipeline.process (project per view, apply per sink) → checkpoint

The checkpoint moves only after :meth:`Pipeline.process` returned, i.e. after every sink
acknowledged every record of the page (I4).

A page that ended at a limit of GetRecords means more records are waiting: the next read
follows at once, and is made while the page is applied (:mod:`viewkeeper.runtime.reading`).
The page read ahead is applied only after the current one is checkpointed, so sink writes
and checkpoints keep their order; a worker that stops drops it (its records are after the
checkpoint: they are read again).
After a page that ended short of the limits the worker waits ``busy_poll_interval``
(records are flowing) or, after an empty page, ``poll_interval``.

``starting_position: LATEST`` means "from the first time this shard was leased", durably.
The first opening takes a LATEST iterator and writes its time to the lease
(``checkpoint_at``, with the checkpoint still ``LATEST``) before reading a record; renewals
move that time forward while the reader is caught up. Any later opening before a record was
checkpointed — a restart, a crash, a lease move — reads from TRIM_HORIZON and skips only the
records written more than :data:`LATEST_MARGIN` before that time (counted in
``viewkeeper_records_before_start_total``), so nothing written since the first opening is
skipped, however long the table stays quiet.

Every page is stamped when GetRecords answers (:class:`~viewkeeper.runtime.reading.Stamp`):
the views' generations this process holds then, and whether its lease was valid then
(renewed within the lease duration). The page is applied at those generations however
late it is applied (a sink outage, a retry), so a record read before a rebuild's handshake
always loses to the rebuild's scan (see :mod:`viewkeeper.runtime.pipeline`). A page that arrived
while the lease was in doubt is not applied at all: this process may have stalled past
its lease, and a rebuild may have gone on without its acknowledgement (it revokes the
lease of a worker that does not answer); the page is read again, with fresh generations,
once the lease is renewed — or by whoever holds the shard next.

A sink outage makes the page retry, with backoff, until the sink is back or the worker is
asked to stop; the checkpoint stays put, and the lease is checked again before each try.
A malformed record is no reason to stop: the pipeline dead-letters it and the page goes on
(I5), so one bad record cannot stall the shard.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from viewkeeper.coordination.model import (
    CoordinationStore,
    CoordinationUnavailable,
    Lease,
    LeaseLost,
    LeaseState,
)
from viewkeeper.runtime import metrics
from viewkeeper.runtime.pipeline import HaltShard, Pipeline
from viewkeeper.runtime.reading import PageReader, Stamp, ended_at_a_limit
from viewkeeper.sinks.base import SinkUnavailable
from viewkeeper.stream.client import StreamClient, gc_paused
from viewkeeper.stream.errors import (
    ExpiredIteratorError,
    ResourceNotFoundError,
    ServiceError,
    ThrottlingError,
    TrimmedDataAccessError,
)
from viewkeeper.stream.records import NO_SEQUENCE, ChangeRecord

__all__ = ["ShardWorker", "WorkerSettings"]

log = logging.getLogger("viewkeeper.worker")

# Checkpoint positions other than a sequence number (see Lease.checkpoint).
LATEST = "LATEST"
TRIM_HORIZON = "TRIM_HORIZON"
# Records are skipped as "before the start" only when written this long before the first
# opening at LATEST (or the last time the reader was known caught up there): covers the
# approximate creation times and the clocks of DynamoDB and this host. Records inside the
# margin are applied again, which is harmless (versions).
LATEST_MARGIN = 300.0


@dataclass(frozen=True)
class WorkerSettings:
    batch_size: int = 1000
    poll_interval: float = 0.25  # after an empty page
    busy_poll_interval: float = 0.02  # after a partial page: records are flowing
    max_backoff: float = 5.0
    retention: float = 24 * 3600.0  # the stream's retention: older checkpoints are trimmed
    # make the next GetRecords call while a page that ended at a limit is applied
    prefetch: bool = True


class ShardWorker:
    """Reads one shard from its checkpoint to SHARD_END (or until stopped / lease lost)."""

    def __init__(
        self,
        lease: Lease,
        client: StreamClient,
        pipeline: Pipeline,
        store: CoordinationStore,
        key_names: tuple[str, ...],
        settings: WorkerSettings,
        *,
        stop: threading.Event,
        on_shard_end: Callable[[Lease], None] = lambda lease: None,
        clock: Callable[[], float] = time.time,
        lease_valid: Callable[[], bool] = lambda: True,
        generations: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.lease = lease
        self.client = client
        self.pipeline = pipeline
        self.store = store
        self.key_names = key_names
        self.settings = settings
        self.stop = stop
        self.on_shard_end = on_shard_end
        self.lease_valid = lease_valid
        self.generations = generations
        self.clock = clock
        self.last_sequence: str | None = (
            lease.checkpoint if lease.checkpoint not in (None, LATEST, TRIM_HORIZON) else None
        )
        self.lag: float | None = None
        self.caught_up = False
        # when a GetRecords call that came back empty was sent: every record created before
        # then is read (the renewal moves the lease's checkpoint_at to it)
        self.tip_seen_at: float | None = None
        self.records_read = 0
        self.finished = False
        self.crashed: str | None = None
        self._pause = contextlib.ExitStack()
        self._backoff = 0.1
        self._labels = (lease.table, lease.shard_id)
        self.reader = PageReader(
            client,
            settings.batch_size,
            prefetch=settings.prefetch,
            thread_name=f"vk-read-{lease.shard_id[-12:]}",
            lease_valid=lease_valid,
            generations=generations,
        )
        # LATEST: when this shard was first opened (None: never, or not at LATEST), and
        # records created before this are before the start (None: none to skip)
        self._latest_at = lease.checkpoint_at if lease.checkpoint == LATEST else None
        self._skip_before: float | None = None

    # --- iterators ----------------------------------------------------------------------
    def _iterator(self) -> str:
        lease = self.lease
        if self.last_sequence is not None:
            return self.client.get_shard_iterator(
                lease.stream_arn, lease.shard_id, "AFTER_SEQUENCE_NUMBER", self.last_sequence
            )
        if lease.checkpoint == LATEST:
            if self._latest_at is None:  # the first opening ever: pin it before reading
                iterator = self.client.get_shard_iterator(lease.stream_arn, lease.shard_id, LATEST)
                self._latest_at = self.clock()
                self._checkpoint(LATEST)  # writes checkpoint_at; LeaseLost goes up
                log.info("shard %s/%s opened at LATEST", *self._labels)
                return iterator
            self._skip_before = self._latest_at - LATEST_MARGIN
        return self.client.get_shard_iterator(lease.stream_arn, lease.shard_id, TRIM_HORIZON)

    # --- the loop -------------------------------------------------------------------------
    def run_guarded(self) -> None:
        """Thread target: an unexpected exception is recorded for the supervisor, which
        restarts the worker with backoff and reports a shard that keeps failing."""
        try:
            self.run()
        except Exception as exc:
            self.crashed = f"{type(exc).__name__}: {exc}"
            log.exception("worker for %s/%s crashed", *self._labels)

    def run(self) -> None:
        lease = self.lease
        # when every record created before was known to be read (the lease's creation,
        # checkpoint writes, renewals after an empty page; never a renewal alone: a stalled
        # worker must trip this). A LATEST shard never opened has no history to lose.
        at = lease.checkpoint_at
        if at is None and self.last_sequence is not None:
            at = lease.updated_at  # a lease written before checkpoint_at existed
        if at and self.clock() - at > self.settings.retention:
            self._trimmed(
                f"the reader was last at checkpoint {lease.checkpoint} "
                f"{(self.clock() - at) / 3600:.1f} h ago, longer than the stream's "
                f"{self.settings.retention / 3600:g} h retention"
            )
            return
        self._backoff = 0.1
        try:
            iterator = self._with_retry(self._iterator)
            while iterator is not None and not self.stop.is_set():
                # One page, from GetRecords to the checkpoint, with the cyclic garbage
                # collector paused (see client.gc_paused): the page's ~150k young objects
                # are freed by reference counting before it runs again, instead of being
                # traversed (bench/redis_pipeline.py measures the difference). Waits for a
                # sink that is down happen with the collector back on.
                self._pause = contextlib.ExitStack()
                self._pause.enter_context(gc_paused())
                try:
                    iterator = self._page(iterator)
                finally:
                    self._pause.close()
        except TrimmedDataAccessError as exc:
            self._trimmed(str(exc))
        except ResourceNotFoundError as exc:
            self._not_found(exc)
        except LeaseLost as exc:
            log.warning("%s; stopping this shard here", exc)
        except HaltShard as exc:
            log.error("shard %s/%s halted (worker.on_error=halt): %s", *self._labels, exc)
            self._set_state(LeaseState.HALTED, str(exc))
        finally:
            self.reader.close()

    def _page(self, iterator: str) -> str | None:
        """Read, apply and checkpoint one page; the next iterator, or None to stop here."""
        asked_at = self.clock()
        try:
            page, stamp = self.reader.read(iterator)
        except ExpiredIteratorError:
            self.caught_up = False
            self._pause.close()
            log.info(
                "iterator of %s/%s expired; resuming after %s", *self._labels, self.last_sequence
            )
            return self._with_retry(self._iterator)
        except (ThrottlingError, ServiceError) as exc:
            self.caught_up = False
            self._pause.close()
            log.warning(
                "GetRecords on %s/%s: %s; backing off %.1fs", *self._labels, exc, self._backoff
            )
            self.stop.wait(self._backoff)
            self._backoff = min(self._backoff * 2, self.settings.max_backoff)
            return iterator
        self._backoff = 0.1
        records = page.records
        full = ended_at_a_limit(len(records), page.size, self.settings.batch_size)
        if records:
            self.caught_up = False  # a renewal must not say "caught up" while this is pending
        elif not stamp.ahead:
            self.tip_seen_at = asked_at  # nothing after the iterator when this was asked
        if records and not stamp.valid:
            return self._read_again(records)
        if records and self._skip_before is not None:
            records = self._after_start(records)
        if records and not self._wait_lease_valid():
            return None  # stopped while the lease was in doubt: the page will be re-read
        if records and not self._process(records, stamp):
            return None  # stopped before the page was applied and checkpointed: re-read
        self.caught_up = not page.records or page.next_iterator is None
        if self.caught_up:
            self.lag = 0.0
        metrics.LAG.labels(*self._labels).set(self.lag or 0.0)
        metrics.CAUGHT_UP.labels(*self._labels).set(1 if self.caught_up else 0)
        next_iterator = page.next_iterator
        if not full:
            self.reader.close()  # caught up (or nearly): no thread per quiet shard
        del page, records  # freed while the collector is still paused
        self._pause.close()
        if next_iterator is None:
            self._shard_end()
            return None
        if not full:
            self.stop.wait(
                self.settings.busy_poll_interval
                if not self.caught_up
                else self.settings.poll_interval
            )
        return next_iterator

    def _after_start(self, records: list[ChangeRecord]) -> list[ChangeRecord]:
        """Drop the records written before the shard was first opened at LATEST (see the
        module doc); the first record after that ends the skipping. A page of nothing but
        such records is checkpointed here, so they are not read again."""
        assert self._skip_before is not None
        start = next(
            (
                i
                for i, r in enumerate(records)
                if not r.created_at or r.created_at >= self._skip_before
            ),
            len(records),
        )
        if start < len(records):
            self._skip_before = None
        if start:
            metrics.BEFORE_START.labels(self.lease.table).inc(start)
            log.info(
                "shard %s/%s: %d records written before it was first opened at LATEST skipped",
                *self._labels,
                start,
            )
            if start == len(records):
                last = next(
                    (r.sequence for r in reversed(records) if r.sequence != NO_SEQUENCE), None
                )
                if last is not None and self._checkpoint(last):
                    self.last_sequence = last
        return records[start:]

    def _read_again(self, records: list[ChangeRecord]) -> str | None:
        """A page arrived while the lease was in doubt: drop it (and the page read ahead),
        wait for the lease to be renewed, and read from its first record again — the
        records then carry the generations of a process that has caught up with the
        coordination table. None when stopped first (the next holder reads it)."""
        self.reader.close()
        self._pause.close()
        log.warning(
            "shard %s/%s: a page arrived while the lease was not renewed in time; "
            "reading it again once the lease is renewed",
            *self._labels,
        )
        first = next((r.sequence for r in records if r.sequence != NO_SEQUENCE), None)
        if not self._wait_lease_valid():
            return None
        if first is None:
            return self._with_retry(self._iterator)
        lease = self.lease
        return self._with_retry(
            lambda: self.client.get_shard_iterator(
                lease.stream_arn, lease.shard_id, "AT_SEQUENCE_NUMBER", first
            )
        )

    def _wait_lease_valid(self) -> bool:
        """Apply only while the supervisor renewed the lease within lease_duration: one that
        stalled may have lost it to another process without knowing yet. Wait for the next
        renewal (or for the stop that follows a lost lease)."""
        if self.stop.is_set():
            return False
        if self.lease_valid():
            return True
        log.warning("shard %s/%s: lease not renewed in time; holding the page", *self._labels)
        self._pause.close()
        while not self.stop.wait(0.05):
            if self.lease_valid():
                return True
        return False

    def _with_retry(self, fn: Callable[[], str]) -> str | None:
        delay = 0.1
        while not self.stop.is_set():
            try:
                return fn()
            except (ThrottlingError, ServiceError) as exc:
                log.warning("shard %s/%s: %s; retrying in %.1fs", *self._labels, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.settings.max_backoff)
        return None

    def _process(self, records: list[ChangeRecord], stamp: Stamp | None = None) -> bool:
        """Apply a page and checkpoint it; False when stopped before the sinks took it or
        before the checkpoint was written (the page is then read again: a replay).

        The checkpoint is the page's last sequence number. A malformed record is
        dead-lettered by the pipeline like any record that cannot be applied, and the page
        goes on; one without a usable SequenceNumber (:data:`NO_SEQUENCE`) cannot be ordered,
        so the checkpoint is the last record of the page that has one (or stays where it is
        when none has: the next page moves it)."""
        table = self.lease.table
        gens = stamp.generations if stamp is not None else None
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                self.pipeline.process(
                    table, self.key_names, records, generations=gens, shard=self.lease.shard_id
                )
                break
            except SinkUnavailable as exc:
                metrics.SINK_RETRIES.labels(str(exc).split(":", 1)[0]).inc()
                metrics.SINK_ERRORS.labels(str(exc).split(":", 1)[0], "unavailable").inc()
                log.warning(
                    "shard %s/%s: %s; retrying the page in %.1fs (checkpoint stays at %s)",
                    *self._labels,
                    exc,
                    delay,
                    self.last_sequence,
                )
                self._pause.close()  # the collector runs while we wait for the sink
                if self.stop.wait(delay) or not self._wait_lease_valid():
                    return False
                delay = min(delay * 2, self.settings.max_backoff)
        metrics.BATCH_SECONDS.labels(table).observe(time.perf_counter() - started)
        self.records_read += len(records)
        last = records[-1]
        if last.sequence == NO_SEQUENCE:
            last = next((r for r in reversed(records) if r.sequence != NO_SEQUENCE), last)
            if last.sequence == NO_SEQUENCE:
                log.warning(
                    "shard %s/%s: no record of the page has a sequence number; "
                    "checkpoint stays at %s",
                    *self._labels,
                    self.last_sequence,
                )
                return True
        if not self._checkpoint(last.sequence):
            return False  # stopped with the page applied but not checkpointed: re-read, a replay
        self.last_sequence = last.sequence
        self.lag = max(0.0, self.clock() - last.created_at) if last.created_at else None
        return True

    def _checkpoint(self, sequence: str | None, state: LeaseState | None = None) -> bool:
        """Write the checkpoint, retrying with backoff while the coordination table cannot be
        reached (the page stays applied meanwhile); False when stopped first. LeaseLost
        goes up: the shard is someone else's now."""
        delay = 0.2
        while True:
            try:
                self.store.checkpoint(self.lease, sequence, state=state)
                return True
            except CoordinationUnavailable as exc:
                log.warning(
                    "shard %s/%s: checkpoint %s not written (%s); the page is applied, "
                    "retrying in %.1fs",
                    *self._labels,
                    sequence,
                    exc,
                    delay,
                )
                self._pause.close()
                if self.stop.wait(delay):
                    return False
                delay = min(delay * 2, self.settings.max_backoff)

    def _shard_end(self) -> None:
        if not self._checkpoint(self.last_sequence, LeaseState.ENDED):
            return  # stopped first: whoever reads the shard next ends it
        self.finished = True
        log.info("shard %s/%s ended after %d records", *self._labels, self.records_read)
        self.on_shard_end(self.lease)

    def _not_found(self, exc: ResourceNotFoundError) -> None:
        """The shard cannot be found. If its stream is still the table's and lists other
        shards but not this one, DynamoDB trimmed the whole shard away (closed, and every
        record past the retention) while records after the checkpoint were unread: data
        lost, like any trimmed data. Otherwise the table or its stream is gone (the
        supervisor's discovery reports a new stream)."""
        lease = self.lease
        try:
            info = self.client.describe_table(lease.table)
            listed = (
                {s.shard_id for s in self.client.list_shards(lease.stream_arn)}
                if info.stream_arn == lease.stream_arn
                else None
            )
        except (ResourceNotFoundError, ThrottlingError, ServiceError):
            listed = None
        if listed is not None and lease.shard_id not in listed:
            self._trimmed(
                f"the shard is no longer in the stream: DynamoDB trimmed all of it after it "
                f"closed, with the records after checkpoint {lease.checkpoint} unread"
            )
            return
        log.error(
            "shard %s/%s: the stream or table is gone (%s); stopping this shard",
            *self._labels,
            exc,
        )

    def _trimmed(self, why: str) -> None:
        metrics.TRIMMED.labels(self.lease.table).inc()
        log.error(
            "DATA LOST TO STREAM RETENTION on %s/%s: %s. Records after checkpoint %s were "
            "trimmed before viewkeeper read them; the shard is marked needs_rebuild and will "
            "not be skipped silently. Run `viewkeeper rebuild` for the views of table %s.",
            *self._labels,
            why,
            self.last_sequence,
            self.lease.table,
        )
        self._set_state(LeaseState.NEEDS_REBUILD, f"trimmed: {why}")

    def _set_state(self, state: LeaseState, error: str) -> None:
        with contextlib.suppress(LeaseLost):
            self.store.checkpoint(self.lease, None, state=state, error=error)
