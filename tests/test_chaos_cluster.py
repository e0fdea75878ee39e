"""The chaos suite in cluster mode: the random run of tests/test_chaos.py with the ``cache``
connection on the test bed's Redis Cluster (``cluster: true``, 3 masters + 3 replicas).

Everything else is as in tests/test_chaos.py (read its docstring): the seeded writer, two
`viewkeeper run` daemons sharing the lease, the Lambda-style applier, OpenSearch and each
daemon's DynamoDB behind proxies, the same views (tests/views_e2e/chaos_views.py), the
daemon and network faults, rebuilds with a lease handover, the final drain and the check
against a full Scan. The standalone Redis faults (kill -9 or SIGTERM with AOF, READONLY,
OOM, data loss) are replaced by the cluster's own (tests/chaos/harness.py, cluster mode),
each on a slot or a master that holds the views' keys, never two at once, never during a
background rebuild:

- ``cluster-failover``: CLUSTER FAILOVER on the replica of a hot slot's master;
- ``cluster-migrate``: a hot slot (an owner's sorted set or hash, a status set, the busiest
  owner-record bucket) migrates to another master, half its keys at once (the daemons' calls
  get ASK, and TRYAGAIN for keys on both sides), the rest and the hand-over 0.5-3 s later;
- ``cluster-pause``: a master SIGSTOPped for 0.3-1.2 s (below the 1.5 s node timeout: calls
  time out and are sent again) or 2-4 s (its replica takes over, it comes back a replica);
- ``cluster-kill-master``: a master SIGKILLed (its replica takes over), started again 0.5-3 s
  later as a replica.

Every kind of fault happens at least once when the run lasts long enough (a shuffled deck,
then weighted draws), the cluster's first.

A master killed or failed over may take with it writes it acknowledged but had not
replicated. The sink must notice (the view marked needs_rebuild); the run then ends with
`viewkeeper rebuild --all` before the check. The check must find every count 0 either way
(the claims of every slot included: tests/chaos/checker.py), with no dead letter.

Run (as the standalone chaos suite)::

    python -m tests.testbed run -- pytest tests/test_chaos_cluster.py -x -q   # short (CI)
    VIEWKEEPER_CHAOS=long python -m tests.testbed run -- pytest tests/test_chaos_cluster.py -q
    VIEWKEEPER_CHAOS_SEED=1234 python -m tests.testbed run -- pytest tests/test_chaos_cluster.py
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import TABLE, Harness
from tests.chaos.lambda_applier import LambdaApplier
from tests.chaos.workload import Writer, make_keys
from tests.test_chaos import (
    LAMBDA,
    MODE,
    PLANS,
    SEED,
    Plan,
    explained,
    inject,
    make_lambda,  # noqa: F401 - a fixture
    say,
)
from tests.testbed import RemoteClusterControl

pytestmark = pytest.mark.redis_cluster

_CLUSTER_KINDS = {
    "cluster-failover": 1,
    "cluster-migrate": 2,
    "cluster-pause": 2,
    "cluster-kill-master": 1,
}
_STANDALONE_ONLY = ("redis", "redis-readonly", "redis-oom", "wipe-rebuild")


def cluster_plan(plan: Plan) -> Plan:
    """The standalone plan with the cluster's faults in place of the standalone Redis's; the
    short run a little shorter (its daemons and its checks read 16,384 slots)."""
    kinds = {k: w for k, w in plan.kinds.items() if k not in _STANDALONE_ONLY}
    seconds = 20.0 if MODE == "short" else plan.seconds
    return Plan(plan.keys, seconds, plan.gap, plan.writer_pause, {**kinds, **_CLUSTER_KINDS})


PLAN = cluster_plan(PLANS[MODE])


@pytest.fixture
def make_cluster_harness(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    dynamodb_url: str,
    opensearch_url: str,
    os_client: Any,
    os_prefix: str,
    redis_cluster_faults: RemoteClusterControl,
) -> Iterator[Callable[..., tuple[Harness, Writer]]]:
    """``make_cluster_harness(keys=30, seed=SEED, writer_pause=0.0)`` -> (harness, writer) on a
    fresh chaos table and the test bed's cluster (healed and flushed before and after)."""
    made: list[tuple[Harness, Writer]] = []

    def factory(
        *, keys: int = 30, seed: int = SEED, writer_pause: float = 0.0
    ) -> tuple[Harness, Writer]:
        with contextlib.suppress(Exception):  # left over by a run that was killed
            dynamodb.delete_table(TableName=TABLE)
            dynamodb.get_waiter("table_not_exists").wait(TableName=TABLE)
        make_table(dynamodb, TABLE, hash_key="pk", range_key="sk", range_type="N")
        rng = random.Random(seed)
        h = Harness(
            tmp_path,
            db=dynamodb,
            dynamodb_url=dynamodb_url,
            opensearch_url=opensearch_url,
            os_prefix=os_prefix,
            redis_server=None,
            redis_cluster=redis_cluster_faults,
            rng=random.Random(rng.random()),
        )
        writer = Writer(
            dynamodb, TABLE, make_keys(keys), random.Random(rng.random()), pause=writer_pause
        )
        made.append((h, writer))
        return h, writer

    yield factory
    for h, writer in made:
        writer.finish()
        h.close()


def inject_cluster(
    h: Harness, kind: str, rng: random.Random, lam: LambdaApplier | None = None
) -> bool:
    """One fault of ``kind`` (a cluster fault here, any other as tests/test_chaos.py's
    ``inject``); False if the current state does not allow it."""
    if not kind.startswith("cluster-"):
        return inject(h, kind, rng, lam)
    if h.redis_busy():  # another cluster fault, or a background rebuild
        return False
    if kind == "cluster-failover":
        h.cluster_failover(rng)
    elif kind == "cluster-migrate":
        h.cluster_migrate(rng, rng.uniform(0.5, 3.0))
    elif kind == "cluster-pause":
        h.cluster_pause(rng, rng.choice((rng.uniform(0.3, 1.2), rng.uniform(2.0, 4.0))))
    elif kind == "cluster-kill-master":
        h.cluster_kill_master(rng, rng.uniform(0.5, 3.0))
    else:
        raise AssertionError(kind)
    return True


@pytest.mark.timeout(PLAN.seconds + 300)
def test_random_faults_converge_on_a_redis_cluster(
    make_cluster_harness: Callable[..., tuple[Harness, Writer]],
    make_lambda: Callable[[Harness], LambdaApplier],  # noqa: F811 - the imported fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    """I1-I6 under random faults, the Redis sink being the cluster (module docstring).

    Failed before (seed 202: 4 dead letters) when a migration caught the daemons' calls:
    redis-py's ``ClusterError("TTL exhausted.")`` was taken for the call's own error; it is
    the cluster's state now, sent again until the slot settles. Its rebuilds could also die
    on the thread race of ``packing.tag_for_slot`` (fixed: the table is published whole)."""
    plan = PLAN
    kinds = {k: w for k, w in plan.kinds.items() if LAMBDA or not k.startswith("lambda")}
    say(capsys, f"\nchaos cluster mode {MODE}, seed {SEED} (VIEWKEEPER_CHAOS_SEED={SEED})")
    h, writer = make_cluster_harness(keys=plan.keys, writer_pause=plan.writer_pause)
    lam = make_lambda(h) if LAMBDA else None
    rng = random.Random(SEED ^ 0xC1A5)
    started = time.monotonic()
    with explained(h, capsys):
        h.start_all()
        writer.start()
        h.wait_for(lambda: h.lease() is not None, 60, "the first lease")
        if lam is not None:
            lam.start()
        # every kind at least once, the cluster's first (the deck is dealt from its end)
        others = [k for k in kinds if k not in _CLUSTER_KINDS]
        ours = list(_CLUSTER_KINDS)
        rng.shuffle(others)
        rng.shuffle(ours)
        deck = others + ours
        names, weights = list(kinds), list(kinds.values())
        end = time.monotonic() + plan.seconds
        next_at = time.monotonic() + rng.uniform(*plan.gap)
        work_for = rng.uniform(0.2, 1.2)
        working_since: float | None = None
        # As in tests/test_chaos.py: with the Lambda applier the run goes on until a rebuild
        # has happened; then until the background rebuilds have ended, with no new fault.
        while True:
            h.tick()
            now = time.monotonic()
            need_rebuild = lam is not None and not h.figures.faults["rebuild + lease handover"]
            if now >= end and not need_rebuild and not h.jobs:
                break
            if h.working is None:
                working_since = None
            elif working_since is None:
                working_since = now
            at_work = working_since is not None and now - working_since >= work_for
            due = now >= next_at and (now < end or need_rebuild)
            if due and (at_work or now >= next_at + 8.0):
                work_for = rng.uniform(0.2, 1.2)
                forced = need_rebuild and now > end - 6.0
                if forced:
                    assert now < end + 60, "no rebuild could be started for a minute"
                    kind = "rebuild-handover"
                else:
                    kind = deck[-1] if deck else rng.choices(names, weights)[0]
                done = inject_cluster(h, kind, rng, lam)
                if deck and done and not forced:
                    deck.pop()
                elif deck and not forced:  # a kind the state does not allow now: to the back
                    deck.insert(0, deck.pop())
                next_at = time.monotonic() + rng.uniform(*plan.gap)
            time.sleep(0.05)
        writer.finish()
        h.note(f"writer stopped after {writer.total} operations")
        h.restore_everything()
        if lam is not None:
            lam.finish()  # reads the stream to its end first, as a real mapping would
        h.stop_all()
        h.drain()
        lost = h.lost_views()
        if lost:  # writes a master acknowledged and lost, noticed: the rebuild repairs them
            h.note(f"views marked needs_rebuild: {lost}; rebuild --all")
            h.rebuild()
            h.drain()
            assert h.lost_views() == [], "the rebuild did not clear needs_rebuild"
        dead = h.deadletters()
        report = h.check()
        seconds = time.monotonic() - started
        exits = [e for d in h.daemons.values() for e in d.unexpected_exits]
        say(
            capsys,
            "\n".join(
                [
                    f"chaos cluster {MODE}: seed {SEED}, {seconds:.0f}s, {plan.keys} keys",
                    f"operations: {writer.total} ({dict(writer.ops)}), {writer.bursts} bursts, "
                    f"{len(writer.errors)} failed calls",
                    f"faults: {sum(h.figures.faults.values())} ({dict(h.figures.faults)})",
                    f"fault effects: {dict(h.figures.effects)}",
                    f"loss noticed, rebuilt: {lost or 'none'}",
                    f"lambda applier: {lam.summary() if lam is not None else 'off'}",
                    f"daemon starts: { {s: d.starts for s, d in h.daemons.items()} }; "
                    f"checkpoints seen moving during the faults: {len(h.checkpoints)}",
                    f"daemon logs: {dict(h.log_counts())}",
                    f"daemons that exited on their own (restarted): at start-up "
                    f"{sum(not e.was_running for e in exits)}, while running "
                    f"{sum(e.was_running for e in exits)}: {sorted({e.why[:160] for e in exits})}",
                    f"dead letters: {len(dead)}",
                    report.summary(),
                ]
            ),
        )
        assert report.items > 0 and report.redis.compared > 0 and report.opensearch.compared > 0
        assert report.claims is not None and report.claims.compared > 0
        assert report.ok, report.summary() + "\n" + h.diagnose(report)
        assert not dead, dead[:3]
        assert not writer.errors or len(writer.errors) < writer.total / 10, writer.errors[:5]
        running = [e for e in exits if e.was_running]
        assert not running, f"running daemons exited: {running}"
