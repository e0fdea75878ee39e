"""The stream side against the in-process fake stream and the real Redis: lineage, rollover,
expired iterators, throttling, trimming, crashes between apply and checkpoint (I4, I5)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import orjson
import pytest
from prometheus_client import REGISTRY

from tests.helpers import redis_view_keys
from tests.views_e2e.fake_views import expected
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import CoordinationUnavailable, Lease, LeaseState
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.supervisor import StreamNotReadable, Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import ShardWorker, WorkerSettings
from viewkeeper.sinks.base import Change, Result
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.errors import ExpiredIteratorError, ServiceError, ThrottlingError
from viewkeeper.stream.fake import FakeStream

REGISTRY_VIEWS = load_views(["tests.views_e2e.fake_views"])


class SpySink:
    """A real RedisSink that also records the order in which item versions were applied."""

    def __init__(self, inner: RedisSink) -> None:
        self.inner = inner
        self.name = inner.name
        self.applied: list[tuple[str, int, int, str]] = []  # item, time order, gen, seq
        self.lock = threading.Lock()

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        with self.lock:
            for ch in changes:
                self.applied.append(
                    (ch.item_key, len(self.applied), ch.version.generation, ch.version.sequence)
                )
        return self.inner.apply(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Bed:
    def __init__(self, redis_client: Any, shards: int = 1, **fake_kwargs: Any) -> None:
        self.fake = FakeStream(**fake_kwargs)
        self.fake.create_table("fk", ("pk",), shards=shards)
        self.store = MemoryStore()
        self.redis = redis_client
        self.sink = SpySink(RedisSink("cache", redis_client))
        self.sink.prepare(list(REGISTRY_VIEWS))
        self.threads: list[tuple[Supervisor, threading.Thread]] = []

    def supervisor(self, start: bool = True, **settings: Any) -> Supervisor:
        defaults: dict[str, Any] = {
            "lease_duration": 1.0,
            "discovery_interval": 60.0,
            "starting_positions": {"fk": "TRIM_HORIZON"},
            "worker": WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0, batch_size=50),
        }
        defaults.update(settings)
        sup = Supervisor(
            ["fk"], self.fake, self.store, self.pipeline, SupervisorSettings(**defaults)
        )
        if start:
            t = threading.Thread(target=sup.run, daemon=True)
            t.start()
            self.threads.append((sup, t))
        return sup

    def pipeline(self, generation_of: Any) -> Pipeline:
        return Pipeline(REGISTRY_VIEWS, {("redis", "cache"): self.sink}, self.store, generation_of)

    def put(self, pk: str, v: int, g: str = "a") -> None:
        self.fake.put_item("fk", {"pk": pk, "v": v, "g": g})

    def converged(self) -> bool:
        return redis_view_keys(self.redis) == expected(self.fake.contents("fk"))

    def wait_converged(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.converged():
                return
            time.sleep(0.05)
        assert redis_view_keys(self.redis) == expected(self.fake.contents("fk"))

    def stop(self) -> None:
        for sup, t in self.threads:
            sup.request_stop()
            t.join(20)
        self.threads.clear()

    def assert_item_order(self) -> None:
        """No item ever went back to an older version than one already applied."""
        newest: dict[str, tuple[int, int, str]] = {}
        for item, _, gen, seq in self.sink.applied:
            key = (gen, len(seq), seq)
            assert key >= newest.get(item, key), f"{item} applied {seq} after {newest[item]}"
            newest[item] = key


@pytest.fixture
def bed(redis_client: Any) -> Iterator[Bed]:
    b = Bed(redis_client)
    yield b
    b.stop()


def test_records_are_applied_and_checkpointed(bed: Bed) -> None:
    for i in range(30):
        bed.put(f"k{i}", i, "ab"[i % 2])
    bed.fake.delete_item("fk", {"pk": "k3"})
    bed.supervisor()
    bed.wait_converged()
    wait_checkpoint(bed)


def wait_checkpoint(bed: Bed) -> None:
    """The checkpoint follows the sinks' acknowledgement; wait for it to reach the end."""
    deadline = time.monotonic() + 10
    while bed.store.list_leases("fk")[0].checkpoint != bed.fake.last_sequence:
        assert time.monotonic() < deadline, bed.store.list_leases("fk")
        time.sleep(0.02)


def test_a_child_shard_is_never_applied_before_its_parent(redis_client: Any) -> None:
    bed = Bed(redis_client, shards=2)
    try:
        rng = random.Random(3)
        bed.supervisor()
        for rnd in range(6):
            for _ in range(60):
                bed.put(f"k{rng.randrange(25)}", rng.randrange(1000), rng.choice("abc"))
            shard = rng.choice(bed.fake.open_shards("fk"))
            if rnd % 2:
                bed.fake.split_shard(shard)
            else:
                bed.fake.rollover(shard)
        bed.wait_converged()
        bed.assert_item_order()
        leases = {lease.shard_id: lease for lease in bed.store.list_leases("fk")}
        assert len(leases) > 2
        for lease in leases.values():
            for parent in lease.parents:
                if lease.checkpoint is not None:
                    assert leases[parent].state is LeaseState.ENDED
    finally:
        bed.stop()


def test_a_child_waits_for_its_parents_backlog(bed: Bed) -> None:
    for i in range(3000):  # a long backlog in the parent, read 50 records per page ...
        bed.put(f"k{i % 5}", i)
    (parent,) = bed.fake.open_shards("fk")
    bed.fake.rollover(parent)
    for i in range(5):  # ... and the newest version of every item in the child
        bed.put(f"k{i}", 10000 + i)
    bed.supervisor()
    bed.wait_converged()
    bed.assert_item_order()  # a child applied early would make the parent's pages go back
    assert len(bed.sink.applied) >= 30  # 6 parent pages x 5 items, then the child


def test_a_child_starts_on_shard_end_without_waiting_for_discovery(bed: Bed) -> None:
    bed.supervisor(discovery_interval=3600.0)
    bed.put("k1", 1)
    bed.wait_converged()
    (parent,) = bed.fake.open_shards("fk")
    bed.fake.rollover(parent)
    ended_at = time.monotonic()
    bed.put("k1", 2)  # lands in the child
    bed.wait_converged(timeout=30.0)  # discovery every hour: only SHARD_END can do this
    pickup = time.monotonic() - ended_at
    logging.getLogger(__name__).info("child picked up in %.3fs", pickup)
    assert bed.fake.contents("fk")["k1"]["v"] == 2


def test_expired_iterators_and_throttling_lose_nothing(bed: Bed) -> None:
    bed.supervisor()
    rng = random.Random(5)
    for rnd in range(4):
        bed.fake.inject("get_records", ExpiredIteratorError("Iterator expired"), times=1)
        bed.fake.inject("get_records", ThrottlingError("Rate exceeded"), times=1)
        bed.fake.inject("get_shard_iterator", ServiceError("Internal error", status=500), times=1)
        for _ in range(20):
            bed.put(f"k{rng.randrange(15)}", rng.randrange(100), rng.choice("xy"))
        if rnd == 2:
            bed.fake.expire_iterators()
        time.sleep(0.3)
    bed.wait_converged(timeout=40)
    assert bed.fake.calls["get_records"] > 4
    bed.assert_item_order()


def test_trimmed_data_is_reported_loudly_and_not_skipped(
    bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    bed.fake.clock = lambda: clock[0]
    bed.put("k1", 1)
    sup = bed.supervisor(start=False)
    sup.run(until_caught_up=True)
    before = REGISTRY.get_sample_value("viewkeeper_trimmed_shards_total", {"table": "fk"}) or 0
    clock[0] = 2000.0
    bed.put("k1", 2)  # never read ...
    clock[0] = 3000.0
    bed.put("k2", 3)
    bed.fake.trim(before=2500.0)  # ... and now trimmed away
    with caplog.at_level(logging.ERROR):
        sup2 = bed.supervisor(start=False)
        threading.Thread(target=sup2.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while bed.store.list_leases("fk")[0].state is not LeaseState.NEEDS_REBUILD:
            assert time.monotonic() < deadline, "trimmed shard not reported"
            time.sleep(0.05)
        sup2.request_stop()
    (lease,) = bed.store.list_leases("fk")
    assert lease.error and "trimmed" in lease.error
    assert "DATA LOST TO STREAM RETENTION" in caplog.text
    assert (
        REGISTRY.get_sample_value("viewkeeper_trimmed_shards_total", {"table": "fk"}) or 0
    ) == before + 1
    # not skipped: k2 (after the gap) was not applied as if nothing happened
    assert "fk:k2" not in redis_view_keys(bed.redis)
    assert redis_view_keys(bed.redis)["fk:k1"] == "1"


class CrashingStore(MemoryStore):
    """Crashes the worker (an exception) on the n-th checkpoint: between apply and checkpoint."""

    def __init__(self, crash_on: set[int]) -> None:
        super().__init__()
        self.crash_on = crash_on
        self.n = 0

    def checkpoint(
        self, lease: Lease, sequence: str | None, state: Any = None, error: str | None = None
    ) -> None:
        self.n += 1
        if self.n in self.crash_on:
            raise RuntimeError(f"simulated crash before checkpoint {self.n}")
        super().checkpoint(lease, sequence, state, error)


def test_a_crash_between_apply_and_checkpoint_loses_nothing(redis_client: Any) -> None:
    bed = Bed(redis_client)
    bed.store = CrashingStore({2, 3, 5})
    try:
        for i in range(200):
            bed.put(f"k{i % 40}", i, "abc"[i % 3])
        bed.supervisor(restart_backoff=0.05)
        bed.wait_converged()
        bed.assert_item_order()
        wait_checkpoint(bed)
        assert (
            REGISTRY.get_sample_value("viewkeeper_shard_failures_total", {"table": "fk"}) or 0
        ) >= 3
    finally:
        bed.stop()


def test_a_projection_that_raises_is_dead_lettered_and_the_counts_add_up(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VK_TEST_BOOM", "1")
    for i in range(10):
        bed.put(f"k{i}", i)
    bed.put("k4", -1)  # the view raises on this one
    pipe = bed.pipeline(lambda v: 0)
    page = bed.fake.get_records(
        bed.fake.get_shard_iterator(
            bed.fake.stream_arn("fk"), bed.fake.open_shards("fk")[0], "TRIM_HORIZON"
        )
    )
    report = pipe.process("fk", ("pk",), page.records)
    assert len(page.records) == 11
    # k4 has two records: the newest raises (dead-lettered), the older one is applied
    assert (report.applied, report.stale, report.dead_lettered) == (10, 0, 1)
    assert report.applied + report.stale + report.dead_lettered == len(page.records)
    (dl,) = bed.store.list_deadletters()
    assert dl.item_key == "k4" and "v = -1" in dl.error
    assert redis_view_keys(bed.redis)["fk:k4"] == "4"


def corrupt(fake: FakeStream, shard_id: str, index: int, mutate: Any) -> dict[str, Any]:
    """Replace the ``index``-th record stored in a shard of the fake by ``mutate`` of it (the
    fake only ever writes well-formed records; this is what a new DynamoDB attribute type, or
    a damaged record, looks like to the worker). Returns the corrupted record."""
    _, shard = fake._shard(fake.stream_arn("fk"), shard_id)
    seq, when, blob = shard.records[index]
    record = orjson.loads(blob)
    mutate(record)
    shard.records[index] = (seq, when, orjson.dumps(record))
    return cast(dict[str, Any], record)


def test_a_malformed_record_is_dead_lettered_and_the_shard_goes_on(bed: Bed) -> None:
    """I5 through the supervisor and the fake stream: one record with an unknown attribute
    type and one without a SequenceNumber (the last of the shard) do not stall the shard.
    Both are dead-lettered with their raw record and error, every other record is applied,
    and the checkpoint moves to the last record that has a sequence number."""
    for i in range(10):
        bed.put(f"k{i}", i)
    (shard_id,) = bed.fake.open_shards("fk")
    unknown = corrupt(
        bed.fake, shard_id, 4, lambda r: r["dynamodb"]["NewImage"].update(x={"X": "1"})
    )
    no_seq = corrupt(bed.fake, shard_id, 9, lambda r: r["dynamodb"].pop("SequenceNumber"))
    last_with_sequence = bed.fake.get_records(
        bed.fake.get_shard_iterator(bed.fake.stream_arn("fk"), shard_id, "TRIM_HORIZON")
    ).records[8]
    failures = REGISTRY.get_sample_value("viewkeeper_shard_failures_total", {"table": "fk"}) or 0

    bed.supervisor()
    good = {k: v for k, v in bed.fake.contents("fk").items() if k not in ("k4", "k9")}
    deadline = time.monotonic() + 10
    while (
        redis_view_keys(bed.redis) != expected(good)
        or bed.store.list_leases("fk")[0].checkpoint != last_with_sequence.sequence
    ):
        assert time.monotonic() < deadline, (
            redis_view_keys(bed.redis),
            bed.store.list_leases("fk"),
        )
        time.sleep(0.02)

    letters = {d.sequence: d for d in bed.store.list_deadletters()}
    assert set(letters) == {unknown["dynamodb"]["SequenceNumber"], "0"}
    bad_type = letters[unknown["dynamodb"]["SequenceNumber"]]
    assert bad_type.item_key == "k4" and "NewImage.x" in bad_type.error and "'X'" in bad_type.error
    assert bad_type.record == unknown
    assert "SequenceNumber" in letters["0"].error and letters["0"].record == no_seq
    assert letters["0"].item_key == "k9"
    (lease,) = bed.store.list_leases("fk")
    assert lease.state is not LeaseState.HALTED and lease.error is None
    assert (
        REGISTRY.get_sample_value("viewkeeper_shard_failures_total", {"table": "fk"}) or 0
    ) == failures  # no crash, no restart on the same page


def test_latest_is_the_default_for_a_table_seen_the_first_time(bed: Bed) -> None:
    bed.put("old", 1)
    bed.supervisor(starting_positions={})
    deadline = time.monotonic() + 10
    while not bed.store.list_leases("fk") or bed.store.list_leases("fk")[0].owner is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    bed.put("new", 2)
    deadline = time.monotonic() + 10
    while "fk:new" not in redis_view_keys(bed.redis):
        assert time.monotonic() < deadline, "a record after start was not applied"
        time.sleep(0.05)
    assert "fk:old" not in redis_view_keys(bed.redis)


def test_a_table_without_a_stream_is_reported_clearly(redis_client: Any) -> None:
    bed = Bed(redis_client)
    bed.fake.create_table("nostream", ("pk",), stream=None)
    sup = Supervisor(["nostream"], bed.fake, bed.store, bed.pipeline, SupervisorSettings())
    with pytest.raises(StreamNotReadable, match="has no stream; enable DynamoDB Streams"):
        sup.discover()
    bed.fake.create_table("keysonly", ("pk",), stream="KEYS_ONLY")
    sup = Supervisor(["keysonly"], bed.fake, bed.store, bed.pipeline, SupervisorSettings())
    with pytest.raises(StreamNotReadable, match="NEW_AND_OLD_IMAGES"):
        sup.discover()


class FlakyCheckpoints(MemoryStore):
    """The coordination table unreachable for the first ``failures`` checkpoints."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def checkpoint(self, lease: Lease, sequence: str | None, **kwargs: Any) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise CoordinationUnavailable("coordination table t: Could not connect")
        super().checkpoint(lease, sequence, **kwargs)


def _direct_worker(bed: Bed, store: MemoryStore) -> ShardWorker:
    lease = Lease("fk", bed.fake.open_shards("fk")[0], bed.fake.stream_arn("fk"), owner="me")
    store.create_lease(lease)
    pipeline = Pipeline(REGISTRY_VIEWS, {("redis", "cache"): bed.sink}, store, lambda v: 0)
    return ShardWorker(
        lease,
        bed.fake,
        pipeline,
        store,
        ("pk",),
        WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0, batch_size=50, max_backoff=0.2),
        stop=threading.Event(),
    )


def test_a_checkpoint_the_table_cannot_take_is_retried_not_a_crash(
    bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(120):
        bed.put(f"k{i % 70}", i, "ab"[i % 2])
    store = FlakyCheckpoints(failures=3)
    worker = _direct_worker(bed, store)
    bed.fake.close_all_and_rollover("fk")  # the shard ends: run() returns at SHARD_END
    with caplog.at_level(logging.WARNING, logger="viewkeeper.worker"):
        worker.run_guarded()
    assert worker.crashed is None and worker.finished
    assert store.attempts > 3
    (lease, *_) = [x for x in store.list_leases("fk") if x.shard_id == worker.lease.shard_id]
    assert lease.checkpoint == worker.last_sequence and lease.state is LeaseState.ENDED
    assert "not written (coordination table t: Could not connect); the page is applied" in (
        caplog.text
    )
    assert redis_view_keys(bed.redis) == expected(bed.fake.contents("fk"))


def test_a_stop_while_the_checkpoint_is_retried_leaves_it_where_it_was(bed: Bed) -> None:
    for i in range(30):
        bed.put(f"k{i}", i)
    store = FlakyCheckpoints(failures=10**6)
    worker = _direct_worker(bed, store)
    thread = threading.Thread(target=worker.run_guarded)
    thread.start()
    deadline = time.monotonic() + 10
    while store.attempts < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker.stop.set()
    thread.join(10)
    assert not thread.is_alive() and worker.crashed is None and not worker.finished
    (lease,) = store.list_leases("fk")
    assert lease.checkpoint is None and worker.last_sequence is None  # the page is re-read
    assert redis_view_keys(bed.redis) == expected(bed.fake.contents("fk"))  # and was applied
