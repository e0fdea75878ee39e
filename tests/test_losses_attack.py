"""Adversarial review of 1f3ff4c (a first claim re-reads the table and records its marker
conditionally; a sink holding the first claim over a later recorded marker is a loss) and
d1d33a7 (marks are counted: announce returns MARKER@LOSSES, a rebuild clears the mark only
if the marker and the count are unchanged).

Each test says in its docstring whether it failed on d1d33a7 (a finding) or HOLDS (kept as a
regression test). Three findings pass since the fix that followed (announce settles the claim first,
as at start, and reads the count at its end; check shows a first claim over a later recorded marker
as LOST). Two are open, strict xfails: a first claim that pauses between its re-read of the table
and its write to the sink can still hide a loss, and a stream gap marked by a viewkeeper older than
d1d33a7 during a rebuild is cleared by it. Real Redis (VIEWKEEPER_TEST_REDIS_URL) and OpenSearch;
the coordination store in memory or DynamoDB on moto (``coord_store``); one Namespaces and one
sink per simulated process; interleavings forced by wrapping a process's sink or store methods.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import test_namespaces_attack as _atk
from tests.test_namespaces import OWNER_A, VALS, os_namespaces, put, redis_namespaces
from tests.test_namespaces_attack import _url, _write
from tests.test_sink_opensearch import ORDERS, up
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.api import View
from viewkeeper.runtime.namespaces import Namespaces, first_marker
from viewkeeper.sinks.base import Claim
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.redis import RedisSink

make_sink = _atk.make_sink  # the fixture: OpenSearch sinks on the real clock


@pytest.fixture
def redis_sinks(redis_client: Any) -> Iterator[Callable[[], RedisSink]]:
    made: list[RedisSink] = []

    def factory() -> RedisSink:
        s = RedisSink("cache", url=_url(redis_client), owner_buckets=16)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.close()


def _rebuild_like(ns: Namespaces, sink: Any, store: Any, items: list[str]) -> tuple[str, bool]:
    """What runtime.rebuild does for one Redis view, without the stream: raise the
    generation, announce, scan (every item written at (G, 0)), sweep, rebuilt."""
    gen = store.raise_generation(VALS.name)
    started = ns.announce(VALS, gen)
    _write(ns, sink, [put(i, 0, "v", gen=gen) for i in items])
    sink.sweep(VALS, gen, time.time())
    return started, ns.rebuilt(VALS, started)


# === a mark a clean rebuild cannot clear =======================================================
def test_a_loss_found_by_announce_keeps_a_clean_rebuild_from_clearing_the_mark(
    redis_sinks: Callable[[], RedisSink], redis_client: Any, coord_store: Any
) -> None:
    """Failed on d1d33a7, passes since its fix. Namespaces.announce read the count of marks *before*
    it read the sink's claim; when the claim is gone (the sink lost its data after the CLI's
    claim(), or after the daemon's re-arm that started the automatic rebuild: a Redis flapping, an
    index deleted twice), announce claims again -- a re-arm that marks the view and counts one more
    loss -- and returns the new marker with the old count. The scan starts after announce returns,
    so it restores everything that loss took; yet rebuilt() finds the count changed and keeps the
    mark: `viewkeeper rebuild` ends cleanly and `status` still says needs_rebuild (the automatic
    rebuild runs a second full scan for nothing). Fix: read ``losses`` after the claim is settled
    (at the end of announce): any mark made before announce returns is one the scan covers."""
    store = coord_store
    s1 = redis_sinks()
    ns1 = redis_namespaces(s1, store)
    ns1.claim()
    _write(ns1, s1, [put(f"i{i}", 1, "v") for i in range(3)])
    redis_client.flushall()  # loss 1
    s_cli = redis_sinks()
    ns_cli = redis_namespaces(s_cli, store)
    ns_cli.claim()  # `viewkeeper rebuild`: app.claim() re-arms and marks it
    assert store.view_states()[VALS.name].needs_rebuild
    redis_client.flushall()  # loss 2, before the rebuild announced
    started, cleared = _rebuild_like(ns_cli, s_cli, store, [f"i{i}" for i in range(3)])
    assert all(redis_client.get(f"atk:i{i}") is not None for i in range(3))  # all restored
    state = store.view_states()[VALS.name]
    assert cleared and not state.needs_rebuild, (
        f"a rebuild that scanned after the loss did not clear the mark: it started with "
        f"{started}, the table holds {state.marker}@{state.losses}"
    )


def test_a_rebuild_after_a_plain_loss_clears_the_mark(
    redis_sinks: Callable[[], RedisSink], redis_client: Any, coord_store: Any
) -> None:
    """HOLDS: a loss re-armed by a writer, then a rebuild (announce reads the re-armed
    claim and the count): the mark is cleared; a second rebuild changes nothing."""
    store = coord_store
    s1 = redis_sinks()
    ns1 = redis_namespaces(s1, store)
    ns1.claim()
    _write(ns1, s1, [put("i1", 1, "v")])
    redis_client.flushall()
    _write(ns1, s1, [put("i2", 1, "v")])  # re-armed, marked
    assert store.view_states()[VALS.name].needs_rebuild
    _, cleared = _rebuild_like(ns1, s1, store, ["i1", "i2"])
    assert cleared and not store.view_states()[VALS.name].needs_rebuild
    _, again = _rebuild_like(ns1, s1, store, ["i1", "i2"])
    assert not again and not store.view_states()[VALS.name].needs_rebuild


# === a real loss still missed ==================================================================
@pytest.mark.xfail(
    strict=True,
    reason="open: a first claim paused between its re-read of the table and its write to "
    "the sink recreates a lost namespace under the recorded first marker",
)
def test_a_first_claim_paused_after_its_table_reread_hides_a_loss(
    make_sink: Callable[..., OpenSearchSink], os_client: Any, coord_store: Any
) -> None:
    """FAILS, open (1f3ff4c narrowed A1's window, did not close it): P2 starts with P1; its claim
    reads the table (nothing), the sink (nothing), and _fresh reads the table again
    (nothing yet) -- then P2 is slow to write the sink (an OpenSearch retry, a GC pause, a
    Lambda frozen between invocations). P1 claims F, records F, writes; the cluster loses
    the index; P2's write lands: F again, the indexes made again empty; record_first_marker
    finds F recorded (the same marker: no conflict). P1's verify sees F as expected; a
    third process sees F claimed and F recorded. 5 documents gone, nothing reported.
    Fix: the first claim must know whether it made the namespace or found a marker
    already recorded by another process: e.g. record_first_marker reserves first (a
    conditional create *before* the sink write, naming the claiming process), and a
    process that finds another's reservation waits for its claim instead of writing one;
    or the sink write of a first claim is create-only (fails if a claim exists) and a
    process that wrote into an empty namespace while the table already held the marker
    reports the loss."""
    store = coord_store
    s1, s2, s3 = make_sink(), make_sink(), make_sink()
    for s in (s1, s2, s3):
        s.prepare([ORDERS])
    ns1, ns2 = os_namespaces(s1, store, ORDERS), os_namespaces(s2, store, ORDERS)
    reached, go = threading.Event(), threading.Event()
    real_w2 = s2.write_claim

    def w2(view: View, claim: Claim) -> None:
        reached.set()
        assert go.wait(30)
        real_w2(view, claim)

    setattr(s2, "write_claim", w2)  # noqa: B010
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ns2.claim()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert reached.wait(20)  # P2 re-read the table: nothing; now writing F
    ns1.claim()
    s1.apply([up(ORDERS, f"o-{i}", 1, {"n": i}) for i in range(5)])
    names = s1.indexes(ORDERS)
    os_client.indices.delete(index=f"{names.live},{names.owners}")  # the cluster lost it
    go.set()
    t.join(30)
    assert not errors, errors
    ns1.verify()
    ns3 = os_namespaces(s3, store, ORDERS)
    ns3.claim()
    ns3.verify()
    s1.apply([up(ORDERS, "o-1", 2, {"n": 10})])
    docs = s1.live_documents(ORDERS)
    state = store.view_states()[ORDERS.name]
    assert state.needs_rebuild, (
        f"documents {sorted(docs)} of o-0..o-4 left, and no loss reported (marker {state.marker})"
    )


def test_check_shows_a_first_claim_over_a_later_recorded_marker_as_a_loss(
    redis_sinks: Callable[[], RedisSink], redis_client: Any
) -> None:
    """Failed on d1d33a7, passes since its fix.
    `viewkeeper check` (Namespaces.inspect, "what claim() would do")
    does not know _first_over_recorded: Redis restored from the snapshot taken right after
    the first claim, after a loss was re-armed and rebuilt (the table records the random
    marker R). claim() reports SINK DATA LOST; check says "claimed by this deployment",
    ok, and no LOST line. Fix: inspect applies _first_over_recorded too (a "LOST: ..."
    line, as for a missing claim)."""
    store = MemoryStore()
    s1 = redis_sinks()
    ns1 = redis_namespaces(s1, store)
    ns1.claim()
    key = s1._claim_key(VALS)
    snapshot = redis_client.hgetall(key)  # the RDB taken right after the first claim
    _write(ns1, s1, [put("i1", 1, "v")])
    redis_client.flushall()
    _write(ns1, s1, [put("i2", 1, "v")])  # re-armed R
    _rebuild_like(ns1, s1, store, ["i1", "i2"])
    state = store.view_states()[VALS.name]
    assert not state.needs_rebuild and state.marker != first_marker(OWNER_A, VALS.name)
    redis_client.flushall()
    redis_client.hset(key, mapping=snapshot)  # Redis restarted from that old RDB
    s2 = redis_sinks()
    ns2 = redis_namespaces(s2, store)
    ok, line = ns2.inspect(VALS, s2)
    ns2.claim()
    assert store.view_states()[VALS.name].needs_rebuild  # what `run` does: a loss
    assert "LOST" in line, f"check said {ok}, {line!r}; run reports SINK DATA LOST"


# === no false loss in normal operation =========================================================
def test_processes_starting_together_then_a_rebuild_make_no_false_loss(
    redis_sinks: Callable[[], RedisSink], coord_store: Any
) -> None:
    """HOLDS: four processes (or Lambda cold starts) of a new deployment claim at once
    (a barrier after each one's first sink read: all found nothing), write, restart one of them, and
    an initial rebuild runs right after: no SINK DATA LOST, one marker, the first one."""
    store = coord_store
    sinks = [redis_sinks() for _ in range(4)]
    nss = [redis_namespaces(s, store) for s in sinks]
    barrier = threading.Barrier(4, timeout=20)
    for s in sinks:
        real = s.read_claim

        def read_claim(view: View, real: Any = real, first: list[bool] = [True]) -> Any:  # noqa: B006
            held = real(view)
            if first[0]:  # each process's first read only (a _fresh may claim again)
                first[0] = False
                barrier.wait()
            return held

        setattr(s, "read_claim", read_claim)  # noqa: B010
    errors: list[BaseException] = []

    def run(ns: Namespaces) -> None:
        try:
            ns.claim()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ns,), daemon=True) for ns in nss]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for s in sinks:
        del s.read_claim  # the class's method again
    for i, (ns, s) in enumerate(zip(nss, sinks, strict=True)):
        _write(ns, s, [put(f"p{i}", 1, "v")])
    restarted = redis_namespaces(redis_sinks(), store)
    restarted.claim()
    started, _ = _rebuild_like(nss[0], sinks[0], store, ["p0", "p1", "p2", "p3"])
    for i, (ns, s) in enumerate(zip(nss, sinks, strict=True)):
        _write(ns, s, [put(f"p{i}", 2, "w")])
        ns.verify()
    state = store.view_states()[VALS.name]
    assert not state.needs_rebuild and state.losses == 0, state
    assert state.marker == first_marker(OWNER_A, VALS.name)
    assert started == f"{state.marker}@0"


def test_a_restart_after_a_loss_was_rebuilt_makes_no_false_loss(
    redis_sinks: Callable[[], RedisSink], redis_client: Any, coord_store: Any
) -> None:
    """HOLDS: after a loss (re-armed: random marker) and its rebuild, a process restarting
    (and a new one) claims the random marker again without a report; the count stays 1."""
    store = coord_store
    s1 = redis_sinks()
    ns1 = redis_namespaces(s1, store)
    ns1.claim()
    _write(ns1, s1, [put("i1", 1, "v")])
    redis_client.flushall()
    _write(ns1, s1, [put("i2", 1, "v")])
    _rebuild_like(ns1, s1, store, ["i1", "i2"])
    for _ in range(2):
        s = redis_sinks()
        ns = redis_namespaces(s, store)
        ns.claim()
        _write(ns, s, [put("i3", 2, "v")])
    _write(ns1, s1, [put("i4", 2, "v")])
    state = store.view_states()[VALS.name]
    assert not state.needs_rebuild and state.losses == 1, state


# === the DynamoDB expressions (and the memory store alike) =====================================
def test_the_count_and_the_conditional_clear(coord_store: Any) -> None:
    """HOLDS: mark counts from nothing (ADD on a missing attribute), keeps the first reason;
    clear needs needs_rebuild, the marker and the count; a bare marker skips the count;
    record_first_marker records where no marker is (also on a view record a stream gap
    made, with no marker) and returns the recorded one otherwise."""
    store = coord_store
    store.mark_needs_rebuild("v", "gap", 1.0, None)  # a stream gap on a view never claimed
    s = store.view_states()["v"]
    assert (s.marker, s.needs_rebuild, s.losses, s.reason) == (None, True, 1, "gap")
    assert store.record_first_marker("v", "F") == "F"
    assert store.record_first_marker("v", "G") == "F"
    assert store.record_first_marker("v", "F") == "F"
    assert not store.clear_needs_rebuild("v", "F", 0)
    assert not store.clear_needs_rebuild("v", "X", 1)
    store.mark_needs_rebuild("v", "second", 2.0, "R")
    s = store.view_states()["v"]
    assert (s.marker, s.losses, s.reason, s.since) == ("R", 2, "gap", 1.0)
    assert not store.clear_needs_rebuild("v", "R", 1)
    assert store.clear_needs_rebuild("v", "R", 2)
    assert not store.clear_needs_rebuild("v", "R", 2)  # not marked any more
    store.mark_needs_rebuild("v", "third", 3.0, None)
    assert store.clear_needs_rebuild("v", "R")  # bare marker: the count is not compared
    assert store.view_states()["v"].losses == 3
    assert store.record_first_marker("w", "F") == "F"  # no record at all
    assert not store.clear_needs_rebuild("w", "F", 0)  # never marked: nothing cleared


def test_a_mark_left_by_an_older_viewkeeper_is_cleared_by_a_rebuild(
    dynamodb: Any, redis_sinks: Callable[[], RedisSink], redis_client: Any
) -> None:
    """HOLDS: a coordination table written by a viewkeeper before d1d33a7 (a view marked
    needs_rebuild, no ``losses`` attribute): announce returns MARKER@0 and the rebuild's
    conditional clear accepts attribute_not_exists(losses)."""
    from viewkeeper.coordination.dynamodb import DynamoDBStore

    store = DynamoDBStore(dynamodb, f"vk-coord_store-{uuid.uuid4().hex[:8]}")
    store.ensure()
    try:
        s1 = redis_sinks()
        ns1 = redis_namespaces(s1, store)  # type: ignore[arg-type]
        ns1.claim()
        marker = store.view_states()[VALS.name].marker
        # the older viewkeeper's mark: no ADD losses
        store._update(
            "view",
            VALS.name,
            "SET needs_rebuild = :t, reason = :r, since = :at",
            {":t": {"BOOL": True}, ":r": {"S": "old"}, ":at": {"N": "1"}},
        )
        started, cleared = _rebuild_like(ns1, s1, store, ["i1"])
        assert started == f"{marker}@0"
        assert cleared and not store.view_states()[VALS.name].needs_rebuild
    finally:
        dynamodb.delete_table(TableName=store.table)


@pytest.mark.xfail(
    strict=True,
    reason="open: a mark made by a viewkeeper older than the count of marks (a rolling "
    "upgrade) during a rebuild is cleared by it",
)
def test_a_stream_gap_marked_by_an_older_viewkeeper_during_a_rebuild_is_cleared_by_it(
    dynamodb: Any, redis_sinks: Callable[[], RedisSink], redis_client: Any
) -> None:
    """FAILS, open (d1d33a7, a rolling upgrade): a daemon still on the version before d1d33a7
    notices a stream gap while a rebuild run by the new version scans (a rebuild run for
    another reason: a changed projection, the initial fill -- the view was not marked when
    it announced). The old mark sets needs_rebuild without a marker and without ADD
    losses: marker and count are what the rebuild started with, so the rebuild clears the
    mark (finding C2 again, for as long as an older process runs). Fix: a rebuild clears
    only a mark that was there when it announced: announce also returns the mark's
    ``since`` (or "unmarked"), and clear_needs_rebuild adds ``since = :s`` to its condition
    (every version sets since with if_not_exists on a first mark). A mark an old process
    adds to a view already marked changes nothing at all and cannot be told: document that
    rebuilds are not to be trusted while a version before d1d33a7 runs."""
    from viewkeeper.coordination.dynamodb import DynamoDBStore

    store = DynamoDBStore(dynamodb, f"vk-coord_store-{uuid.uuid4().hex[:8]}")
    store.ensure()
    try:
        s1 = redis_sinks()
        ns1 = redis_namespaces(s1, store)  # type: ignore[arg-type]
        ns1.claim()
        gen = store.raise_generation(VALS.name)
        started = ns1.announce(VALS, gen)
        _write(ns1, s1, [put("i1", 0, "v", gen=gen)])  # the scan passed item i1
        # the older daemon's Supervisor._stream_gap -> its mark_needs_rebuild(view, why, at, None)
        store._update(
            "view",
            VALS.name,
            "SET needs_rebuild = :t, reason = if_not_exists(reason, :r), "
            "since = if_not_exists(since, :at)",
            {":t": {"BOOL": True}, ":r": {"S": "stream gap"}, ":at": {"N": "2"}},
        )
        cleared = ns1.rebuilt(VALS, started)
        assert not cleared and store.view_states()[VALS.name].needs_rebuild, (
            "a stream gap marked by an older viewkeeper during the rebuild was cleared by it"
        )
    finally:
        dynamodb.delete_table(TableName=store.table)


# === more regression tests =====================================================================
def test_a_take_over_then_its_rebuild_clears_the_mark_without_a_false_loss(
    redis_sinks: Callable[[], RedisSink], redis_client: Any, coord_store: Any
) -> None:
    """HOLDS: `rebuild --take-over` (claim(take_over), wipe, rebuild): the take-over's mark
    is counted before announce reads the count; the wipe keeps the new claim; the rebuild
    clears the mark, and nothing reports SINK DATA LOST (no _first_over_recorded: the
    take-over's marker is random)."""
    from tests.helpers import registry_of
    from tests.test_namespaces import OWNER_B
    from viewkeeper.runtime import metrics

    theirs = MemoryStore()
    sb = redis_sinks()
    nsb = Namespaces(registry_of(VALS), {("redis", "cache"): sb}, theirs, {"atk": OWNER_B})
    nsb.claim()
    _write(nsb, sb, [put("x", 1, "theirs")])
    store = coord_store
    sa = redis_sinks()
    nsa = redis_namespaces(sa, store)
    lost_before = metrics.SINK_DATA_LOST.labels(VALS.name)._value.get()
    taken = nsa.claim(take_over=(VALS.name,))
    assert [t.view for t in taken] == [VALS.name]
    sa.wipe(VALS)
    started, cleared = _rebuild_like(nsa, sa, store, ["i1"])
    state = store.view_states()[VALS.name]
    assert cleared and not state.needs_rebuild and state.losses == 1, (started, state)
    assert metrics.SINK_DATA_LOST.labels(VALS.name)._value.get() == lost_before
    assert redis_client.get("atk:x") is None


def test_a_restore_to_the_rebuilds_marker_after_a_later_loss_keeps_the_mark(
    redis_sinks: Callable[[], RedisSink], redis_client: Any, coord_store: Any
) -> None:
    """HOLDS (the count at work): loss 1 re-armed R1; a snapshot holds R1's claim; a rebuild
    announces R1@1 and writes; loss 2 is re-armed R2; Redis is restored from the snapshot
    (R1 again): the writer adopts R1 silently ("re-armed by another process, reported
    already"), so the marker is the rebuild's again -- the count (2) keeps the rebuild from
    clearing a mark its writes no longer back."""
    store = coord_store
    s1, srb = redis_sinks(), redis_sinks()
    ns1, nsrb = redis_namespaces(s1, store), redis_namespaces(srb, store)
    ns1.claim()
    nsrb.claim()
    _write(ns1, s1, [put("i1", 1, "v")])
    redis_client.flushall()
    _write(ns1, s1, [put("i2", 1, "v")])  # R1, losses 1
    key = s1._claim_key(VALS)
    snapshot = redis_client.hgetall(key)
    gen = store.raise_generation(VALS.name)
    started = nsrb.announce(VALS, gen)
    _write(nsrb, srb, [put(i, 0, "v", gen=gen) for i in ("i1", "i2")])
    redis_client.flushall()
    _write(ns1, s1, [put("i3", 1, "v")])  # R2, losses 2
    redis_client.flushall()
    redis_client.hset(key, mapping=snapshot)  # restored: R1, no entries
    _write(ns1, s1, [put("i4", 1, "v")])
    _write(nsrb, srb, [put("i5", 0, "v", gen=gen)])
    srb.sweep(VALS, gen, time.time())
    assert redis_client.get("atk:i1") is None
    state = store.view_states()[VALS.name]
    assert (state.marker, state.losses) == (started.partition("@")[0], 2)  # only the count
    assert not nsrb.rebuilt(VALS, started)
    assert store.view_states()[VALS.name].needs_rebuild


class _StoreProxy:
    """The coordination store as one process sees it, with ``mark_needs_rebuild`` wrapped."""

    def __init__(self, store: Any, before: Callable[[], None], after: Callable[[], None]) -> None:
        self._store, self._before, self._after = store, before, after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def mark_needs_rebuild(self, *args: Any) -> None:
        self._before()
        self._store.mark_needs_rebuild(*args)
        self._after()


def test_two_re_arms_crossing_leave_a_mark_no_rebuild_can_clear(
    redis_sinks: Callable[[], RedisSink], redis_client: Any, coord_store: Any
) -> None:
    """Failed on d1d33a7, passes since its fix (a mark a clean rebuild never cleared:
    auto_rebuild looped forever).

    Redis comes back empty. The daemon D (worker.on_sink_loss: rebuild) and a Lambda cold
    start L (or `viewkeeper deadletters replay`, any short-lived app.claim()) both find no
    claim and re-arm: L writes R1 to the sink, D writes R2 over it and records R2, then L
    records R1 (mark_needs_rebuild sets the marker). The sink holds R2, the table R1. D
    expects R2 and its claim checks and verify() pass, so nothing reconciles the two (L
    wrote nothing more to the view and is gone). D's automatic rebuild announces R2 (read
    from the sink), scans cleanly, and clear_needs_rebuild wants the recorded marker R1:
    refused; still marked, rebuilt again, refused again -- for as long as D runs (a
    restart's claim() reports the difference, marks R2, and only then a rebuild clears).
    Fix: announce reconciles the table with the sink before returning (held != recorded:
    record the sink's marker, as lost() does for a re-arm reported already), or _report's
    mark writes its marker only if the sink still holds it (mark with the claim read
    back: ``marker = held`` after the write), or a rebuild clears against the recorded
    marker it read at announce and checks the sink still holds the claim it announced."""
    store = coord_store
    sd, sl = redis_sinks(), redis_sinks()
    d_at_write, l_wrote, d_marked = threading.Event(), threading.Event(), threading.Event()
    nsd = redis_namespaces(sd, _StoreProxy(store, lambda: None, d_marked.set))  # type: ignore[arg-type]
    nsd.claim()
    _write(nsd, sd, [put(f"i{i}", 1, "v") for i in range(3)])
    redis_client.flushall()  # Redis came back empty
    real_wd, real_wl = sd.write_claim, sl.write_claim

    def wd(view: View, claim: Claim) -> None:
        d_at_write.set()  # D read no claim
        assert l_wrote.wait(20)
        real_wd(view, claim)

    def wl(view: View, claim: Claim) -> None:
        real_wl(view, claim)
        l_wrote.set()

    setattr(sd, "write_claim", wd)  # noqa: B010
    setattr(sl, "write_claim", wl)  # noqa: B010
    errors: list[BaseException] = []

    def daemon_write() -> None:
        try:
            _write(nsd, sd, [put("i9", 2, "v")])
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=daemon_write, daemon=True)
    t.start()
    assert d_at_write.wait(20)
    nsl = redis_namespaces(sl, _StoreProxy(store, lambda: d_marked.wait(20), lambda: None))  # type: ignore[arg-type]
    nsl.claim()  # the cold start
    t.join(30)
    assert not errors, errors
    setattr(sd, "write_claim", real_wd)  # noqa: B010
    held = sd.read_claim(VALS)
    assert held is not None
    results = []
    for _ in range(3):  # the automatic rebuild, again while still marked
        started, cleared = _rebuild_like(nsd, sd, store, [f"i{i}" for i in range(3)] + ["i9"])
        nsd.verify()
        results.append((started, cleared))
        if cleared:
            break
    state = store.view_states()[VALS.name]
    assert not state.needs_rebuild, (
        f"sink holds {held.marker}, the table {state.marker}@{state.losses}; rebuilds "
        f"(started, cleared): {results}"
    )
