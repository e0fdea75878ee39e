"""Lease renewal runs concurrently in a bounded pool (runtime/leases.py, Leases.renew).

No services: one :class:`Supervisor` on a :class:`FakeStream` table with empty shards, a
:class:`MemoryStore` whose ``renew_lease`` can be gated (a :class:`threading.Barrier` that only
trips when ``parties`` renewals are in flight at once, so a sequential loop fails it), made to
fail for one shard, and that records concurrency, the threads used, and when each call began.
The supervisor's clock is a :class:`ManualClock` that a renewal may move while it is in flight
(a slow call), so the test can tell the time a renewal was sent from the time it returned.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import Lease
from viewkeeper.projection.registry import ViewRegistry
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import WorkerSettings
from viewkeeper.stream.fake import FakeStream, ManualClock

Key = tuple[str, str]


class GatedStore(MemoryStore):
    """A MemoryStore whose renewals can block on a barrier, fail, or take (manual) time."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.barrier: threading.Barrier | None = None
        self.fail_shard: str | None = None
        self.slow_by = 0.0  # the manual clock moves this much during every renewal
        self._count_lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.threads: set[str] = set()
        self.sent_at: dict[Key, float] = {}

    def renew_lease(
        self, lease: Lease, lag: float | None, caught_up: bool, **kwargs: Any
    ) -> Lease | None:
        with self._count_lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.threads.add(threading.current_thread().name)
            self.sent_at[(lease.table, lease.shard_id)] = self.clock()
        try:
            if self.barrier is not None:
                self.barrier.wait()  # BrokenBarrierError (after its timeout) when sequential
            if lease.shard_id == self.fail_shard:
                raise ConnectionError("DynamoDB unreachable (simulated)")
            renewed = super().renew_lease(lease, lag, caught_up, **kwargs)
            if self.slow_by:
                self.clock.advance(self.slow_by)
            return renewed
        finally:
            with self._count_lock:
                self.in_flight -= 1

    def reset_counts(self) -> None:
        with self._count_lock:
            self.in_flight = self.max_in_flight = self.calls = 0
            self.threads.clear()
            self.sent_at.clear()


class Bed:
    def __init__(self, shards: int, **settings: Any) -> None:
        self.clock = ManualClock()
        self.fake = FakeStream()
        self.fake.create_table("fk", ("pk",), shards=shards)
        self.store = GatedStore(self.clock)
        self.worker_id = f"renew-test-{uuid.uuid4().hex[:8]}"
        defaults: dict[str, Any] = {
            "lease_duration": 6.0,  # on the manual clock; run() also waits a third of it
            "discovery_interval": 3600.0,
            "starting_positions": {"fk": "TRIM_HORIZON"},
            "worker": WorkerSettings(poll_interval=0.05, busy_poll_interval=0.0),
            **settings,
        }
        self.sup = Supervisor(
            ["fk"],
            self.fake,
            self.store,
            lambda generation_of: Pipeline(ViewRegistry(), {}, self.store, generation_of),
            SupervisorSettings(**defaults),
            worker_id=self.worker_id,
            clock=self.clock,
        )

    def take_all(self) -> None:
        """First round: discovery and acquisition (nothing held yet, so nothing renewed)."""
        self.sup.tick()
        assert len(self.sup.held) == len(self.fake.list_shards(self.arn)), self.sup.held
        assert self.store.calls == 0

    @property
    def arn(self) -> str:
        arn = self.sup.table_info["fk"].stream_arn
        assert arn is not None
        return arn

    def counters(self) -> dict[Key, int]:
        return {("fk", lease.shard_id): lease.counter for lease in self.store.list_leases("fk")}

    def renewer_threads(self) -> list[threading.Thread]:
        prefix = f"viewkeeper-renew-{self.worker_id}"
        return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.fixture
def bed_factory() -> Iterator[Callable[..., Bed]]:
    made: list[Bed] = []

    def factory(shards: int, **settings: Any) -> Bed:
        bed = Bed(shards, **settings)
        made.append(bed)
        return bed

    yield factory
    for bed in made:
        bed.store.barrier = None
        bed.store.fail_shard = None
        bed.sup.shutdown()


def test_renewals_run_concurrently_up_to_the_bound(bed_factory: Callable[..., Bed]) -> None:
    bound = 4
    bed = bed_factory(20, renew_threads=bound)
    bed.take_all()
    before = bed.counters()
    # trips only with `bound` renewals in flight together; every thread meets it 5 times
    bed.store.barrier = threading.Barrier(bound, timeout=20)
    bed.sup.tick()
    assert bed.store.calls == 20
    assert bed.store.max_in_flight == bound
    assert len(bed.store.threads) == bound, bed.store.threads
    assert all(name.startswith(f"viewkeeper-renew-{bed.worker_id}") for name in bed.store.threads)
    assert bed.counters() == {k: c + 1 for k, c in before.items()}
    assert {k: lease.counter for k, lease in bed.sup.held.items()} == bed.counters()


def test_the_pool_uses_no_more_threads_than_there_are_leases(
    bed_factory: Callable[..., Bed],
) -> None:
    bed = bed_factory(3)  # default bound (8) > 3 leases
    assert bed.sup.settings.renew_threads > 3
    bed.take_all()
    bed.store.barrier = threading.Barrier(3, timeout=20)
    bed.sup.tick()
    assert bed.store.max_in_flight == 3
    assert len(bed.store.threads) == 3


def test_renewed_at_is_when_the_renewal_was_sent_not_when_it_returned(
    bed_factory: Callable[..., Bed],
) -> None:
    bed = bed_factory(6, renew_threads=3)
    bed.take_all()
    bed.clock.advance(2.0)
    round_start = bed.clock()
    bed.store.slow_by = 1.0  # every renewal moves the clock while it is in flight
    bed.sup.tick()
    assert bed.clock() == round_start + 6.0
    assert set(bed.store.sent_at) == set(bed.sup.held)
    for key, at in bed.sup.leases.renewed_at.items():
        assert round_start <= at <= bed.store.sent_at[key], (key, at, bed.store.sent_at[key])
    # so validity ends no later than lease_duration after the write was sent
    bed.clock.now = max(bed.store.sent_at.values()) + bed.sup.settings.lease_duration
    assert not any(bed.sup.leases.valid(key) for key in bed.sup.held)


def test_a_lost_lease_is_dropped_and_its_worker_stopped_while_the_others_stay(
    bed_factory: Callable[..., Bed],
) -> None:
    bed = bed_factory(6, renew_threads=3)
    bed.take_all()
    before = bed.counters()
    renewed_at = dict(bed.sup.leases.renewed_at)
    lost = sorted(bed.sup.held)[2]
    stop = bed.sup.running[lost].stop
    stolen = bed.store.take_lease(bed.sup.held[lost], "thief")  # another process took it
    assert stolen is not None
    bed.clock.advance(2.0)
    bed.store.barrier = threading.Barrier(3, timeout=20)  # concurrently; 1 of 6 is refused
    bed.sup.tick()
    assert bed.store.calls == 6
    assert lost not in bed.sup.held and lost not in bed.sup.leases.renewed_at
    assert lost not in bed.sup.running
    assert stop.is_set()
    kept = set(before) - {lost}
    assert set(bed.sup.held) == kept
    for key in kept:
        assert bed.sup.held[key].counter == before[key] + 1 == bed.counters()[key]
        assert bed.sup.leases.renewed_at[key] > renewed_at[key]
        assert not bed.sup.running[key].stop.is_set()
    assert bed.store.list_leases("fk")[sorted(before).index(lost)].owner == "thief"


def test_a_failing_renewal_fails_the_round_and_loses_nothing(
    bed_factory: Callable[..., Bed],
) -> None:
    bed = bed_factory(12, renew_threads=4)
    bed.take_all()
    held_before = dict(bed.sup.held)
    renewed_at = dict(bed.sup.leases.renewed_at)
    failing = sorted(bed.sup.held)[5]
    bed.store.fail_shard = failing[1]
    bed.clock.advance(2.0)
    with pytest.raises(ConnectionError, match="simulated"):
        bed.sup.tick()  # as before: the exception leaves tick(); run() logs it and retries
    # the failing lease is kept (not lost), its validity not extended, its worker running
    assert bed.sup.held[failing] == held_before[failing]
    assert bed.sup.leases.renewed_at[failing] == renewed_at[failing]
    assert not bed.sup.running[failing].stop.is_set()
    # nothing dropped; every renewal that reached the store is recorded (else it is lost)
    assert set(bed.sup.held) == set(held_before)
    store = bed.counters()
    for key, lease in bed.sup.held.items():
        assert lease.counter == store[key], key
        moved = lease.counter != held_before[key].counter
        assert (bed.sup.leases.renewed_at[key] > renewed_at[key]) == moved, key
    # the store comes back: the next round renews every lease, none lost
    bed.store.fail_shard = None
    bed.store.reset_counts()
    bed.sup.tick()
    assert bed.store.calls == 12
    assert set(bed.sup.held) == set(held_before)
    assert {k: lease.counter for k, lease in bed.sup.held.items()} == bed.counters()


def test_run_retries_a_round_whose_renewal_failed(bed_factory: Callable[..., Bed]) -> None:
    bed = bed_factory(4, renew_threads=2, lease_duration=0.3)
    bed.take_all()
    failing = sorted(bed.sup.held)[1]
    bed.store.fail_shard = failing[1]
    original = bed.store.renew_lease
    failed = [0]

    def fail_once(lease: Lease, lag: float | None, caught: bool, **kwargs: Any) -> Lease | None:
        try:
            return original(lease, lag, caught, **kwargs)
        except ConnectionError:
            failed[0] += 1
            bed.store.fail_shard = None  # DynamoDB is back for the next round
            raise

    bed.store.renew_lease = fail_once  # type: ignore[method-assign]
    seen: list[tuple[dict[Key, int], dict[Key, int]]] = []

    def on_tick(sup: Supervisor) -> None:  # only after a round that did not fail
        seen.append(({k: lease.counter for k, lease in sup.held.items()}, bed.counters()))
        sup.request_stop()

    bed.sup.run(on_tick=on_tick)
    assert failed == [1]
    assert len(seen) == 1
    held, store = seen[0]
    assert held == store and len(held) == 4  # the retried round renewed all, lost none
    assert bed.renewer_threads() == []


def test_the_pool_is_shut_down_when_the_supervisor_stops(
    bed_factory: Callable[..., Bed],
) -> None:
    bed = bed_factory(5, renew_threads=3, lease_duration=0.3)
    rounds = [0]
    alive: list[int] = []

    def on_tick(sup: Supervisor) -> None:
        rounds[0] += 1
        alive.append(len(bed.renewer_threads()))  # kept between rounds, not made per round
        if rounds[0] == 3:
            sup.request_stop()

    thread = threading.Thread(target=bed.sup.run, kwargs={"on_tick": on_tick}, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert rounds[0] == 3
    # round 1 took the 5 leases in the pool, rounds 2 and 3 renewed them with the same threads
    assert all(1 <= n <= 3 for n in alive) and alive == sorted(alive), alive
    assert bed.store.calls == 10  # rounds 2 and 3 renewed the 5 leases
    assert bed.renewer_threads() == []
    assert bed.sup.held == {}


def test_shutdown_releases_leases_concurrently_and_one_failure_spares_the_others(
    bed_factory: Callable[..., Bed],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bed = bed_factory(6, renew_threads=3)
    bed.take_all()
    failing = sorted(bed.sup.held)[2][1]
    barrier = threading.Barrier(3, timeout=20)  # trips only with 3 releases in flight
    real = bed.store.release_lease

    def release(lease: Lease) -> None:
        barrier.wait()
        if lease.shard_id == failing:
            raise ConnectionError("DynamoDB unreachable (simulated)")
        real(lease)

    monkeypatch.setattr(bed.store, "release_lease", release)
    bed.sup.shutdown()
    owners = {lease.shard_id: lease.owner for lease in bed.store.list_leases("fk")}
    assert owners.pop(failing) == bed.worker_id  # left to expire
    assert set(owners.values()) == {None}, owners  # the other five released
    assert f"could not release lease fk/{failing}" in caplog.text
    assert bed.renewer_threads() == []


class GatedTakes(GatedStore):
    """Takes gated like renewals: a barrier, and one shard whose take fails."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.take_barrier: threading.Barrier | None = None
        self.fail_take: str | None = None
        self.take_threads: set[str] = set()

    def take_lease(self, lease: Lease, owner: str, gens: Any = None) -> Lease | None:
        with self._count_lock:
            self.take_threads.add(threading.current_thread().name)
        if self.take_barrier is not None:
            self.take_barrier.wait()
        if lease.shard_id == self.fail_take:
            raise ConnectionError("DynamoDB unreachable (simulated)")
        return super().take_lease(lease, owner, gens)


def _with_gated_takes(bed: Bed) -> GatedTakes:
    store = GatedTakes(bed.clock)
    bed.store = store
    bed.sup.store = store
    bed.sup.leases.store = store
    return store


def test_free_leases_are_taken_concurrently_up_to_the_fair_share(
    bed_factory: Callable[..., Bed],
) -> None:
    bed = bed_factory(12, renew_threads=4)
    store = _with_gated_takes(bed)
    store.take_barrier = threading.Barrier(4, timeout=20)  # a sequential loop breaks it
    bed.sup.tick()
    assert len(bed.sup.held) == 12
    assert len(store.take_threads) == 4
    assert {lease.owner for lease in store.list_leases("fk")} == {bed.worker_id}


def test_a_failing_take_fails_the_round_but_the_others_are_held(
    bed_factory: Callable[..., Bed],
) -> None:
    bed = bed_factory(6, renew_threads=3)
    store = _with_gated_takes(bed)
    bed.sup.discover()
    failing = sorted(lease.shard_id for lease in store.list_leases("fk"))[1]
    store.fail_take = failing
    with pytest.raises(ConnectionError):
        bed.sup.tick()
    owners = {lease.shard_id: lease.owner for lease in store.list_leases("fk")}
    assert owners.pop(failing) is None
    assert set(owners.values()) == {bed.worker_id}  # every take that reached the store...
    assert {k[1] for k in bed.sup.held} == set(owners)  # ...is known to be held
    store.fail_take = None
    bed.sup.tick()
    assert len(bed.sup.held) == 6
