"""Change-log views on the OpenSearch sink (``@changelog_view(opensearch=..., index=...)``),
checked against the real OpenSearch node of the test bed: one document per record in a
daily index behind the view's alias, appended once however often the record comes.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opensearchpy import OpenSearch

from tests.helpers import Clock, view_for
from viewkeeper.projection.api import View
from viewkeeper.projection.changelog import changelog_view
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import (
    Append,
    Change,
    Claim,
    NamespaceLost,
    Outcome,
    Owner,
    Result,
    SinkError,
)
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.opensearch.changelog_indexes import TEMPLATE_PRIORITY

needs_os = pytest.mark.opensearch
DAY = 86_400
NOW = 1_700_000_000.0  # the tests' Clock: 2023-11-14 22:13:20 UTC
_views = itertools.count()


def log_view(index: str = "orders-audit", retention_days: int | None = None) -> View:
    """A change-log view on ``index`` (a fresh name per call)."""

    def audit(change: Any) -> dict[str, Any]:
        return dict(change.new or {})

    changelog_view(
        table="orders",
        opensearch="search",
        index=index,
        retention_days=retention_days,
        name=f"audit_{next(_views)}",
    )(audit)
    return view_for(audit)


def seq(n: int) -> str:
    """A SequenceNumber-like decimal text: 21 digits and more."""
    return str(10**20 + n)


def app(view: View, s: str, item: str = "o1", at: float = NOW, **body: Any) -> Append:
    return Append(view, "shard-1", s, item, body or {"status": "new"}, at)


def outcomes(results: list[Result]) -> list[str]:
    return [r.outcome.value for r in results]


def day_of(t: float) -> str:
    return time.strftime("%Y.%m.%d", time.gmtime(t))


def count(client: OpenSearch, index: str) -> int:
    client.indices.refresh(index=index, ignore_unavailable=True)
    return int(client.count(index=index, ignore_unavailable=True)["count"])


def hits(client: OpenSearch, index: str, **body: Any) -> list[dict[str, Any]]:
    client.indices.refresh(index=index)
    found = client.search(index=index, body={"size": 1000, **body})
    return list(found["hits"]["hits"])


@pytest.fixture
def sink(make_sink: Callable[..., OpenSearchSink]) -> OpenSearchSink:
    return make_sink()


# --- pure ------------------------------------------------------------------------------
def test_the_names_of_a_change_log_view_and_its_template_priority() -> None:
    made = OpenSearchSink("search", OpenSearch(hosts=["http://127.0.0.1:1"]), index_prefix="p-")
    view = log_view()
    assert made.changelog_alias(view) == "p-orders-audit"
    assert made.changelog_index(view, NOW) == "p-orders-audit-2023.11.14"
    assert made.changelog_template(view) == "p-viewkeeper-changelog-orders-audit"
    body = made._template_body(view, None)
    assert body["index_patterns"] == ["p-orders-audit-*"]
    assert body["priority"] == TEMPLATE_PRIORITY + len("p-orders-audit")
    assert body["template"]["aliases"] == {"p-orders-audit": {}}
    made.close()


# --- append ----------------------------------------------------------------------------
@needs_os
def test_appends_land_once_and_the_same_batch_again_is_all_stale(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    view = log_view()
    batch = [app(view, seq(i), item=f"o{i}", total=i) for i in range(3)]
    sink.prepare([view])
    assert outcomes(sink.append(batch)) == ["applied"] * 3
    assert outcomes(sink.append(batch)) == ["stale"] * 3
    alias = sink.changelog_alias(view)
    assert count(os_client, alias) == 3
    doc = os_client.get(index=sink.changelog_index(view, NOW), id=seq(1))["_source"]
    assert doc == {
        "total": 1,
        "_vk": {
            "seq": seq(1),
            "seq_sort": seq(1).zfill(40),
            "item": "o1",
            "at": int(NOW * 1000),
        },
    }
    # no live or owner index for a change-log view
    assert not os_client.indices.exists(index=f"{alias}.vk-live")
    assert not os_client.indices.exists(index=f"{alias}.vk-owners")


@needs_os
def test_a_record_twice_in_one_batch_is_appended_once(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    view = log_view()
    a, b = app(view, seq(1)), app(view, seq(2))
    assert outcomes(sink.append([a, b, a])) == ["applied", "applied", "stale"]
    assert count(os_client, sink.changelog_alias(view)) == 2


@needs_os
def test_two_days_land_in_two_daily_indices_both_searched_through_the_alias(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    view = log_view()
    sink.append([app(view, seq(1), at=NOW - DAY), app(view, seq(2), at=NOW)])
    alias = sink.changelog_alias(view)
    days = {f"{alias}-{day_of(NOW - DAY)}", f"{alias}-{day_of(NOW)}"}
    assert set(os_client.indices.get_alias(name=alias)) == days
    assert {h["_id"]: h["_index"] for h in hits(os_client, alias)} == {
        seq(1): f"{alias}-2023.11.13",
        seq(2): f"{alias}-2023.11.14",
    }
    mapping = os_client.indices.get_mapping(index=f"{alias}-2023.11.13")
    vk = mapping[f"{alias}-2023.11.13"]["mappings"]["properties"]["_vk"]["properties"]
    assert vk["seq_sort"] == {"type": "keyword"}
    assert vk["at"]["type"] == "date"


@needs_os
def test_a_change_without_a_creation_time_lands_on_the_day_of_the_sink_clock(
    sink: OpenSearchSink, os_client: OpenSearch, clock: Clock
) -> None:
    view = log_view()
    clock.now = NOW + 2 * DAY
    assert outcomes(sink.append([app(view, seq(1), at=0.0)])) == ["applied"]
    doc = os_client.get(index=sink.changelog_index(view, clock.now), id=seq(1))["_source"]
    assert doc["_vk"]["at"] == int(clock.now * 1000)


@needs_os
def test_one_items_changes_come_back_in_stream_order_sorted_on_the_padded_sequence(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    """Sequence numbers of unequal length: their text sorts wrong, ``_vk.seq_sort`` right."""
    view = log_view()
    seqs = ["99999999999999999999", "100000000000000000000", "1000000000000000000000"]
    shuffled = [seqs[2], seqs[0], seqs[1]]
    results = sink.append([app(view, s, item="o1", step=seqs.index(s)) for s in shuffled])
    assert outcomes(results) == ["applied"] * 3
    sink.append([app(view, seq(5), item="other")])
    alias = sink.changelog_alias(view)
    query = {"term": {"_vk.item": "o1"}}
    by_pad = hits(os_client, alias, query=query, sort=[{"_vk.seq_sort": "asc"}])
    assert [h["_source"]["step"] for h in by_pad] == [0, 1, 2]
    by_text = hits(os_client, alias, query=query, sort=[{"_vk.seq": "asc"}])
    assert [h["_source"]["step"] for h in by_text] != [0, 1, 2]  # why seq_sort exists


@needs_os
def test_a_document_opensearch_rejects_is_an_error_alone(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    view = log_view()
    assert outcomes(sink.append([app(view, seq(1), total=5)])) == ["applied"]  # total: long
    bad, good = sink.append([app(view, seq(2), total="abc"), app(view, seq(3), total=7)])
    assert bad.outcome is Outcome.ERROR and good.outcome is Outcome.APPLIED
    assert bad.error is not None
    assert view.name in bad.error and seq(2) in bad.error
    assert "mapper_parsing_exception" in bad.error
    assert count(os_client, sink.changelog_alias(view)) == 2
    [again] = sink.append([app(view, seq(2), total="abc")])  # replayed: the same error
    assert again.outcome is Outcome.ERROR


@needs_os
def test_a_record_the_sink_cannot_encode_or_name_is_an_error_alone(sink: OpenSearchSink) -> None:
    view = log_view()
    results = sink.append(
        [
            app(view, "12ab"),
            app(view, seq(1), total=float("nan")),
            app(view, seq(2)),
        ]
    )
    assert outcomes(results) == ["error", "error", "applied"]
    assert "12ab" in str(results[0].error) and "NaN" in str(results[1].error)


# --- retention and wipe ----------------------------------------------------------------
@needs_os
def test_the_retention_purge_deletes_old_days_only(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    view = log_view(retention_days=2)
    keep_all = log_view(index="orders-keep")
    for v in (view, keep_all):
        sink.append([app(v, seq(k), at=NOW - k * DAY) for k in range(5)])
        sink.append([app(v, seq(10 + k), at=NOW - k * DAY) for k in range(5)])
    alias = sink.changelog_alias(view)
    # the clock is at 2023-11-14 22:13: days that ended 2 days before (11-11 and older) go
    assert sink.purge_tombstones(view, 0.0) == 4
    left = set(os_client.indices.get_alias(name=alias))
    assert left == {f"{alias}-2023.11.{d}" for d in (12, 13, 14)}
    assert count(os_client, alias) == 6
    assert sink.purge_tombstones(view, 0.0) == 0
    assert sink.purge_expired([view, keep_all]) == 0
    assert count(os_client, sink.changelog_alias(keep_all)) == 10  # retention None: all kept


@needs_os
def test_wipe_deletes_every_day_and_says_how_many_documents_went(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    view = log_view()
    other = log_view(index="orders-audit-eu")  # under the first one's pattern: not its day
    sink.append([app(view, seq(k), at=NOW - k * DAY) for k in range(3)])
    sink.append([app(other, seq(1))])
    assert sink.wipe(view) == 3
    assert not os_client.indices.exists_alias(name=sink.changelog_alias(view))
    assert count(os_client, sink.changelog_alias(other)) == 1
    assert outcomes(sink.append([app(view, seq(1))])) == ["applied"]  # the template stays


# --- refusals --------------------------------------------------------------------------
@needs_os
def test_a_concrete_index_on_the_alias_name_is_refused_with_the_fix(
    sink: OpenSearchSink, os_client: OpenSearch, os_prefix: str
) -> None:
    view = log_view()
    os_client.indices.create(index=f"{os_prefix}orders-audit")
    with pytest.raises(SinkError) as caught:
        sink.prepare([view])
    text = str(caught.value)
    assert view.name in text and f"{os_prefix}orders-audit" in text
    assert "concrete index" in text and "Fix:" in text


@needs_os
def test_an_alias_on_other_indexes_is_refused(
    sink: OpenSearchSink, os_client: OpenSearch, os_prefix: str
) -> None:
    view = log_view()
    os_client.indices.create(
        index=f"{os_prefix}old", body={"aliases": {f"{os_prefix}orders-audit": {}}}
    )
    with pytest.raises(SinkError, match="not only to its daily indices"):
        sink.prepare([view])


def test_a_view_whose_index_falls_under_a_change_log_pattern_is_refused(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """Its live index would match the change-log's template and get its alias."""
    from tests.test_sink_opensearch import ORDERS  # index "orders"

    sink = make_sink()
    under = dataclasses.replace(ORDERS, name="ordx", index="ord-x")
    with pytest.raises(SinkError, match="falls under the daily indices"):
        sink.prepare([log_view(index="ord"), under])
    with pytest.raises(SinkError, match="both use index"):
        sink.prepare([log_view(index="orders"), ORDERS])


@needs_os
def test_apply_and_sweep_refuse_a_change_log_view(sink: OpenSearchSink) -> None:
    view = log_view()
    with pytest.raises(SinkError, match="append"):
        sink.apply([Change(view, "o1", Version(0, seq(1)), [])])
    with pytest.raises(SinkError, match="nothing to sweep"):
        sink.sweep(view, 2, NOW)


@needs_os
def test_a_normal_view_and_a_change_log_view_prepared_together(
    sink: OpenSearchSink, os_client: OpenSearch, os_prefix: str
) -> None:
    from tests.test_sink_opensearch import ORDERS

    view = log_view()
    sink.prepare([ORDERS, view])
    assert os_client.indices.exists(index=f"{os_prefix}orders.vk-live")
    assert not os_client.indices.exists(index=f"{os_prefix}orders-audit.vk-live")
    assert os_client.indices.exists_index_template(name=sink.changelog_template(view))


# --- claims ----------------------------------------------------------------------------
OWNER = Owner("us-east-1/orders", "vk-coord", "d" * 32)


@needs_os
def test_the_claim_lives_in_the_template_and_the_days_and_append_checks_it(
    sink: OpenSearchSink, os_client: OpenSearch, make_sink: Callable[..., OpenSearchSink]
) -> None:
    view = log_view()
    sink.append([app(view, seq(1), at=NOW - DAY)])  # a day made before the claim
    assert sink.read_claim(view) is None
    sink.write_claim(view, Claim(OWNER, "m1", 3))
    assert sink.read_claim(view) == Claim(OWNER, "m1", 3)
    alias = sink.changelog_alias(view)
    for index in (f"{alias}-2023.11.13",):
        meta = os_client.indices.get_mapping(index=index)[index]["mappings"]["_meta"]
        assert meta["viewkeeper"]["claim"]["marker"] == "m1"
    sink.expect(view, "m1")
    assert outcomes(sink.append([app(view, seq(2))])) == ["applied"]
    meta = os_client.indices.get_mapping(index=f"{alias}-2023.11.14")
    assert meta[f"{alias}-2023.11.14"]["mappings"]["_meta"]["viewkeeper"]["claim"]["marker"] == "m1"
    assert sink.prepare([view]) is None and sink.read_claim(view) == Claim(OWNER, "m1", 3)
    fresh = make_sink()  # another process preparing the view keeps the claim
    fresh.prepare([view])
    assert fresh.read_claim(view) == Claim(OWNER, "m1", 3)

    # another process re-arms it (or another deployment takes it over): a new marker
    fresh.write_claim(view, Claim(OWNER, "m2", 3))
    with pytest.raises(NamespaceLost) as caught:
        sink.append([app(view, seq(3)), app(view, seq(4), at=NOW + DAY)])
    assert caught.value.views == [view.name]
    assert count(os_client, alias) == 2  # nothing written
    assert not os_client.indices.exists(index=f"{alias}-2023.11.15")
    sink.expect(view, "m2")
    assert outcomes(sink.append([app(view, seq(3))])) == ["applied"]

    # the template deleted: lost, nothing written (no day made without the template)
    os_client.indices.delete_index_template(name=sink.changelog_template(view))
    assert sink.read_claim(view) is None
    with pytest.raises(NamespaceLost):
        sink.append([app(view, seq(4), at=NOW + DAY)])
    assert not os_client.indices.exists(index=f"{alias}-2023.11.15")
    sink.write_claim(view, Claim(OWNER, "m3", 3))  # the re-arm puts the template again
    sink.expect(view, "m3")
    assert outcomes(sink.append([app(view, seq(4), at=NOW + DAY)])) == ["applied"]
    assert f"{alias}-2023.11.15" in os_client.indices.get_alias(name=alias)


@needs_os
def test_without_an_expected_marker_a_deleted_template_is_put_again_before_writing(
    sink: OpenSearchSink, os_client: OpenSearch
) -> None:
    view = log_view()
    sink.append([app(view, seq(1))])
    os_client.indices.delete_index_template(name=sink.changelog_template(view))
    assert outcomes(sink.append([app(view, seq(2), at=NOW + DAY)])) == ["applied"]
    alias = sink.changelog_alias(view)
    assert f"{alias}-2023.11.15" in os_client.indices.get_alias(name=alias)


# --- property --------------------------------------------------------------------------
@needs_os
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.data(),
    pool=st.lists(st.integers(0, 2**62), min_size=1, max_size=12, unique=True),
)
def test_any_replays_and_reorderings_leave_exactly_one_document_per_record(
    sink: OpenSearchSink, os_client: OpenSearch, data: st.DataObject, pool: list[int]
) -> None:
    view = log_view(index=f"prop-{next(_views)}")
    records = [app(view, seq(n), item=f"o{n % 3}", at=NOW - (n % 3) * DAY, n=n) for n in pool]
    batches = data.draw(
        st.lists(st.lists(st.sampled_from(records), min_size=1, max_size=8), max_size=6)
    )
    batches.append(list(records))  # every record at least once
    batches = data.draw(st.permutations(batches))
    applied: dict[str, int] = {}
    for batch in batches:
        for a, r in zip(batch, sink.append(batch), strict=True):
            assert r.outcome in (Outcome.APPLIED, Outcome.STALE)
            applied[a.sequence] = applied.get(a.sequence, 0) + (r.outcome is Outcome.APPLIED)
    assert applied == {seq(n): 1 for n in pool}
    found = hits(os_client, sink.changelog_alias(view))
    assert sorted(h["_id"] for h in found) == sorted(seq(n) for n in pool)
    assert all(h["_source"]["n"] == int(h["_id"]) - 10**20 for h in found)
    sink.wipe(view)
