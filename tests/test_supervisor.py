"""The supervisor (issue #5): fair shares, stealing one lease at a time without ping-pong,
expiry takeover, crash restarts with backoff, children after parents — and real
``viewkeeper run`` processes sharing a 24-shard fake stream: kill -9 failover, rolling
restart, SIGTERM drain.

Two levels:

1. One process: several :class:`Supervisor` objects (distinct worker ids) on one
   :class:`MemoryStore` and one :class:`FakeStream`, driven by calling ``tick()`` round by
   round on a manual clock (``Ring``). The supervisor reads wall time (``time.time``) for
   worker heartbeats and its ``clock`` for lease expiry; both come from the manual clock
   here, so "a worker died 20 s ago" takes no real time. Shard workers are real threads
   applying to the real Redis.
2. Processes: ``python -m viewkeeper.cli run`` subprocesses against
   :class:`tests.fakestream_server.FakeStreamServer` (the fake's stream over HTTP, everything
   else forwarded to moto, which holds the coordination table) and the real Redis
   (``Cluster``). A sampler thread reads the lease table every ~50 ms; the view
   (tests/views_e2e/scale_views.py) logs every projection with its pid, so the test can tell
   which process applied which shard when.

Findings that are product bugs are strict ``xfail`` tests: each fails today, and will XPASS
(and so fail) once the fix lands — then drop the marker.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
import yaml
from botocore.exceptions import ClientError
from prometheus_client import REGISTRY

import viewkeeper.runtime.supervisor as supervisor_module
from tests.fakestream_server import FakeStreamServer, _Forwarder
from tests.helpers import REPO, redis_view_keys, vk_env, write_config
from tests.testbed.dynamo import boto3_client
from tests.views_e2e import fake_views, scale_views
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import Lease, LeaseState
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.pipeline import BatchReport, Pipeline
from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import WorkerSettings
from viewkeeper.sinks.base import Change, Result
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.errors import (
    ExpiredIteratorError,
    ResourceNotFoundError,
    ServiceError,
    ThrottlingError,
    TrimmedDataAccessError,
    ValidationError,
)
from viewkeeper.stream.fake import FakeStream, ManualClock
from viewkeeper.stream.http import HttpStreamClient
from viewkeeper.stream.records import ChangeRecord

log = logging.getLogger(__name__)

FK_VIEWS = load_views(["tests.views_e2e.fake_views"])


def wait_until(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    step: float = 0.02,
    state: Callable[[], object] | None = None,
) -> float:
    """Poll ``cond`` until true; returns the seconds it took (fails naming ``what`` and, if
    given, what ``state()`` shows then)."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            seen = f"; state then: {state()}" if state is not None else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{seen}")
        time.sleep(step)
    return time.monotonic() - started


def failures_metric(table: str) -> float:
    value = REGISTRY.get_sample_value("viewkeeper_shard_failures_total", {"table": table})
    return value or 0.0


# =========================================================================================
# 1. Several supervisors in one process, tick by tick on a manual clock
# =========================================================================================
class _Time:
    """Replaces the ``time`` module inside viewkeeper.runtime.supervisor: wall-clock reads (worker
    heartbeats, the live-worker horizon) come from the manual clock; monotonic stays real
    (it bounds the joins in ``shutdown``)."""

    def __init__(self, clock: ManualClock) -> None:
        self.time = clock
        self.monotonic = time.monotonic


@dataclass(frozen=True)
class Take:
    round: int
    at: float
    shard_id: str
    previous: str | None
    owner: str


class RecordingStore(MemoryStore):
    """A MemoryStore that records every successful take_lease (who took what from whom)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.clock = clock
        self.round = 0
        self.takes: list[Take] = []
        self.failed_takes = 0
        self.on_renew: Callable[[Lease], None] | None = None

    def take_lease(self, lease: Lease, owner: str, gens: Any = None) -> Lease | None:
        taken = super().take_lease(lease, owner, gens)
        if taken is not None:
            self.takes.append(Take(self.round, self.clock(), lease.shard_id, lease.owner, owner))
        else:
            self.failed_takes += 1
        return taken

    def renew_lease(
        self, lease: Lease, lag: float | None, caught_up: bool, **kwargs: Any
    ) -> Lease | None:
        if self.on_renew is not None:
            self.on_renew(lease)
        return super().renew_lease(lease, lag, caught_up, **kwargs)


class FlakyPipeline(Pipeline):
    """A real pipeline whose ``process`` raises (a worker crash) while ``crashes`` > 0."""

    crashes = 0

    def process(
        self,
        table: str,
        key_names: tuple[str, ...],
        records: Sequence[ChangeRecord],
        only: Sequence[str] | None = None,
        *,
        generations: Mapping[str, int] | None = None,
        shard: str = "",
    ) -> BatchReport:
        if FlakyPipeline.crashes > 0:
            FlakyPipeline.crashes -= 1
            raise RuntimeError("simulated worker crash")
        return super().process(
            table, key_names, records, only, generations=generations, shard=shard
        )


class TaggedSink:
    """The real RedisSink, recording which supervisor applied which items, and when."""

    def __init__(self, inner: RedisSink, tag: str, log: list[tuple[str, float, str]]) -> None:
        self.inner = inner
        self.name = inner.name
        self.tag = tag
        self.log = log

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        now = time.monotonic()
        self.log.extend((self.tag, now, ch.item_key) for ch in changes)
        return self.inner.apply(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Ring:
    """Supervisors sharing one MemoryStore and one FakeStream table ``fk``, ticked in rounds.

    One round = every live supervisor ticks once (in a fixed order), then the manual clock
    moves by ``lease_duration / 3`` — the pace of ``Supervisor.run``.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch,
        shards: int,
        lease_duration: float = 6.0,
        flaky: bool = False,
        **settings: Any,
    ) -> None:
        self.clock = ManualClock(time.time())  # near real time: workers check retention
        monkeypatch.setattr(supervisor_module, "time", _Time(self.clock))
        self.fake = FakeStream()
        self.fake.create_table("fk", ("pk",), shards=shards)
        self.store = RecordingStore(self.clock)
        sink = RedisSink("cache", redis_client)
        sink.prepare(list(FK_VIEWS))
        self.redis = redis_client
        self.sinks = {("redis", "cache"): sink}
        self.lease_duration = lease_duration
        self.flaky = flaky
        self.settings: dict[str, Any] = {
            "lease_duration": lease_duration,
            "discovery_interval": 60.0,
            "starting_positions": {"fk": "TRIM_HORIZON"},
            "worker": WorkerSettings(poll_interval=0.02, busy_poll_interval=0.0, batch_size=50),
            **settings,
        }
        self.sups: dict[str, Supervisor] = {}
        self.dead: dict[str, Supervisor] = {}
        self.applied: list[tuple[str, float, str]] = []  # supervisor, monotonic time, item

    def pipeline(self, generation_of: Callable[[str], int], tag: str) -> Pipeline:
        cls = FlakyPipeline if self.flaky else Pipeline
        sinks = {k: TaggedSink(v, tag, self.applied) for k, v in self.sinks.items()}
        return cls(FK_VIEWS, sinks, self.store, generation_of)  # type: ignore[arg-type]

    def add(self, name: str) -> Supervisor:
        sup = Supervisor(
            ["fk"],
            self.fake,
            self.store,
            partial(self.pipeline, tag=name),
            SupervisorSettings(**self.settings),
            worker_id=name,
            clock=self.clock,
        )
        self.sups[name] = sup
        return sup

    def round(self, n: int = 1) -> None:
        for _ in range(n):
            self.store.round += 1
            for sup in list(self.sups.values()):
                sup.tick()
            self.clock.advance(self.lease_duration / 3)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.sups, 0)
        for lease in self.store.list_leases("fk"):
            if lease.owner is not None:
                out[lease.owner] = out.get(lease.owner, 0) + 1
        return out

    def owners(self) -> dict[str, str | None]:
        return {lease.shard_id: lease.owner for lease in self.store.list_leases("fk")}

    def steals(self, since_round: int = 0) -> list[Take]:
        return [t for t in self.store.takes if t.previous is not None and t.round > since_round]

    def kill(self, name: str) -> None:
        """As kill -9: the supervisor stops ticking (no renewals, no heartbeats), its
        workers stop, nothing is released."""
        sup = self.sups.pop(name)
        for run in sup.running.values():
            run.stop.set()
        self.dead[name] = sup

    def stall(self, name: str) -> None:
        """The supervisor's loop stops turning (a long GC pause, a starved process, a stuck
        call): no renewals, no heartbeats — but its shard workers go on."""
        self.dead[name] = self.sups.pop(name)

    def close(self) -> None:
        FlakyPipeline.crashes = 0
        for sup in [*self.sups.values(), *self.dead.values()]:
            sup.shutdown()


@pytest.fixture
def ring_factory(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Ring]]:
    made: list[Ring] = []

    def factory(shards: int, **kwargs: Any) -> Ring:
        ring = Ring(redis_client, monkeypatch, shards, **kwargs)
        made.append(ring)
        return ring

    yield factory
    for ring in made:
        ring.close()


def assert_no_ping_pong(takes: Sequence[Take]) -> None:
    """No lease ever went back to a worker that had already lost it to a steal."""
    lost: set[tuple[str, str]] = set()
    for t in takes:
        assert (t.shard_id, t.owner) not in lost, f"{t.shard_id} went back to {t.owner}: {t}"
        if t.previous is not None:
            lost.add((t.shard_id, t.previous))


def test_supervisors_starting_together_reach_a_fair_share(
    ring_factory: Callable[..., Ring],
) -> None:
    ring = ring_factory(12)
    for name in ("a", "b", "c"):
        ring.add(name)
    for _ in range(20):
        ring.round()
        if sorted(ring.counts().values()) == [4, 4, 4]:
            break
    assert ring.counts() == {"a": 4, "b": 4, "c": 4}
    per_round = Counter((t.round, t.owner) for t in ring.steals())
    assert max(per_round.values()) == 1, per_round  # at most one steal per round each
    assert_no_ping_pong(ring.store.takes)
    balanced_at = ring.store.round
    ring.round(30)
    assert ring.steals(balanced_at) == [], "leases moved after the share was fair"
    assert ring.counts() == {"a": 4, "b": 4, "c": 4}
    # every held lease has a running worker, and nothing else does
    for sup in ring.sups.values():
        assert set(sup.running) == set(sup.held)
        assert len(sup.held) == 4


def test_a_joining_worker_steals_one_lease_per_round_up_to_its_share(
    ring_factory: Callable[..., Ring],
) -> None:
    ring = ring_factory(12)
    ring.add("a")
    ring.round(2)
    assert ring.counts() == {"a": 12}
    ring.add("b")
    for k in range(1, 9):
        ring.round()
        assert ring.counts()["b"] == min(k, 6), (k, ring.counts())
    assert ring.counts() == {"a": 6, "b": 6}
    ring.add("c")
    start = ring.store.round
    for k in range(1, 8):
        ring.round()
        assert ring.counts()["c"] == min(k, 4), (k, ring.counts())
    assert ring.counts() == {"a": 4, "b": 4, "c": 4}
    steals = ring.steals(start)
    assert len(steals) == 4 and {t.owner for t in steals} == {"c"}
    assert_no_ping_pong(ring.store.takes)
    balanced_at = ring.store.round
    ring.round(30)
    assert ring.steals(balanced_at) == [], "ping-pong: leases moved once balanced"


@pytest.mark.parametrize("shards", [10, 13])
def test_a_third_worker_gets_a_fair_share_of_an_uneven_count(
    ring_factory: Callable[..., Ring], shards: int
) -> None:
    ring = ring_factory(shards)
    ring.add("a")
    ring.round(2)
    ring.add("b")
    ring.round(shards)
    ring.add("c")
    ring.round(shards)
    counts = ring.counts()
    assert sum(counts.values()) == shards
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert_no_ping_pong(ring.store.takes)


def test_a_steal_is_not_starved_by_the_thiefs_own_slow_renewals(
    ring_factory: Callable[..., Ring],
) -> None:
    ring = ring_factory(12)
    a = ring.add("a")
    ring.round(2)
    ring.add("b")
    ticking = [False]
    once = threading.Lock()  # renewals run in b's pool threads: one of them ticks a

    def slow_renewals_of_b(lease: Lease) -> None:
        # while b renews its own leases (think: many leases, a slow store), a's loop turns
        # once and renews everything a holds
        with once:
            if lease.owner != "b" or ticking[0]:
                return
            ticking[0] = True
        a.tick()

    ring.store.on_renew = slow_renewals_of_b
    for _ in range(12):
        ticking[0] = False
        ring.round()
    assert ring.counts() == {"a": 6, "b": 6}, (ring.counts(), ring.store.failed_takes)


def _kill_and_watch(ring: Ring, victim: str, rounds: int) -> tuple[float, dict[str, float]]:
    """Kill ``victim``; run rounds; return (kill time, shard -> time it was taken over)."""
    theirs = {s for s, owner in ring.owners().items() if owner == victim}
    killed_at = ring.clock()
    ring.kill(victim)
    taken: dict[str, float] = {}
    for _ in range(rounds):
        ring.round()
        for t in ring.store.takes:
            if t.shard_id in theirs and t.previous == victim:
                taken.setdefault(t.shard_id, t.at)
        if len(taken) == len(theirs):
            break
    return killed_at, taken


def test_the_leases_of_a_dead_worker_are_taken_after_they_expire_and_not_before(
    ring_factory: Callable[..., Ring],
) -> None:
    ring = ring_factory(12)
    for name in ("a", "b", "c"):
        ring.add(name)
    ring.round(12)
    assert ring.counts() == {"a": 4, "b": 4, "c": 4}
    dur = ring.lease_duration
    killed_at, taken = _kill_and_watch(ring, "c", rounds=30)
    assert len(taken) == 4, f"only {len(taken)} of 4 leases taken over: {ring.counts()}"
    first, last = min(taken.values()) - killed_at, max(taken.values()) - killed_at
    log.info("dead worker's leases taken %.1f..%.1fs after it died (lease %.0fs)", first, last, dur)
    # safety: never before the lease could have expired (the last renewal was at most one
    # round before the kill)
    assert first >= dur - dur / 3, (first, dur)
    # liveness: today within two lease durations and a couple of rounds (see the xfail below)
    assert last <= 2 * dur + 2 * dur / 3, (last, dur)
    assert ring.counts() == {"a": 6, "b": 6}
    ring.round(20)
    assert ring.counts() == {"a": 6, "b": 6}  # and stable


def test_the_leases_of_a_dead_worker_are_taken_within_one_lease_duration(
    ring_factory: Callable[..., Ring],
) -> None:
    ring = ring_factory(12)
    for name in ("a", "b", "c"):
        ring.add(name)
    ring.round(12)
    dur = ring.lease_duration
    killed_at, taken = _kill_and_watch(ring, "c", rounds=30)
    assert len(taken) == 4
    # expiry is noticed at most one round late, and taking needs one more round
    assert max(taken.values()) - killed_at <= dur + 2 * dur / 3


def test_a_stalled_supervisors_workers_stop_applying_when_its_lease_expires(
    ring_factory: Callable[..., Ring],
) -> None:
    ring = ring_factory(1)
    ring.add("a")
    ring.round(2)
    (shard,) = ring.fake.open_shards("fk")
    assert ring.owners() == {shard: "a"}
    ring.stall("a")  # its worker thread keeps polling
    ring.add("b")
    for _ in range(12):  # b waits out the lease (and a's heartbeat), then takes it
        ring.round()
        if ring.owners()[shard] == "b":
            break
    assert ring.owners() == {shard: "b"}
    taken_at = time.monotonic()
    ring.fake.put_item("fk", {"pk": "late", "v": 1, "g": "z"})
    wait_until(
        lambda: {tag for tag, _, item in ring.applied if item == "late"} >= {"b"},
        10,
        "b to apply the new record",
    )
    time.sleep(0.3)  # a's worker polls every 20 ms
    zombie = [(tag, at) for tag, at, _ in ring.applied if tag == "a" and at > taken_at]
    assert zombie == [], "the stalled supervisor's worker applied after its lease was taken"


def test_a_crashing_worker_is_restarted_with_backoff_and_reported(
    ring_factory: Callable[..., Ring], caplog: pytest.LogCaptureFixture
) -> None:
    ring = ring_factory(1, flaky=True, restart_backoff=1.0, max_restart_backoff=4.0)
    for i in range(20):
        ring.fake.put_item("fk", {"pk": f"k{i}", "v": i, "g": "ab"[i % 2]})
    sup = ring.add("a")
    other = ring.add("b")  # must not take the failing shard away: the lease stays held
    (shard,) = ring.fake.open_shards("fk")
    key = ("fk", shard)
    FlakyPipeline.crashes = 4
    before = failures_metric("fk")

    def crash_and_reap() -> None:
        run = sup.running[key]
        wait_until(lambda: not run.thread.is_alive(), 10, "the worker to crash")
        assert run.worker.crashed is not None and "simulated worker crash" in run.worker.crashed
        sup.tick()
        assert key not in sup.running  # not restarted at once

    restarts: list[float] = []
    with caplog.at_level(logging.ERROR, logger="viewkeeper.runtime.supervisor"):
        sup.tick()
        other.tick()
        assert key in sup.running
        for n, delay in enumerate([1.0, 2.0, 4.0, 4.0], start=1):
            crash_and_reap()
            assert failures_metric("fk") == before + n
            crashed_at = ring.clock()
            # not before the backoff ...
            ring.clock.advance(delay - 0.1)
            sup.tick()
            other.tick()
            assert key not in sup.running, f"restarted before its {delay}s backoff"
            # ... and right after it
            ring.clock.advance(0.1001)  # (float sums: step just past the retry time)
            sup.tick()
            assert key in sup.running, f"not restarted after its {delay}s backoff"
            restarts.append(ring.clock() - crashed_at)
    assert restarts == pytest.approx([1.0, 2.0, 4.0, 4.0], abs=0.01)
    # reported, not hidden: one error per crash, with the count, and the metric
    crashes = [r.getMessage() for r in caplog.records if "crashed (" in r.getMessage()]
    assert len(crashes) == 4
    assert "crashed (4 times in a row)" in crashes[-1] and "simulated worker crash" in crashes[-1]
    assert ring.owners() == {shard: "a"}  # held throughout: nobody else took it
    # the fifth start works: everything lands, the checkpoint reaches the end
    wait_until(
        lambda: redis_view_keys(ring.redis) == fake_views.expected(ring.fake.contents("fk")),
        10,
        "Redis to converge after the crashes",
    )
    wait_until(
        lambda: (
            ring.store.list_leases("fk")[0].checkpoint is not None
            and int(ring.store.list_leases("fk")[0].checkpoint or 0) >= max_record_seq(ring.fake)
        ),
        10,
        "the checkpoint to reach the last record",
    )


def max_record_seq(fake: FakeStream, table: str = "fk") -> int:
    return max(int(r.sequence) for records in shard_records(fake, table).values() for r in records)


def test_the_crash_count_starts_again_after_the_worker_recovered(
    ring_factory: Callable[..., Ring], caplog: pytest.LogCaptureFixture
) -> None:
    ring = ring_factory(1, flaky=True, restart_backoff=1.0, max_restart_backoff=60.0)
    ring.fake.put_item("fk", {"pk": "k0", "v": 0, "g": "a"})
    sup = ring.add("a")
    (shard,) = ring.fake.open_shards("fk")
    key = ("fk", shard)
    FlakyPipeline.crashes = 3
    sup.tick()
    for delay in (1.0, 2.0, 4.0):
        run = sup.running[key]
        wait_until(lambda run=run: not run.thread.is_alive(), 10, "the worker to crash")
        sup.tick()
        ring.clock.advance(delay)
        sup.tick()
    wait_until(lambda: "fk:k0" in redis_view_keys(ring.redis), 10, "the recovered worker")
    for _ in range(5):  # it has been running fine for a while
        ring.clock.advance(2.0)
        sup.tick()
    FlakyPipeline.crashes = 1
    ring.fake.put_item("fk", {"pk": "k1", "v": 1, "g": "a"})
    run = sup.running[key]
    wait_until(lambda: not run.thread.is_alive(), 10, "the worker to crash again")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="viewkeeper.runtime.supervisor"):
        sup.tick()
    (message,) = [r.getMessage() for r in caplog.records if "crashed (" in r.getMessage()]
    assert "crashed (1 times in a row)" in message, message
    ring.clock.advance(1.0)  # the first backoff again, not 8 s
    sup.tick()
    assert key in sup.running


def test_children_wait_for_their_parents_across_supervisors(
    ring_factory: Callable[..., Ring],
) -> None:
    ring = ring_factory(2, lease_duration=3.0)
    rng = random.Random(7)
    for i in range(400):  # a backlog in both parents (8 pages of 50 each) ...
        ring.fake.put_item("fk", {"pk": f"k{i % 30}", "v": i, "g": rng.choice("xyz")})
    parents = ring.fake.open_shards("fk")
    for shard in parents:
        ring.fake.split_shard(shard)
    for i in range(30):  # ... and the newest version of every item in the children
        ring.fake.put_item("fk", {"pk": f"k{i}", "v": 1000 + i, "g": rng.choice("xyz")})
    rolled = ring.fake.open_shards("fk")[0]
    ring.fake.rollover(rolled)
    for i in range(0, 30, 3):
        ring.fake.put_item("fk", {"pk": f"k{i}", "v": 2000 + i, "g": "w"})
    ring.add("a")
    ring.add("b")
    violations: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ring.round()
        leases = {lease.shard_id: lease for lease in ring.store.list_leases("fk")}
        for lease in leases.values():
            if lease.owner is None and lease.checkpoint is None:
                continue
            for parent in lease.parents:
                if leases[parent].state is not LeaseState.ENDED:
                    violations.append(f"{lease.shard_id} held before {parent} ended")
        for sup in ring.sups.values():
            for _table, shard in sup.running:
                for parent in leases[shard].parents:
                    if leases[parent].state is not LeaseState.ENDED:
                        violations.append(f"{shard} running before {parent} ended")
        if redis_view_keys(ring.redis) == fake_views.expected(ring.fake.contents("fk")):
            break
        time.sleep(0.05)
    assert violations == []
    assert redis_view_keys(ring.redis) == fake_views.expected(ring.fake.contents("fk"))
    leases = {lease.shard_id: lease for lease in ring.store.list_leases("fk")}
    assert len(leases) == 7  # 2 parents, 4 children, 1 grandchild
    for shard in [*parents, rolled]:
        assert leases[shard].state is LeaseState.ENDED
    assert all(leases[s].owner in ("a", "b") for s in ring.fake.open_shards("fk"))
    owners = {t.owner for t in ring.store.takes}
    assert owners == {"a", "b"}  # the lineage was spread over both supervisors


# =========================================================================================
# The fake stream server speaks the protocol HttpStreamClient parses
# =========================================================================================
def _http_client(url: str, **kwargs: Any) -> HttpStreamClient:
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    return HttpStreamClient("us-east-1", url, session, **kwargs)


def shard_records(fake: FakeStream, table: str) -> dict[str, list[ChangeRecord]]:
    """Every record of every shard of ``table``, read from the fake (TRIM_HORIZON)."""
    arn = fake.stream_arn(table)
    out: dict[str, list[ChangeRecord]] = {}
    for shard in fake.list_shards(arn):
        it: str | None = fake.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON")
        records: list[ChangeRecord] = []
        while it is not None:
            page = fake.get_records(it, 1000)
            records += page.records
            if not page.records:
                break
            it = page.next_iterator
        out[shard.shard_id] = records
    return out


def test_the_fake_stream_server_round_trips_records_shards_scans_and_errors(
    dynamodb_url: str,
) -> None:
    fake = FakeStream(
        describe_page_size=2, scan_page_size=3, first_sequence=10**21 - 8, sequence_gap=1
    )
    fake.create_table("pt", ("pk", "sk"), shards=3)
    items = [
        {
            "pk": f"p{i}",
            "sk": i,
            "b": bytes([i, 0, 255]),
            "n": Decimal("1.25") * i,
            "big": 10**30 + i,
            "ss": {"x", f"y{i}"},
            "ns": {1, 2, i + 3},
            "bs": {b"\x00", b"\x01"},
            "l": [1, "a", None, True],
            "m": {"nested": {"deep": [Decimal("0.5")]}},
            "nul": None,
            "t": False,
        }
        for i in range(12)
    ]
    for item in items:
        fake.put_item("pt", item)
    fake.update("pt", {"pk": "p1", "sk": 1}, {"t": True})
    fake.delete_item("pt", {"pk": "p2", "sk": 2})
    fake.split_shard(fake.open_shards("pt")[0])
    fake.put_item("pt", {**items[0], "t": True})
    with FakeStreamServer(fake, dynamodb_url) as server:
        client = _http_client(server.url, max_attempts=1)
        assert client.describe_table("pt") == fake.describe_table("pt")
        arn = fake.stream_arn("pt")
        assert client.list_shards(arn) == fake.list_shards(arn)  # 3 pages of 2
        for shard in fake.list_shards(arn):
            mine = client.get_records(
                client.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON")
            )
            theirs = fake.get_records(fake.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON"))
            assert [
                (r.event, r.sequence, r.keys, r.new_image, r.old_image, r.created_at)
                for r in mine.records
            ] == [
                (r.event, r.sequence, r.keys, r.new_image, r.old_image, r.created_at)
                for r in theirs.records
            ]
            assert (mine.next_iterator is None) == (theirs.next_iterator is None)
        # sequence numbers crossed from 21 to 22 digits and survived as text
        assert {len(r.sequence) for recs in shard_records(fake, "pt").values() for r in recs} == {
            21,
            22,
        }
        scanned: list[dict[str, Any]] = []
        for segment in range(2):
            start: dict[str, Any] | None = None
            while True:
                page = client.scan("pt", segment, 2, start)
                scanned += page.items
                start = page.last_evaluated_key
                if start is None:
                    break
        assert sorted(scanned, key=lambda i: i["sk"]) == sorted(
            fake.items("pt"), key=lambda i: i["sk"]
        )

        # errors: typed on the client side as the fake raises them in-process
        by_shard = shard_records(fake, "pt")
        shard = next(s for s in fake.open_shards("pt") if by_shard[s])
        it = client.get_shard_iterator(arn, shard, "TRIM_HORIZON")
        fake.inject("get_records", ThrottlingError("Rate exceeded"), times=1)
        with pytest.raises(ThrottlingError):
            client.get_records(it)
        fake.inject("get_records", ServiceError("boom", status=500), times=1)
        with pytest.raises(ServiceError):
            client.get_records(it)
        fake.expire_iterators()
        with pytest.raises(ExpiredIteratorError):
            client.get_records(it)
        with pytest.raises(ValidationError):
            client.get_shard_iterator(arn, shard, "AFTER_SEQUENCE_NUMBER", "1")
        fake.trim(before=time.time() + 1)
        with pytest.raises(TrimmedDataAccessError):
            client.get_shard_iterator(
                arn, shard, "AFTER_SEQUENCE_NUMBER", by_shard[shard][0].sequence
            )
        # a table the fake does not have: forwarded to moto, which says it is not there
        with pytest.raises(ResourceNotFoundError):
            client.describe_table("no-such-table-anywhere")
        # the coordination table lives in moto, reached through the server
        store = DynamoDBStore(boto3_client("dynamodb", server.url), "vk-coord-fss")
        store.ensure()
        assert store.create_lease(Lease("pt", "s1", arn))
        taken = store.take_lease(store.list_leases("pt")[0], "me")
        assert taken is not None and taken.owner == "me"
        direct = DynamoDBStore(boto3_client("dynamodb", dynamodb_url), "vk-coord-fss")
        assert [lease.owner for lease in direct.list_leases("pt")] == ["me"]
        assert server.counts[("forward", "UpdateItem")] >= 1
        assert server.counts[("fake", "GetRecords")] >= 4
        boto3_client("dynamodb", dynamodb_url).delete_table(TableName="vk-coord-fss")


def test_two_processes_creating_the_coordination_table_at_once_both_start(
    dynamodb_url: str,
) -> None:
    """Seen for real: three `viewkeeper run` started together, one exited 1 at start."""
    name = f"vk-coord-race-{os.getpid()}-{random.randrange(10**6)}"
    db = boto3_client("dynamodb", dynamodb_url)
    first = DynamoDBStore(db, name)

    class Racing:
        """The second process's client: the first process creates the table between our
        DescribeTable (not found) and our CreateTable."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def create_table(self, **kwargs: Any) -> Any:
            first.ensure()
            return self.inner.create_table(**kwargs)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.inner, attr)

    second = DynamoDBStore(Racing(db), name)
    try:
        second.ensure()
        assert second.list_leases("x") == []
    finally:
        with contextlib.suppress(Exception):
            db.delete_table(TableName=name)


# =========================================================================================
# 2. Real processes against the fake stream server, moto and Redis
# =========================================================================================
LEASE = 2.0  # worker.lease_duration of the processes


def pid_of(owner: str | None) -> int | None:
    """Worker ids are ``<host>-<pid>-<random>``."""
    if owner is None:
        return None
    return int(owner.rsplit("-", 2)[1])


@dataclass
class Sample:
    at: float
    leases: dict[str, tuple[int | None, int, str | None, str]]  # shard: pid, counter, cp, state


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    started_at: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class OneWritePerItem(_Forwarder):
    """The fake server's forwarding to moto, handing moto one write per item at a time.

    DynamoDB applies the writes to one item one after the other, each conditional write
    checked against the state the previous one left: the lease protocol rests on that
    (of several takes of a lease at the counter they saw, one wins). moto's threaded
    server checks a condition and then applies the update with no lock in between, so
    racing takes of one free lease could all be granted — and the stored owner, counter
    and token could come from different takes. In the rolling restart, when a drained
    process's leases fell free and the others took them at once, a process could end up
    renewing a lease whose stored owner was another, which lost it and did not release
    it at its drain: the lease stayed owned by the drained process. Writes to different
    items (different leases) still go in parallel, as in DynamoDB."""

    _WRITES = frozenset({"UpdateItem", "PutItem", "DeleteItem"})

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._items: dict[tuple[str, str], threading.Lock] = {}
        self._items_lock = threading.Lock()

    def send(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        target = next((v for k, v in headers if k.lower() == "x-amz-target"), "")
        if target.rpartition(".")[2] not in self._WRITES:
            return super().send(method, path, headers, body)
        payload = json.loads(body)
        # the coordination table's key is (pk, sk); without them, one lock for the table
        key = payload.get("Key") or {
            k: v for k, v in payload.get("Item", {}).items() if k in ("pk", "sk")
        }
        item = (str(payload.get("TableName")), json.dumps(key, sort_keys=True))
        with self._items_lock:
            lock = self._items.setdefault(item, threading.Lock())
        with lock:
            return super().send(method, path, headers, body)


@dataclass
class Cluster:
    """A fake-stream table ``scale`` served over HTTP, moto for coordination, real Redis, and
    ``viewkeeper run`` processes; a sampler records the lease table every ~50 ms."""

    tmp: Path
    redis_url: str
    dynamodb_url: str
    redis: redis.Redis
    shards: int
    worker: dict[str, Any]
    fake: FakeStream = field(init=False)
    server: FakeStreamServer = field(init=False)
    config: Path = field(init=False)
    store: DynamoDBStore = field(init=False)
    spy_dir: Path = field(init=False)
    procs: list[Proc] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    written: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _writer_stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.fake = FakeStream()
        self.fake.create_table("scale", ("pk",), shards=self.shards)
        self.server = FakeStreamServer(self.fake, self.dynamodb_url)
        self.server.forwarder = OneWritePerItem(self.dynamodb_url)  # see its doc
        self.server.start()
        self.config = write_config(
            self.tmp,
            dynamodb_url=self.server.url,
            redis_url=self.redis_url,
            views=["tests.views_e2e.scale_views"],
            tables={"scale": {"starting_position": "TRIM_HORIZON"}},
            worker={"lease_duration": LEASE, "poll_interval": 0.05, **self.worker},
        )
        table = yaml.safe_load(self.config.read_text())["coordination"]["table"]
        self.store = DynamoDBStore(boto3_client("dynamodb", self.dynamodb_url), table)
        # created here: processes starting together race to create it (see
        # test_two_processes_creating_the_coordination_table_at_once_both_start)
        self.store.ensure()
        self.spy_dir = self.tmp / "spy"
        self.spy_dir.mkdir()

    # --- processes ------------------------------------------------------------------------
    def start(self, **env: str) -> Proc:
        log_path = self.tmp / f"vk-{len(self.procs)}.log"
        environ = vk_env() | {"VK_SCALE_SPY_DIR": str(self.spy_dir)} | env
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(self.config)],
                cwd=REPO,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(popen, log_path, time.time())
        self.procs.append(proc)
        return proc

    def terminate(self, proc: Proc, timeout: float = 20.0) -> int:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            pytest.fail(f"pid {proc.pid} did not drain within {timeout}s:\n{proc.output()[-3000:]}")

    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.popen.poll() is None]

    # --- observation ----------------------------------------------------------------------
    def leases(self) -> list[Lease]:
        try:
            return self.store.list_leases("scale")
        except ClientError as exc:  # the first process has not created the table yet
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            return []

    def counts(self) -> Counter[int | None]:
        return Counter(pid_of(lease.owner) for lease in self.leases())

    def fair(self, procs: Sequence[Proc]) -> bool:
        for p in procs:
            if p.popen.poll() is not None:
                pytest.fail(f"pid {p.pid} exited ({p.popen.returncode}):\n{p.output()[-3000:]}")
        counts = self.counts()
        per = [counts.get(p.pid, 0) for p in procs]
        return counts.get(None, 0) == 0 and sum(per) == self.shards and max(per) - min(per) <= 1

    def start_sampler(self) -> None:
        client = DynamoDBStore(boto3_client("dynamodb", self.dynamodb_url), self.store.table)

        def sample() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # the table may not exist yet
                    # stamped when the query leaves: its answer shows the table at some
                    # instant after that (stamped on return, a slow query under load made a
                    # take look later than the first applies that followed it)
                    asked_at = time.time()
                    leases = client.list_leases("scale")
                    self.samples.append(
                        Sample(
                            asked_at,
                            {
                                lease.shard_id: (
                                    pid_of(lease.owner),
                                    lease.counter,
                                    lease.checkpoint,
                                    lease.state.value,
                                )
                                for lease in leases
                            },
                        )
                    )
                self._stop.wait(0.05)

        self._spawn(sample, "sampler")

    def start_writer(self, rate: float = 40.0, keys: int = 240, seed: int = 1) -> None:
        rng = random.Random(seed)
        self._writer_stop.clear()

        def write() -> None:
            next_at = time.monotonic()
            while not self._writer_stop.is_set():
                self.written += 1
                pk = f"k{rng.randrange(keys)}"
                if rng.random() < 0.1:
                    self.fake.delete_item("scale", {"pk": pk})
                else:
                    self.fake.put_item("scale", {"pk": pk, "w": self.written})
                next_at += 1 / rate
                self._writer_stop.wait(max(0.0, next_at - time.monotonic()))

        self._spawn(write, "writer")

    def stop_writer(self) -> None:
        self._writer_stop.set()
        for t in self._threads:
            if t.name == "writer":
                t.join(5)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def expected(self) -> dict[str, object]:
        return scale_views.expected(self.fake.contents("scale"))

    def wait_converged(self, timeout: float = 30.0) -> float:
        return wait_until(
            lambda: redis_view_keys(self.redis) == self.expected(),
            timeout,
            "Redis to equal the projection of the fake table",
            step=0.1,
        )

    def spy(self) -> list[tuple[float, int, str, int]]:
        """Every projection of every process: (time, pid, pk, w), by time."""
        out: list[tuple[float, int, str, int]] = []
        for path in self.spy_dir.glob("*.log"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4:
                    out.append((float(parts[0]), int(parts[1]), parts[2], int(parts[3])))
        return sorted(out)

    def close(self) -> None:
        self._writer_stop.set()
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.server.stop()
        with contextlib.suppress(Exception):
            self.store._db.delete_table(TableName=self.store.table)


@pytest.fixture
def cluster_factory(
    tmp_path: Path, redis_url: str, dynamodb_url: str, redis_client: redis.Redis
) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def factory(shards: int = 24, **worker: Any) -> Cluster:
        cluster = Cluster(tmp_path, redis_url, dynamodb_url, redis_client, shards, worker)
        made.append(cluster)
        return cluster

    yield factory
    for cluster in made:
        for proc in cluster.procs:
            if proc.popen.poll() is None or proc.popen.returncode not in (0, -9):
                print(f"--- viewkeeper pid {proc.pid} ---\n{proc.output()[-4000:]}")
        cluster.close()


def renewal_gaps(
    samples: Sequence[Sample], since: float = 0.0, until: float = float("inf")
) -> dict[int, list[float]]:
    """Per process, the seconds between consecutive renewals seen for a lease it kept, in
    [since, until]: the real period of its supervisor loop (lease_duration / 3 plus the time
    a round takes, which grows when the machine is loaded)."""
    gaps: dict[int, list[float]] = {}
    last: dict[str, tuple[int | None, int, float]] = {}
    for s in samples:
        if not since <= s.at <= until:
            continue
        for shard, (pid, counter, _, _) in s.leases.items():
            seen = last.get(shard)
            if pid is None or seen is None or seen[0] != pid:
                last[shard] = (pid, counter, s.at)
            elif counter != seen[1]:
                gaps.setdefault(pid, []).append(s.at - seen[2])
                last[shard] = (pid, counter, s.at)
    return gaps


def lease_moves(samples: Sequence[Sample]) -> list[tuple[float, str, int | None, int | None]]:
    """(time, shard, pid before, pid after) of each change of owner the sampler saw."""
    moves: list[tuple[float, str, int | None, int | None]] = []
    last: dict[str, int | None] = {}
    for s in list(samples):
        for shard, (pid, _, _, _) in s.leases.items():
            if shard in last and last[shard] != pid:
                moves.append((round(s.at, 1), shard[-6:], last[shard], pid))
            last[shard] = pid
    return moves


def assert_applies_only_by_owners(cluster: Cluster) -> dict[str, Any]:
    """Every apply on a shard came from the process holding its lease, or from the previous
    holder shortly after it lost it.

    Holders come from the lease-table samples (an apply may precede the first sample that
    shows a take by one sampling gap). How long the previous holder may go on: the product
    stops a worker at its next checkpoint (after applying the page in flight) or when its
    supervisor's next renewal fails — so within lease_duration plus that process's own
    renewal period, which the samples measure. (A bound of lease_duration alone does not
    hold under load: see test_a_stalled_supervisors_workers_stop_applying_when_its_lease_
    expires.) Returns figures for the log, among them the longest apply-after-loss seen.
    """
    shard_of_w: dict[int, str] = {}
    for shard, records in shard_records(cluster.fake, "scale").items():
        for r in records:
            if r.new_image is not None:
                shard_of_w[int(r.new_image["w"])] = shard
    samples = cluster.samples
    assert samples, "the sampler saw nothing"
    sample_gaps = [b.at - a.at for a, b in itertools.pairwise(samples)]
    period = {pid: max(g) for pid, g in renewal_gaps(samples).items()}
    # tenures: shard -> [(pid, may have started at, last seen at, first seen gone at)]
    tenures: dict[str, list[tuple[int, float, float, float]]] = {s: [] for s in shard_of_w.values()}
    for shard, out in tenures.items():
        current: list[Any] | None = None
        prev_at = samples[0].at
        for s in samples:
            pid = s.leases.get(shard, (None, 0, None, ""))[0]
            if current is not None and pid != current[0]:
                out.append((current[0], current[1], current[2], s.at))
                current = None
            if pid is not None and current is None:
                current = [pid, prev_at, s.at]
            if current is not None:
                current[2] = s.at
            prev_at = s.at
        if current is not None:
            out.append((current[0], current[1], current[2], float("inf")))
    outside: list[str] = []
    after_loss: list[float] = []
    events = cluster.spy()
    for at, pid, _pk, w in events:
        shard = shard_of_w[w]
        grace = LEASE + period.get(pid, LEASE)
        ok = False
        for p, start, _last, end in tenures[shard]:
            if p == pid and start - 0.05 <= at <= end + grace:
                ok = True
                if at > end:
                    after_loss.append(at - end)
        if not ok:
            around = ", ".join(
                f"pid {p} {start - at:+.2f}..{last - at:+.2f} (gone {end - at:+.2f})"
                for p, start, last, end in tenures[shard]
                if start - 10 < at < end + 10
            )
            outside.append(
                f"pid {pid} applied w={w} on {shard.split('-')[1][-3:]} (renews every "
                f"{period.get(pid, 0):.1f}s at worst); holders: {around}"
            )
    assert outside == [], f"{len(outside)} applies outside their lease:\n" + "\n".join(outside[:20])
    return {
        "applies": len(events),
        "max_sample_gap": round(max(sample_gaps, default=0.0), 2),
        "worst_renewal_period": round(max(period.values(), default=0.0), 2),
        "applies_after_loss": len(after_loss),
        "beyond_lease_duration": sum(1 for x in after_loss if x > LEASE),
        "max_apply_after_loss": round(max(after_loss, default=0.0), 2),
        "handovers": sum(max(0, len(t) - 1) for t in tenures.values()),
    }


def test_the_clusters_coordination_table_grants_a_contested_lease_once(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """The lease protocol rests on DynamoDB's conditional writes being atomic per item: of
    takes racing for one lease at the counter they saw, one wins. moto's server checks a
    condition, then applies the update, with no lock in between, so several takes could
    all win (seen in the rolling restart: a drained process stayed a lease's owner while
    another renewed the lease in its name). The processes' coordination traffic goes
    through the cluster's server, which hands moto one write per item at a time."""
    cluster = cluster_factory(1)
    through = DynamoDBStore(boto3_client("dynamodb", cluster.server.url), cluster.store.table)
    arn = cluster.fake.stream_arn("scale")
    assert cluster.store.create_lease(Lease("contested", "shardId-contested", arn, ()))
    racers = 8
    wrong: list[str] = []

    def take(free: Lease, owner: str, barrier: threading.Barrier, won: list[Lease]) -> None:
        barrier.wait()
        taken = through.take_lease(free, owner)
        if taken is not None:
            won.append(taken)

    for trial in range(30):
        (free,) = cluster.store.list_leases("contested")
        assert free.owner is None, free
        barrier = threading.Barrier(racers)
        won: list[Lease] = []
        threads = [
            threading.Thread(target=take, args=(free, f"racer-{i}-{trial}", barrier, won))
            for i in range(racers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        (stored,) = cluster.store.list_leases("contested")
        if len(won) != 1 or (won[0].owner, won[0].counter) != (stored.owner, stored.counter):
            wrong.append(
                f"trial {trial}: takes granted {[(w.owner, w.counter) for w in won]}, "
                f"stored {(stored.owner, stored.counter)}"
            )
        cluster.store.release_lease(stored)
    assert wrong == [], "\n".join(wrong)


def test_three_processes_share_fairly_and_a_kill_9_loses_nothing(
    cluster_factory: Callable[..., Cluster], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = cluster_factory(24)
    cluster.start_sampler()
    procs = [cluster.start() for _ in range(3)]
    took = wait_until(lambda: cluster.fair(procs), 60, "a fair share (8/8/8)", step=0.1)
    log.info("fair share reached %.1fs after start", took)
    assert sorted(cluster.counts().values()) == [8, 8, 8]
    cluster.start_writer()
    time.sleep(2.0)
    assert all(p.popen.poll() is None for p in procs), [p.output()[-2000:] for p in procs]

    victim = procs[1]
    before = {lease.shard_id: lease for lease in cluster.leases()}
    theirs = {s for s, lease in before.items() if pid_of(lease.owner) == victim.pid}
    assert len(theirs) == 8
    victim.popen.send_signal(signal.SIGKILL)
    killed_at = time.time()
    victim.popen.wait(10)

    def moved_and_reading() -> bool:
        last = cluster.samples[-1]
        for shard in theirs:
            pid, _, checkpoint, _ = last.leases[shard]
            if pid in (None, victim.pid) or checkpoint == before[shard].checkpoint:
                return False
        return True

    wait_until(moved_and_reading, 40, "the killed process's shards to be read by others")
    taken_at: dict[str, float] = {}
    reading_at: dict[str, float] = {}
    for s in cluster.samples:
        if s.at < killed_at:
            continue
        for shard in theirs:
            pid, _, checkpoint, _ = s.leases[shard]
            if pid not in (None, victim.pid):
                taken_at.setdefault(shard, s.at)
                if checkpoint != before[shard].checkpoint:
                    reading_at.setdefault(shard, s.at)
    takeover = max(taken_at.values()) - killed_at
    failover = max(reading_at.values()) - killed_at
    first = min(taken_at.values()) - killed_at
    window = renewal_gaps(cluster.samples, killed_at - 3, killed_at + failover)
    gaps = [g for pid_gaps in window.values() for g in pid_gaps]
    period = max(gaps)
    with capsys.disabled():
        print(
            f"\n[failover] kill -9 of a process holding 8 of 24 shards (lease {LEASE:.0f}s): "
            f"first lease taken after {first:.2f}s, all taken after {takeover:.2f}s, "
            f"all read again after {failover:.2f}s; survivors renewed every "
            f"{sorted(gaps)[len(gaps) // 2]:.2f}s (median), {period:.2f}s (max)"
        )
    # not before the lease could have expired: each shard taken at least lease_duration
    # after the victim's last renewal the sampler saw. Measured from the kill instead, this
    # failed once in CI on a loaded machine: the victim's last renewal came well before it.
    renewed_at: dict[str, float] = {}
    for shard in theirs:
        counter = None
        for s in cluster.samples:
            if s.at >= killed_at:
                break
            if shard not in s.leases:  # sampled before the lease was made
                continue
            pid, seen, _, _ = s.leases[shard]
            if pid == victim.pid and seen != counter:
                counter, renewed_at[shard] = seen, s.at
    # (a shard the victim took just before the kill may not be in any sample yet)
    assert len(renewed_at) >= len(theirs) // 2, renewed_at
    # a renewal shows in the first sample after it: as late as the widest gap between samples
    near = [x.at for x in cluster.samples if killed_at - LEASE - 3 <= x.at < killed_at]
    late = max(b - a for a, b in itertools.pairwise(near)) + 0.1
    honoured = min(taken_at[shard] - at for shard, at in renewed_at.items())
    assert honoured >= LEASE - late, (honoured, late, first)
    # today the dead process counts as live for 2 x lease_duration (its heartbeat horizon;
    # see the xfail unit test), then a survivor's round or two takes its leases
    assert failover <= 2 * LEASE + 3 * period + 1.0, (failover, period)
    survivors = [procs[0], procs[2]]
    wait_until(lambda: cluster.fair(survivors), 30, "12/12 between the survivors")
    time.sleep(1.0)
    cluster.stop_writer()
    cluster.wait_converged()  # nothing lost (I4)
    for proc in survivors:
        assert cluster.terminate(proc) == 0, proc.output()[-3000:]
    assert all(lease.owner is None for lease in cluster.leases()), cluster.leases()
    cluster._stop.set()
    report = assert_applies_only_by_owners(cluster)
    with capsys.disabled():
        print(f"[failover] {report}")
    assert report["applies"] > 0


def test_a_rolling_restart_loses_nothing_and_drains_cleanly(
    cluster_factory: Callable[..., Cluster], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = cluster_factory(24)
    cluster.start_sampler()
    procs = [cluster.start() for _ in range(3)]
    wait_until(lambda: cluster.fair(procs), 60, "a fair share (8/8/8)", step=0.1)
    cluster.start_writer()
    handovers: list[float] = []
    for i in range(3):
        old = procs[0]
        held = {lease.shard_id for lease in cluster.leases() if pid_of(lease.owner) == old.pid}
        rc = cluster.terminate(old)
        stopped_at = time.time()
        assert rc == 0, old.output()[-3000:]
        assert "stopped cleanly" in old.output()
        # its leases were released, not left to expire
        leases = cluster.leases()
        assert not [lease for lease in leases if pid_of(lease.owner) == old.pid]

        def handed_over(held: set[str] = held) -> bool:
            owners = {lease.shard_id: lease.owner for lease in cluster.leases()}
            return all(owners[s] is not None for s in held)

        wait_until(handed_over, 30, f"restart {i}: released leases taken")
        handovers.append(time.time() - stopped_at)
        new = cluster.start()
        procs = [*procs[1:], new]
        # the newcomer is working (its share comes one steal per round, checked at the end)
        wait_until(
            lambda new=new: cluster.counts().get(new.pid, 0) >= 2, 60, f"restart {i}: a lease"
        )
    wait_until(
        partial(cluster.fair, procs),
        60,
        "a fair share after the restarts",
        step=0.1,
        state=lambda: (
            f"leases per pid {dict(cluster.counts())} (live: {[p.pid for p in procs]}); "
            f"last lease moves {lease_moves(cluster.samples)[-8:]}"
        ),
    )
    time.sleep(0.5)
    cluster.stop_writer()
    cluster.wait_converged()
    for proc in procs:
        assert cluster.terminate(proc) == 0, proc.output()[-3000:]
    assert all(lease.owner is None for lease in cluster.leases())
    cluster._stop.set()
    report = assert_applies_only_by_owners(cluster)
    with capsys.disabled():
        print(f"\n[rolling restart] handovers {[round(h, 2) for h in handovers]}s; {report}")


def test_sigterm_during_a_busy_batch_finishes_and_checkpoints_it(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory(1, batch_size=50)
    for w in range(1, 201):  # four pages of 50 distinct items
        cluster.fake.put_item("scale", {"pk": f"k{w:03d}", "w": w})
    cluster.written = 200
    proc = cluster.start(VK_SCALE_SLOW="0.03")  # a page takes about 1.5 s to project
    spy = cluster.spy_dir / f"{proc.pid}.log"

    def applied() -> int:
        return len(spy.read_text().splitlines()) if spy.exists() else 0

    wait_until(lambda: applied() >= 60, 30, "the second page to be in flight", step=0.005)
    in_flight = applied()
    rc = cluster.terminate(proc)
    assert rc == 0, proc.output()[-3000:]
    done = applied()
    # the page in flight (the second, unless the signal came late) was finished, no other
    # was started: the drain stops at a page boundary
    assert in_flight > 50 and done % 50 == 0 and in_flight <= done < 200, (in_flight, done)
    (lease,) = cluster.leases()
    records = shard_records(cluster.fake, "scale")[lease.shard_id]
    sequence_of = {int(r.new_image["w"]): r.sequence for r in records if r.new_image}
    last_w = max(w for _, _, _, w in cluster.spy())
    assert last_w == done
    assert lease.checkpoint == sequence_of[last_w]  # the in-flight page was checkpointed
    assert lease.owner is None  # and its lease released
    assert lease.state is LeaseState.ACTIVE
    view = redis_view_keys(cluster.redis)
    assert view == {f"sc:k{w:03d}": str(w) for w in range(1, done + 1)}
    assert "stopped cleanly" in proc.output()
    # a new process resumes after the checkpoint and finishes the rest
    proc2 = cluster.start()
    cluster.wait_converged()
    assert cluster.terminate(proc2) == 0
    ws = [w for _, pid, _, w in cluster.spy() if pid == proc2.pid]
    assert min(ws) == done + 1  # nothing before the checkpoint was applied again
