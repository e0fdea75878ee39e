"""Sixth attack round on aggregate views (Counter, SortedSetCounter): the final design of
how a rebuild recomputes counters (viewkeeper/sinks/redis/sums.py; README.md, "Counters",
"Through a rebuild"): joined sums (new token, 'sweeping' cleared), fresh sums (new epoch),
a sweep that settles only the sums of its epoch. Against the real redis-server; each test
fails on the code it was written against.

Driven through the sink's own methods in the order ``rebuild()`` (runtime/rebuild.py) calls
them: ``begin_rebuild(view, floor)`` with the generation read before it raises it, the
scan's changes at ``(G, 0)``, ``sweep(view, G, ...)``; stream records are changes stamped
with the generation their reader held."""

from __future__ import annotations

from typing import Any

import pytest

from tests.counter_support import MONEY, SEQ, applied, change, sink  # noqa: F401
from viewkeeper.projection.api import View
from viewkeeper.sinks.redis import RedisSink

# ruff: noqa: F811 - the tests take the fixture `sink` imported above


def scan(sink: RedisSink, gen: int, items: dict[str, dict[str, Any]]) -> None:
    assert applied(sink.apply([change(MONEY, k, 0, s, gen=gen) for k, s in items.items()]))


ITEMS = {"A": {"g": "x", "a": 3}, "C": {"g": "x", "a": 4}}


def test_a_join_during_a_sweep_unmarks_a_late_page_that_the_sweep_then_overwrites(
    sink: RedisSink, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guarantee: a counter equals the sum of the contributions its items' owner records
    hold; a change at or below the floor that lands once a sweep has started marks the
    counter 'x' and is left live (README.md, "Through a rebuild"). WRONG VALUE written by
    the settling step (reported as a repair), not merely unrepaired.

    A (3) and C (4) count into sum:x (7). A worker read a page at generation 0, before any
    rebuild: "X created with 5"; its apply is late. R1 begins (floor 0), raises to 1, scans
    A and C (sums 7#2), and its sweep starts: _sweeping sets 'sweeping' and returns the
    epoch, the owner records are listed (X has none yet). Now R2 begins: the sums exist, so
    it joins them — new token, and 'sweeping' CLEARED ("its own sweep sets it again"). The
    late page lands at (0, s): at the floor, but 'sweeping' is gone, so sum:x is not marked
    'x': the live sum moves to 12 and X's owner record holds 5. R1's settling step (same
    epoch: it still settles) sets sum:x to its sums, 7, logged as a repair. sum:x = 7 while
    A, C and X's record contribute 12; when X's REMOVE arrives (X deleted from the table)
    it drops to 2 although A and C yield 7. Only a later rebuild that settles puts it right;
    if R2 is killed (or keeps an unreadable item), it stays wrong. A join should not clear
    'sweeping' while a sweep of the same epoch is past its listing (or R1's settling step
    should skip counters moved at or below the floor since it began, e.g. a per-epoch
    'sweeping' set by the sweep and cleared only by a fresh begin)."""
    c = redis_client
    assert applied(sink.apply([change(MONEY, k, SEQ, s) for k, s in ITEMS.items()]))
    assert c.get("sum:x") == b"7"
    finish = sink._finish_sums

    def join_then_late_page(view: View, sweep: Any, keep: Any) -> int:
        monkeypatch.setattr(sink, "_finish_sums", finish)
        sink.begin_rebuild(MONEY, 1)  # R2 joins (would raise -> 2)
        late = change(MONEY, "X", SEQ, {"g": "x", "a": 5}, gen=0)  # read before R1 began
        assert applied(sink.apply([late]))
        assert c.get("sum:x") == b"12"
        return finish(view, sweep, keep)

    sink.begin_rebuild(MONEY, 0)  # R1 -> 1
    scan(sink, 1, ITEMS)
    monkeypatch.setattr(sink, "_finish_sums", join_then_late_page)
    sink.sweep(MONEY, 1, 0)  # R1's sweep: lists, then (after the join) settles
    gone = change(MONEY, "X", SEQ + 1, None, gen=0)  # X deleted from the table (R2 killed)
    assert applied(sink.apply([gone]))
    assert c.get("sum:x") == b"7"  # A 3 + C 4; with the 'x' mark: 12 - 5
