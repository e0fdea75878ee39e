"""The supervisor: leases, shard discovery, balancing, and one worker thread per shard.

Concurrency model: threads. A shard worker spends nearly all its time waiting on sockets
(GetRecords, Redis, OpenSearch) or sleeping between polls, and the libraries on that path
(urllib3, redis-py, opensearch-py) are blocking; a thread per leased shard keeps the worker a
plain loop, and the GIL is released while it waits. An idle worker costs one sleeping thread
(~tens of kB RSS) and a poll every ``poll_interval``; bench/ records the figures for 500 idle
shards. CPU-bound throughput beyond one core comes from running more processes: instances
share shards through the lease table, as KCL workers do.

Leases (taking, renewing, balancing, validity) are :mod:`viewkeeper.runtime.leases`'s: the
supervisor's round renews them, lists the lease table, and acquires up to the fair share.

A shard's children start only after the parent's lease is ENDED (all its records applied).
A worker that reaches SHARD_END wakes the supervisor to discover the children at once.

Generations (the rebuild's handshake, see :mod:`viewkeeper.runtime.rebuild`): each round first
reads the views' generations (``adopted``); its take and renewal writes publish them in each
lease it holds, and a worker stamps the pages it receives with what its lease has published
— never with a generation the lease table does not show yet. A taker starts from the
lease's generations, so the stamps of a shard's records never go down when the shard changes
hands (a steal included: the old holder cannot publish after the take, the new one starts at
least where it was).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from viewkeeper.coordination.model import CoordinationStore, Lease, LeaseState, WorkerInfo
from viewkeeper.runtime import metrics
from viewkeeper.runtime.leases import Leases, Progress, takeable
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.worker import LATEST, ShardWorker, WorkerSettings
from viewkeeper.sinks.base import SinkUnavailable
from viewkeeper.stream.client import StreamClient, TableInfo

__all__ = ["StreamNotReadable", "Supervisor", "SupervisorFatal", "SupervisorSettings"]

log = logging.getLogger("viewkeeper.runtime.supervisor")


class StreamNotReadable(Exception):
    """A source table has no stream, a disabled stream, or a stream without new images."""


class SupervisorFatal(Exception):
    """This process must stop (e.g. another deployment took a view's namespace over): the
    round is not retried; ``run`` drains and raises it."""


@dataclass(frozen=True)
class SupervisorSettings:
    lease_duration: float = 10.0
    discovery_interval: float = 10.0
    starting_positions: Mapping[str, str] = field(default_factory=dict)  # table → LATEST|...
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    restart_backoff: float = 1.0
    max_restart_backoff: float = 60.0
    shutdown_timeout: float = 30.0
    # renewals in flight at once: I/O-bound calls, and botocore's default connection pool
    # (max_pool_connections=10) is shared with the workers' checkpoints, so a few suffice
    renew_threads: int = 8
    # how often the sinks' claims are compared with what is expected (viewkeeper.runtime.namespaces)
    verify_interval: float = 5.0


@dataclass
class _Running:
    worker: ShardWorker
    thread: threading.Thread
    stop: threading.Event


class Supervisor:
    def __init__(
        self,
        tables: list[str],
        client: StreamClient,
        store: CoordinationStore,
        pipeline_factory: Callable[[Callable[[str], int]], Pipeline],
        settings: SupervisorSettings,
        *,
        worker_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        start: Callable[[], None] | None = None,
        verify: Callable[[], None] | None = None,
        fatal: Callable[[], str | None] | None = None,
    ) -> None:
        self.tables = tables
        self.start = start  # before the first round (the sinks' claims: App.ensure_claimed)
        self.verify = verify  # checks the sinks' claims (Namespaces.verify)
        self.fatal = fatal  # a reason this process must stop, or None
        self._last_verify = -math.inf
        self.client = client
        self.store = store
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock = clock
        self.wall_clock = wall_clock  # epoch seconds: heartbeats, checkpoint times
        self.generations: dict[str, int] = {}
        self.pipeline = pipeline_factory(lambda view: self.generations.get(view, 0))
        self.table_info: dict[str, TableInfo] = {}
        self.running: dict[tuple[str, str], _Running] = {}
        self.failures: dict[tuple[str, str], tuple[int, float]] = {}  # count, retry-at
        self._leases: dict[str, list[Lease]] = {}
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._last_discovery = -math.inf
        self._last_tick = clock()
        self.started_at = wall_clock()
        self.leases = Leases(
            store, self.worker_id, settings.lease_duration, settings.renew_threads, clock
        )

    # --- discovery ----------------------------------------------------------------------
    def _describe(self, table: str) -> TableInfo:
        info = self.client.describe_table(table)
        if not info.stream_arn:
            raise StreamNotReadable(
                f"table {table!r} has no stream; enable DynamoDB Streams on it with view type "
                "NEW_AND_OLD_IMAGES (or NEW_IMAGE)"
            )
        if info.stream_view_type not in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES"):
            raise StreamNotReadable(
                f"table {table!r} streams {info.stream_view_type}; views need the new image: "
                "set the stream view type to NEW_AND_OLD_IMAGES (or NEW_IMAGE)"
            )
        return info

    def discover(self) -> None:
        """Create a lease for every shard not yet in the lease table."""
        for table in self.tables:
            info = self._describe(table)
            old = self.table_info.get(table)
            if old is not None and old.stream_arn != info.stream_arn:
                log.warning(
                    "table %s has a new stream %s (was %s): it was disabled and "
                    "re-enabled; records in between are lost, rebuild its views",
                    table,
                    info.stream_arn,
                    old.stream_arn,
                )
            self.table_info[table] = info
            assert info.stream_arn is not None
            shards = self.client.list_shards(info.stream_arn)
            leases = self.store.list_leases(table)
            known = {lease.shard_id for lease in leases}
            first_sight = not known
            if leases and all(lease.stream_arn != info.stream_arn for lease in leases):
                self._stream_gap(table, leases[-1].stream_arn, info.stream_arn)
            position = self.settings.starting_positions.get(table, LATEST)
            ids = {s.shard_id for s in shards}
            for shard in shards:
                if shard.shard_id in known:
                    continue
                parents = (shard.parent_shard_id,) if shard.parent_shard_id in ids else ()
                checkpoint: str | None = None
                state = LeaseState.ACTIVE
                if first_sight and position == LATEST:
                    if shard.ending_sequence is not None:
                        state = LeaseState.ENDED  # closed before we ever looked: history
                    elif not parents:
                        checkpoint = LATEST
                if self.store.create_lease(
                    Lease(
                        table,
                        shard.shard_id,
                        info.stream_arn,
                        parents,
                        checkpoint=checkpoint,
                        state=state,
                        # read from TRIM_HORIZON: every record since now must be read (the
                        # worker's retention check); a LATEST shard starts when first opened
                        checkpoint_at=None if checkpoint == LATEST else self.wall_clock(),
                    )
                ):
                    log.info(
                        "new shard %s/%s (parents %s)",
                        table,
                        shard.shard_id,
                        ",".join(parents) or "none",
                    )
        self._last_discovery = self.clock()

    def _stream_gap(self, table: str, old: str, new: str) -> None:
        """The table's stream is one the lease table has never seen: it was disabled and
        enabled again (a new stream), and what was written in between is in no stream.
        Reported before its first lease is made (a crash in between reports it again):
        its views are marked needs_rebuild, loudly."""
        why = (
            f"the stream of table {table} was disabled and enabled again ({old} -> {new}): "
            "writes made in between are in no stream"
        )
        for view in self.pipeline.registry.by_table(table):
            if view.changelog:  # nothing can rebuild a history: said, not marked
                log.error("CHANGE-LOG GAP: view %s misses the changes of %s", view.name, why)
            else:
                self.store.mark_needs_rebuild(view.name, why, self.wall_clock(), None)
        metrics.STREAM_GAPS.labels(table).inc()
        log.error(
            "DATA LOST TO A STREAM GAP: %s. The views of %s are marked needs_rebuild: run "
            "`viewkeeper rebuild --table %s`",
            why,
            table,
            table,
        )

    # --- one round ----------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        self._last_tick = now
        reason = self.fatal() if self.fatal is not None else None
        if reason is not None:
            raise SupervisorFatal(reason)
        self.generations = self.store.generations()  # adopted: published by renewals below
        if now - self._last_discovery >= self.settings.discovery_interval or self._wake.is_set():
            self._wake.clear()
            self.discover()
        self._heartbeat()
        live = self._live_workers()
        self._renew()  # first: the snapshot below must be fresh when _acquire takes from it
        for table in self.tables:
            self._leases[table] = self.store.list_leases(table)
        listed_at = self.clock()  # expiry counts from here, not from the round's start
        if not self.stopping.is_set():
            self.leases.acquire(self._leases, listed_at, live, self.generations)
        self._reap_and_start(now)
        metrics.LEASES.set(len(self.held))
        if self.verify is not None and now - self._last_verify >= self.settings.verify_interval:
            self._last_verify = now
            try:
                self.verify()
            except SinkUnavailable as exc:  # the workers wait for it too; checked next time
                log.debug("claims not verified: %s", exc)

    def _heartbeat(self) -> None:
        self.store.put_worker(
            WorkerInfo(
                worker_id=self.worker_id,
                heartbeat_at=self.wall_clock(),
                acked=dict(self.generations),
                host=socket.gethostname(),
                pid=os.getpid(),
                leases=len(self.held),
                started_at=self.started_at,
            )
        )

    def _live_workers(self) -> dict[str, int]:
        horizon = self.wall_clock() - self.settings.lease_duration * 2
        return {
            w.worker_id: w.leases
            for w in self.store.list_workers()
            if w.heartbeat_at >= horizon or w.worker_id == self.worker_id
        }

    @property
    def held(self) -> dict[tuple[str, str], Lease]:
        """The leases this process holds."""
        return self.leases.held

    def _renew(self) -> None:
        """Renew every held lease (:meth:`Leases.renew`); stop the workers of those lost."""
        for key in self.leases.renew(self._progress, self.generations):
            self._drop(key)

    def _progress(self, key: tuple[str, str]) -> Progress:
        run = self.running.get(key)
        if run is None:
            return Progress()
        w = run.worker
        return Progress(w.lag, w.caught_up, w.tip_seen_at)

    def _drop(self, key: tuple[str, str]) -> None:
        self.leases.forget(key)
        self.failures.pop(key, None)
        run = self.running.pop(key, None)
        if run is not None:
            run.stop.set()

    def _reap_and_start(self, now: float) -> None:
        for key, run in list(self.running.items()):
            if run.thread.is_alive():
                if run.worker.records_read or run.worker.caught_up:
                    self.failures.pop(key, None)  # it works again: a later crash starts over
                continue
            del self.running[key]
            if run.worker.finished or key not in self.held:
                if run.worker.finished:
                    self.leases.release(key)
                continue
            if run.worker.crashed is not None:
                count, _ = self.failures.get(key, (0, 0.0))
                delay = min(
                    self.settings.restart_backoff * 2**count, self.settings.max_restart_backoff
                )
                self.failures[key] = (count + 1, now + delay)
                metrics.SHARD_FAILURES.labels(key[0]).inc()
                log.error(
                    "worker for %s/%s crashed (%d times in a row): %s; restarting in %.0fs",
                    *key,
                    count + 1,
                    run.worker.crashed,
                    delay,
                )
            else:
                # stopped for a reason it already reported (trimmed, halted, stream gone):
                # give the lease back so that `status` shows its state, and do not loop on it
                self.leases.release(key)
        if self.stopping.is_set():
            return
        for key, lease in self.held.items():
            if key in self.running:
                continue
            _, retry_at = self.failures.get(key, (0, 0.0))
            if now < retry_at:
                continue
            self._start(key, lease)

    def _start(self, key: tuple[str, str], lease: Lease) -> None:
        info = self.table_info[key[0]]
        stop = threading.Event()
        worker = ShardWorker(
            lease,
            self.client,
            self.pipeline,
            self.store,
            info.key_names,
            self.settings.worker,
            stop=stop,
            on_shard_end=self._on_shard_end,
            lease_valid=lambda: self.leases.valid(key, lease.token),
            generations=lambda: self.leases.published(key, lease.token),
            clock=self.wall_clock,
        )
        thread = threading.Thread(
            target=worker.run_guarded, name=f"shard-{key[1][-12:]}", daemon=True
        )
        self.running[key] = _Running(worker, thread, stop)
        thread.start()

    def _on_shard_end(self, lease: Lease) -> None:
        self._wake.set()

    # --- lifecycle ----------------------------------------------------------------------
    def caught_up(self) -> bool:
        """True when every readable shard is held here, read to its end, and idle."""
        for table in self.tables:
            leases = self._leases.get(table, [])
            by_id = {lease.shard_id: lease for lease in leases}
            for lease in leases:
                if not takeable(lease, by_id):
                    continue
                run = self.running.get((table, lease.shard_id))
                if run is None or not run.worker.caught_up:
                    return False
        return bool(self._leases) and not self._wake.is_set()

    def healthy(self) -> bool:
        """For the systemd watchdog: the supervisor loop turned recently (or is draining)."""
        if self.stopping.is_set():
            return True
        return self.clock() - self._last_tick < self.settings.lease_duration * 2

    def summary(self) -> tuple[int, float]:
        """(shards held, worst lag in seconds) for STATUS lines and `status`."""
        lags = [r.worker.lag or 0.0 for r in self.running.values()]
        return len(self.held), max(lags, default=0.0)

    def run(
        self, *, until_caught_up: bool = False, on_tick: Callable[[Supervisor], None] | None = None
    ) -> None:
        """Run rounds until :meth:`request_stop` (or until caught up), then drain."""
        self.store.ensure()
        if self.start is not None:
            self.start()
        interval = self.settings.lease_duration / 3
        failures = 0
        try:
            while not self.stopping.is_set():
                try:
                    self.tick()
                except SupervisorFatal:
                    raise
                except Exception as exc:
                    # DynamoDB unreachable, throttled, a 5xx: the round is retried; workers keep
                    # their leases until those expire, and the watchdog (healthy()) notices a
                    # loop that keeps failing. A batch run (--until-caught-up) gives up instead.
                    failures += 1
                    if until_caught_up and failures >= 20:
                        raise
                    log.error(
                        "supervisor round failed (retrying): %s",
                        exc,
                        exc_info=log.isEnabledFor(logging.DEBUG),
                    )
                    self._wake.wait(min(1.0, self.settings.lease_duration / 3))
                    continue
                failures = 0
                if on_tick is not None:
                    on_tick(self)
                if until_caught_up and self.caught_up():
                    break
                self._wake.wait(min(interval, 0.2) if until_caught_up else interval)
        finally:
            self.shutdown()

    def request_stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def shutdown(self) -> None:
        """Stop workers after their batch in flight, release leases, leave the worker table."""
        self.stopping.set()
        for run in self.running.values():
            run.stop.set()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        for run in self.running.values():
            run.thread.join(max(0.0, deadline - time.monotonic()))
        done = []
        for key in self.held:
            still = self.running.get(key)
            if still is not None and still.thread.is_alive():
                log.warning("worker for %s/%s did not stop in time; its lease will expire", *key)
            else:
                done.append(key)
        self.leases.release_all(done)
        self.running.clear()
        try:
            self.store.delete_worker(self.worker_id)
        except Exception as exc:
            log.warning("could not remove worker record: %s", exc)
        metrics.LEASES.set(0)
        # after the rounds (run() calls this once its loop has left tick()): nothing in flight
        self.leases.close()
