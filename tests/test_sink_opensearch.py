"""The OpenSearch sink's guarantees, checked against the real OpenSearch node of the test bed.

Pure parts (naming, NDJSON, host scrubbing) are checked without a server at the top.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from opensearchpy import OpenSearch
from opensearchpy.exceptions import TransportError

from tests.helpers import Clock, view_for
from viewkeeper.projection.api import View, opensearch_view
from viewkeeper.projection.entries import Document, Value
from viewkeeper.projection.versions import Version, compare_encoded
from viewkeeper.sinks import opensearch as opensearch_module
from viewkeeper.sinks.base import (
    Change,
    Claim,
    Outcome,
    Owner,
    Result,
    SinkError,
    SinkUnavailable,
)
from viewkeeper.sinks.opensearch import (
    LIVE_SUFFIX,
    OWNERS_SUFFIX,
    OpenSearchSink,
    ViewIndexes,
    _host_text,
    _Plan,
    make_client,
    script_source,
)
from viewkeeper.sinks.opensearch import apply as opensearch_apply_module
from viewkeeper.sinks.opensearch import plans as opensearch_plans_module

if TYPE_CHECKING:
    from viewkeeper.sinks.opensearch import _Check

needs_os = pytest.mark.opensearch


@opensearch_view(table="orders", opensearch="search", index="orders")
def orders(item: dict[str, Any]) -> dict[str, Any]:
    return item


@opensearch_view(
    table="cards", opensearch="search", index="cards", doc_id=lambda item: str(item["card"])
)
def cards(item: dict[str, Any]) -> dict[str, Any]:
    return item


ORDERS = view_for(orders)
CARDS = view_for(cards)


def up(
    view: View,
    item: str,
    seq: str | int,
    body: dict[str, Any],
    gen: int = 1,
    doc_id: str | None = None,
) -> Change:
    """An upsert of ``item`` at version (gen, seq) with ``body``."""
    if doc_id is None:
        doc_id = str(body["card"]) if view.doc_id is not None else item
    return Change(view, item, Version(gen, str(seq)), [Document(doc_id, body)])


def rm(view: View, item: str, seq: str | int, gen: int = 1) -> Change:
    """The item owns nothing at version (gen, seq): removed."""
    return Change(view, item, Version(gen, str(seq)), [])


def outcomes(results: list[Result]) -> list[str]:
    return [r.outcome.value for r in results]


@pytest.fixture
def sink(make_sink: Callable[..., OpenSearchSink]) -> OpenSearchSink:
    s = make_sink()
    s.prepare([ORDERS, CARDS])
    return s


def get_doc(client: OpenSearch, index: str, doc_id: str) -> dict[str, Any] | None:
    """GET by id, as a reader does (through the alias); None when not found."""
    found = client.transport.perform_request(
        "GET", f"/{index}/_doc/{doc_id}", params={"ignore": 404}
    )
    return found["_source"] if found.get("found") else None


def search_ids(client: OpenSearch, index: str) -> set[str]:
    client.transport.perform_request("POST", f"/{index}/_refresh")
    found = client.search(index=index, body={"size": 1000, "query": {"match_all": {}}})
    return {hit["_id"] for hit in found["hits"]["hits"]}


# ----------------------------------------------------------------------------------------
# pure parts


def test_names_put_live_documents_behind_an_alias_and_owner_records_beside_it() -> None:
    names = ViewIndexes.of(ORDERS, "t-1-")
    assert names == ViewIndexes(
        "t-1-orders", "t-1-orders" + LIVE_SUFFIX, "t-1-orders" + OWNERS_SUFFIX
    )
    assert not names.owners.startswith(names.live)


def test_host_descriptions_never_carry_credentials() -> None:
    assert _host_text("https://admin:s3cret@search.example:9200") == ("https://search.example:9200")
    assert _host_text({"host": "h", "port": 9201, "use_ssl": True}) == "https://h:9201"
    assert "s3cret" not in _host_text("admin:s3cret@h:9200")


def test_script_compares_like_versions_py_without_doubles_or_longs_for_sequences() -> None:
    src = script_source()
    assert "Long.parseLong" in src and "length()" in src and "compareTo" in src
    assert "Double" not in src and "parseDouble" not in src


def test_bulk_lines_are_valid_ndjson() -> None:
    sink = OpenSearchSink("search", OpenSearch(hosts=["http://127.0.0.1:9"]), index_prefix="p-")
    plan = _Plan(
        up(ORDERS, "o|1", 7, {"total": 1.5}), ViewIndexes.of(ORDERS, "p-"), None, False, "1:7"
    )
    op = sink._del_op(plan, "del", 'we"ird\\id', "1:7")
    action, payload, tail = op.lines.split(b"\n")
    assert tail == b""
    assert orjson.loads(action) == {
        "update": {"_index": "p-orders", "retry_on_conflict": 5, "_id": 'we"ird\\id'}
    }
    assert orjson.loads(payload)["script"]["params"] == {"op": "del", "v": "1:7", "item": "o|1"}


# ----------------------------------------------------------------------------------------
# setup


@needs_os
def test_prepare_creates_live_index_behind_the_alias_and_a_hidden_owner_index(
    sink: OpenSearchSink, os_client: OpenSearch, make_sink: Callable[..., OpenSearchSink]
) -> None:
    names = sink.indexes(ORDERS)
    aliases = os_client.transport.perform_request("GET", f"/_alias/{names.alias}")
    assert list(aliases) == [names.live]
    assert os_client.indices.exists(index=names.owners)
    owner_aliases = os_client.transport.perform_request("GET", f"/{names.owners}/_alias")
    assert owner_aliases[names.owners]["aliases"] == {}
    # idempotent, also from a second daemon
    make_sink().prepare([ORDERS, CARDS])
    sink.prepare([ORDERS])


@needs_os
def test_prepare_refuses_a_concrete_index_named_like_the_view_and_says_how_to_fix(
    make_sink: Callable[..., OpenSearchSink], os_client: OpenSearch, os_prefix: str
) -> None:
    os_client.indices.create(index=f"{os_prefix}orders")
    with pytest.raises(SinkError) as err:
        make_sink().prepare([ORDERS])
    text = str(err.value)
    assert f"{os_prefix}orders" in text and "concrete index" in text
    assert f"{os_prefix}orders{LIVE_SUFFIX}" in text and "reindex" in text


@needs_os
def test_two_views_cannot_share_one_index(make_sink: Callable[..., OpenSearchSink]) -> None:
    @opensearch_view(table="x", opensearch="search", index="orders")
    def other(item: dict[str, Any]) -> dict[str, Any]:
        return item

    with pytest.raises(SinkError, match="both use index"):
        make_sink().prepare([ORDERS, view_for(other)])


# ----------------------------------------------------------------------------------------
# apply


@needs_os
def test_upsert_update_and_delete_are_what_readers_see_by_id_and_by_search(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    alias = sink.indexes(ORDERS).alias
    assert outcomes(
        sink.apply(
            [
                up(ORDERS, "o-1", 10, {"status": "new", "total": 5}),
                up(ORDERS, "o-2", 11, {"status": "new", "total": 7}),
            ]
        )
    ) == ["applied", "applied"]
    doc = get_doc(os_client, alias, "o-1")
    assert doc is not None and doc["status"] == "new"
    assert doc["_vk"] == {"v": "1:10", "g": 1, "item": "o-1"}

    assert outcomes(sink.apply([up(ORDERS, "o-1", 12, {"status": "paid"})])) == ["applied"]
    assert get_doc(os_client, alias, "o-1") == {
        "status": "paid",
        "_vk": {"v": "1:12", "g": 1, "item": "o-1"},
    }  # replaced, not merged

    assert outcomes(sink.apply([rm(ORDERS, "o-1", 13)])) == ["applied"]
    assert get_doc(os_client, alias, "o-1") is None
    assert search_ids(os_client, alias) == {"o-2"}
    assert sink.live_documents(ORDERS) == {"o-2": {"status": "new", "total": 7}}
    assert sink.tombstones(ORDERS) == {"o-1": "1:13"}


@needs_os
def test_stale_update_is_stale_and_leaves_the_body_unchanged(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    alias = sink.indexes(ORDERS).alias
    sink.apply([up(ORDERS, "o-1", 20, {"status": "paid"})])
    assert outcomes(sink.apply([up(ORDERS, "o-1", 19, {"status": "new"})])) == ["stale"]
    assert outcomes(sink.apply([up(ORDERS, "o-1", 20, {"status": "paid"})])) == ["stale"]
    doc = get_doc(os_client, alias, "o-1")
    assert doc is not None and doc["status"] == "paid" and doc["_vk"]["v"] == "1:20"


@needs_os
def test_replaying_a_delete_is_stale_and_a_stale_delete_keeps_the_newer_document(
    sink: OpenSearchSink,
) -> None:
    assert outcomes(sink.apply([rm(ORDERS, "gone", 5)])) == ["applied"]
    assert outcomes(sink.apply([rm(ORDERS, "gone", 5)])) == ["stale"]
    sink.apply([up(ORDERS, "back", 30, {"n": 1})])
    assert outcomes(sink.apply([rm(ORDERS, "back", 29)])) == ["stale"]
    assert sink.live_documents(ORDERS) == {"back": {"n": 1}}


@needs_os
def test_stale_update_after_delete_does_not_resurrect_even_after_gc_deletes_expired(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    """I3 without index.gc_deletes: the live index forgets deletes after 1 s here."""
    names = sink.indexes(ORDERS)
    os_client.indices.put_settings(index=names.live, body={"index": {"gc_deletes": "1s"}})
    settings = os_client.indices.get_settings(index=names.live)
    assert settings[names.live]["settings"]["index"]["gc_deletes"] == "1s"

    sink.apply([up(ORDERS, "o-1", 10, {"status": "new"})])
    sink.apply([rm(ORDERS, "o-1", 20)])
    time.sleep(2.5)
    os_client.indices.refresh(index=names.live)  # deletes are pruned on refresh after 1 s

    assert outcomes(sink.apply([up(ORDERS, "o-1", 15, {"status": "stale"})])) == ["stale"]
    assert outcomes(sink.apply([up(ORDERS, "o-1", 15, {"status": "stale"}, gen=0)])) == [
        "stale"
    ]  # an older generation too
    assert get_doc(os_client, names.alias, "o-1") is None
    assert sink.live_documents(ORDERS) == {}
    # a newer change does bring it back
    assert outcomes(sink.apply([up(ORDERS, "o-1", 21, {"status": "again"})])) == ["applied"]
    assert sink.live_documents(ORDERS) == {"o-1": {"status": "again"}}


@needs_os
def test_search_and_get_through_the_alias_never_show_tombstones(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    alias = sink.indexes(ORDERS).alias
    sink.apply([up(ORDERS, f"o-{i}", 10, {"i": i}) for i in range(6)])
    sink.apply(
        [rm(ORDERS, f"o-{i}", 11) for i in range(0, 6, 2)] + [rm(ORDERS, "never-existed", 3)]
    )
    assert search_ids(os_client, alias) == {"o-1", "o-3", "o-5"}
    for gone in ("o-0", "o-2", "o-4", "never-existed"):
        assert get_doc(os_client, alias, gone) is None
    count = os_client.count(index=alias)["count"]
    assert count == 3
    assert set(sink.tombstones(ORDERS)) == {"o-0", "o-2", "o-4", "never-existed"}


SEQ_CASES = [
    # (stored, incoming): 21 and 40 digits; text order and number order disagree; neighbours
    # that a double cannot tell apart; equal.
    ("9" * 21, "1" + "0" * 39),
    ("1" + "0" * 39, "9" * 21),
    ("2" + "0" * 20, "1" + "0" * 39),
    ("4" * 39 + "1", "4" * 39 + "2"),
    ("4" * 39 + "2", "4" * 39 + "1"),
    ("12345678901234567890123", "12345678901234567890123"),
    ("100000000000000000001", "100000000000000000000"),
    ("99999999999999999999", "100000000000000000000"),
]


@needs_os
def test_sequence_numbers_of_21_to_40_digits_compare_as_integers(sink: OpenSearchSink) -> None:
    first = [up(ORDERS, f"s-{i}", a, {"seq": a}) for i, (a, _) in enumerate(SEQ_CASES)]
    assert set(outcomes(sink.apply(first))) == {"applied"}
    second = [up(ORDERS, f"s-{i}", b, {"seq": b}) for i, (_, b) in enumerate(SEQ_CASES)]
    expected = ["applied" if int(b) > int(a) else "stale" for a, b in SEQ_CASES]
    assert outcomes(sink.apply(second)) == expected
    docs = sink.live_documents(ORDERS)
    for i, (a, b) in enumerate(SEQ_CASES):
        assert docs[f"s-{i}"] == {"seq": max(a, b, key=int)}


@needs_os
def test_generation_beats_sequence(sink: OpenSearchSink) -> None:
    sink.apply([up(ORDERS, "g", "9" * 40, {"from": "stream"}, gen=1)])
    assert outcomes(sink.apply([up(ORDERS, "g", 0, {"from": "scan"}, gen=2)])) == ["applied"]
    assert outcomes(sink.apply([up(ORDERS, "g", "9" * 40, {"from": "late"}, gen=1)])) == ["stale"]
    assert outcomes(sink.apply([up(ORDERS, "g", 1, {"from": "stream"}, gen=2)])) == ["applied"]
    sink.apply([up(ORDERS, "h", 5, {"n": 1}, gen=10)])
    assert outcomes(sink.apply([up(ORDERS, "h", 5, {"n": 2}, gen=9)])) == ["stale"]  # 10 > 9
    assert sink.live_documents(ORDERS) == {"g": {"from": "stream"}, "h": {"n": 1}}


@needs_os
def test_painless_ordering_matches_versions_py_on_many_pairs(sink: OpenSearchSink) -> None:
    seqs = [
        "0",
        "1",
        "9",
        "10",
        "99999999999999999999",
        "100000000000000000000",
        "9" * 21,
        "1" + "0" * 21,
        "5" * 40,
        "5" * 39 + "6",
        "9" * 40,
    ]
    versions = [f"{g}:{s}" for g in (0, 1, 12) for s in seqs]
    pairs = list(itertools.product(versions, repeat=2))
    first = [
        up(ORDERS, f"p{i}", Version.decode(a).sequence, {"v": a}, gen=Version.decode(a).generation)
        for i, (a, _) in enumerate(pairs)
    ]
    second = [
        up(ORDERS, f"p{i}", Version.decode(b).sequence, {"v": b}, gen=Version.decode(b).generation)
        for i, (_, b) in enumerate(pairs)
    ]
    sink.apply(first)
    got = outcomes(sink.apply(second))
    want = ["applied" if compare_encoded(b, a) > 0 else "stale" for a, b in pairs]
    assert got == want


@needs_os
def test_cached_fast_path_is_used_and_falls_back_when_another_daemon_wrote_the_document(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    a, b = make_sink(), make_sink()
    a.prepare([ORDERS])
    a._new_share = 0.0  # no create attempts: first puts go through the script
    a.apply([up(ORDERS, "o-1", 10, {"by": "a"}), up(ORDERS, "o-2", 10, {"by": "a"})])
    assert a.stats["put_script"] == 2
    assert outcomes(a.apply([up(ORDERS, "o-1", 11, {"by": "a"})])) == ["applied"]
    assert a.stats["put_cas"] == 1 and a.stats["fallback"] == 0
    # another daemon writes o-1 and o-2; a's cached seq_no is now stale
    b.apply([up(ORDERS, "o-1", 20, {"by": "b"}), up(ORDERS, "o-2", 5, {"by": "b"})])
    assert outcomes(
        a.apply([up(ORDERS, "o-1", 15, {"by": "a"}), up(ORDERS, "o-2", 12, {"by": "a"})])
    ) == ["stale", "applied"]
    assert a.stats["fallback"] == 1  # o-1: 409, resent as the script, which said noop
    assert a.live_documents(ORDERS) == {"o-1": {"by": "b"}, "o-2": {"by": "a"}}


@needs_os
def test_create_fast_path_on_an_existing_document_falls_back_to_the_versioned_script(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    a, b = make_sink(), make_sink()
    b.prepare([ORDERS])
    b.apply([up(ORDERS, "o-1", 9, {"by": "b"})])
    a._new_share = 1.0
    assert outcomes(
        a.apply([up(ORDERS, "o-1", 5, {"by": "a"}), up(ORDERS, "o-2", 5, {"by": "a"})])
    ) == ["stale", "applied"]
    assert a.stats["put_create"] == 1 and a.stats["fallback"] == 1
    assert a.live_documents(ORDERS) == {"o-1": {"by": "b"}, "o-2": {"by": "a"}}


@needs_os
def test_cached_write_after_another_daemons_delete_does_not_resurrect(
    make_sink: Callable[..., OpenSearchSink], os_client: OpenSearch
) -> None:
    a, b = make_sink(), make_sink()
    a.prepare([ORDERS])
    a.apply([up(ORDERS, "o-1", 10, {"by": "a"})])  # a caches o-1
    b.apply([rm(ORDERS, "o-1", 20)])
    assert outcomes(a.apply([up(ORDERS, "o-1", 15, {"by": "a"})])) == ["stale"]
    assert a.stats["fallback"] == 1 and a.stats["post_check_fix"] == 1
    assert get_doc(os_client, a.indexes(ORDERS).alias, "o-1") is None
    assert outcomes(a.apply([up(ORDERS, "o-1", 21, {"by": "a"})])) == ["applied"]


@needs_os
def test_many_small_requests_in_concurrent_segments_keep_every_answer_in_place(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    sink = make_sink(max_bulk_bytes=2_000, min_split=2, bulk_concurrency=3)
    first = sink.apply([up(ORDERS, f"o-{i}", 10, {"i": i}) for i in range(300)])
    assert {r.outcome for r in first} == {Outcome.APPLIED}
    mixed = sink.apply(
        [
            up(ORDERS, f"o-{i}", 10 + i % 3 - 1, {"i": -i}) if i % 2 else rm(ORDERS, f"o-{i}", 11)
            for i in range(300)
        ]
    )
    want = ["applied" if i % 2 == 0 or i % 3 == 2 else "stale" for i in range(300)]
    assert outcomes(mixed) == want
    docs = sink.live_documents(ORDERS)
    assert docs == {f"o-{i}": {"i": -i if i % 3 == 2 else i} for i in range(1, 300, 2)}


def _bulk_ids(body: bytes) -> list[str]:
    """The document ids of the actions of a ``_bulk`` body (every other line)."""
    lines = body.splitlines()
    return [next(iter(orjson.loads(line).values()))["_id"] for line in lines[::2]]


def test_bulk_sends_the_chunks_of_one_group_in_order_and_the_groups_concurrently() -> None:
    """``max_bulk_bytes`` cuts each group of ``_bulk`` into several requests: those of one
    group go one after the other (the ops of one document keep their order), the groups
    side by side. No server: ``_post`` answers. The first request of each group waits
    until the other group's first request is there too (a barrier: the groups must run
    side by side), and the first request of a group is held 0.3 s longer, so that a
    second request of the same group sent without waiting for it would arrive first."""
    sink = OpenSearchSink(
        "search",
        OpenSearch(hosts=["http://127.0.0.1:9"]),
        max_bulk_bytes=1,  # one action per request
        min_split=2,
        bulk_concurrency=2,
    )
    ids: dict[int, list[str]] = {0: [], 1: []}
    for n in itertools.count():  # three documents in each group (hash(id) % 2)
        doc = f"d-{n}"
        if len(ids[hash(doc) % 2]) < 3:
            ids[hash(doc) % 2].append(doc)
        if all(len(group) == 3 for group in ids.values()):
            break
    # each document twice: the ops of one document must land in order
    order = [d for pair in zip(ids[0], ids[1], strict=True) for d in pair]
    plan = _Plan(up(ORDERS, "o", 1, {}), ViewIndexes.of(ORDERS), None, False, "1:1")
    ops = [sink._del_op(plan, "del", d, f"1:{n}") for n in (1, 2) for d in order]
    arrived: list[tuple[str, str]] = []
    firsts = {ids[0][0], ids[1][0]}
    barrier = threading.Barrier(2, timeout=5)
    lock = threading.Lock()

    def post(path: str, params: Any, body: bytes, headers: Any) -> Any:
        [doc] = _bulk_ids(body)
        version = orjson.loads(body.splitlines()[1])["script"]["params"]["v"]
        if doc in firsts and version == "1:1":
            barrier.wait()  # BrokenBarrierError if the groups do not run side by side
            time.sleep(0.3)
        with lock:
            arrived.append((doc, version))
        return {"items": [{"update": {"status": 200, "result": "noop"}}]}

    setattr(sink, "_post", post)  # noqa: B010 - an instance attribute over the method
    try:
        items = sink._bulk(ops, False, time.monotonic() + 10)
    finally:
        sink.close()
    assert len(items) == len(ops)
    for group in ids.values():
        got = [(d, v) for d, v in arrived if d in group]
        # sent in the order of the ops: each group's ops in the ops' order
        assert got == [(d, f"1:{n}") for n in (1, 2) for d in group]


def test_a_bulk_refused_as_a_whole_is_split_until_the_refused_actions_fail_alone() -> None:
    """No server: ``_post`` refuses (HTTP 400, as OpenSearch refuses an ``_id`` over 512
    bytes) every request holding one of the bad actions. The request is halved until each
    bad action is alone; those answer the refusal, the others their own answer. Every
    split ends: at most two requests per action and level, also when every action is
    bad (a refusal that is nobody's fault ends as one ERROR per change, never a loop)."""
    reason = {"type": "action_request_validation_exception", "reason": "Validation Failed"}

    def run(n: int, bad: set[int]) -> tuple[list[dict[str, Any]], int]:
        sink = OpenSearchSink("search", OpenSearch(hosts=["http://127.0.0.1:9"]), min_split=2)
        plan = _Plan(up(ORDERS, "o", 1, {}), ViewIndexes.of(ORDERS), None, False, "1:1")
        ops = [sink._del_op(plan, "del", f"d-{i}", "1:1") for i in range(n)]
        sent = itertools.count()

        def post(path: str, params: Any, body: bytes, headers: Any) -> Any:
            next(sent)
            ids = _bulk_ids(body)
            if any(int(d[2:]) in bad for d in ids):
                raise TransportError(400, reason["type"], {"error": reason, "status": 400})
            return {"items": [{"update": {"status": 200, "_id": d}} for d in ids]}

        setattr(sink, "_post", post)  # noqa: B010 - an instance attribute over the method
        try:
            items = sink._bulk(ops, False, time.monotonic() + 10)
        finally:
            sink.close()
        return items, next(sent)

    items, requests = run(100, {37})
    assert [i for i, item in enumerate(items) if item["status"] == 400] == [37]
    assert items[37]["error"]["type"] == "action_request_validation_exception"
    assert all(item["_id"] == f"d-{i}" for i, item in enumerate(items) if i != 37)
    assert requests <= 2 * 8  # halving 100 actions: 7 levels, two requests each at most
    items, requests = run(16, set(range(16)))
    assert {item["status"] for item in items} == {400} and requests <= 2 * 16 - 1


@needs_os
def test_two_puts_of_one_document_in_requests_cut_by_size_land_in_order(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """One document put at 10 then at 11 in one batch, each put in a request of its own
    (``max_bulk_bytes=1``). The request of the put at 10 is held until the other one is
    answered (at most 3 s): if they were sent side by side, 11 would land first and the
    put at 10 would be a noop (stale); in order both are applied."""
    sink = make_sink(max_bulk_bytes=1)
    sink.prepare([ORDERS])
    real = sink._post
    second_done = threading.Event()

    def post(path: str, params: Any, body: bytes, headers: Any) -> Any:
        if path == "/_bulk" and b'"v":"1:10"' in body:
            second_done.wait(3)
        try:
            return real(path, params, body, headers)
        finally:
            if path == "/_bulk" and b'"v":"1:11"' in body:
                second_done.set()

    setattr(sink, "_post", post)  # noqa: B010 - an instance attribute over the method
    results = sink.apply([up(ORDERS, "o-1", 10, {"n": 10}), up(ORDERS, "o-1", 11, {"n": 11})])
    assert outcomes(results) == ["applied", "applied"]
    assert sink.live_documents(ORDERS) == {"o-1": {"n": 11}}


@needs_os
def test_hand_built_documents_with_another_id_or_a_vk_field_are_handled(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    """Changes not made by project(): a default-id view given another document id is
    tracked by owner records, and a body's own ``_vk`` key never doubles the metadata."""
    assert outcomes(
        sink.apply(
            [
                up(ORDERS, "item", 1, {"n": 1}, doc_id="other-id"),
                up(ORDERS, "vk", 1, {"_vk": "mine", "n": 2}),
            ]
        )
    ) == ["applied", "applied"]
    doc = get_doc(os_client, sink.indexes(ORDERS).alias, "vk")
    assert doc is not None and doc["_vk"]["item"] == "vk"
    assert sink.live_documents(ORDERS) == {"other-id": {"n": 1}, "vk": {"n": 2}}
    assert outcomes(sink.apply([rm(ORDERS, "item", 2), rm(ORDERS, "vk", 2)])) == [
        "applied",
        "applied",
    ]
    assert sink.live_documents(ORDERS) == {}


def _drive_by_hand(
    sink: OpenSearchSink, upsert: Change, delete: Change, order: tuple[str, ...]
) -> None:
    """Run the steps of two applies interleaved as ``order`` says (white-box).

    Upsert: U1 = live phase (the versioned put), U2 = post-check (mget owner records and
    fix). Delete: W1 = owner phase (the tombstone), W2 = live phase (the versioned delete).
    """
    u = [sink._plan(upsert)]
    w = [sink._plan(delete)]
    sink._owner_phase(u)  # nothing to do for a default-id upsert
    checks: list[_Check] = []
    for step in order:
        if step == "U1":
            checks = sink._live_phase(u)
        elif step == "U2":
            sink._post_check(checks)
        elif step == "W1":
            sink._owner_phase(w)
        else:
            sink._live_phase(w)


INTERLEAVINGS = sorted(
    {
        order
        for order in itertools.permutations(("U1", "U2", "W1", "W2"))
        if order.index("U1") < order.index("U2") and order.index("W1") < order.index("W2")
    }
)


@needs_os
@pytest.mark.parametrize("order", INTERLEAVINGS, ids=["-".join(o) for o in INTERLEAVINGS])
def test_stale_upsert_racing_a_delete_ends_deleted_in_every_interleaving(
    sink: OpenSearchSink, os_client: OpenSearch, order: tuple[str, ...]
) -> None:
    """E.g. the rebuild scan read the item just before the stream deleted it."""
    alias = sink.indexes(ORDERS).alias
    sink.apply([up(ORDERS, "o-1", 10, {"status": "old"})])
    _drive_by_hand(
        sink, up(ORDERS, "o-1", 0, {"status": "scan"}, gen=2), rm(ORDERS, "o-1", 5, gen=3), order
    )
    assert get_doc(os_client, alias, "o-1") is None
    assert sink.live_documents(ORDERS) == {}
    # and the other way round: a newer upsert racing an older delete survives it
    sink.apply([up(ORDERS, "o-2", 10, {"status": "old"})])
    _drive_by_hand(
        sink, up(ORDERS, "o-2", 30, {"status": "new"}, gen=3), rm(ORDERS, "o-2", 20, gen=3), order
    )
    assert sink.live_documents(ORDERS) == {"o-2": {"status": "new"}}


@needs_os
def test_stale_upsert_and_delete_in_one_batch_end_deleted(sink: OpenSearchSink) -> None:
    sink.apply([up(ORDERS, "a", 1, {"n": 1}), up(ORDERS, "b", 1, {"n": 1})])
    results = sink.apply(
        [
            rm(ORDERS, "a", 20),
            up(ORDERS, "a", 15, {"n": 2}),
            up(ORDERS, "b", 15, {"n": 2}),
            rm(ORDERS, "b", 20),
        ]
    )
    assert outcomes(results) == ["applied", "stale", "applied", "applied"]
    assert sink.live_documents(ORDERS) == {}


def card(who: str, doc: str) -> dict[str, str]:
    return {"card": doc, "who": who}


@needs_os
def test_a_document_id_passed_from_one_item_to_another_on_another_shard_is_kept(
    sink: OpenSearchSink,
) -> None:
    """Item A yields document d at sequence 500; later (in time) A moves to e and item B,
    on another shard, yields d, at 300: sequence numbers of two shards say nothing about
    their order. B's record is applied while d still holds A's document, then A's move:
    d must end with B's document (A's delete of d takes A's document, not B's)."""
    got = [
        sink.apply([up(CARDS, "A", 500, card("A", "d"))]),
        sink.apply([up(CARDS, "B", 300, card("B", "d"))]),
        sink.apply([up(CARDS, "A", 600, card("A", "e"))]),
    ]
    assert sink.live_documents(CARDS) == {"d": card("B", "d"), "e": card("A", "e")}
    assert [outcomes(r) for r in got] == [["applied"]] * 3
    # B took d over while A's owner record still named d: both claimed it then
    assert [(c.entry, c.other_item) for c in got[1][0].collisions] == [("cards/d", "A")]


@needs_os
def test_a_document_id_taken_over_from_an_item_that_moved_away_is_no_collision(
    sink: OpenSearchSink,
) -> None:
    """The same, with A's owner record (W1 of its move) written before B's put and A's
    delete of d (W2) after it: B takes d over from an owner that moved away, which is not
    a collision, and A's delete leaves B's document alone."""
    sink.apply([up(CARDS, "A", 500, card("A", "d"))])
    [move] = [sink._plan(up(CARDS, "A", 600, card("A", "e")))]
    sink._owner_phase([move])
    [result] = sink.apply([up(CARDS, "B", 300, card("B", "d"))])
    assert result.outcome is Outcome.APPLIED and list(result.collisions) == []
    sink._post_check(sink._live_phase([move]))
    sink._unpend_phase([move])
    assert move.outcome is Outcome.APPLIED
    assert sink.live_documents(CARDS) == {"d": card("B", "d"), "e": card("A", "e")}


@needs_os
def test_a_late_claim_of_a_document_another_item_holds_now_gives_it_back_when_it_ends(
    sink: OpenSearchSink,
) -> None:
    """The other way round: A held d and let it go before B took it, but A's shard is
    late: B's record comes first, then A's (at a higher sequence number, as A's shard
    may well have), then A's REMOVE. A takes d (its change is newer than anything of A),
    and when it ends, d is B's again."""
    assert outcomes(sink.apply([up(CARDS, "B", 300, card("B", "d"))])) == ["applied"]
    assert outcomes(sink.apply([up(CARDS, "A", 500, card("A", "d"))])) == ["applied"]
    assert sink.live_documents(CARDS) == {"d": card("A", "d")}
    assert outcomes(sink.apply([rm(CARDS, "A", 600)])) == ["applied"]
    assert sink.live_documents(CARDS) == {"d": card("B", "d")}
    assert outcomes(sink.apply([up(CARDS, "A", 500, card("A", "d"))])) == ["stale"]  # replay
    assert sink.live_documents(CARDS) == {"d": card("B", "d")}


@needs_os
def test_a_claim_of_an_older_generation_never_takes_a_document_back_after_a_rebuild(
    sink: OpenSearchSink,
) -> None:
    """A holds d, B takes it (A's claim waits behind B's). A rebuild to generation 2 scans
    B (still d) but not A (gone from the table): B's write of generation 2 drops A's claim
    of generation 1, the sweep leaves d (B's, generation 2), and when B leaves d, A's old
    document does not come back. A put of generation 1 arriving late (a daemon not yet on
    generation 2) waits behind B's claim and is dropped with it."""
    sink.apply([up(CARDS, "A", 500, card("A", "d"))])
    sink.apply([up(CARDS, "B", 600, card("B", "d"))])  # A's claim waits
    assert outcomes(sink.apply([up(CARDS, "B", 0, card("B", "d"), gen=2)])) == ["applied"]
    assert sink.sweep(CARDS, 2, now=0.0) == 0
    assert sink.live_documents(CARDS) == {"d": card("B", "d")}
    [late] = sink.apply([up(CARDS, "C", 700, card("C", "d"))])  # generation 1, late
    assert late.outcome is Outcome.APPLIED
    assert [(c.entry, c.other_item) for c in late.collisions] == [("cards/d", "B")]
    assert sink.live_documents(CARDS) == {"d": card("B", "d")}  # C waits: B is newer
    [gone] = sink.apply([rm(CARDS, "C", 3, gen=2)])  # C's own claim goes, whatever its age
    assert gone.outcome is Outcome.APPLIED
    assert sink.live_documents(CARDS) == {"d": card("B", "d")}
    assert outcomes(sink.apply([rm(CARDS, "B", 5, gen=2)])) == ["applied"]
    assert sink.live_documents(CARDS) == {}


@needs_os
def test_collision_of_two_items_on_one_custom_doc_id_is_reported_with_both_keys(
    sink: OpenSearchSink,
) -> None:
    """Items whose owner records all name one document id (a view bug): each put takes the
    document (versions of two items are never compared), reports the item it took it from,
    and that item's claim waits; when the holder leaves, the claim parked last takes the
    document back. Items leaving never take another item's document with them."""
    r1 = sink.apply([up(CARDS, "item-1", 10, {"card": "c-7", "who": 1})])
    assert r1[0].collisions == []
    r2 = sink.apply([up(CARDS, "item-2", 11, {"card": "c-7", "who": 2})])
    assert r2[0].outcome is Outcome.APPLIED
    assert [(c.entry, c.other_item) for c in r2[0].collisions] == [("cards/c-7", "item-1")]
    r3 = sink.apply([up(CARDS, "item-3", 9, {"card": "c-7", "who": 3})])  # 9 < 11: no matter
    assert r3[0].outcome is Outcome.APPLIED
    assert [(c.entry, c.other_item) for c in r3[0].collisions] == [("cards/c-7", "item-2")]
    assert sink.live_documents(CARDS) == {"c-7": {"card": "c-7", "who": 3}}
    # the same item again is no collision
    assert sink.apply([up(CARDS, "item-3", 12, {"card": "c-7", "who": 3})])[0].collisions == []
    assert outcomes(sink.apply([rm(CARDS, "item-3", 13)])) == ["applied"]
    assert sink.live_documents(CARDS) == {"c-7": {"card": "c-7", "who": 2}}
    assert outcomes(sink.apply([rm(CARDS, "item-1", 13)])) == ["applied"]  # its claim only
    assert sink.live_documents(CARDS) == {"c-7": {"card": "c-7", "who": 2}}
    assert outcomes(sink.apply([rm(CARDS, "item-2", 13)])) == ["applied"]
    assert sink.live_documents(CARDS) == {}


@needs_os
def test_custom_doc_id_moves_and_removals_leave_no_orphans(sink: OpenSearchSink) -> None:
    sink.apply([up(CARDS, "i", 10, {"card": "a"}), up(CARDS, "j", 10, {"card": "x"})])
    assert outcomes(sink.apply([up(CARDS, "i", 11, {"card": "b"})])) == ["applied"]
    assert sink.live_documents(CARDS) == {"b": {"card": "b"}, "x": {"card": "x"}}
    assert outcomes(sink.apply([up(CARDS, "i", 10, {"card": "a"})])) == ["stale"]  # replay
    assert outcomes(sink.apply([rm(CARDS, "i", 12), rm(CARDS, "j", 12)])) == ["applied", "applied"]
    assert sink.live_documents(CARDS) == {}
    assert outcomes(sink.apply([up(CARDS, "i", 11, {"card": "b"})])) == ["stale"]
    assert sink.live_documents(CARDS) == {}


class Killed(BaseException):
    """kill -9 of the daemon in the middle of an apply: not an Exception, so nothing in the
    sink catches or retries it."""


def kill_at(
    sink: OpenSearchSink, when: Callable[[int, bytes], bool], *, sent: bool
) -> Callable[[], int]:
    """Kill the sink's next apply at the first request (counted from 0: ``_bulk`` bodies and
    ``mget``) for which ``when(n, body)`` holds: after it took effect (``sent``) or before
    it left (held, like the chaos suite's proxy does). One-shot. Returns a function that
    says how many requests went out."""
    real = sink._post
    count = itertools.count()
    seen = [0]

    def post(path: str, params: Any, body: bytes, headers: Any) -> Any:
        n = next(count)
        seen[0] = n + 1
        if when(n, body):
            delattr(sink, "_post")  # one-shot
            if sent:
                real(path, params, body, headers)
            raise Killed(f"killed {'after' if sent else 'before'} request {n}: {path}")
        return real(path, params, body, headers)

    setattr(sink, "_post", post)  # noqa: B010 - an instance attribute over the method
    return lambda: seen[0]


def owner_record(client: OpenSearch, sink: OpenSearchSink, view: View, item: str) -> Any:
    found = client.transport.perform_request(
        "GET", f"/{sink.indexes(view).owners}/_doc/{item}", params={"ignore": 404}
    )
    return found["_source"] if found.get("found") else None


@needs_os
def test_kill_between_the_owner_record_and_the_document_delete_of_a_custom_id_view(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """tests/test_chaos.py::test_kill_9_between_owner_record_and_document_delete_of_a_custom_id_view
    by hand. Item k0|0 (owner ana) has document ana.k0.0; its delete writes the tombstone
    (W1) and the daemon dies before the delete of ana.k0.0 (W2) leaves. The item is
    created again (owner bo) before any daemon runs: the next page holds the REMOVE and
    the INSERT and only the INSERT is applied. Its owner record must carry the pending
    delete of ana.k0.0, so that the INSERT's apply deletes it."""
    a = make_sink()
    a.prepare([CARDS])
    a.apply([up(CARDS, "k0|0", 10, {"card": "ana.k0.0", "owner": "ana"})])
    kill_at(a, lambda _, body: b'"params":{"op":"del"' in body, sent=False)
    with pytest.raises(Killed):
        a.apply([rm(CARDS, "k0|0", 11)])
    assert a.tombstones(CARDS) == {"k0|0": "1:11"}  # W1 is written
    assert set(a.live_documents(CARDS)) == {"ana.k0.0"}  # W2 is not
    b = make_sink()  # the restarted daemon
    assert outcomes(b.apply([up(CARDS, "k0|0", 12, {"card": "bo.k0.0", "owner": "bo"})])) == [
        "applied"
    ]
    assert b.live_documents(CARDS) == {"bo.k0.0": {"card": "bo.k0.0", "owner": "bo"}}


_CRASHING = {"delete": None, "move": "b"}  # what the killed apply does to the item (doc a)
_NEXT = {  # what the restarted daemon applies: the killed change again, or a newer one only
    "replay": "",
    "newer-upsert": "c",
    "newer-upsert-back": "a",
    "newer-delete": None,
}


@needs_os
@pytest.mark.parametrize("crashing", sorted(_CRASHING))
@pytest.mark.parametrize("after", sorted(_NEXT))
def test_a_kill_after_any_request_of_a_custom_id_apply_leaves_no_orphan(
    make_sink: Callable[..., OpenSearchSink], os_client: OpenSearch, crashing: str, after: str
) -> None:
    """I4 with I1 for custom doc ids: the daemon is killed after each request of an apply in
    turn (owner records, live documents, post-check, owner records again); the restarted
    daemon replays the change, or applies only a newer change of the item (a page that
    coalesces both). The alias ends with exactly the newest state's document and the
    owner record lists no pending delete."""
    first = make_sink()
    first.prepare([CARDS])
    for k in itertools.count():
        tag = f"k{k}-"
        item = tag + "item"

        def change(card: str | None, seq: int, item: str = item, tag: str = tag) -> Change:
            if card is None:
                return rm(CARDS, item, seq)
            return up(CARDS, item, seq, {"card": tag + card})

        first.apply([change("a", 10)])
        killed = make_sink()
        requests = kill_at(killed, lambda n, _, k=k: n == k, sent=True)
        try:
            killed.apply([change(_CRASHING[crashing], 11)])
        except Killed:
            pass
        else:
            assert k > 0 and requests() <= k  # every request was a crash point already
            break
        restarted = make_sink()
        card = _NEXT[after]
        last = change(_CRASHING[crashing], 11) if card == "" else change(card, 12)
        restarted.apply([last])
        want = {d.doc_id: d.body for d in last.entries if isinstance(d, Document)}
        got = {i: b for i, b in restarted.live_documents(CARDS).items() if i.startswith(tag)}
        assert got == want, f"killed after request {k}"
        rec = owner_record(os_client, restarted, CARDS, item)
        assert rec is not None and not rec.get("pending"), rec


@needs_os
def test_a_tombstone_with_pending_deletes_is_not_purged_until_they_are_done(
    make_sink: Callable[..., OpenSearchSink], clock: Clock
) -> None:
    a = make_sink()
    a.prepare([CARDS])
    a.apply([up(CARDS, "i", 1, {"card": "x"})])
    kill_at(a, lambda _, body: b'"params":{"op":"del"' in body, sent=False)
    with pytest.raises(Killed):
        a.apply([rm(CARDS, "i", 2)])
    b = make_sink()
    assert b.purge_tombstones(CARDS, older_than=clock.now + 1) == 0  # it still lists x
    assert outcomes(b.apply([rm(CARDS, "i", 2)])) == ["applied"]  # the replay deletes x
    assert b.live_documents(CARDS) == {}
    assert b.purge_tombstones(CARDS, older_than=clock.now + 1) == 1


@needs_os
@pytest.mark.parametrize(
    "older", [{"prev_doc": "old"}, {"prev_docs": ["old", "older"]}], ids=["v1", "v2"]
)
@pytest.mark.parametrize("replay", [False, True], ids=["newer-change", "replay"])
def test_owner_records_written_by_older_scripts_keep_their_documents_pending(
    sink: OpenSearchSink, os_client: OpenSearch, older: dict[str, Any], replay: bool
) -> None:
    """Upgrade: an owner record written by the v1 script (``prev_doc``) or the v2 script
    (``prev_docs``) whose deletes never ran, then a newer change or the same one again."""
    names = sink.indexes(CARDS)
    for doc_id in ("old", "older", "mid"):
        body = {"card": doc_id, "_vk": {"v": "1:1", "g": 1, "item": "i"}}
        os_client.index(index=names.alias, id=doc_id, body=body)
    os_client.index(
        index=names.owners,
        id="i",
        body={"v": "1:2", "g": 1, "item": "i", "doc": "mid", **older},
        refresh=True,
    )
    card = "mid" if replay else "new"
    sink.apply([up(CARDS, "i", 2 if replay else 3, {"card": card})])
    want = {"mid": {"card": "mid"}} if replay else {"new": {"card": "new"}}
    if "prev_doc" in older:
        want["older"] = {"card": "older"}  # not one the record listed
    assert sink.live_documents(CARDS) == want
    rec = owner_record(os_client, sink, CARDS, "i")
    assert rec["doc"] == card and not {"pending", "prev_doc", "prev_docs"} & set(rec)


@needs_os
def test_pending_deletes_never_take_another_items_document(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """Two items claim one document id (a view bug, reported): item-1's pending delete of
    c-7 must leave item-2's c-7 alone, killed or not."""
    a = make_sink()
    a.prepare([CARDS])
    a.apply([up(CARDS, "item-1", 10, {"card": "c-7", "who": 1})])
    a.apply([up(CARDS, "item-2", 11, {"card": "c-7", "who": 2})])  # takes c-7 over
    kill_at(a, lambda _, body: b'"params":{"op":"del"' in body, sent=False)
    with pytest.raises(Killed):
        a.apply([up(CARDS, "item-1", 12, {"card": "c-8", "who": 1})])
    b = make_sink()
    # applied: it removes item-1's claim on c-7 (waiting behind item-2's), not the document
    assert outcomes(b.apply([rm(CARDS, "item-1", 13)])) == ["applied"]
    assert b.live_documents(CARDS) == {"c-7": {"card": "c-7", "who": 2}}


@needs_os
def test_a_stale_put_taking_a_document_over_from_another_item_is_post_checked(
    sink: OpenSearchSink,
) -> None:
    """White-box race: item i's change at 10 (document d) writes its owner record; i's
    newer change at 20 moves to e and finishes, pending deletes and all; item j writes d
    at 5; only then does the change at 10 put d, taking it from j ("updated", not
    "created"). Its post-check must undo it: i does not own d any more, so no collision
    either, and j's claim takes d back."""
    [stale] = [sink._plan(up(CARDS, "i", 10, {"card": "d", "who": "i"}))]
    sink._owner_phase([stale])
    assert outcomes(sink.apply([up(CARDS, "i", 20, {"card": "e", "who": "i"})])) == ["applied"]
    assert outcomes(sink.apply([up(CARDS, "j", 5, {"card": "d", "who": "j"})])) == ["applied"]
    checks = sink._live_phase([stale])
    assert [(doc, other) for _, doc, other in checks] == [("d", "j")]
    sink._post_check(checks)
    assert stale.outcome is Outcome.STALE and not stale.collisions
    assert sink.live_documents(CARDS) == {
        "e": {"card": "e", "who": "i"},
        "d": {"card": "d", "who": "j"},
    }


@needs_os
def test_a_stale_replay_deletes_its_own_document_left_by_a_killed_applier(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """White-box race at a lease handover: the old holder A writes the owner record of
    item i's change at 10 (document d); the new holder B applies i's change at 20 (document
    e) in full; A's put of d lands (created) and A is killed before its post-check. B's
    replay of the change at 10 is STALE at the owner record and deletes d."""
    a, b = make_sink(), make_sink()
    a.prepare([CARDS])
    [stale] = [a._plan(up(CARDS, "i", 10, {"card": "d"}))]
    a._owner_phase([stale])
    assert outcomes(b.apply([up(CARDS, "i", 20, {"card": "e"})])) == ["applied"]
    assert [c[1] for c in a._live_phase([stale])] == ["d"]  # created; then a is killed
    assert set(b.live_documents(CARDS)) == {"d", "e"}
    assert outcomes(b.apply([up(CARDS, "i", 10, {"card": "d"})])) == ["stale"]
    assert b.live_documents(CARDS) == {"e": {"card": "e"}}


@needs_os
def test_mapping_rejection_is_an_error_for_that_change_only(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    sink.apply([up(ORDERS, "o-0", 1, {"total": 5})])  # maps total as long
    results = sink.apply(
        [
            up(ORDERS, "o-1", 2, {"total": 6}),
            up(ORDERS, "o-2", 2, {"total": {"amount": 7}}),
            up(ORDERS, "o-3", 2, {"total": 8}),
            Change(ORDERS, "o-4", Version(1, "2"), [Value("k", 1)]),
        ]
    )
    assert outcomes(results) == ["applied", "error", "applied", "error"]
    error = results[1].error or ""
    assert "'orders'" in error and "'o-2'" in error and "mapper_parsing_exception" in error
    assert "total" in error
    assert "Document" in (results[3].error or "")
    assert set(sink.live_documents(ORDERS)) == {"o-0", "o-1", "o-3"}


@needs_os
def test_a_refused_move_keeps_the_last_good_document_through_stale_changes_and_replays(
    make_sink: Callable[..., OpenSearchSink], os_client: OpenSearch
) -> None:
    """F9: a put OpenSearch refuses leaves its item as it was — its last good document, and an
    owner record naming it again ('keep'), so that a stale change does not take it for a
    pending delete; the same change applied again with a body the mapping takes (a dead
    letter replayed once the view is fixed) moves the item; a new item whose first put is
    refused gets nothing. One request at a time and two at once."""
    for concurrency in (1, 2):
        sink = make_sink(bulk_concurrency=concurrency)
        sink.prepare([CARDS])
        i, j = f"i{concurrency}", f"j{concurrency}"
        a, b, c = f"a{concurrency}", f"b{concurrency}", f"c{concurrency}"
        assert outcomes(sink.apply([up(CARDS, i, 10, {"card": a, "total": 5})])) == ["applied"]
        refused = [
            up(CARDS, i, 11, {"card": b, "total": {"amount": 7}}),
            up(CARDS, j, 11, {"card": c, "total": {"amount": 7}}),
        ]
        assert outcomes(sink.apply(refused)) == ["error", "error"]
        record = os_client.get(index=sink.indexes(CARDS).owners, id=i)["_source"]
        assert (record["v"], record["doc"], record.get("was")) == ("1:11", a, None)
        stale = [up(CARDS, i, 9, {"card": a, "total": 4}), up(CARDS, j, 9, {"card": c, "total": 1})]
        assert outcomes(sink.apply(stale)) == ["stale", "stale"]
        docs = {k: v for k, v in sink.live_documents(CARDS).items() if k.endswith(str(concurrency))}
        assert docs == {a: {"card": a, "total": 5}}
        fixed = [
            up(CARDS, i, 11, {"card": b, "total": 7}),
            up(CARDS, j, 11, {"card": c, "total": 7}),
        ]
        assert outcomes(sink.apply(fixed)) == ["applied", "applied"]
        docs = {k: v for k, v in sink.live_documents(CARDS).items() if k.endswith(str(concurrency))}
        assert docs == {b: {"card": b, "total": 7}, c: {"card": c, "total": 7}}
        assert outcomes(sink.apply([rm(CARDS, i, 12), rm(CARDS, j, 12)])) == ["applied"] * 2
        docs = {k: v for k, v in sink.live_documents(CARDS).items() if k.endswith(str(concurrency))}
        assert docs == {}


@needs_os
def test_a_custom_id_put_whose_owner_record_was_swept_is_undone_by_its_post_check(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """F11: a record named a document when W1 wrote it; gone at the post-check, a sweep to a
    newer generation took it (the item was not found): the put is undone (STALE), also when
    the item had no document before, and a later change of the new generation still writes."""
    a, b = make_sink(bulk_concurrency=1), make_sink(bulk_concurrency=1)
    a.prepare([CARDS])
    [put] = [a._plan(up(CARDS, "n", 20, {"card": "x"}, gen=1))]
    a._owner_phase([put])
    b.sweep(CARDS, 2, 0.0)
    a._post_check(a._live_phase([put]))
    a._unpend_phase([put])
    assert a._result(put).outcome is Outcome.STALE
    assert a.live_documents(CARDS) == {}
    assert outcomes(b.apply([up(CARDS, "n", 5, {"card": "x"}, gen=2)])) == ["applied"]
    assert a.live_documents(CARDS) == {"x": {"card": "x"}}


LONG_KEY = "k" * 2048  # DynamoDB's largest partition key


def _bulk_actions(body: bytes) -> list[tuple[str, str]]:
    """(index, document id) of the actions of a ``_bulk`` body."""
    return [
        (action["_index"], action["_id"])
        for line in body.splitlines()[::2]
        for action in orjson.loads(line).values()
    ]


@needs_os
def test_a_bulk_the_node_refuses_as_a_whole_fails_only_the_change_at_fault(
    sink: OpenSearchSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSearch refuses a whole ``_bulk`` (HTTP 400 action_request_validation_exception)
    when one action's ``_id`` is over 512 bytes: here the owner records (W1) of a REMOVE
    (tombstone) and of a custom-id change of an item with a 2 KB key, whose ``_id`` is made
    that key (the sink gives such keys a digest id: ``item_id`` is patched to give the key
    itself, as the sink did before, to have a refusal the real node makes). The sink splits
    the request until the action at fault is alone: its change is ERROR naming view, item,
    document id and OpenSearch's reason; the rest of the batch is applied, and a change
    whose W1 failed sends nothing after it (no W2, no put)."""
    # patched where it is looked up: the plans (owner record ids) and the post-check
    for module in (opensearch_plans_module, opensearch_apply_module):
        monkeypatch.setattr(module, "item_id", lambda key: key)
    sent: list[tuple[str, str]] = []
    real = sink._post

    def post(path: str, params: Any, body: bytes, headers: Any) -> Any:
        if path == "/_bulk":
            sent.extend(_bulk_actions(body))
        return real(path, params, body, headers)

    setattr(sink, "_post", post)  # noqa: B010 - an instance attribute over the method
    results = sink.apply(
        [
            up(ORDERS, "o-1", 10, {"n": 1}),
            rm(ORDERS, LONG_KEY, 10),
            up(CARDS, "i-1", 10, {"card": "c-1"}),
            up(CARDS, LONG_KEY, 10, {"card": "c-2"}),
            rm(ORDERS, "o-2", 10),
        ]
    )
    assert outcomes(results) == ["applied", "error", "applied", "error", "applied"]
    for result, view in ((results[1], ORDERS), (results[3], CARDS)):
        error = result.error or ""
        assert f"view {view.name!r}" in error, error
        assert "owner record" in error and LONG_KEY[:100] in error, error
        assert "action_request_validation_exception" in error and "512" in error, error
        assert len(error) < 1500, f"the 2 KB key is echoed in full: {len(error)} characters"
    assert sink.live_documents(ORDERS) == {"o-1": {"n": 1}}
    assert sink.live_documents(CARDS) == {"c-1": {"card": "c-1"}}
    assert sink.tombstones(ORDERS) == {"o-2": "1:10"}
    live = {sink.indexes(ORDERS).alias, sink.indexes(CARDS).alias}
    assert not [(i, d) for i, d in sent if i in live and (d == LONG_KEY or d == "c-2")]


def digest_id(key: str) -> str:
    """The documented ``_id`` of an item key over 512 bytes (sinks/opensearch/README.md § Ids)."""
    return "vk:sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def test_item_keys_become_ids_as_they_are_up_to_512_bytes_and_as_a_digest_above() -> None:
    item_id = opensearch_module.item_id
    assert item_id("o-1") == "o-1"
    assert item_id("é" * 256) == "é" * 256  # 512 bytes
    assert item_id("é" * 256 + "x") == digest_id("é" * 256 + "x")  # 513 bytes
    assert item_id(LONG_KEY) == digest_id(LONG_KEY) and len(digest_id(LONG_KEY)) == 74
    # a short key that looks like a digest is digested too: two keys never share an id
    lookalike = digest_id(LONG_KEY)
    assert item_id(lookalike) == digest_id(lookalike) != item_id(LONG_KEY)


@needs_os
def test_a_2_kb_item_key_works_in_a_default_id_view_under_its_digest_id(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    """DynamoDB keys go up to 2048 + 1024 bytes, OpenSearch ids to 512: the document and
    the tombstone of such an item are stored under the digest id; ``_vk.item`` and the
    owner record's ``item`` hold the whole key. Insert, modify, remove, and a stale replay
    after the remove does not bring the document back."""
    names = sink.indexes(ORDERS)
    doc_id = digest_id(LONG_KEY)
    assert outcomes(sink.apply([up(ORDERS, LONG_KEY, 10, {"n": 1}), up(ORDERS, "a", 10, {})])) == [
        "applied",
        "applied",
    ]
    doc = get_doc(os_client, names.alias, doc_id)
    assert doc == {"n": 1, "_vk": {"v": "1:10", "g": 1, "item": LONG_KEY}}
    assert outcomes(sink.apply([up(ORDERS, LONG_KEY, 11, {"n": 2})])) == ["applied"]
    assert sink.live_documents(ORDERS) == {doc_id: {"n": 2}, "a": {}}
    assert outcomes(sink.apply([rm(ORDERS, LONG_KEY, 12)])) == ["applied"]
    assert sink.live_documents(ORDERS) == {"a": {}}
    assert sink.tombstones(ORDERS) == {LONG_KEY: "1:12"}
    tomb = owner_record(os_client, sink, ORDERS, doc_id)
    assert tomb is not None and tomb["item"] == LONG_KEY
    assert outcomes(sink.apply([up(ORDERS, LONG_KEY, 11, {"n": 2})])) == ["stale"]
    assert outcomes(sink.apply([rm(ORDERS, LONG_KEY, 12)])) == ["stale"]
    assert sink.live_documents(ORDERS) == {"a": {}}
    assert outcomes(sink.apply([up(ORDERS, LONG_KEY, 13, {"n": 3})])) == ["applied"]
    assert sink.live_documents(ORDERS) == {doc_id: {"n": 3}, "a": {}}


@needs_os
def test_a_2_kb_item_key_works_in_a_doc_id_view_its_owner_record_under_the_digest_id(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    owner_id = digest_id(LONG_KEY)
    assert outcomes(sink.apply([up(CARDS, LONG_KEY, 10, {"card": "c-1"})])) == ["applied"]
    rec = owner_record(os_client, sink, CARDS, owner_id)
    assert rec is not None and rec["item"] == LONG_KEY and rec["doc"] == "c-1"
    doc = get_doc(os_client, sink.indexes(CARDS).alias, "c-1")
    assert doc is not None and doc["_vk"]["item"] == LONG_KEY
    assert outcomes(sink.apply([up(CARDS, LONG_KEY, 11, {"card": "c-2"})])) == ["applied"]
    assert sink.live_documents(CARDS) == {"c-2": {"card": "c-2"}}
    assert outcomes(sink.apply([rm(CARDS, LONG_KEY, 12)])) == ["applied"]
    assert sink.live_documents(CARDS) == {}
    assert sink.tombstones(CARDS) == {LONG_KEY: "1:12"}
    for seq, card in ((10, "c-1"), (11, "c-2")):  # stale replays
        assert outcomes(sink.apply([up(CARDS, LONG_KEY, seq, {"card": card})])) == ["stale"]
    assert sink.live_documents(CARDS) == {}


@needs_os
def test_a_doc_id_over_512_bytes_is_that_changes_error_naming_the_view_bug(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    """A doc_id= function returning an id over 512 bytes is a bug of the view: that change
    is ERROR before anything is written for it; the rest of the batch is applied."""
    long_id = "c" * 600
    results = sink.apply(
        [
            up(CARDS, "i-1", 10, {"card": "c-1"}),
            up(CARDS, "i-2", 10, {"card": long_id}),
            up(CARDS, "i-3", 10, {"card": "é" * 257}),  # 514 bytes in UTF-8
        ]
    )
    assert outcomes(results) == ["applied", "error", "error"]
    for result, size in ((results[1], 600), (results[2], 514)):
        error = result.error or ""
        assert "view 'cards'" in error and "'i-" in error and "doc_id=" in error, error
        assert f"{size} bytes" in error and "512" in error and len(error) < 600, error
    assert sink.live_documents(CARDS) == {"c-1": {"card": "c-1"}}
    assert owner_record(os_client, sink, CARDS, "i-2") is None


@needs_os
def test_item_conflicts_beyond_retry_on_conflict_are_retried_until_applied(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """Two writers hammer one document with retry_on_conflict=0: 409s are retried here."""
    a = make_sink(retry_on_conflict=0, unavailable_after=30.0)
    b = make_sink(retry_on_conflict=0, unavailable_after=30.0)
    a.prepare([ORDERS])
    errors: list[BaseException] = []

    def writer(sink: OpenSearchSink, parity: int) -> None:
        try:
            for n in range(parity, 120, 2):
                [res] = sink.apply([up(ORDERS, "hot", 1000 + n, {"n": n})])
                assert res.outcome in (Outcome.APPLIED, Outcome.STALE)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, p)) for s, p in ((a, 0), (b, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert a.live_documents(ORDERS) == {"hot": {"n": 119}}


@needs_os
def test_missing_stored_script_is_stored_again(sink: OpenSearchSink, os_client: OpenSearch) -> None:
    os_client.transport.perform_request("DELETE", f"/_scripts/{sink.script_id}")
    assert outcomes(sink.apply([up(ORDERS, "o-1", 1, {"n": 1})])) == ["applied"]


@needs_os
def test_a_document_over_http_max_content_length_fails_alone(opensearch_url: str) -> None:
    """A node of its own with ``http.max_content_length: 1mb``: OpenSearch refuses the whole
    request (413); the sink halves it until the one document fails alone as ERROR."""
    from tests.testbed import OpenSearchNode

    node = OpenSearchNode()
    (node.home / "config").mkdir(parents=True, exist_ok=True)
    (node.home / "config" / "opensearch.yml").write_text("http.max_content_length: 1mb\n")
    with node:
        sink = OpenSearchSink("search", hosts=[node.url], index_settings={"number_of_replicas": 0})
        try:
            small = [up(ORDERS, f"o-{i}", 1, {"blob": "y" * 50_000}) for i in range(30)]
            big = up(ORDERS, "big", 1, {"blob": "x" * (2 * 2**20)})
            results = sink.apply([*small[:15], big, *small[15:]])
            assert outcomes(results) == ["applied"] * 15 + ["error"] + ["applied"] * 15
            error = results[15].error or ""
            assert "'big'" in error and "max_content_length" in error and "HTTP 413" in error
            assert len(sink.live_documents(ORDERS)) == 30
        finally:
            sink.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_unreachable_host_raises_sink_unavailable_naming_sink_and_host_not_password() -> None:
    port = _free_port()
    sink = OpenSearchSink(
        "search", hosts=[f"http://admin:s3cret@127.0.0.1:{port}"], unavailable_after=0.6
    )
    started = time.monotonic()
    with pytest.raises(SinkUnavailable) as err:
        sink.apply([up(ORDERS, "o-1", 1, {"n": 1})])
    elapsed = time.monotonic() - started
    text = str(err.value)
    assert "'search'" in text and f"127.0.0.1:{port}" in text
    assert "s3cret" not in text and "admin" not in text
    assert elapsed < 5
    with pytest.raises(SinkUnavailable):
        sink.ping()
    sink.close()


@needs_os
def test_ping_reaches_the_node(sink: OpenSearchSink) -> None:
    sink.ping()


@needs_os
def test_purge_removes_only_tombstones_older_than_the_cutoff(
    sink: OpenSearchSink, clock: Clock
) -> None:
    clock.now = 1_000.0
    sink.apply([rm(ORDERS, "old", 1), up(CARDS, "card-holder", 1, {"card": "c"})])
    clock.now = 5_000.0
    sink.apply([rm(ORDERS, "new", 1), rm(CARDS, "gone", 1)])
    assert sink.purge_tombstones(ORDERS, older_than=3_000.0) == 1
    assert sink.tombstones(ORDERS) == {"new": "1:1"}
    # owner records of live documents (custom doc_id) are never purged
    assert sink.purge_tombstones(CARDS, older_than=10_000.0) == 1
    assert outcomes(sink.apply([rm(CARDS, "card-holder", 2)])) == ["applied"]
    assert sink.live_documents(CARDS) == {}
    clock.now = 5_000.0 + sink.tombstone_retention + 1
    assert sink.purge_expired([ORDERS, CARDS]) == 2


@needs_os
def test_sweep_removes_only_documents_of_older_generations(sink: OpenSearchSink) -> None:
    sink.apply([up(ORDERS, k, 100, {"k": k}, gen=1) for k in ("a", "b", "c", "d")])
    # rebuild to generation 2: the scan writes a and b; the stream updates c meanwhile
    sink.apply(
        [
            up(ORDERS, "a", 0, {"k": "a2"}, gen=2),
            up(ORDERS, "b", 0, {"k": "b2"}, gen=2),
            up(ORDERS, "c", 101, {"k": "c2"}, gen=2),
        ]
    )
    assert sink.sweep(ORDERS, 2, now=0.0) == 1
    assert sink.live_documents(ORDERS) == {"a": {"k": "a2"}, "b": {"k": "b2"}, "c": {"k": "c2"}}
    assert sink.sweep(ORDERS, 2, now=0.0) == 0


@needs_os
def test_sweep_also_removes_documents_viewkeeper_did_not_write(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    """Drift: someone indexed straight into the alias; a rebuild's sweep repairs it."""
    alias = sink.indexes(ORDERS).alias
    sink.apply([up(ORDERS, "a", 0, {"k": "a"}, gen=2)])
    os_client.index(index=alias, id="stray", body={"k": "x"}, refresh=True)
    os_client.index(index=alias, id="a2", body={"k": "y", "_vk": {"note": "no g"}}, refresh=True)
    assert sink.sweep(ORDERS, 2, now=0.0) == 2
    assert sink.live_documents(ORDERS) == {"a": {"k": "a"}}


@needs_os
def test_sweep_of_a_custom_id_view_forgets_the_swept_owner_records(
    sink: OpenSearchSink,
) -> None:
    sink.apply([up(CARDS, "i", 1, {"card": "x"}), up(CARDS, "j", 1, {"card": "y"})])
    sink.apply([up(CARDS, "i", 0, {"card": "x"}, gen=2)])
    assert sink.sweep(CARDS, 2, now=0.0) == 1
    assert sink.live_documents(CARDS) == {"x": {"card": "x"}}


@needs_os
def test_a_deleted_alias_is_reported_unavailable_then_recreated(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    names = sink.indexes(ORDERS)
    os_client.indices.delete(index=names.live)
    with pytest.raises(SinkUnavailable, match="rebuild"):
        sink.apply([up(ORDERS, "o-1", 1, {"n": 1})])
    assert outcomes(sink.apply([up(ORDERS, "o-1", 1, {"n": 1})])) == ["applied"]
    assert sink.live_documents(ORDERS) == {"o-1": {"n": 1}}


@needs_os
def test_the_claim_lives_in_both_indexes_and_an_owner_index_made_by_a_write_is_replaced(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    """F2/F3: read_claim needs the same claim in both indexes' _meta; an owner index made
    again by a write without the template (dynamic mappings: text where viewkeeper maps
    keywords) holds none, and write_claim replaces it; an owner index of format 1 (older
    viewkeeper, no claim there) is trusted until the claim is written again."""
    claim = Claim(Owner("arn:t", "coord", "dep"), "m1", 2)
    sink.write_claim(CARDS, claim)
    assert sink.read_claim(CARDS) == claim
    names = sink.indexes(CARDS)
    os_client.transport.perform_request("DELETE", f"/_index_template/{sink.owners_template}")
    os_client.indices.delete(index=names.owners)
    os_client.index(index=names.owners, id="x", body={"v": "1:1", "item": "x", "doc": "d"})
    assert sink.read_claim(CARDS) is None  # lost: no claim in the owner index
    sink.write_claim(CARDS, Claim(claim.owner, "m2", 2))  # re-armed: the index is replaced
    assert sink.read_claim(CARDS) == Claim(claim.owner, "m2", 2)
    mapping = os_client.indices.get_mapping(index=names.owners)[names.owners]["mappings"]
    assert mapping["properties"]["doc"]["type"] == "keyword"
    assert outcomes(sink.apply([up(CARDS, "i", 1, {"card": "a"})])) == ["applied"]

    legacy = {"viewkeeper": {"view": CARDS.name, "role": "owners", "format": 1}}
    os_client.indices.put_mapping(index=names.owners, body={"_meta": legacy})
    assert sink.read_claim(CARDS) == Claim(claim.owner, "m2", 2)
    legacy["viewkeeper"]["format"] = 2  # type: ignore[index]
    os_client.indices.put_mapping(index=names.owners, body={"_meta": legacy})
    assert sink.read_claim(CARDS) is None  # made by this viewkeeper without a claim: lost


@needs_os
def test_an_owner_index_made_by_a_write_gets_viewkeepers_mappings_a_refused_template_warns(
    make_sink: Callable[..., OpenSearchSink],
    os_client: OpenSearch,
    os_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = make_sink()
    sink.prepare([CARDS])
    owners = sink.indexes(CARDS).owners
    os_client.indices.delete(index=owners)
    os_client.index(index=owners, id="x", body={"v": "1:1", "item": "x", "doc": "d"})
    mapping = os_client.indices.get_mapping(index=owners)[owners]["mappings"]
    assert mapping["properties"]["doc"]["type"] == "keyword" and "_meta" not in mapping
    # another template at the owner template's priority, over the same names: refused
    os_client.transport.perform_request("DELETE", f"/_index_template/{sink.owners_template}")
    other = {"index_patterns": [f"{os_prefix}*"], "priority": 2_000_000_000 + len(os_prefix)}
    os_client.transport.perform_request("PUT", f"/_index_template/{os_prefix}other", body=other)
    make_sink().prepare([CARDS])
    assert "cannot store the index template" in caplog.text


@needs_os
def test_bulk_throughput_report(
    make_sink: Callable[..., OpenSearchSink],
    opensearch_url: str,
    os_prefix: str,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not a guarantee: docs/s of 1000-document batches, the sink vs a raw ``_bulk`` index of
    the same documents (``_vk`` included) on the same node through the same client, and what
    a tombstone pre-check mget would cost. Printed and recorded as junit properties. Creates
    are new documents; updates rewrite documents already refreshed into segments, the first
    round through the script (nothing cached), later rounds through the cached fast path.
    The assertion only catches a collapse such as a round trip per document."""
    os_client = make_client([opensearch_url], timeout=60)
    sink = make_sink(client=os_client)
    sink.prepare([ORDERS])
    raw_index = f"{os_prefix}raw"
    os_client.indices.create(index=raw_index, body={"settings": {"number_of_replicas": 0}})
    n, batch = 5000, 1000

    def body(i: int, r: int) -> dict[str, Any]:
        return {
            "customer_id": f"c{i % 100}",
            "status": "open",
            "total": i * 1.5,
            "r": r,
            "tags": ["a", "b"],
            "note": "x" * 50,
        }

    def raw(ids: list[int], r: int) -> None:
        head = b'{"index":{"_index":' + orjson.dumps(raw_index) + b',"_id":"%d"}}\n'
        for start in range(0, n, batch):
            lines = [
                head % i
                + orjson.dumps(
                    {**body(i, r), "_vk": {"v": f"1:{r}{i:020d}", "g": 1, "item": str(i)}}
                )
                + b"\n"
                for i in ids[start : start + batch]
            ]
            resp = os_client.transport.perform_request(
                "POST",
                "/_bulk",
                body=b"".join(lines),
                headers={"content-type": "application/x-ndjson"},
            )
            assert not resp["errors"]

    def through_sink(ids: list[int], r: int) -> None:
        for start in range(0, n, batch):
            results = sink.apply(
                [up(ORDERS, str(i), f"{r}{i:020d}", body(i, r)) for i in ids[start : start + batch]]
            )
            assert {x.outcome for x in results} == {Outcome.APPLIED}

    def rate(fn: Callable[[list[int], int], None], ids: list[int], r: int) -> float:
        started = time.perf_counter()
        fn(ids, r)
        return n / (time.perf_counter() - started)

    rates: dict[str, list[float]] = {}
    for r in range(1, 5):
        fresh = list(range(r * 10**6, r * 10**6 + n))
        for label, fn in (("raw", raw), ("sink", through_sink)):
            rates.setdefault(f"create {label}", []).append(rate(fn, fresh, r))
        # updates of documents already refreshed into segments (the slower, common case)
        os_client.indices.refresh(index=f"{raw_index},{sink.indexes(ORDERS).alias}")
        for label, fn in (("raw", raw), ("sink", through_sink)):
            rates.setdefault(f"update {label}", []).append(rate(fn, fresh, r + 10))
    owners = sink.indexes(ORDERS).owners
    started = time.perf_counter()
    for start in range(0, n, batch):
        sink._mget(owners, [str(i) for i in range(start, start + batch)])
    mget_ms = (time.perf_counter() - started) * 1000 / (n / batch)

    def best(key: str) -> float:
        return max(rates[key])

    report = {key: round(best(key)) for key in rates}
    ratios = {
        kind: round(best(f"{kind} sink") / best(f"{kind} raw"), 2) for kind in ("create", "update")
    }
    with capsys.disabled():
        print(
            f"\nOpenSearch bulk docs/s (best of 4, {batch}-doc batches): {report}; "
            f"sink/raw {ratios}; a pre-check mget of {batch} ids: {mget_ms:.1f} ms"
        )
    record_property("opensearch_bulk_docs_per_s", report)
    record_property("opensearch_sink_vs_raw", ratios)
    os_client.close()
    assert min(ratios.values()) > 0.15


RACE = {
    "type": "illegal_argument_exception",
    "reason": "mapper [n] cannot be changed from type [long] to [float]",
}


@needs_os
@pytest.mark.parametrize("refusals", [1, 3, 10])
def test_a_put_refused_for_a_concurrent_mapping_update_is_sent_again(
    sink: OpenSearchSink, refusals: int
) -> None:
    """Two requests that bring one new field at once, as an integer and as a decimal, race
    on OpenSearch's dynamic mapping update; the loser's document is refused (400 "mapper
    [n] cannot be changed from type [long] to [float]") though it is taken once the field is
    mapped (tests/test_chaos.py reproduces the race on the node). Here the node's answer to
    the put of o-2 is that refusal, ``refusals`` times in a row: up to three resends the
    change is applied; a refusal that stays is the document's, ERROR with OpenSearch's
    reason (dead-lettered), never a shard held on it."""
    real = sink._bulk
    refused: list[str] = []

    def bulk(ops: list[Any], require_alias: bool, deadline: float) -> list[dict[str, Any]]:
        refuse = [op.kind == "put" and op.doc_id == "o-2" and len(refused) < refusals for op in ops]
        refused.extend("o-2" for r in refuse if r)  # the node refuses it: not written
        sent = [op for op, r in zip(ops, refuse, strict=True) if not r]
        taken = iter(real(sent, require_alias, deadline) if sent else [])
        return [{"status": 400, "error": RACE} if r else next(taken) for r in refuse]

    setattr(sink, "_bulk", bulk)  # noqa: B010 - an instance attribute over the method
    results = sink.apply([up(ORDERS, "o-1", 10, {"n": 1}), up(ORDERS, "o-2", 10, {"n": 1.5})])
    if refusals <= 3:
        assert outcomes(results) == ["applied", "applied"]
        assert sink.live_documents(ORDERS) == {"o-1": {"n": 1}, "o-2": {"n": 1.5}}
        assert len(refused) == refusals
    else:
        assert outcomes(results) == ["applied", "error"]
        error = results[1].error or ""
        assert "view 'orders'" in error and "cannot be changed from type" in error, error
        assert len(refused) == 4, "the first send and three resends"
        assert sink.live_documents(ORDERS) == {"o-1": {"n": 1}}
