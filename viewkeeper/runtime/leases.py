"""This process's leases: taking, renewing, balancing, and how long each stays valid.

Leases (as KCL): each lease has an owner and a counter. The owner renews every
``lease_duration / 3`` by raising the counter with a conditional write. Another process that
sees a lease's counter unchanged for ``lease_duration`` (on its own clock, so no clock skew
matters; measured from when the counter was *read*, not from the start of the round) may
take it with a conditional write on the counter it saw. Balancing aims at a fair share
(ceil(leases / live workers)); a process under its share first takes free or expired
leases, then steals at most one lease per round from the most loaded worker, and only from
one holding at least two more than itself, so leases do not ping-pong.

Renewals are one conditional write per lease (5-10 ms each against DynamoDB), so a process
with hundreds of leases renews them concurrently, ``renew_threads`` (default 8) at a time
from one pool kept for the process's life: 500 leases take ~0.5 s a round instead of ~4 s,
well inside the renewal period. Taking free leases (start-up, a dead peer's leases) and
releasing them at shutdown use the same pool, never more takes in flight than the fair
share still wants. The results are applied on the supervisor's thread; a lease counts as
renewed from the moment its write was *sent* (never from when it returned, which would
stretch its validity beyond what the store granted).

Takes and renewals publish the views' generations this process adopted in the lease
(``Lease.gens``, merged by the store with what the lease said); a worker stamps its pages
with what its lease has published (:meth:`Leases.published`), and sees its lease valid
(:meth:`Leases.valid`) only under its own take (the lease's token) — a worker of an
earlier take by the same process sees it invalid.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial

from viewkeeper.coordination.model import CoordinationStore, Lease, LeaseState

__all__ = ["Key", "Leases", "Progress", "takeable"]

log = logging.getLogger("viewkeeper.runtime.leases")

Key = tuple[str, str]  # (table, shard id)


@dataclass(frozen=True, slots=True)
class Progress:
    """What a renewal tells the lease table about its shard's reader."""

    lag: float | None = None
    caught_up: bool = False
    tip_seen_at: float | None = None  # when a read came back empty (see the worker)


@dataclass
class _Seen:
    counter: int
    owner: str | None
    since: float


def takeable(lease: Lease, by_id: Mapping[str, Lease]) -> bool:
    """An ACTIVE lease whose parents (those still listed) are all ENDED: a shard's
    children are read only after every record of the parent is applied."""
    if lease.state is not LeaseState.ACTIVE:
        return False
    return all(by_id[p].state is LeaseState.ENDED for p in lease.parents if p in by_id)


class Leases:
    """The leases one process holds (``held``) and when each was last renewed."""

    def __init__(
        self,
        store: CoordinationStore,
        worker_id: str,
        lease_duration: float,
        threads: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threads < 1:
            raise ValueError(f"renew_threads must be at least 1, not {threads}")
        self.store = store
        self.worker_id = worker_id
        self.lease_duration = lease_duration
        self.clock = clock
        self.held: dict[Key, Lease] = {}
        self.renewed_at: dict[Key, float] = {}  # on self.clock: when the write was sent
        self._seen: dict[Key, _Seen] = {}
        # threads start on demand: never more than there are leases to renew at once
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"viewkeeper-renew-{worker_id}"
        )

    # --- what a worker asks -------------------------------------------------------------
    def valid(self, key: Key, token: str | None = None) -> bool:
        """True while this process renewed ``key`` within lease_duration (on its own clock)
        — under the take whose ``token`` is given: past that, another process (or another
        take of this one) may hold it, so its worker must not apply."""
        at = self.renewed_at.get(key)
        held = self.held.get(key)
        if token is not None and (held is None or held.token != token):
            return False
        return at is not None and self.clock() - at < self.lease_duration

    def published(self, key: Key, token: str | None) -> dict[str, int]:
        """The generations lease ``key`` shows for the take ``token`` (what its worker
        stamps with); nothing (all 0) for a take this process no longer holds."""
        held = self.held.get(key)
        return held.gens if held is not None and held.token == token else {}

    # --- renewing -----------------------------------------------------------------------
    def renew(self, progress: Callable[[Key], Progress], gens: Mapping[str, int]) -> list[Key]:
        """Renew every held lease, ``threads`` at a time; the keys the store refused (lost
        to another process: forgotten here, the caller stops their workers). An exception
        (DynamoDB unreachable, ...) fails the round: renewals not yet started are not
        started, the ones already sent are awaited and their results kept (a renewal that
        reached the store raised the counter, so forgetting it would lose the lease next
        round), and the first exception in ``held`` order is raised."""
        futures: dict[Key, Future[tuple[float, Lease | None]]] = {}
        for key, lease in self.held.items():
            p = progress(key)
            futures[key] = self._pool.submit(
                self._sent,
                partial(self.store.renew_lease, tip_at=p.tip_seen_at, gens=gens),
                lease,
                p.lag,
                p.caught_up,
            )
        if not futures:
            return []
        _, pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
        if pending:  # one failed: start no more, but wait for those already sent
            for fut in pending:
                fut.cancel()
            wait(pending)
        error: BaseException | None = None
        lost: list[Key] = []
        for key, fut in futures.items():
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is not None:
                if error is None:
                    error = exc
                continue
            started, renewed = fut.result()
            if renewed is None:
                log.warning("lost lease %s/%s to another worker", *key)
                self.forget(key)
                lost.append(key)
            else:
                self.held[key] = renewed
                self.renewed_at[key] = started
        if error is not None:
            raise error
        return lost

    def forget(self, key: Key) -> Lease | None:
        """No longer held here (lost, released, given back); the lease it was."""
        self.renewed_at.pop(key, None)
        return self.held.pop(key, None)

    def _sent(
        self, write: Callable[..., Lease | None], *args: object
    ) -> tuple[float, Lease | None]:
        """In a pool thread: the time a lease write (renew, take) was sent — the
        conservative start of the validity it grants — and the store's answer."""
        started = self.clock()
        return started, write(*args)

    # --- taking -------------------------------------------------------------------------
    def _expired(self, key: Key, lease: Lease, now: float) -> bool:
        if lease.owner is None:
            return True
        seen = self._seen.get(key)
        if seen is None or seen.counter != lease.counter or seen.owner != lease.owner:
            self._seen[key] = _Seen(lease.counter, lease.owner, now)
            return False
        return now - seen.since >= self.lease_duration

    def acquire(
        self,
        listing: Mapping[str, list[Lease]],
        now: float,
        live: Mapping[str, int],
        gens: Mapping[str, int],
    ) -> bool:
        """Take free, expired or (one) stolen leases of ``listing`` (per table, read at
        ``now``) up to the fair share among the ``live`` workers; True when one was taken."""
        candidates: list[Lease] = []
        owned_by: dict[str, list[Lease]] = {}
        expired_owners: set[str] = set()
        total = 0
        for table, leases in listing.items():
            by_id = {lease.shard_id: lease for lease in leases}
            for lease in leases:
                if not takeable(lease, by_id):
                    continue
                total += 1
                key = (table, lease.shard_id)
                if key in self.held:
                    continue
                if self._expired(key, lease, now):
                    candidates.append(lease)
                    if lease.owner is not None:
                        expired_owners.add(lease.owner)
                elif lease.owner is not None:
                    owned_by.setdefault(lease.owner, []).append(lease)
        # a worker whose every lease has expired is gone, whatever its last heartbeat says
        dead = expired_owners - owned_by.keys() - {self.worker_id}
        target = math.ceil(total / max(1, len(live.keys() - dead)))
        mine = len(self.held)
        took = False
        while candidates and mine < target:  # never more takes in flight than still wanted
            chunk, candidates = candidates[: target - mine], candidates[target - mine :]
            taken = self.take_many(chunk, gens)
            mine += taken
            took = took or taken > 0
        if mine < target and owned_by:
            busiest, theirs = max(owned_by.items(), key=lambda kv: len(kv[1]))
            if len(theirs) >= mine + 2:
                victim = sorted(theirs, key=lambda lease: lease.shard_id)[-1]
                log.info(
                    "stealing lease %s/%s from %s (%d leases, fair share %d)",
                    victim.table,
                    victim.shard_id,
                    busiest,
                    len(theirs),
                    target,
                )
                took = self.take_many([victim], gens) == 1 or took
        return took

    def take_many(self, leases: list[Lease], gens: Mapping[str, int]) -> int:
        """Take ``leases`` (conditional writes), ``threads`` at a time in the pool: hundreds
        of free leases at start-up or after a peer died are taken in a fraction of the
        round they took one by one. Every take that reached the store is recorded, even
        when another one raised (that exception is raised afterwards); a lease counts as
        renewed from when its take was sent."""
        outcomes: list[tuple[float, Lease | None] | BaseException] = []
        if len(leases) == 1:
            try:
                outcomes.append(self._sent(self.store.take_lease, leases[0], self.worker_id, gens))
            except Exception as exc:
                outcomes.append(exc)
        else:
            futures = [
                self._pool.submit(self._sent, self.store.take_lease, lease, self.worker_id, gens)
                for lease in leases
            ]
            wait(futures)
            outcomes = [fut.exception() or fut.result() for fut in futures]
        error: BaseException | None = None
        taken_count = 0
        for lease, outcome in zip(leases, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                error = error or outcome
                continue
            started, taken = outcome
            if taken is None:
                continue
            log.info(
                "took lease %s/%s (checkpoint %s)", lease.table, lease.shard_id, taken.checkpoint
            )
            self.held[(lease.table, lease.shard_id)] = taken
            self.renewed_at[(lease.table, lease.shard_id)] = started
            taken_count += 1
        if error is not None:
            raise error
        return taken_count

    # --- giving back --------------------------------------------------------------------
    def release(self, key: Key) -> None:
        """Give ``key`` back now (its shard ended, or its worker stopped for a reason it
        reported)."""
        lease = self.forget(key)
        if lease is not None:
            self.store.release_lease(lease)

    def release_all(self, keys: Iterable[Key]) -> None:
        """Release ``keys`` at shutdown, in the pool (hundreds in a fraction of a second),
        best effort (a lease not released expires anyway); forget everything held."""
        releases = {
            key: self._pool.submit(self.store.release_lease, self.held[key])
            for key in keys
            if key in self.held
        }
        for key, fut in releases.items():
            exc = fut.exception()
            if exc is not None:
                log.warning("could not release lease %s/%s: %s", *key, exc)
        self.held.clear()
        self.renewed_at.clear()

    def close(self) -> None:
        """After the last round: nothing is in flight."""
        self._pool.shutdown(wait=True, cancel_futures=True)
