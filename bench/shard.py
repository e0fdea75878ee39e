"""Recorded pages through the daemon's own shard worker.

:class:`RecordedShard` is a stream of one shard whose GetRecords answers are recorded page
bodies: each call parses its body exactly as :class:`~viewkeeper.stream.http.HttpStreamClient`
parses a response (``parse_records`` on the bytes), and the last page ends the shard. A
:class:`~viewkeeper.runtime.worker.ShardWorker` reads it from TRIM_HORIZON to SHARD_END through
the pipeline and sinks under test, checkpointing into a ``MemoryStore`` — the whole path of
the daemon's loop (GC pause per page, read-ahead, metrics, checkpoints) without moto, whose
own speed would be the figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Outcomes", "RecordedShard", "worker_feed"]


class RecordedShard:
    """GetRecords over recorded page bodies: iterator ``"i"`` is page ``i``. ``delay``: each
    call first waits that many seconds, as a call waits for the service's answer (a sleep
    releases the GIL as a socket read does)."""

    def __init__(self, pages: Sequence[bytes], delay: float = 0.0) -> None:
        self.pages = pages
        self.delay = delay

    def get_shard_iterator(
        self, stream_arn: str, shard_id: str, iterator_type: str, sequence: str | None = None
    ) -> str:
        if iterator_type != "TRIM_HORIZON":
            raise AssertionError(f"a recorded shard is read from TRIM_HORIZON, not {iterator_type}")
        return "0"

    def get_records(self, iterator: str, limit: int = 1000) -> Any:
        return self.read_records(iterator, limit).decode()

    def read_records(self, iterator: str, limit: int = 1000) -> Any:
        """The call (the wait) and the envelope now, the records' decode when asked: as
        HttpStreamClient does."""
        from viewkeeper.stream.client import PendingPage
        from viewkeeper.stream.records import PageHead

        if self.delay:
            time.sleep(self.delay)
        i = int(iterator)
        following = str(i + 1) if i + 1 < len(self.pages) else None
        return PendingPage.of(PageHead(self.pages[i]), following)


class Outcomes:
    """The pipeline under test, counting the outcomes of the pages it processed (the shard
    worker keeps no report); a dead-lettered record fails the round."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.applied = self.stale = 0
        self._lock = threading.Lock()

    def process(
        self, table: str, key_names: tuple[str, ...], records: Sequence[Any], **kwargs: Any
    ) -> Any:
        report = self.pipeline.process(table, key_names, records, **kwargs)
        if report.dead_lettered:
            raise AssertionError(f"{report.dead_lettered} records dead-lettered")
        with self._lock:
            self.applied += report.applied
            self.stale += report.stale
        return report


def worker_feed(
    pipeline: Outcomes,
    table: str,
    key_names: tuple[str, ...],
    pages: Sequence[bytes],
    *,
    prefetch: bool = True,
    delay: float = 0.0,
) -> Callable[[], None]:
    """A round: one :class:`ShardWorker` reads ``pages`` as one shard, to its end, in the
    calling thread (GetRecords answering after ``delay`` seconds). Raises if the worker
    crashed or did not read every record."""
    from viewkeeper.coordination.memory import MemoryStore
    from viewkeeper.coordination.model import Lease
    from viewkeeper.runtime.worker import ShardWorker, WorkerSettings

    expected = sum(body.count(b'"SequenceNumber"') for body in pages)

    def run() -> None:
        store = MemoryStore()
        lease = Lease(table, "shardId-bench", "arn:bench", owner="bench")
        store.create_lease(lease)
        worker = ShardWorker(
            lease,
            RecordedShard(pages, delay),  # type: ignore[arg-type]
            pipeline,  # type: ignore[arg-type]
            store,
            key_names,
            WorkerSettings(prefetch=prefetch),
            stop=threading.Event(),
        )
        worker.run_guarded()
        if not worker.finished or worker.records_read != expected:
            raise AssertionError(
                f"the worker read {worker.records_read} of {expected} records "
                f"(finished: {worker.finished}, crashed: {worker.crashed})"
            )

    return run
