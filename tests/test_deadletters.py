"""Dead letters (I5): one per record and view, written once the page is done, replayed at
the record's own generation, and never replayed past the tombstone retention."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.helpers import redis_view_keys
from tests.views_e2e.fake_views import expected
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import Lease
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.deadletters import replay
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.worker import ShardWorker, WorkerSettings
from viewkeeper.sinks.base import Change, Result, SinkUnavailable
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.fake import FakeStream

VIEWS = load_views(["tests.views_e2e.fake_views"])
TABLE, KEYS = "fk", ("pk",)


class FlakySink:
    """A real RedisSink that is unavailable for the first ``outages`` batches."""

    def __init__(self, inner: RedisSink, outages: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.outages = outages

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        if self.outages > 0:
            self.outages -= 1
            raise SinkUnavailable("redis sink 'cache' at test: unavailable (injected)")
        return self.inner.apply(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Bed:
    def __init__(self, redis_client: Any, outages: int = 0) -> None:
        self.fake = FakeStream()
        self.fake.create_table(TABLE, KEYS)
        self.store = MemoryStore()
        self.redis = redis_client
        inner = RedisSink("cache", redis_client)
        inner.prepare(list(VIEWS))
        self.sink = FlakySink(inner, outages)

    def pipeline(self, generation_of: Any = lambda view: 0) -> Pipeline:
        return Pipeline(VIEWS, {("redis", "cache"): self.sink}, self.store, generation_of)

    def drain(self) -> None:
        """Run one shard worker until the checkpoint reaches the stream's last record."""
        arn = self.fake.describe_table(TABLE).stream_arn
        assert arn is not None
        (shard,) = self.fake.list_shards(arn)
        if not self.store.list_leases(TABLE):
            self.store.create_lease(Lease(TABLE, shard.shard_id, arn))
        lease = self.store.take_lease(self.store.list_leases(TABLE)[0], "me")
        assert lease is not None
        stop = threading.Event()
        worker = ShardWorker(
            lease,
            self.fake,
            self.pipeline(),
            self.store,
            KEYS,
            WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0, max_backoff=0.05),
            stop=stop,
        )
        t = threading.Thread(target=worker.run_guarded, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        try:
            while self.store.list_leases(TABLE)[0].checkpoint != self.fake.last_sequence:
                assert time.monotonic() < deadline, "the worker did not drain the shard"
                time.sleep(0.02)
        finally:
            stop.set()
            t.join(10)
            self.store.release_lease(lease)
        assert worker.crashed is None


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VK_TEST_BOOM", "1")  # fk_card raises on v == -1
    yield


def test_a_record_is_dead_lettered_once_however_often_its_page_is_retried(
    redis_client: Any, boom: None
) -> None:
    """Issue #13 case 10: projection failures were stored before the sinks were called, so
    every retry of the page during a sink outage stored them again (3 dead letters for one
    record after 3 attempts). One record and view is one dead letter, written once the
    page went through."""
    bed = Bed(redis_client, outages=2)
    bed.fake.put_item(TABLE, {"pk": "good", "v": 1, "g": "a"})
    bed.fake.put_item(TABLE, {"pk": "bad", "v": -1, "g": "a"})
    bed.drain()
    letters = bed.store.list_deadletters()
    assert [(d.item_key, d.view) for d in letters] == [("bad", "fk_card")]
    assert redis_view_keys(redis_client) == {"fk:good": "1", "fkg:a": {"good": 1.0}}


def test_the_same_record_dead_lettered_again_is_one_dead_letter_keeping_its_first_time(
    redis_client: Any, boom: None
) -> None:
    """A page read again after a crash (the checkpoint had not moved) meets the same bad
    record: still one dead letter, and it keeps the time of the first failure (the
    retention rule below counts from it)."""
    bed = Bed(redis_client)
    bed.fake.put_item(TABLE, {"pk": "bad", "v": -1, "g": "a"})
    records = bed.fake.get_records(_iterator(bed), 100).records
    bed.pipeline().process(TABLE, KEYS, records)
    (first,) = bed.store.list_deadletters()
    time.sleep(0.05)
    bed.pipeline().process(TABLE, KEYS, records)
    (again,) = bed.store.list_deadletters()
    assert again.id == first.id and again.created_at == first.created_at


def test_a_replay_that_fails_again_keeps_the_dead_letter(redis_client: Any, boom: None) -> None:
    bed = Bed(redis_client)
    bed.fake.put_item(TABLE, {"pk": "bad", "v": -1, "g": "a"})
    bed.drain()
    (before,) = bed.store.list_deadletters()
    report = replay(bed.store, bed.pipeline(), lambda table: KEYS)
    assert (report.replayed, report.failed_again) == (1, 1)
    (after,) = bed.store.list_deadletters()
    assert after.id == before.id and after.created_at == before.created_at


def test_a_dead_letter_older_than_the_tombstone_retention_is_not_replayed(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Suspected in #13, confirmed: a dead letter replayed after its item's tombstone was
    purged (48 h) brought the deleted item back. Replay refuses dead letters older than
    the retention and says what to do; `deadletters drop` removes them."""
    from viewkeeper.runtime.deadletters import drop

    monkeypatch.setenv("VK_TEST_BOOM", "1")
    bed = Bed(redis_client)
    bed.fake.put_item(TABLE, {"pk": "x", "v": -1, "g": "a"})
    bed.drain()  # dead-lettered
    bed.fake.delete_item(TABLE, {"pk": "x"})
    bed.drain()  # the tombstone
    (view,) = VIEWS
    (dl,) = bed.store.list_deadletters()
    bed.store.delete_deadletter(dl.id)
    dl.created_at -= 49 * 3600  # the dead letter is 49 hours old ...
    bed.store.put_deadletter(dl)
    bed.sink.inner.purge_tombstones(view, time.time() + 1)  # ... its item's tombstone purged
    monkeypatch.setenv("VK_TEST_BOOM", "0")  # the view is fixed
    report = replay(bed.store, bed.pipeline(), lambda table: KEYS, retention=48 * 3600)
    assert (report.replayed, report.skipped) == (0, 1)
    assert "older than the tombstone retention" in report.notes[0]
    assert "rebuild fk_card" in report.notes[0]
    assert redis_view_keys(redis_client) == expected(bed.fake.contents(TABLE)) == {}
    assert drop(bed.store, retention=48 * 3600, expired_only=True) == 1
    assert bed.store.list_deadletters() == []


def _iterator(bed: Bed) -> str:
    arn = bed.fake.describe_table(TABLE).stream_arn
    assert arn is not None
    (shard,) = bed.fake.list_shards(arn)
    return bed.fake.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON")


def test_an_item_the_rebuild_cannot_project_keeps_its_entries_through_the_sweep(
    redis_client: Any, boom: None
) -> None:
    """Suspected in #13, confirmed: the sweep retracted the entries of items that exist but
    whose scan projection failed (or whose write the sink refused). The stream keeps an
    item's last good entries when a record of it fails; a rebuild now does the same: the
    item is dead-lettered and the sweep leaves it alone."""
    import io

    from viewkeeper.runtime.rebuild import RebuildSettings, rebuild

    bed = Bed(redis_client)
    bed.fake.put_item(TABLE, {"pk": "x", "v": 1, "g": "a"})
    bed.fake.put_item(TABLE, {"pk": "y", "v": 2, "g": "a"})
    bed.drain()
    bed.fake.put_item(TABLE, {"pk": "x", "v": -1, "g": "a"})  # the view fails on it
    bed.drain()
    assert redis_view_keys(redis_client)["fk:x"] == "1"
    report = rebuild(
        list(VIEWS),
        VIEWS,
        bed.fake,
        bed.store,
        bed.pipeline,
        RebuildSettings(segments=1),
        out=io.StringIO(),
    )
    assert report.dead_lettered == 1 and report.retracted == 0
    kept = {"fk:x": "1", "fk:y": "2", "fkg:a": {"x": 1.0, "y": 2.0}}
    assert redis_view_keys(redis_client) == kept
