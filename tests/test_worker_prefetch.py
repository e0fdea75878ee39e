"""The shard worker reads the next page while it applies a full one (``WorkerSettings.prefetch``).

Driven directly (one ``ShardWorker`` on the in-process fake stream, the real Redis behind the
sink): the read-ahead really overlaps the apply, and nothing else changes — pages are applied
and checkpointed in stream order, a failed read-ahead is handled as a failed read, and a
worker that stops drops the page it read ahead (it is read again from the checkpoint) and
leaves no thread behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.helpers import redis_view_keys
from tests.views_e2e.fake_views import expected
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import Lease, LeaseState
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.reading import PAGE_BYTES, ended_at_a_limit
from viewkeeper.runtime.worker import ShardWorker, WorkerSettings
from viewkeeper.sinks.base import Change, Result
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.client import PendingPage, RecordsPage
from viewkeeper.stream.errors import ExpiredIteratorError, ServiceError, ThrottlingError
from viewkeeper.stream.fake import FakeStream
from viewkeeper.stream.records import ChangeRecord

VIEWS = load_views(["tests.views_e2e.fake_views"])
PAGE = 50
PAGES = 4


class Log:
    """What happened, in order: ("read", first sequence), ("apply", first sequence),
    ("checkpoint", sequence)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def add(self, kind: str, what: str) -> None:
        with self.changed:
            self.events.append((kind, what))
            self.changed.notify_all()

    def wait_reads(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` pages with records have been read; False on timeout."""
        with self.changed:
            return self.changed.wait_for(
                lambda: sum(k == "read" for k, _ in self.events) >= count, timeout
            )


class Client:
    """The fake stream, with every page read logged and the threads that called and decoded
    noted; ``fail_call`` makes that call (1-based, of get_records or read_records) raise
    ``error`` instead."""

    def __init__(self, fake: FakeStream, log: Log) -> None:
        self.fake = fake
        self.log = log
        self.calls = 0
        self.fail_call: int | None = None
        self.error: BaseException | None = None
        self.failed_in: str | None = None  # the thread the failing call ran in
        self.called_in: list[str] = []  # the thread of each read_records call
        self.decoded_in: list[str] = []  # the thread each of its pages was decoded in
        # when set, the decode of a full page read ahead waits (up to 5 s) for the call of
        # the page after it to start, and notes whether it did
        self.decode_waits_for_next_call = False
        self.next_call_started: list[bool] = []
        self._started = threading.Condition()

    def _call(self, iterator: str, limit: int) -> RecordsPage:
        self.calls += 1
        if self.calls == self.fail_call and self.error is not None:
            self.failed_in = threading.current_thread().name
            raise self.error
        page = self.fake.get_records(iterator, limit)
        if page.records:
            self.log.add("read", page.records[0].sequence)
        return page

    def get_records(self, iterator: str, limit: int = 1000) -> RecordsPage:
        return self._call(iterator, limit)

    def read_records(self, iterator: str, limit: int = 1000) -> PendingPage:
        with self._started:
            self.called_in.append(threading.current_thread().name)
            number = len(self.called_in)
            self._started.notify_all()
        page = self._call(iterator, limit)

        def decode() -> list[ChangeRecord]:
            self.decoded_in.append(threading.current_thread().name)
            if self.decode_waits_for_next_call and len(page.records) >= PAGE:
                with self._started:
                    self.next_call_started.append(
                        self._started.wait_for(lambda: len(self.called_in) > number, 5.0)
                    )
            return page.records

        return PendingPage(len(page.records), page.next_iterator, page.size, decode)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fake, name)


class Store(MemoryStore):
    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def checkpoint(self, lease: Lease, sequence: str | None, **kwargs: Any) -> Lease:
        self.log.add("checkpoint", str(sequence))
        return super().checkpoint(lease, sequence, **kwargs)


class Sink:
    """The real Redis sink; each apply is logged, and ``hold`` runs inside it before the
    changes are written (to wait for the read-ahead, or to stop the worker)."""

    def __init__(self, inner: RedisSink, log: Log) -> None:
        self.inner = inner
        self.name = inner.name
        self.log = log
        self.applies = 0
        self.hold: Any = None

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        self.applies += 1
        self.log.add("apply", min((c.version.sequence for c in changes), key=lambda s: (len(s), s)))
        if self.hold is not None:
            self.hold(self.applies)
        return self.inner.apply(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Bed:
    def __init__(self, redis_client: Any, items: int = PAGE * PAGES, pad: int = 0) -> None:
        self.log = Log()
        self.fake = FakeStream()
        self.fake.create_table("fk", ("pk",))
        for i in range(items):  # every record a new item: a page is PAGE changes
            item = {"pk": f"k{i}", "v": i, "g": "ab"[i % 2]}
            if pad:
                item["pad"] = "x" * pad  # not in the view: only makes the record larger
            self.fake.put_item("fk", item)
        self.client = Client(self.fake, self.log)
        self.store = Store(self.log)
        self.redis = redis_client
        self.sink = Sink(RedisSink("cache", redis_client), self.log)
        self.sink.prepare(list(VIEWS))
        self.pipeline = Pipeline(VIEWS, {("redis", "cache"): self.sink}, self.store, lambda v: 0)
        self.lease = Lease(
            "fk", self.fake.open_shards("fk")[0], self.fake.stream_arn("fk"), owner="me"
        )
        self.store.create_lease(self.lease)

    def worker(
        self, prefetch: bool = True, batch_size: int = PAGE, busy_poll: float = 0.0
    ) -> tuple[ShardWorker, threading.Thread]:
        (lease,) = self.store.list_leases("fk")
        worker = ShardWorker(
            lease,
            self.client,  # type: ignore[arg-type]
            self.pipeline,
            self.store,
            ("pk",),
            WorkerSettings(
                batch_size=batch_size,
                poll_interval=0.01,
                busy_poll_interval=busy_poll,
                prefetch=prefetch,
            ),
            stop=threading.Event(),
        )
        thread = threading.Thread(target=worker.run_guarded, daemon=True)
        self.thread_name = thread.name
        thread.start()
        return worker, thread

    def checkpoint(self) -> str | None:
        return self.store.list_leases("fk")[0].checkpoint

    def run_to_end(self, prefetch: bool = True, **settings: Any) -> ShardWorker:
        worker, thread = self.worker(prefetch, **settings)
        deadline = time.monotonic() + 20
        while self.checkpoint() != self.fake.last_sequence:
            assert time.monotonic() < deadline, (self.checkpoint(), self.log.events)
            time.sleep(0.01)
        worker.stop.set()
        thread.join(10)
        assert not thread.is_alive()
        assert worker.crashed is None, worker.crashed
        return worker

    def assert_in_stream_order(self) -> None:
        """Each page is applied, then checkpointed, before the next page is applied; the
        checkpoints rise; and Redis holds exactly the table's projection."""
        seq = [(k, w) for k, w in self.log.events if k != "read"]
        kinds = [k for k, _ in seq]
        assert kinds == ["apply", "checkpoint"] * (len(kinds) // 2), seq
        order = [(len(w), w) for _, w in seq]
        assert order == sorted(order), seq
        assert redis_view_keys(self.redis) == expected(self.fake.contents("fk"))


@pytest.fixture
def bed(redis_client: Any) -> Iterator[Bed]:
    yield Bed(redis_client)


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vk-read-")]


def test_the_next_page_is_read_while_a_full_page_is_applied(bed: Bed) -> None:
    overlapped: list[bool] = []

    def hold(n: int) -> None:  # inside apply of page n: is page n + 1 read meanwhile?
        if n < PAGES:
            overlapped.append(bed.log.wait_reads(n + 1))

    bed.sink.hold = hold
    bed.run_to_end()
    assert overlapped == [True] * (PAGES - 1)
    reads = [w for k, w in bed.log.events if k == "read"]
    assert len(reads) == PAGES  # each page read once
    # the calls ahead (pages 2..PAGES, and the empty one after the last full page) ran in
    # the helper; their pages were decoded in the worker's own thread
    assert len(bed.client.called_in) == PAGES
    assert all(name.startswith("vk-read-") for name in bed.client.called_in)
    assert bed.client.decoded_in == [bed.thread_name] * PAGES
    bed.assert_in_stream_order()
    assert not reader_threads()


def test_without_prefetch_each_page_is_read_after_the_last_checkpoint(bed: Bed) -> None:
    bed.run_to_end(prefetch=False)
    kinds = [k for k, _ in bed.log.events]
    assert kinds == ["read", "apply", "checkpoint"] * PAGES, bed.log.events
    bed.assert_in_stream_order()
    assert not reader_threads()


@pytest.mark.parametrize(
    "error",
    [
        ExpiredIteratorError("Iterator expired"),
        ThrottlingError("Rate exceeded for shard"),
        ServiceError("InternalServerError"),
    ],
    ids=["expired", "throttled", "service"],
)
def test_a_failed_read_ahead_is_handled_like_a_failed_read(bed: Bed, error: Exception) -> None:
    bed.client.fail_call, bed.client.error = 2, error  # call 2 is page 2, read ahead
    worker = bed.run_to_end()
    assert bed.client.failed_in is not None and bed.client.failed_in.startswith("vk-read-")
    assert worker.records_read == PAGE * PAGES  # nothing applied twice, nothing skipped
    bed.assert_in_stream_order()


def test_a_stop_drops_the_page_read_ahead_and_the_next_worker_reads_it_again(bed: Bed) -> None:
    first: dict[str, Any] = {}
    started = threading.Event()  # the worker's thread may reach its apply before worker()
    # returns it to this thread

    def hold(n: int) -> None:  # stop while page 1 is applied, once page 2 has been read
        assert bed.log.wait_reads(2)
        assert started.wait(10)
        first["worker"].stop.set()

    bed.sink.hold = hold
    first["worker"], thread = bed.worker()
    started.set()
    thread.join(10)
    assert not thread.is_alive() and first["worker"].crashed is None
    assert not reader_threads()
    # page 1 applied and checkpointed; page 2 was read but never applied
    kinds = [k for k, _ in bed.log.events]
    assert sorted(kinds) == ["apply", "checkpoint", "read", "read"] and kinds[-1] == "checkpoint"
    assert bed.sink.applies == 1
    page1_last = bed.checkpoint()
    assert page1_last is not None

    bed.sink.hold = None
    bed.run_to_end()
    reads = [w for k, w in bed.log.events if k == "read"]
    assert reads[1] == reads[2]  # page 2: read ahead by the first worker, again by the next
    assert (len(reads[1]), reads[1]) > (len(page1_last), page1_last)
    bed.assert_in_stream_order()
    (lease,) = bed.store.list_leases("fk")
    assert lease.state is LeaseState.ACTIVE


def test_pages_of_large_items_end_at_one_megabyte_and_count_as_full(redis_client: Any) -> None:
    """A page of 6 KB records stops at GetRecords' 1 MB cap with ~170 records, far below
    batch_size: the worker must still treat it as full — read the next page at once, ahead
    — and not wait busy_poll_interval (30 s here, longer than run_to_end allows) after it."""
    bed = Bed(redis_client, items=700, pad=6000)
    bed.run_to_end(batch_size=1000, busy_poll=30.0)
    reads = [w for k, w in bed.log.events if k == "read"]
    assert 4 <= len(reads) <= 6, reads  # 700 x ~6 KB: 4-5 pages of at most 1 MB
    assert len(bed.client.called_in) >= len(reads) - 1  # every page but the first, ahead
    bed.assert_in_stream_order()


def test_what_counts_as_a_full_page() -> None:
    assert ended_at_a_limit(1000, 100_000, 1000)
    assert ended_at_a_limit(50, 5_000, 50)
    assert not ended_at_a_limit(999, 100_000, 1000)
    assert not ended_at_a_limit(0, 0, 1000)
    assert ended_at_a_limit(128, PAGE_BYTES // 2, 1000)  # half of 1 MB
    assert not ended_at_a_limit(128, PAGE_BYTES // 2 - 1, 1000)


def test_the_call_for_the_page_after_next_leaves_before_the_next_page_is_decoded(
    bed: Bed,
) -> None:
    """Page N+1's envelope (count, next iterator) is read in the helper, so the call for page
    N+2 is sent when page N+1 is taken, before its records are decoded: the wait for the
    service overlaps the decode too, not only the apply."""
    bed.client.decode_waits_for_next_call = True
    bed.run_to_end()
    # pages 2..PAGES are full pages read ahead; each decode saw the next call start first
    assert bed.client.next_call_started == [True] * (PAGES - 1)
    bed.assert_in_stream_order()
