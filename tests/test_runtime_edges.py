"""The runtime at its edges, found by an adversarial review: leases that change hands
during a rebuild, LATEST and TRIM_HORIZON across long outages, dead letters of two readers,
the rebuild's scan, a stream disabled and enabled again, replay from another config.

Each test forced an interleaving or fault that broke one of the guarantees I1-I6, against
the real Redis (FakeStream + MemoryStore, or DynamoDBStore on moto, for the stream and the
coordination table). The interleavings are forced with hooks in thin wrapper classes (a
store call or a sink call that is slow), never with sleeps that merely hope for an order.
"""

from __future__ import annotations

import io
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import redis_view_keys
from tests.views_e2e.fake_views import expected
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.keys import encode_key
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.rebuild import RebuildSettings, rebuild
from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import WorkerSettings
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.errors import ServiceError
from viewkeeper.stream.fake import FakeStream

VIEWS = load_views(["tests.views_e2e.fake_views"])
(VIEW,) = VIEWS
TABLE, KEYS = "fk", ("pk",)


def _wait(cond: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Gate:
    """A one-shot hook: the first call that matches signals ``entered`` and waits for
    ``release`` (a slow network call, a stalled thread)."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def arm(self) -> None:
        self.entered.clear()
        self.release.clear()
        self.armed = True

    def pass_through(self) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(30), "gate never released"


class SlowStore:
    """A coordination store whose ``put_worker`` (the supervisor's heartbeat write) or
    ``put_deadletter`` can be made slow once; everything else is the inner store."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.heartbeat = Gate()
        self.deadletter = Gate()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def put_worker(self, info: Any) -> None:
        self.heartbeat.pass_through()
        self._inner.put_worker(info)

    def put_deadletter(self, dl: Any) -> None:
        self.deadletter.pass_through()
        self._inner.put_deadletter(dl)


class SlowSink:
    """A sink whose next ``apply`` touching ``item_key`` can be made slow once."""

    def __init__(self, inner: RedisSink, item_key: str) -> None:
        self._inner = inner
        self.item_key = item_key
        self.gate = Gate()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def apply(self, changes: Any) -> Any:
        if any(c.item_key == self.item_key for c in changes):
            self.gate.pass_through()
        return self._inner.apply(changes)


def _key_in_upper_half(prefix: str) -> str:
    """A ``pk`` whose item lands in the second of two shards (crc32 of its key >= 2**31)."""
    for i in range(1000):
        pk = f"{prefix}{i}"
        if zlib.crc32(encode_key({"pk": pk}, KEYS).encode()) >= 1 << 31:
            return pk
    raise AssertionError("no key found")


@pytest.fixture
def redis_sink(redis_client: Any) -> RedisSink:
    sink = RedisSink("cache", redis_client)
    sink.prepare(list(VIEWS))
    return sink


# ============================================================================================
# 1. A stolen lease: the old holder stamps an older record with a newer generation
# ============================================================================================
def test_steal_during_rebuild_old_holder_stamps_older_record_with_newer_generation(
    redis_client: Any, redis_sink: RedisSink, coord_store: Any
) -> None:
    """I1/I6. B steals a lease from A (balancing) while A is alive and renewing; A's worker
    does not know until A's next renewal fails, and its lease looks valid to it meanwhile.
    A rebuild raises the generation. A adopts it first; B (which re-read the generations at
    its take, before the raise) has not yet. A's worker receives record r1 of item x,
    stamped with the NEW generation; B's worker receives r1 and the newer r2 of x, stamped
    with the OLD generation, and applies x=2 at (0, s2). A's apply of r1 lands after it, as
    (1, s1) > (0, s2): x=1. The rebuild's scan writes (1, 0), which loses to (1, s1).
    Stream drained, rebuild done: the sink holds x=1, the table x=2, and nothing will ever
    correct it (B checkpointed r2)."""
    fake = FakeStream()
    fake.create_table(TABLE, KEYS, shards=2)
    store = coord_store
    x = _key_in_upper_half("x")
    a_store = SlowStore(store)
    a_sink = SlowSink(redis_sink, encode_key({"pk": x}, KEYS))
    settings = SupervisorSettings(
        lease_duration=30.0,
        discovery_interval=3600.0,
        starting_positions={TABLE: "TRIM_HORIZON"},
        worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0, max_backoff=0.05),
    )
    a = Supervisor(
        [TABLE],
        fake,
        a_store,
        lambda gen: Pipeline(VIEWS, {("redis", "cache"): a_sink}, a_store, gen),
        settings,
        worker_id="A",
    )
    b = Supervisor(
        [TABLE],
        fake,
        store,
        lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen),
        settings,
        worker_id="B",
    )
    rebuild_thread: threading.Thread | None = None
    try:
        fake.put_item(TABLE, {"pk": x, "v": 0, "g": "a"})
        a.tick()  # A discovers both shards and takes both
        assert len(a.held) == 2
        _wait(lambda: all(r.worker.caught_up for r in list(a.running.values())), what="A idle")
        stolen = max(a.held)  # B steals the shard with the highest id (x's shard)
        assert redis_view_keys(redis_client)[f"fk:{x}"] == "0"

        b.tick()  # B joins: fair share 1, steals one lease from A (generations: none yet)
        assert list(b.held) == [stolen]
        w1 = a.running[stolen]  # A's worker on the stolen shard: A does not know yet
        _wait(lambda: b.running[stolen].worker.caught_up, what="B idle")

        # a rebuild of the view starts: it raises the generation and waits in the handshake
        def run_rebuild() -> None:
            rebuild(
                list(VIEWS),
                VIEWS,
                fake,
                store,
                lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen),
                # (the daemons' lease duration is 30 s so that nothing expires by itself in
                # this test; the handshake's wait after the publications is one of it)
                RebuildSettings(segments=1, handshake_timeout=60, lease_duration=2.0),
                out=io.StringIO(),
            )

        rebuild_thread = threading.Thread(target=run_rebuild, daemon=True)
        rebuild_thread.start()
        _wait(lambda: store.generations().get(VIEW.name) == 1, what="the raise")

        # A's next round adopts generation 1; its heartbeat write is slow (its renewal,
        # which will find the lease gone, comes after it)
        a_store.heartbeat.arm()
        a_sink.gate.arm()
        a_round = threading.Thread(target=a.tick, daemon=True)
        a_round.start()
        assert a_store.heartbeat.entered.wait(10)
        assert a.generations == {VIEW.name: 1}

        fake.put_item(TABLE, {"pk": x, "v": 1, "g": "a"})  # r1
        # A's worker received [r1] stamped {v: 1}, lease valid; its sink call is slow
        assert a_sink.gate.entered.wait(10), "A's worker did not receive r1"
        fake.put_item(TABLE, {"pk": x, "v": 2, "g": "a"})  # r2
        # B's worker applies r1, r2 stamped with generation 0 and checkpoints r2
        _wait(
            lambda: (
                next(ls for ls in store.list_leases(TABLE) if ls.shard_id == stolen[1]).checkpoint
                == fake.last_sequence
            ),
            what="B checkpoints r2",
        )
        assert redis_view_keys(redis_client)[f"fk:{x}"] == "2"

        a_store.heartbeat.release.set()  # A's round goes on: its renewal fails, W1 stopped
        a_round.join(10)
        assert stolen not in a.held
        a_sink.gate.release.set()  # ... but W1's page was already on its way to the sink
        w1.thread.join(10)
        assert not w1.thread.is_alive()

        b.tick()  # B adopts generation 1 and acknowledges it: the handshake completes
        rebuild_thread.join(60)
        assert not rebuild_thread.is_alive(), "rebuild did not finish"
        _wait(lambda: b.running[stolen].worker.caught_up, what="B drained")

        # I1: the stream is drained and the rebuild is done: the sink must be the table
        assert fake.get_item(TABLE, {"pk": x}) == {"pk": x, "v": 2, "g": "a"}
        assert redis_view_keys(redis_client) == expected(fake.contents(TABLE))
    finally:
        a_store.heartbeat.release.set()
        a_sink.gate.release.set()
        a.request_stop()
        b.request_stop()
        a.shutdown()
        b.shutdown()
        if rebuild_thread is not None:
            rebuild_thread.join(5)


# ============================================================================================
# 2. LATEST: a renewal says "caught up" for a worker that cannot read, moving checkpoint_at
# ============================================================================================
class LatestBed:
    def __init__(self, redis_client: Any, redis_sink: RedisSink) -> None:
        self.offset = 0.0  # how far the coordination table's and the stream's clocks moved
        self.fake = FakeStream(clock=self.now)
        self.fake.create_table(TABLE, KEYS)
        self.store = MemoryStore(clock=self.now)
        self.redis = redis_client
        self.sink = redis_sink
        self.running: list[tuple[Supervisor, threading.Thread]] = []

    def now(self) -> float:
        return time.time() + self.offset

    def start(self) -> Supervisor:
        sup = Supervisor(
            [TABLE],
            self.fake,
            self.store,
            lambda gen: Pipeline(VIEWS, {("redis", "cache"): self.sink}, self.store, gen),
            SupervisorSettings(
                lease_duration=1.0,
                worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0, max_backoff=0.05),
            ),  # starting position: LATEST (the default)
        )
        t = threading.Thread(target=sup.run, daemon=True)
        t.start()
        self.running.append((sup, t))
        return sup

    def crash(self, sup: Supervisor) -> None:
        """kill -9: workers stop, nothing is released or checkpointed."""
        for pair in list(self.running):
            if pair[0] is sup:
                sup.stopping.set()
                for run in list(sup.running.values()):
                    run.stop.set()
                sup.held.clear()
                pair[1].join(20)
                self.running.remove(pair)


@pytest.fixture
def latest_bed(redis_client: Any, redis_sink: RedisSink) -> Iterator[LatestBed]:
    bed = LatestBed(redis_client, redis_sink)
    yield bed
    bed.fake.clear_injections()
    for sup, t in bed.running:
        sup.request_stop()
        t.join(20)


def test_latest_renewal_while_getrecords_fails_moves_the_start_past_unread_records(
    latest_bed: LatestBed,
) -> None:
    """I4/I5. A shard first opened at LATEST (checkpoint still LATEST: no record applied
    yet) is caught up; then GetRecords fails (throttling, a Streams outage) for more than
    LATEST_MARGIN while the table is written. The worker's ``caught_up`` stays True (only a
    page changes it), so every renewal writes checkpoint_at = now: "the reader is known to
    be at its checkpoint now". The process is killed; the next holder reopens from
    TRIM_HORIZON and skips records created before checkpoint_at - 300 s as "written
    before the first opening": the record written after the first opening, which nobody
    ever applied, is silently skipped (counted only as before_start)."""
    bed = latest_bed
    first = bed.start()
    _wait(lambda: any(r.worker.caught_up for r in list(first.running.values())), what="opened")
    (lease,) = bed.store.list_leases(TABLE)
    assert lease.checkpoint == "LATEST" and lease.checkpoint_at is not None
    opened_at = lease.checkpoint_at

    bed.fake.inject("get_records", ServiceError("GetRecords: 500"), times=None)
    bed.fake.put_item(TABLE, {"pk": "lost", "v": 1, "g": "a"})  # after the first opening
    bed.offset = 600.0  # ten minutes of failing GetRecords calls (and renewals)
    renewed = bed.store.list_leases(TABLE)[0].counter
    _wait(lambda: bed.store.list_leases(TABLE)[0].counter >= renewed + 3, what="renewals")
    # a renewal moves checkpoint_at only to when the reader last saw the end of the shard
    assert (bed.store.list_leases(TABLE)[0].checkpoint_at or 0) < opened_at + 500
    bed.crash(first)
    bed.fake.clear_injections()

    bed.start()  # the lease expires and a new process takes it
    bed.fake.put_item(TABLE, {"pk": "after", "v": 2, "g": "a"})
    _wait(lambda: "fk:after" in redis_view_keys(bed.redis), what="fk:after")
    # I1/I4: 'lost' was written after the shard was first opened at LATEST; nothing
    # applied it, and it must not be skipped
    assert redis_view_keys(bed.redis) == expected(bed.fake.contents(TABLE))


# ============================================================================================
# 3. Trimmed data of a shard that has no checkpoint yet is skipped silently
# ============================================================================================
def test_trimmed_records_of_a_shard_without_a_checkpoint_are_skipped_silently(
    redis_client: Any, redis_sink: RedisSink
) -> None:
    """I5. A quiet table read from TRIM_HORIZON: the daemon opened its shard, found nothing
    (no record, so no checkpoint: the lease stays at checkpoint None) and went down. A
    record is written, and the daemon stays down past the stream's 24 h retention, so the
    record is trimmed. On restart the lease is read from TRIM_HORIZON: the retention check
    of ShardWorker.run only looks at leases with a sequence checkpoint (or a LATEST start),
    so the trimmed record is skipped without a needs_rebuild mark, a metric or an error.
    The same path is taken by a child shard whose lease was created (its parent ended) but
    whose first records were trimmed before it was read."""
    clock = [time.time() - 86400 - 3600 - 120]  # the stream's and the store's clock
    fake = FakeStream(clock=lambda: clock[0])
    fake.create_table(TABLE, KEYS)
    store = MemoryStore(clock=lambda: clock[0])

    def supervisor() -> Supervisor:
        return Supervisor(
            [TABLE],
            fake,
            store,
            lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen),
            SupervisorSettings(
                lease_duration=1.0,
                starting_positions={TABLE: "TRIM_HORIZON"},
                worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0),
            ),
            wall_clock=lambda: clock[0],
        )

    supervisor().run(until_caught_up=True)  # the shard is opened and read: it is empty
    (lease,) = store.list_leases(TABLE)
    assert lease.checkpoint is None and lease.state.value == "active"
    clock[0] += 60
    fake.put_item(TABLE, {"pk": "b", "v": 1, "g": "a"})  # written while the daemon is down
    clock[0] += 86400 + 3600  # ... for 25 hours
    fake.put_item(TABLE, {"pk": "c", "v": 2, "g": "a"})
    assert fake.trim(before=clock[0] - 60) == 1  # b is gone from the stream
    supervisor().run(until_caught_up=True)
    (lease,) = store.list_leases(TABLE)
    keys = redis_view_keys(redis_client)
    # I5: b was lost to the retention; that must be reported (needs_rebuild), not skipped
    assert lease.state.value == "needs_rebuild" or "fk:b" in keys, (
        f"record b was trimmed and skipped silently: lease {lease.state.value}, "
        f"checkpoint {lease.checkpoint}, error {lease.error!r}; sink {sorted(keys)}"
    )


# ============================================================================================
# 4. A stolen lease: the old holder's dead letter overwrites the new holder's generation
# ============================================================================================
def test_steal_after_rebuild_old_holder_dead_letter_overwrites_generation_replay_loses_record(
    redis_client: Any, redis_sink: RedisSink, monkeypatch: pytest.MonkeyPatch, coord_store: Any
) -> None:
    """I1/I5. B steals the lease of table fk from A (A also holds a lease of another table,
    so the handshake of a rebuild of fk's view never asks A). The rebuild raises the
    generation, B adopts and acknowledges it, the scan writes x at (1, 0). Then record r
    of x is written, and it fails the view: B's worker reads it stamped 1 and dead-letters
    it with generation 1; A's worker (its lease still looks valid: A has not renewed since
    the steal) reads it stamped 0 and dead-letters it too — the same id, and
    ``put_deadletter`` replaces the stored generation with 0. Once the view is fixed, the
    replay applies r at (0, s), STALE against the scan's (1, 0), and deletes the dead
    letter: the newest record of x is neither applied nor dead-lettered any more."""
    monkeypatch.setenv("VK_TEST_BOOM", "1")
    fake = FakeStream()
    fake.create_table("other", KEYS)  # created first: its shard id sorts below fk's
    fake.create_table(TABLE, KEYS)
    store = coord_store
    a_store = SlowStore(store)
    settings = SupervisorSettings(
        lease_duration=30.0,
        discovery_interval=3600.0,
        starting_positions={TABLE: "TRIM_HORIZON", "other": "TRIM_HORIZON"},
        worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0, max_backoff=0.05),
    )
    a = Supervisor(
        ["other", TABLE],
        fake,
        a_store,
        lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, a_store, gen),
        settings,
        worker_id="A",
    )
    b = Supervisor(
        ["other", TABLE],
        fake,
        store,
        lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen),
        settings,
        worker_id="B",
    )
    try:
        fake.put_item(TABLE, {"pk": "x", "v": 4, "g": "a"})
        a.tick()
        assert len(a.held) == 2
        _wait(lambda: all(r.worker.caught_up for r in list(a.running.values())), what="A idle")
        (fk_key,) = [k for k in a.held if k[0] == TABLE]
        b.tick()  # B steals fk's shard (the highest shard id)
        assert list(b.held) == [fk_key]
        w1 = a.running[fk_key]

        # rebuild of fk's view: B (the owner of fk's only lease) acknowledges; A is not asked
        result: list[BaseException | None] = []

        def run_rebuild() -> None:
            try:
                rebuild(
                    list(VIEWS),
                    VIEWS,
                    fake,
                    store,
                    lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen),
                    RebuildSettings(segments=1, handshake_timeout=30, lease_duration=2.0),
                    out=io.StringIO(),
                )
                result.append(None)
            except BaseException as exc:  # pragma: no cover - reported below
                result.append(exc)

        t = threading.Thread(target=run_rebuild, daemon=True)
        t.start()
        _wait(lambda: store.generations().get(VIEW.name) == 1, what="the raise")
        b.tick()
        t.join(30)
        assert result == [None]
        assert redis_view_keys(redis_client)["fk:x"] == "4"

        a_store.deadletter.arm()
        fake.put_item(TABLE, {"pk": "x", "v": -1, "g": "a"})  # r: the view fails on it
        assert a_store.deadletter.entered.wait(10), "A's worker did not dead-letter r"
        _wait(lambda: store.list_deadletters(), what="B's dead letter")
        (dl,) = store.list_deadletters()
        assert dl.generation == 1  # B read r after the handshake: generation 1
        a_store.deadletter.release.set()  # A's copy of the same dead letter lands after it
        w1.thread.join(10)
        assert not w1.thread.is_alive()  # its checkpoint was refused: A stopped
        (dl,) = store.list_deadletters()
        print("stored dead letter generation after A's write:", dl.generation)

        monkeypatch.setenv("VK_TEST_BOOM", "0")  # the view is fixed; the operator replays
        from viewkeeper.runtime.deadletters import replay

        report = replay(
            store,
            Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, lambda v: 0),
            lambda table: KEYS,
        )
        print("replay:", report)
        # I1: x's newest record must end applied (x = -1), or stay dead-lettered
        assert redis_view_keys(redis_client) == expected(fake.contents(TABLE)) or (
            store.list_deadletters()
        ), f"record r of x was replayed as stale and dropped: {report}"
    finally:
        a_store.deadletter.release.set()
        a.request_stop()
        b.request_stop()
        a.shutdown()
        b.shutdown()


# ============================================================================================
# 5. Dead letters of scanned items the sink rejects all share one id
# ============================================================================================
def test_rebuild_scan_items_rejected_by_the_sink_get_distinct_dead_letters(
    redis_client: Any, redis_sink: RedisSink
) -> None:
    """I5. The rebuild's scan applies ready-made changes (no stream record). When the sink
    rejects one (Outcome.ERROR: here a key of another type is in the way), Pipeline._apply
    dead-letters it without ``scanned=``, so deadletter_id falls through to the digest of
    the raw record — None for every scanned item: ``fk/fk_card/x-<sha1('null')>``. Every
    rejected scan item of the view gets that same id; each overwrites the previous one,
    so all but the last vanish from `deadletters list`, while the rebuild reports them
    all as dead-lettered."""
    fake = FakeStream()
    fake.create_table(TABLE, KEYS)
    store = MemoryStore()
    for pk in ("a", "b", "c"):
        fake.put_item(TABLE, {"pk": pk, "v": 1, "g": "a"})
        redis_client.rpush(f"fk:{pk}", "in the way")  # a list where the view writes a string
    report = rebuild(
        list(VIEWS),
        VIEWS,
        fake,
        store,
        lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen),
        RebuildSettings(segments=1, handshake_timeout=5),
        out=io.StringIO(),
    )
    letters = store.list_deadletters()
    print("rebuild dead-lettered", report.dead_lettered, "; stored:", [d.id for d in letters])
    assert report.dead_lettered == 3
    assert sorted(d.item_key for d in letters) == ["a", "b", "c"], (
        f"{report.dead_lettered} dead letters reported, {len(letters)} stored: "
        f"{[(d.id, d.item_key) for d in letters]}"
    )


# ============================================================================================
# 6. The rebuild's scan is an eventually consistent read
# ============================================================================================
def test_rebuild_scan_is_eventually_consistent_and_beats_a_newer_record(
    redis_client: Any,
    redis_sink: RedisSink,
    dynamodb: Any,
    dynamodb_url: str,
    make_table: Any,
) -> None:
    """I6. The handshake's argument is "a record read before the handshake loses to the
    scan's (G, 0), right, since the scan read the item after the record was written".
    HttpStreamClient.scan sends Scan without ConsistentRead, and DynamoDB's Scan is then
    eventually consistent: it may return an item as it was before a write that the stream
    already delivered. Here, on moto with the real HttpStreamClient, the Scan answer is
    made to lag (as a replica that has not applied x=2 yet) only when the request does not
    ask for a consistent read. x=2's record was applied at (0, s2) before the handshake;
    the scan writes x=1 at (1, 0), which wins; no record of x follows: the sink keeps x=1
    for good."""
    import boto3
    import orjson

    from viewkeeper.stream.http import HttpStreamClient

    make_table(dynamodb, TABLE, hash_key="pk")

    class LaggingReplica(HttpStreamClient):
        behind: dict[str, Any] = {}  # pk -> the DynamoDB JSON item a lagging replica holds
        scans: list[dict[str, Any]] = []

        def _call(self, api: Any, action: str, payload: Any, parse: Any = orjson.loads) -> Any:
            result = super()._call(api, action, payload, parse)
            if action == "Scan":
                self.scans.append(dict(payload))
                if not payload.get("ConsistentRead"):
                    result["Items"] = [self.behind.get(i["pk"]["S"], i) for i in result["Items"]]
            return result

    client = LaggingReplica(
        "us-east-1",
        dynamodb_url,
        boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ),
        max_attempts=2,
    )
    store = MemoryStore()

    def pipeline(gen: Any) -> Pipeline:
        return Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen)

    sup = Supervisor(
        [TABLE],
        client,
        store,
        pipeline,
        SupervisorSettings(
            lease_duration=1.0,
            starting_positions={TABLE: "TRIM_HORIZON"},
            worker=WorkerSettings(poll_interval=0.02, busy_poll_interval=0.0),
        ),
    )
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()

    def put(v: int) -> dict[str, Any]:
        item = {"pk": {"S": "x"}, "v": {"N": str(v)}, "g": {"S": "a"}}
        dynamodb.put_item(TableName=TABLE, Item=item)
        return item

    try:
        old = put(1)
        _wait(lambda: redis_view_keys(redis_client).get("fk:x") == "1", what="x=1 applied")
        put(2)
        LaggingReplica.behind["x"] = old  # the replica a Scan may read has not applied it yet
        _wait(lambda: redis_view_keys(redis_client).get("fk:x") == "2", what="x=2 applied")
        rebuild(
            list(VIEWS),
            VIEWS,
            client,
            store,
            pipeline,
            RebuildSettings(segments=1, handshake_timeout=20, lease_duration=1.0),
            out=io.StringIO(),
        )
        time.sleep(0.5)  # nothing more comes from the stream: x is not written again
        print("scan requests:", LaggingReplica.scans)
        table = {"fk:x": "2", "fkg:a": {"x": 2.0}}
        assert redis_view_keys(redis_client) == table, (
            "the rebuild's eventually consistent scan overwrote x=2 (read from the stream "
            f"before the handshake) with an older x=1; Scan requests: {LaggingReplica.scans}"
        )
    finally:
        sup.request_stop()
        t.join(20)
        client.close()


# ============================================================================================
# 7. Writes while the table's stream was disabled are lost without a needs_rebuild mark
# ============================================================================================
def test_writes_while_the_stream_was_disabled_are_lost_silently_across_a_restart(
    redis_client: Any, redis_sink: RedisSink
) -> None:
    """I1/I5. The table's stream is disabled and enabled again (a new stream ARN) while the
    daemon is restarted (a deploy). Writes in between are in no stream. Supervisor.discover
    warns about a new stream only when the same process saw the old ARN (its in-memory
    table_info); after a restart it just creates leases for the new stream's shards (read
    from TRIM_HORIZON, since the table's old leases exist) and the old stream's leases are
    read to their end. Nothing marks the views needs_rebuild, no metric, no log line: the
    item written in the gap is missing from the sink for good."""
    fake = FakeStream()
    fake.create_table(TABLE, KEYS)
    store = MemoryStore()

    def supervisor() -> Supervisor:
        return Supervisor(
            [TABLE],
            fake,
            store,
            lambda gen: Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, gen),
            SupervisorSettings(
                lease_duration=1.0,
                starting_positions={TABLE: "TRIM_HORIZON"},
                worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0),
            ),
        )

    fake.put_item(TABLE, {"pk": "a", "v": 1, "g": "a"})
    supervisor().run(until_caught_up=True)
    fake.disable_stream(TABLE)
    fake.put_item(TABLE, {"pk": "gap", "v": 2, "g": "a"})  # no stream: no record
    fake.enable_stream(TABLE)
    fake.put_item(TABLE, {"pk": "b", "v": 3, "g": "a"})
    supervisor().run(until_caught_up=True)  # the daemon after its restart
    keys = redis_view_keys(redis_client)
    assert "fk:b" in keys
    marked = [v for v, s in store.view_states().items() if s.needs_rebuild] + [
        ls.shard_id for ls in store.list_leases(TABLE) if ls.state.value == "needs_rebuild"
    ]
    assert "fk:gap" in keys or marked, (
        "the item written while the stream was disabled is missing and nothing says so: "
        f"leases {[(ls.shard_id[-8:], ls.state.value) for ls in store.list_leases(TABLE)]}"
    )


# ============================================================================================
# 8. Replay deletes the dead letters of a view the replaying config does not define
# ============================================================================================
def test_replay_does_not_delete_dead_letters_of_a_view_it_does_not_know(
    redis_client: Any, redis_sink: RedisSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """I5. deadletters.replay runs the stored record through ``pipeline.process(...,
    only=[dl.view])`` and deletes the dead letter when nothing was dead-lettered again. When
    the replaying process's registry has no view of that name (the view was renamed or
    taken out of the config for now, or another config shares the coordination table),
    ``process`` projects nothing — applied 0, stale 0, dead-lettered 0 — and the dead
    letter is deleted, counted as "replayed": the record is gone from every list without
    having been applied."""
    from tests.helpers import registry_of
    from viewkeeper.runtime.deadletters import replay

    monkeypatch.setenv("VK_TEST_BOOM", "1")
    fake = FakeStream()
    fake.create_table(TABLE, KEYS)
    store = MemoryStore()
    fake.put_item(TABLE, {"pk": "x", "v": -1, "g": "a"})  # the view fails on it
    arn = fake.stream_arn(TABLE)
    (shard,) = fake.list_shards(arn)
    page = fake.get_records(fake.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON"))
    report = Pipeline(VIEWS, {("redis", "cache"): redis_sink}, store, lambda v: 0).process(
        TABLE, KEYS, page.records
    )
    assert report.dead_lettered == 1 and len(store.list_deadletters()) == 1

    # a replay from a config whose registry does not hold fk_card
    other = Pipeline(registry_of(), {("redis", "cache"): redis_sink}, store, lambda v: 0)
    replayed = replay(store, other, lambda table: KEYS)
    print("replay:", replayed)
    assert store.list_deadletters() or replayed.applied + replayed.stale == replayed.replayed, (
        f"the dead letter was deleted although nothing applied it: {replayed}"
    )
