"""The generation belongs to the record, not to the applier (I6, I3 across rebuilds).

A record read before a rebuild's handshake carries the old generation wherever and whenever
it is applied (a retry, a dead-letter replay, another process after a lease move); one
read after carries the new one. These tests put each applier of the issue-13 review in
front of a rebuild, on the fake stream and the real Redis.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import redis_view_keys
from tests.views_e2e.fake_views import expected
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.registry import load_views
from viewkeeper.projection.versions import Version
from viewkeeper.runtime.deadletters import replay
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.rebuild import RebuildSettings, rebuild
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.fake import FakeStream

VIEWS = load_views(["tests.views_e2e.fake_views"])
TABLE, KEYS = "fk", ("pk",)


class Bed:
    """A fake table ``fk`` with one shard, a memory coordination store and the real Redis."""

    def __init__(self, redis_client: Any) -> None:
        self.fake = FakeStream()
        self.fake.create_table(TABLE, KEYS)
        self.store = MemoryStore()
        self.redis = redis_client
        self.sink = RedisSink("cache", redis_client)
        self.sink.prepare(list(VIEWS))
        self.iterator: str | None = None

    def pipeline(self, generation_of: Any = None) -> Pipeline:
        if generation_of is None:

            def generation_of(view: str) -> int:
                return self.store.generations().get(view, 0)

        return Pipeline(VIEWS, {("redis", "cache"): self.sink}, self.store, generation_of)

    def read(self) -> list[Any]:
        """The records written since the last read (one shard)."""
        if self.iterator is None:
            arn = self.fake.describe_table(TABLE).stream_arn
            assert arn is not None
            (shard,) = self.fake.list_shards(arn)
            self.iterator = self.fake.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON")
        page = self.fake.get_records(self.iterator, 1000)
        self.iterator = page.next_iterator
        return page.records

    def rebuild(self) -> None:
        rebuild(
            list(VIEWS),
            VIEWS,
            self.fake,
            self.store,
            self.pipeline,
            RebuildSettings(segments=1, handshake_timeout=5),
            out=io.StringIO(),
        )

    def sink_holds_the_table(self) -> None:
        assert redis_view_keys(self.redis) == expected(self.fake.contents(TABLE))


@pytest.fixture
def bed(redis_client: Any) -> Iterator[Bed]:
    yield Bed(redis_client)


def test_dead_letter_replay_after_a_rebuild_does_not_overwrite_newer_data(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #13 case 1: a record dead-lettered at s1, a later record s2 of the item
    applied, then a rebuild writes (G, 0); replaying the dead letter must lose: it is
    older than what the scan read. Before, replay stamped it (G, s1), which beat (G, 0)."""
    monkeypatch.setenv("VK_TEST_BOOM", "1")  # the view fails on v == -1 ...
    bed.fake.put_item(TABLE, {"pk": "x", "v": -1, "g": "a"})
    report = bed.pipeline().process(TABLE, KEYS, bed.read())
    assert report.dead_lettered == 1
    bed.fake.put_item(TABLE, {"pk": "x", "v": 2, "g": "b"})
    assert bed.pipeline().process(TABLE, KEYS, bed.read()).applied == 1
    bed.rebuild()
    bed.sink_holds_the_table()
    monkeypatch.setenv("VK_TEST_BOOM", "0")  # ... until the view is fixed, then replayed
    replayed = replay(bed.store, bed.pipeline(), lambda table: KEYS)
    assert (replayed.replayed, replayed.applied, replayed.stale) == (1, 0, 1)
    bed.sink_holds_the_table()  # x is still {v: 2, g: b}, not the dead letter's -1


def test_dead_letter_replay_after_a_rebuild_does_not_resurrect_a_deleted_item(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same mechanism, with a delete: the REMOVE's tombstone is (0, s2); a replay
    stamped with the rebuild's generation (1, s1) would bring x back."""
    monkeypatch.setenv("VK_TEST_BOOM", "1")
    bed.fake.put_item(TABLE, {"pk": "x", "v": 5, "g": "a"})
    bed.fake.put_item(TABLE, {"pk": "x", "v": -1, "g": "a"})
    bed.pipeline().process(TABLE, KEYS, bed.read())  # the newest (-1) is dead-lettered
    bed.fake.delete_item(TABLE, {"pk": "x"})
    bed.fake.put_item(TABLE, {"pk": "y", "v": 1, "g": "a"})
    bed.pipeline().process(TABLE, KEYS, bed.read())
    bed.rebuild()
    bed.sink_holds_the_table()
    monkeypatch.setenv("VK_TEST_BOOM", "0")
    replayed = replay(bed.store, bed.pipeline(), lambda table: KEYS)
    assert replayed.stale == 1 and replayed.applied == 0
    bed.sink_holds_the_table()  # no fk:x


# --- the handshake: based on leases, not on wall clocks --------------------------------------
def _lease_held_by(store: MemoryStore, owner: str) -> Any:
    from viewkeeper.coordination.model import Lease

    store.create_lease(Lease(TABLE, "shard-1", "arn:stream"))
    taken = store.take_lease(store.list_leases(TABLE)[0], owner)
    assert taken is not None
    return taken


def _handshake(store: MemoryStore, timeout: float, lease_duration: float = 1.0) -> float:
    """Run only the handshake of a rebuild of every view; seconds it took."""
    import time

    from viewkeeper.runtime.rebuild import handshake

    gens = {v.name: store.raise_generation(v.name) for v in VIEWS}
    started = time.monotonic()
    handshake(
        store,
        [TABLE],
        gens,
        RebuildSettings(handshake_timeout=timeout, lease_duration=lease_duration),
        io.StringIO(),
    )
    return time.monotonic() - started


def test_handshake_waits_for_a_live_worker_whatever_its_clock_says() -> None:
    """Suspected in #13, confirmed: the handshake took a worker whose heartbeat_at looked
    20 s old on the rebuilding host's clock (skew, or a slow round) as dead, and scanned
    while it still stamped the old generation. Now a worker that holds a lease of the
    table and keeps renewing it is waited for until it acknowledges, whatever its clock."""
    import threading
    import time

    from viewkeeper.coordination.model import WorkerInfo
    from viewkeeper.runtime.rebuild import HandshakeTimeout

    store = MemoryStore()
    lease = _lease_held_by(store, "w-skewed")
    store.put_worker(WorkerInfo("w-skewed", time.time() - 3600, {}, "h", 1, 1, 0.0))
    stop = threading.Event()

    def renew() -> None:  # alive: renews its lease, but never acknowledges
        nonlocal lease
        while not stop.wait(0.1):
            lease = store.renew_lease(lease, 0.0, True) or lease

    t = threading.Thread(target=renew, daemon=True)
    t.start()
    try:
        with pytest.raises(HandshakeTimeout, match="w-skewed"):
            _handshake(store, timeout=2.5, lease_duration=1.0)
    finally:
        stop.set()
        t.join()
    assert store.list_leases(TABLE)[0].owner == "w-skewed"  # a live lease is never revoked


def test_handshake_revokes_the_lease_of_a_worker_that_stopped_renewing() -> None:
    """A worker that neither acknowledges nor renews (stalled, or dead without a goodbye)
    has its lease revoked once it is unchanged for a lease duration: its next renewal
    fails, so it can never apply a page stamped with the old generation."""
    import time

    from viewkeeper.coordination.model import WorkerInfo

    store = MemoryStore()
    lease = _lease_held_by(store, "w-stalled")
    store.put_worker(WorkerInfo("w-stalled", time.time(), {}, "h", 1, 1, 0.0))
    took = _handshake(store, timeout=10, lease_duration=1.0)
    assert 2.0 <= took < 6  # unchanged for a lease duration, revoked, one more duration
    revoked = store.list_leases(TABLE)[0]
    assert revoked.owner is None and revoked.gens == store.generations()
    assert store.renew_lease(lease, 0.0, True) is None


def test_handshake_passes_once_the_lease_holder_publishes_the_generation() -> None:
    import threading
    import time

    from viewkeeper.coordination.model import WorkerInfo

    store = MemoryStore()
    lease = _lease_held_by(store, "w-live")
    store.put_worker(WorkerInfo("w-live", time.time(), {}, "h", 1, 1, 0.0))

    def publish_later() -> None:  # the holder adopts the generation and renews with it
        nonlocal lease
        time.sleep(0.5)
        lease = store.renew_lease(lease, 0.0, True, gens=store.generations()) or lease

    t = threading.Thread(target=publish_later, daemon=True)
    t.start()
    took = _handshake(store, timeout=10, lease_duration=1.0)
    t.join()
    assert 1.4 < took < 5  # the publication, then one lease duration for its answer
    assert store.list_leases(TABLE)[0].owner == "w-live"
    assert store.renew_lease(lease, 0.0, True) is not None


# --- a lease taken during a rebuild ----------------------------------------------------------
def test_a_lease_taken_during_a_rebuild_is_read_with_the_new_generation(bed: Bed) -> None:
    """Suspected in #13, confirmed: a supervisor read the generations at the start of its
    round, a rebuild raised the generation and scanned (this supervisor held no lease, so
    the handshake did not wait for it), then the round took the lease and its worker
    stamped the old generation: the item's REMOVE went out as (G-1, seq), stale against
    the scan's (G, 0), and the deleted item survived the sweep. The handshake now writes
    the generation into the free lease (its counter moves: the take fails and is made
    again, from the lease's generations)."""
    import threading
    import time

    from viewkeeper.coordination.model import Lease
    from viewkeeper.projection.versions import Version
    from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
    from viewkeeper.runtime.worker import WorkerSettings
    from viewkeeper.sinks.base import Change

    bed.fake.put_item(TABLE, {"pk": "x", "v": 1, "g": "a"})
    bed.pipeline().process(TABLE, KEYS, bed.read())  # applied at (0, s1); checkpoint below
    arn = bed.fake.describe_table(TABLE).stream_arn
    assert arn is not None
    (shard,) = bed.fake.list_shards(arn)
    bed.store.create_lease(Lease(TABLE, shard.shard_id, arn, checkpoint=bed.fake.last_sequence))

    class RebuildBeforeTheTake(MemoryStore):
        """The rebuild runs between this round's generations read and its take."""

        def __init__(self, inner: MemoryStore) -> None:
            self.__dict__ = inner.__dict__
            self.done = False

        def take_lease(
            self, lease: Lease, owner: str, gens: dict[str, int] | None = None
        ) -> Lease | None:
            if not self.done:
                self.done = True
                (view,) = VIEWS
                gen = self.raise_generation(view.name)
                from viewkeeper.runtime.rebuild import handshake

                handshake(  # the lease is free: the handshake writes the generation in it
                    self,
                    [TABLE],
                    {view.name: gen},
                    RebuildSettings(lease_duration=0.1),
                    io.StringIO(),
                )
                scan = bed.pipeline().project_item(
                    _report(), view, TABLE, bed.fake.items(TABLE)[0], KEYS, Version(gen, "0")
                )
                assert isinstance(scan, Change)
                bed.sink.apply([scan])
                bed.fake.delete_item(TABLE, {"pk": "x"})  # after the scan read x
            return super().take_lease(lease, owner, gens)

    store = RebuildBeforeTheTake(bed.store)
    sup = Supervisor(
        [TABLE],
        bed.fake,
        store,
        bed.pipeline,
        SupervisorSettings(
            lease_duration=1.0,
            worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0),
        ),
    )
    t = threading.Thread(target=sup.run, kwargs={"until_caught_up": True}, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()
    (view,) = VIEWS
    bed.sink.sweep(view, bed.store.generations()[view.name], time.time())
    bed.sink_holds_the_table()  # x is gone


def _report() -> Any:
    from viewkeeper.runtime.pipeline import BatchReport

    return BatchReport()


# --- a page that arrives while the lease is in doubt ----------------------------------------
def test_a_page_read_while_the_lease_was_in_doubt_is_read_again_with_fresh_generations(
    bed: Bed,
) -> None:
    """Guards the rule that makes read-time stamping safe for a stalled process: the
    handshake may go on without a worker whose lease it revoked; a page that worker
    received meanwhile carries the old generation, so it is never applied — it is read
    again once the lease is renewed, stamped with the generations adopted by then."""
    import threading
    import time

    from viewkeeper.coordination.model import Lease
    from viewkeeper.runtime.worker import ShardWorker, WorkerSettings

    bed.fake.put_item(TABLE, {"pk": "x", "v": 1, "g": "a"})
    arn = bed.fake.describe_table(TABLE).stream_arn
    assert arn is not None
    (shard,) = bed.fake.list_shards(arn)
    bed.store.create_lease(Lease(TABLE, shard.shard_id, arn))
    lease = bed.store.take_lease(bed.store.list_leases(TABLE)[0], "me")
    assert lease is not None
    adopted: dict[str, int] = {}
    valid = threading.Event()
    valid.set()
    stop = threading.Event()
    worker = ShardWorker(
        lease,
        bed.fake,
        bed.pipeline(lambda view: 99),  # never used: pages carry their stamp
        bed.store,
        KEYS,
        WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0),
        stop=stop,
        lease_valid=valid.is_set,
        generations=lambda: adopted,
    )
    t = threading.Thread(target=worker.run_guarded, daemon=True)
    t.start()
    try:
        _wait(lambda: bed.store.list_leases(TABLE)[0].checkpoint == bed.fake.last_sequence)
        valid.clear()  # this process stalls; a rebuild revokes, raises and scans
        (view,) = VIEWS
        gen = bed.store.raise_generation(view.name)
        bed.sink.apply(
            [
                bed.pipeline().project_item(
                    _report(), view, TABLE, bed.fake.items(TABLE)[0], KEYS, Version(gen, "0")
                )
            ]
        )
        bed.fake.put_item(TABLE, {"pk": "x", "v": 2, "g": "a"})  # after the scan read x
        time.sleep(0.3)  # the worker receives it, stamped {} while its lease is in doubt
        adopted[view.name] = gen  # the process catches up: adopts, then renews
        valid.set()
        _wait(lambda: bed.store.list_leases(TABLE)[0].checkpoint == bed.fake.last_sequence)
        bed.sink_holds_the_table()  # x = 2: (G, s2) beat the scan's (G, 0)
    finally:
        stop.set()
        t.join(10)
    assert worker.crashed is None


def _wait(cond: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
