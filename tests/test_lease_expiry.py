"""Lease expiry and the lease guard, measured where it is safe (#13, suspected cases):
another process's lease is expired only a lease duration after its counter was *read*
(not after the start of the round that read it), and a page retried through a sink outage
is applied only while the lease is valid. No services but the fake stream and memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import Lease
from viewkeeper.projection.registry import ViewRegistry, load_views
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import ShardWorker, WorkerSettings
from viewkeeper.sinks.base import APPLIED, Change, Result, SinkUnavailable
from viewkeeper.stream.fake import FakeStream, ManualClock

TABLE = "fk"


class SlowListStore(MemoryStore):
    """list_leases takes ``slow_by`` seconds of the manual clock (a slow Query)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.slow_by = 0.0

    def list_leases(self, table: str) -> list[Lease]:
        self.clock.advance(self.slow_by)  # the answer is the table as it is at the end
        return super().list_leases(table)


def test_a_lease_is_not_taken_before_a_lease_duration_after_its_counter_was_read() -> None:
    """The taker measured expiry from the start of its round: a round whose Query of the
    leases took 1.5 s saw a counter the owner had just renewed, and a round 0.1 s later
    took the lease — while the owner's renewal was valid for most of a second more."""
    clock = ManualClock()
    fake = FakeStream()
    fake.create_table(TABLE, ("pk",))
    store = SlowListStore(clock)
    (shard,) = fake.open_shards(TABLE)
    arn = fake.describe_table(TABLE).stream_arn
    assert arn is not None
    store.create_lease(Lease(TABLE, shard, arn))
    owner = store.take_lease(store.list_leases(TABLE)[0], "owner-a")
    assert owner is not None
    sup = Supervisor(
        [TABLE],
        fake,
        store,
        lambda generation_of: Pipeline(ViewRegistry(), {}, store, generation_of),
        SupervisorSettings(lease_duration=1.0, discovery_interval=3600.0),
        worker_id="taker-b",
        clock=clock,
    )
    store.slow_by = 1.5
    sup.tick()  # sees owner-a's counter at the end of a 1.5 s read
    store.slow_by = 0.0
    clock.advance(0.1)
    sup.tick()  # 0.1 s after that read: owner-a's lease is valid, not expired
    assert store.list_leases(TABLE)[0].owner == "owner-a"
    clock.advance(0.95)
    sup.tick()  # a lease duration after the read, the counter unchanged: expired
    assert store.list_leases(TABLE)[0].owner == "taker-b"
    sup.shutdown()


class OutageSink:
    """Unavailable until ``up`` is set; records whether it applied while the lease was bad."""

    name = "cache"

    def __init__(self, lease_ok: threading.Event) -> None:
        self.up = threading.Event()
        self.lease_ok = lease_ok
        self.applied_while_invalid = 0
        self.applied = 0

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        if not self.up.is_set():
            raise SinkUnavailable("cache: down (injected)")
        if not self.lease_ok.is_set():
            self.applied_while_invalid += 1
        self.applied += 1
        return [APPLIED for _ in changes]

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def test_a_page_retried_through_a_sink_outage_waits_for_a_valid_lease() -> None:
    """_process did not re-check the lease across its retries: a page retried through a
    long sink outage was applied as soon as the sink came back, even when the lease had
    not been renewed for longer than its duration by then (another process may hold it)."""
    views = load_views(["tests.views_e2e.fake_views"])
    fake = FakeStream()
    fake.create_table(TABLE, ("pk",))
    store = MemoryStore()
    (shard,) = fake.open_shards(TABLE)
    arn = fake.describe_table(TABLE).stream_arn
    assert arn is not None
    store.create_lease(Lease(TABLE, shard, arn))
    lease = store.take_lease(store.list_leases(TABLE)[0], "me")
    assert lease is not None
    lease_ok = threading.Event()
    lease_ok.set()
    sink = OutageSink(lease_ok)
    stop = threading.Event()
    worker = ShardWorker(
        lease,
        fake,
        Pipeline(views, {("redis", "cache"): sink}, store, lambda v: 0),  # type: ignore[dict-item]
        store,
        ("pk",),
        WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0, max_backoff=0.05),
        stop=stop,
        lease_valid=lease_ok.is_set,
    )
    fake.put_item(TABLE, {"pk": "x", "v": 1, "g": "a"})
    t = threading.Thread(target=worker.run_guarded, daemon=True)
    t.start()
    try:
        time.sleep(0.3)  # the page is read (lease valid) and retried: the sink is down
        lease_ok.clear()  # the renewals stop ...
        sink.up.set()  # ... and then the sink comes back
        time.sleep(0.5)
        assert sink.applied == 0 and sink.applied_while_invalid == 0
        lease_ok.set()  # renewed: the page goes through
        deadline = time.monotonic() + 5
        while store.list_leases(TABLE)[0].checkpoint != fake.last_sequence:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sink.applied == 1 and sink.applied_while_invalid == 0
    finally:
        stop.set()
        t.join(10)
    assert worker.crashed is None
