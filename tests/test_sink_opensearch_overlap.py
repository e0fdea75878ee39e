"""The OpenSearch sink's overlapped apply: default-id puts leave first, and the owner phase,
the other live ops and the post-checks run while they are on the server.

Each test can fail: the split is checked on its own (pure), the overlapped path is shown to
be taken (a spy on the background sends) and to end exactly where the one-request-at-a-time
path ends, and a kill in the middle leaves no request of the apply running and loses nothing
once the batch comes again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opensearchpy import OpenSearch

from tests.test_sink_opensearch import CARDS, ORDERS, Killed, get_doc, kill_at, outcomes, rm, up
from viewkeeper.sinks.base import Change, Outcome
from viewkeeper.sinks.opensearch import OpenSearchSink, ViewIndexes, _Live, _Plan

needs_os = pytest.mark.opensearch


@pytest.fixture
def make_sink(os_client: OpenSearch, os_prefix: str) -> Iterator[Callable[..., OpenSearchSink]]:
    made: list[OpenSearchSink] = []

    def factory(**kwargs: Any) -> OpenSearchSink:
        kwargs.setdefault("index_prefix", os_prefix)
        kwargs.setdefault("index_settings", {"number_of_replicas": 0})
        sink = OpenSearchSink("search", kwargs.pop("client", os_client), **kwargs)
        sink.prepare([ORDERS, CARDS])
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.close()


def spy_background(sink: OpenSearchSink) -> list[list[str]]:
    """Record the item keys of every live send made in the background (the overlap)."""
    seen: list[list[str]] = []
    real = sink._live_send

    def send(plans: list[_Plan], background: bool = False, **kwargs: Any) -> _Live:
        if background:
            seen.append([p.change.item_key for p in plans])
        return real(plans, background, **kwargs)

    setattr(sink, "_live_send", send)  # noqa: B010 - an instance attribute over the method
    return seen


# ----------------------------------------------------------------------------------------
# the split (pure: no server)


def split_of(changes: list[Change], **kwargs: Any) -> tuple[list[str], list[str]]:
    sink = OpenSearchSink("search", hosts=["http://127.0.0.1:9"], **kwargs)
    for view in (ORDERS, CARDS):
        sink._prepared[view.name] = ViewIndexes.of(view, "p-")
    early, late = sink._early([sink._plan(ch) for ch in changes])
    sink.close()
    return [p.change.item_key for p in early], [p.change.item_key for p in late]


def test_default_id_puts_go_early_everything_else_late() -> None:
    batch = [
        up(ORDERS, "a", 10, {}),
        rm(ORDERS, "b", 10),
        up(CARDS, "c", 10, {"card": "k"}),
        up(ORDERS, "d", 10, {}),
    ]
    assert split_of(batch) == (["a", "d"], ["b", "c"])


def test_nothing_to_overlap_means_no_early_puts() -> None:
    puts = [up(ORDERS, "a", 10, {}), up(ORDERS, "b", 10, {})]
    assert split_of(puts) == ([], ["a", "b"])  # no owner phase to hide
    mixed = [*puts, rm(ORDERS, "c", 10)]
    assert split_of(mixed, bulk_concurrency=1) == ([], ["a", "b", "c"])  # one at a time


def test_a_put_whose_document_a_late_change_touches_stays_late() -> None:
    batch = [
        up(ORDERS, "a", 11, {}),
        rm(ORDERS, "a", 12),  # the same item deleted in the same batch
        up(ORDERS, "b", 10, {}),
        up(ORDERS, "x", 10, {}, doc_id="c"),  # a hand-built change writing document c
        up(ORDERS, "c", 10, {}),
        up(CARDS, "d", 10, {"card": "k"}),  # another view: its ids never clash with ORDERS'
        up(ORDERS, "k", 10, {}),
    ]
    assert split_of(batch) == (["b", "k"], ["a", "a", "x", "c", "d"])


# ----------------------------------------------------------------------------------------
# against the server


def history() -> list[list[Change]]:
    """Batches with everything at once: new and known documents, deletes, a stale put
    after a delete (resurrection attempt), one item put and deleted in one batch, and a
    custom-id view whose documents move."""
    return [
        [
            up(ORDERS, "o-1", 10, {"n": 1}),
            up(ORDERS, "o-2", 10, {"n": 2}),
            up(ORDERS, "o-3", 10, {"n": 3}),
            up(CARDS, "i-1", 10, {"card": "k1"}),
        ],
        [
            up(ORDERS, "o-1", 11, {"n": 11}),
            rm(ORDERS, "o-2", 20),
            up(CARDS, "i-1", 11, {"card": "k2"}),
            up(ORDERS, "o-4", 11, {"n": 4}),
        ],
        [
            up(ORDERS, "o-2", 15, {"n": 15}),  # stale: older than the tombstone at 20
            up(ORDERS, "o-3", 12, {"n": 12}),
            rm(ORDERS, "o-3", 13),
            up(ORDERS, "o-5", 12, {"n": 5}),
            rm(CARDS, "i-1", 12),
            up(ORDERS, "o-1", 10, {"n": 10}),  # older than what is stored
            rm(ORDERS, "o-6", 12),  # never existed
        ],
    ]


def final_state(sink: OpenSearchSink) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    return sink.live_documents(ORDERS), sink.live_documents(CARDS), sink.tombstones(ORDERS)


@needs_os
def test_the_overlapped_apply_ends_where_one_request_at_a_time_ends(
    make_sink: Callable[..., OpenSearchSink], os_prefix: str
) -> None:
    overlapped = make_sink()
    background = spy_background(overlapped)
    sequential = make_sink(index_prefix=os_prefix + "seq-", bulk_concurrency=1)
    got = [outcomes(overlapped.apply(batch)) for batch in history()]
    want = [outcomes(sequential.apply(batch)) for batch in history()]
    assert got == want
    assert got[2] == ["stale", "applied", "applied", "applied", "applied", "stale", "applied"]
    assert background, "the overlapped path was not taken"
    # the third batch: its default-id puts first, then (after the owner phase) the rest
    assert background[-2:] == [["o-2", "o-5", "o-1"], ["o-3", "o-3", "i-1", "o-6"]]
    assert final_state(overlapped) == final_state(sequential)
    live_orders, live_cards, tombstones = final_state(overlapped)
    assert live_orders == {"o-1": {"n": 11}, "o-4": {"n": 4}, "o-5": {"n": 5}}
    assert live_cards == {}
    assert set(tombstones) == {"o-2", "o-3", "o-6"}


@needs_os
@pytest.mark.parametrize("where", ["owner phase", "early puts"])
def test_a_kill_during_the_overlap_leaves_nothing_running_and_loses_nothing(
    make_sink: Callable[..., OpenSearchSink],
    os_client: OpenSearch,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    sink = make_sink()
    sink.apply(history()[0])
    lock = threading.Lock()
    running = [0]
    ended: list[float] = []
    real = OpenSearchSink._post

    def counted(self: OpenSearchSink, *args: Any) -> Any:
        with lock:
            running[0] += 1
        try:
            return real(self, *args)
        finally:
            with lock:
                running[0] -= 1
                ended.append(time.monotonic())

    monkeypatch.setattr(OpenSearchSink, "_post", counted)
    if where == "owner phase":  # killed before W1 leaves, while the early puts are out
        kill_at(sink, lambda _, body: b'"op":"own"' in body, sent=False)
    else:  # killed in a pool thread once the early puts took effect
        kill_at(sink, lambda _, body: b'"if_seq_no"' in body, sent=True)
    with pytest.raises(Killed):
        sink.apply(history()[1])
    killed_at = time.monotonic()
    with lock:
        assert running[0] == 0, "a request of the killed apply was still running"
    time.sleep(0.5)  # a request queued in the pool but not started yet would run by now
    with lock:
        assert running[0] == 0 and max(ended) <= killed_at, "a request ran after the kill"
    vars(sink).pop("_post", None)
    # the checkpoint did not move: the batch comes again, to a fresh daemon
    again = make_sink()
    assert Outcome.ERROR not in {r.outcome for r in again.apply(history()[1])}
    live = again.live_documents(ORDERS)
    assert live == {"o-1": {"n": 11}, "o-3": {"n": 3}, "o-4": {"n": 4}}
    assert get_doc(os_client, again.indexes(ORDERS).alias, "o-2") is None
    assert again.live_documents(CARDS) == {"k2": {"card": "k2"}}


@needs_os
def test_a_host_that_refuses_connections_is_marked_dead_and_the_next_one_used(
    opensearch_url: str, make_sink: Callable[..., OpenSearchSink]
) -> None:
    """The sink posts straight to a connection of the client's pool (not through the
    transport), so it marks a failed connection dead itself; the retry then goes to a live
    host instead of the dead one, round after round."""
    dead = "http://127.0.0.1:9"
    ready = make_sink()  # indexes and script made through a client of the live host only
    client = OpenSearch(hosts=[dead, opensearch_url], timeout=10, randomize_hosts=False)
    sink = OpenSearchSink("search", client, index_prefix=ready.index_prefix, unavailable_after=10)
    sink._prepared = dict(ready._prepared)
    try:
        pool = client.transport.connection_pool
        for i in range(4):  # round robin: the dead host comes up at once if not marked
            result = sink.apply([up(ORDERS, f"o-{i}", 10, {"i": i})])  # a put and its mget
            assert outcomes(result) == ["applied"]
        assert [c.host for c in pool.dead_count] == [dead]
        assert set(ready.live_documents(ORDERS)) == {"o-0", "o-1", "o-2", "o-3"}
    finally:
        sink.close()
        client.close()
