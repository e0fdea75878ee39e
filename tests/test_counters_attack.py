"""Attacks on aggregate views (Counter, SortedSetCounter) against the real redis-server:
each test is one way found to break the contract (a counter equals the sum of amount over the
view's items that currently yield it; absent when none does; overflow only when that sum is
out of range; rebuild, sweep and wipe restore it). Each fails on the code it was written
against."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.helpers import view_for
from viewkeeper import Counter, Value, redis_view
from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.project import project
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Outcome
from viewkeeper.sinks.redis import RedisSink

SEQ = 10**20


@redis_view(table="orders", redis="cache", name="plain")
def plain(item: dict[str, Any]) -> Iterator[Entry]:
    yield Value(item["k"], "plain")


@redis_view(table="orders", redis="cache", name="shape")
def shape(item: dict[str, Any]) -> Iterator[Entry]:
    if item["hash"]:
        yield Counter(f"n:{item['id']}", field="count", amount=item["a"])
    else:
        yield Counter(f"n:{item['id']}", amount=item["a"])


@redis_view(table="orders", redis="cache", name="money")
def money(item: dict[str, Any]) -> Iterator[Entry]:
    yield Counter(f"sum:{item['g']}", amount=item["a"])


PLAIN, SHAPE, MONEY = (view_for(f) for f in (plain, shape, money))


@redis_view(table="orders", redis="cache", name="lines")
def lines(order: dict[str, Any]) -> Iterator[Entry]:
    for line in order["lines"]:  # the same product twice in one order: amounts add up
        yield Counter(f"product:{line['p']}:sold", amount=line["qty"])


LINES = view_for(lines)


def change(view: View, item: str, seq: int, state: dict[str, Any] | None, gen: int = 0) -> Change:
    entries = [] if state is None else project(view, {"id": item, **state}, item, ("id",))
    return Change(view, item, Version(gen, str(seq)), entries)


@pytest.fixture
def sink(redis_client: redis.Redis) -> Iterator[RedisSink]:
    s = RedisSink("cache", redis_client, retry_seconds=2)
    s.prepare([PLAIN, SHAPE, MONEY, LINES])
    yield s
    s.close()


def claims(client: Any) -> dict[bytes, bytes]:
    out = {}
    for k in client.scan_iter(b"vk:c:*"):
        out.update(client.hgetall(k))
    return out


def test_rebuild_does_not_restore_a_counter_deleted_as_the_error_message_says(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild leaves every counter equal to the sum over the current items.
    A counter overwritten outside viewkeeper makes the next change an ERROR whose message says
    "delete it and rebuild the view". Doing exactly that: the rebuild re-reads A (amount 5)
    and C (amount 4) at generation 1, yet the counter ends up 2 (A's new amount minus its
    old one, added to the deleted key), not 9: a re-read whose body did not change (C)
    rewrites no counter, and a changed one (A) adds only its difference to whatever the key
    holds."""
    c = redis_client
    sink.apply(
        [
            change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3}),
            change(MONEY, "C", SEQ + 1, {"g": "x", "a": 4}),
        ]
    )
    c.set("sum:x", "lots")  # someone else wrote there
    [r] = sink.apply([change(MONEY, "A", SEQ + 2, {"g": "x", "a": 5})])
    assert r.outcome is Outcome.ERROR and "delete it and rebuild" in str(r.error)
    c.delete("sum:x")  # as the message says; then the rebuild (scan at (1, 0), sweep)
    sink.begin_rebuild(MONEY, 0)  # what rebuild() does before it raises the generation
    rebuild = [
        change(MONEY, "A", 0, {"g": "x", "a": 5}, gen=1),
        change(MONEY, "C", 0, {"g": "x", "a": 4}, gen=1),
    ]
    assert all(r.outcome is Outcome.APPLIED for r in sink.apply(rebuild))
    sink.sweep(MONEY, 1, 0)
    assert c.get("sum:x") == b"9"


def test_a_value_written_over_a_counter_then_deleted_drops_the_counter_of_live_items(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a counter is present (its sum) while some item yields it. A (3) and C (4)
    count into sum:x; an item of another view writes a Value there (was: applied, reported
    only as a collision) and is then deleted, which deleted the key and the counter's claim.
    C then changes its amount to 10: the script counted its contributors from the missing
    claim as 0 + 1 - 1 = 0 and removed the counter, although A and C both still yield it.
    Now the Value is refused (an ERROR naming the view that owns the counter): a Value must
    not overwrite the sum of other items."""
    c = redis_client
    sink.apply(
        [
            change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3}),
            change(MONEY, "C", SEQ + 1, {"g": "x", "a": 4}),
        ]
    )
    assert c.get("sum:x") == b"7"
    [r] = sink.apply([change(PLAIN, "W", SEQ + 1, {"k": "sum:x"})])
    assert r.outcome is Outcome.ERROR and "view money" in str(r.error)
    assert c.get("sum:x") == b"7"
    sink.apply([change(PLAIN, "W", SEQ + 2, None)])
    [r] = sink.apply([change(MONEY, "C", SEQ + 2, {"g": "x", "a": 10})])
    assert r.outcome is Outcome.APPLIED
    assert c.get("sum:x") == b"13"


def test_an_item_moving_its_own_counter_from_a_string_to_a_hash_field_is_refused(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: an item changing its counters has the old contribution retracted and the
    new one added in one step. S is the only contributor to n:S (a string Counter); its new
    state yields Counter("n:S", field="count") instead. The change is refused ("key 'n:S'
    holds a string") and dead-lettered forever, although the only thing at n:S is S's own
    counter, which this very change retracts (a Value moving to a HashField of the same key
    is accepted: the type check's `vanishes` ignores retracted counters)."""
    sink.apply([change(SHAPE, "S", SEQ + 1, {"hash": False, "a": 2})])
    assert redis_client.get("n:S") == b"2"
    [r] = sink.apply([change(SHAPE, "S", SEQ + 2, {"hash": True, "a": 2})])
    assert r.outcome is Outcome.APPLIED, r.error
    assert redis_client.hgetall("n:S") == {b"count": b"2"}


def test_retractions_skipped_on_a_replaced_key_leave_a_claim_that_revives_a_zero_counter(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a counter no item contributes to is absent, and its claim counts its
    contributors. D and E count into sum:y (claim #2). Someone replaces sum:y with a set;
    D and E are deleted (their retraction skips the foreign key but leaves the claim at #2);
    the set is removed. F then yields sum:y (claim #3) and is deleted (claim #2): no item
    contributes, yet sum:y is present as "0" and its claim says 2 contributors."""
    c = redis_client
    sink.apply(
        [
            change(MONEY, "D", SEQ + 1, {"g": "y", "a": 1}),
            change(MONEY, "E", SEQ + 1, {"g": "y", "a": 1}),
        ]
    )
    c.delete("sum:y")
    c.sadd("sum:y", "foreign")
    sink.apply([change(MONEY, "D", SEQ + 2, None), change(MONEY, "E", SEQ + 2, None)])
    c.delete("sum:y")
    sink.apply([change(MONEY, "F", SEQ + 1, {"g": "y", "a": 1})])
    sink.apply([change(MONEY, "F", SEQ + 2, None)])
    assert not claims(c)
    assert not c.exists("sum:y")


def test_a_sweep_retraction_refused_for_a_transient_overflow_leaves_a_wrong_sum(
    redis_client: Any,
) -> None:
    """Guarantee: after a rebuild's sweep every counter equals the sum over the re-read items,
    and an overflow is an ERROR only when the sum itself overflows. A = B = 2**62 and
    C = -2**62 count into sum:x (2**62). The rebuild re-reads only A; the sweep retracts C
    first (A + B = 2**63 overflows at that step: its change is refused) then B. The final sum
    over the current items (A alone, 2**62) fits, but sum:x is 0 (C still counted) and the
    sweep reports nothing: its ERROR results are dropped (maintenance.py sweep counts only
    APPLIED; no dead letter, no retry after the other retractions)."""
    c = redis_client
    sink = RedisSink("cache", c, retry_seconds=2, owner_buckets=1)  # sweep order = insertion
    sink.prepare([MONEY])
    big = 2**62
    sink.apply(
        [
            change(MONEY, "C", SEQ + 1, {"g": "x", "a": -big}),
            change(MONEY, "B", SEQ + 1, {"g": "x", "a": big}),
            change(MONEY, "A", SEQ + 1, {"g": "x", "a": big}),
        ]
    )
    assert c.get("sum:x") == str(big).encode()
    sink.apply([change(MONEY, "A", 0, {"g": "x", "a": big}, gen=1)])
    sink.sweep(MONEY, 1, 0)
    sink.close()
    assert c.get("sum:x") == str(big).encode()
    assert claims(c)[b"Vsum:x"].endswith(b"#1")  # A alone contributes


def test_wipe_deletes_owner_records_whose_retraction_was_refused(redis_client: Any) -> None:
    """Guarantee: wipe retracts every entry the view's items own. C (-2**62), B and A (2**62
    each) count into sum:x. wipe retracts C first: A + B = 2**63 overflows, the retraction is
    refused; B and A are retracted; then every owner record is deleted anyway. sum:x is left
    at -2**62 with a claim of 1 contributor that no owner record backs: never retracted
    again, and a rebuild of the same three items then counts -2**62 too much."""
    c = redis_client
    sink = RedisSink("cache", c, retry_seconds=2, owner_buckets=1)  # wipe order = insertion
    sink.prepare([MONEY])
    big = 2**62
    sink.apply(
        [
            change(MONEY, "C", SEQ + 1, {"g": "x", "a": -big}),
            change(MONEY, "B", SEQ + 1, {"g": "x", "a": big}),
            change(MONEY, "A", SEQ + 1, {"g": "x", "a": big}),
        ]
    )
    sink.wipe(MONEY)
    left, owned = c.get("sum:x"), list(sink.iter_owner_records(MONEY))
    sink.close()
    assert (left, claims(c), owned) == (None, {}, [])


def test_one_items_amounts_that_add_up_within_range_are_refused_for_a_partial_sum(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: an item yielding the same counter several times contributes the sum of its
    amounts; overflow is an ERROR only when a sum is out of range. The order's lines are
    2**63 - 1, 1 and -5 of product p: they add up to 2**63 - 5, a valid int64, but the sink
    refuses the change ("amounts add up to 9223372036854775808") because apply.py's
    _sum_amounts checks each running total, in yield order."""
    top = 2**63 - 1
    state = {"lines": [{"p": "p", "qty": top}, {"p": "p", "qty": 1}, {"p": "p", "qty": -5}]}
    [r] = sink.apply([change(LINES, "o1", SEQ + 1, state)])
    assert r.outcome is Outcome.APPLIED, r.error
    assert redis_client.get("product:p:sold") == str(top - 4).encode()
