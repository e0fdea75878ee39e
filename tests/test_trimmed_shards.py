"""Trimmed stream data (I5) at the edges of shard lineage: a parent shard trimmed out of the
stream is reported loudly, and `rebuild` unblocks its children; a failed rebuild keeps the
mark (#13 case 6 and the suspected cases about needs_rebuild). Fake stream, real Redis."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.helpers import redis_view_keys
from tests.views_e2e.fake_views import expected
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import LeaseState
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.rebuild import RebuildSettings, rebuild
from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import WorkerSettings
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.fake import FakeStream

VIEWS = load_views(["tests.views_e2e.fake_views"])
TABLE = "fk"


class Bed:
    def __init__(self, redis_client: Any) -> None:
        self.now = time.time() - 3 * 86400  # the stream's clock: records three days old
        self.fake = FakeStream(clock=lambda: self.now)
        self.fake.create_table(TABLE, ("pk",))
        self.store = MemoryStore()
        self.redis = redis_client
        self.sink = RedisSink("cache", redis_client)
        self.sink.prepare(list(VIEWS))

    def pipeline(self, generation_of: Any) -> Pipeline:
        return Pipeline(VIEWS, {("redis", "cache"): self.sink}, self.store, generation_of)

    def supervisor(self) -> Supervisor:
        return Supervisor(
            [TABLE],
            self.fake,
            self.store,
            self.pipeline,
            SupervisorSettings(
                lease_duration=1.0,
                starting_positions={TABLE: "TRIM_HORIZON"},
                worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0),
            ),
        )

    def put(self, pk: str, v: int) -> None:
        self.fake.put_item(TABLE, {"pk": pk, "v": v, "g": "a"})

    def state(self, shard: str) -> LeaseState:
        return next(x for x in self.store.list_leases(TABLE) if x.shard_id == shard).state

    def rebuild(self, client: Any = None) -> None:
        rebuild(
            list(VIEWS),
            VIEWS,
            client or self.fake,
            self.store,
            self.pipeline,
            RebuildSettings(segments=1, handshake_timeout=10, lease_duration=1.0),
            out=io.StringIO(),
        )


@pytest.fixture
def bed(redis_client: Any) -> Iterator[Bed]:
    yield Bed(redis_client)


def trimmed_metric() -> float:
    return REGISTRY.get_sample_value("viewkeeper_trimmed_shards_total", {"table": TABLE}) or 0.0


def wait_for(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _parent_trimmed_away(bed: Bed) -> tuple[str, list[str]]:
    """A parent read half-way, then split (its children's leases created, naming it), then
    trimmed out of the stream entirely while nobody read it: its lease still says ACTIVE
    with a checkpoint in the middle."""
    bed.put("a", 1)
    bed.supervisor().run(until_caught_up=True)  # reads a; checkpoint after it
    (parent,) = bed.fake.open_shards(TABLE)
    bed.now += 60
    bed.put("b", 2)  # never read: lost with the parent
    children = list(bed.fake.split_shard(parent))
    bed.supervisor().discover()  # the children's leases name their parent
    bed.now += 86400 + 3600  # a day later the parent and its records are gone
    bed.put("c", 3)
    bed.put("a", 4)
    assert bed.fake.trim(before=bed.now - 60) >= 2
    arn = bed.fake.describe_table(TABLE).stream_arn
    assert arn is not None
    assert parent not in {s.shard_id for s in bed.fake.list_shards(arn)}
    return parent, children


def test_a_parent_trimmed_out_of_the_stream_is_reported_and_holds_its_children(
    bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #13 case 6: ResourceNotFound on the parent shard was taken as "stream gone":
    the lease was released ACTIVE and taken again every round, no needs_rebuild, no metric,
    and its children waited forever."""
    parent, _ = _parent_trimmed_away(bed)
    before = trimmed_metric()
    sup = bed.supervisor()
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: bed.state(parent) is LeaseState.NEEDS_REBUILD, "needs_rebuild")
        time.sleep(0.5)  # a few rounds: the children do not start, nothing loops
        assert trimmed_metric() == before + 1
        lease = next(x for x in bed.store.list_leases(TABLE) if x.shard_id == parent)
        assert lease.error and "no longer in the stream" in lease.error and lease.owner is None
        assert "DATA LOST TO STREAM RETENTION" in caplog.text
        assert "fk:c" not in redis_view_keys(bed.redis)
    finally:
        sup.request_stop()
        t.join(20)


def test_rebuild_unblocks_the_children_of_a_parent_trimmed_out_of_the_stream(bed: Bed) -> None:
    """...and `rebuild` did not unblock them. Now the rebuild ends the parent that is gone
    (the scan covers whatever it held) and its children are read."""
    parent, children = _parent_trimmed_away(bed)
    sup = bed.supervisor()
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: bed.state(parent) is LeaseState.NEEDS_REBUILD, "needs_rebuild")
        bed.rebuild()
        assert bed.state(parent) is LeaseState.ENDED
        wait_for(
            lambda: redis_view_keys(bed.redis) == expected(bed.fake.contents(TABLE)),
            "the children to be read",
        )
    finally:
        sup.request_stop()
        t.join(20)
    assert all(bed.state(c) is LeaseState.ACTIVE for c in children)


def test_a_rebuild_that_fails_keeps_the_needs_rebuild_mark(bed: Bed) -> None:
    """Suspected in #13, confirmed: `rebuild` cleared needs_rebuild before its scan, so a
    scan that failed lost the mark and the shard was read on as if nothing was lost."""
    bed.put("a", 1)
    bed.supervisor().run(until_caught_up=True)
    bed.now += 60
    bed.put("b", 2)
    bed.now += 86400 + 3600
    bed.put("c", 3)
    bed.fake.trim(before=bed.now - 60)
    sup = bed.supervisor()
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    (shard,) = bed.fake.open_shards(TABLE)
    try:
        wait_for(lambda: bed.state(shard) is LeaseState.NEEDS_REBUILD, "needs_rebuild")

        class ScanFails:
            def __getattr__(self, name: str) -> Any:
                return getattr(bed.fake, name)

            def scan(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("the scan failed (injected)")

        with pytest.raises(RuntimeError, match="injected"):
            bed.rebuild(ScanFails())
        assert bed.state(shard) is LeaseState.NEEDS_REBUILD
        bed.rebuild()
        assert bed.state(shard) is LeaseState.ACTIVE
        wait_for(
            lambda: redis_view_keys(bed.redis) == expected(bed.fake.contents(TABLE)),
            "convergence after the rebuild",
        )
    finally:
        sup.request_stop()
        t.join(20)
