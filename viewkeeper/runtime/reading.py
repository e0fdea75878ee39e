"""Where a shard's records enter: GetRecords pages, stamped when they arrive, one read ahead.

A page that ended at a limit of GetRecords (``batch_size`` records, or half of its 1 MB
cap: :func:`ended_at_a_limit`) means more records are waiting. The call for the next page
is then made at once, in a helper thread, while the worker applies this one (as KCL's
prefetching publisher does; :meth:`StreamClient.read_records`): a backlog pays the
service's round trip while a page is decoded and applied, not after. Only the wait and the
envelope (record count, next iterator) move to the helper — the call for page N+2 leaves
as soon as page N+1 is taken — while the records' decode stays in the worker's thread,
because two threads of Python work only take turns on the GIL (decoding ahead made the
CPU-bound path 5-10 % slower, bench/README.md).

Every page is stamped when GetRecords answers (in the helper for a page read ahead): the
views' generations this process holds then, and whether its lease was valid then. The
worker applies the page at those generations however late it applies it
(:mod:`viewkeeper.runtime.worker` says why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from viewkeeper.stream.client import PendingPage, RecordsPage, StreamClient

__all__ = ["PAGE_BYTES", "PageReader", "Stamp", "ended_at_a_limit"]

PAGE_BYTES = 1 << 20  # GetRecords returns at most 1 MB of records


@dataclass(frozen=True, slots=True)
class Stamp:
    """What held when GetRecords answered: the views' generations (None: let the pipeline
    stamp at apply time — workers built without a generation source, in tests), whether
    the lease was valid, and whether the page was read ahead (in the helper)."""

    generations: Mapping[str, int] | None
    valid: bool
    ahead: bool = False


def ended_at_a_limit(count: int, size: int, batch_size: int) -> bool:
    """Whether a page of ``count`` records in a body of ``size`` bytes stopped at
    GetRecords' limits — ``batch_size`` records, or about its 1 MB: more records are then
    likely waiting. A page of large items ends at 1 MB with far fewer than 1000 records;
    counting half of it as full allows for the record that did not fit (an item is up to
    400 KB, a record with both images twice that). The body's JSON is larger than the sizes
    DynamoDB counts, so a page that only looks full is possible: it costs one early read,
    which comes back short."""
    return count >= batch_size or size >= PAGE_BYTES // 2


class PageReader:
    """Reads one shard's pages for its worker, one page ahead while a backlog lasts."""

    def __init__(
        self,
        client: StreamClient,
        batch_size: int,
        *,
        prefetch: bool,
        thread_name: str,
        lease_valid: Callable[[], bool],
        generations: Callable[[], Mapping[str, int]] | None,
    ) -> None:
        self.client = client
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.thread_name = thread_name
        self.lease_valid = lease_valid
        self.generations = generations
        self._helper: ThreadPoolExecutor | None = None  # made on the first full page
        # (iterator, its call): the page read ahead, stamped when it arrived
        self._ahead: tuple[str, Future[tuple[PendingPage, Stamp]]] | None = None

    def stamp(self, ahead: bool = False) -> Stamp:
        """Taken the moment a page arrives."""
        gens = dict(self.generations()) if self.generations is not None else None
        return Stamp(gens, self.lease_valid(), ahead)

    def read(self, iterator: str) -> tuple[RecordsPage, Stamp]:
        """The page at ``iterator`` and its stamp: the one read ahead for it (decoded now, in
        this thread, once the call for the next page has left), or a GetRecords call now. An
        error of the read-ahead call is raised here, as if the call were made now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[0] == iterator:
                pending, stamp = ahead[1].result()
                self._maybe_read_ahead(pending.next_iterator, pending.count, pending.size)
                return pending.decode(), stamp
            ahead[1].cancel()  # not the page asked for (cannot happen today): never used
        page = self.client.get_records(iterator, self.batch_size)
        stamp = self.stamp()
        self._maybe_read_ahead(page.next_iterator, len(page.records), page.size)
        return page, stamp

    def close(self) -> None:
        """Drop the page read ahead (its records are after the checkpoint: whoever holds the
        shard next reads them again) and wait for its call, so no thread outlives the
        worker."""
        self._ahead = None
        if self._helper is not None:
            self._helper.shutdown(wait=True, cancel_futures=True)
            self._helper = None

    def _maybe_read_ahead(self, iterator: str | None, count: int, size: int) -> None:
        """Make the call for the page after one of ``count`` records and ``size`` bytes now,
        in the helper, if that page ended at a limit (more records are waiting)."""
        if (
            self.prefetch
            and iterator is not None
            and ended_at_a_limit(count, size, self.batch_size)
        ):
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix=self.thread_name)
            self._ahead = (iterator, self._helper.submit(self._call_ahead, iterator))

    def _call_ahead(self, iterator: str) -> tuple[PendingPage, Stamp]:
        """In the helper: the call, then the stamp, taken when the answer arrived."""
        pending = self.client.read_records(iterator, self.batch_size)
        return pending, self.stamp(ahead=True)
