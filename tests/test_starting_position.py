"""``starting_position: LATEST`` means "from the first time this shard was leased", durably:
a restart, a crash or a lease move never skips what was written in between (#13 case 3).
On the fake stream, with the real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import redis_view_keys
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.runtime.supervisor import Supervisor, SupervisorSettings
from viewkeeper.runtime.worker import WorkerSettings
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.fake import FakeStream

VIEWS = load_views(["tests.views_e2e.fake_views"])
TABLE = "fk"


class Bed:
    def __init__(self, redis_client: Any) -> None:
        self.offset = -3600.0  # items written before the daemon ever ran: an hour ago
        self.fake = FakeStream(clock=lambda: time.time() + self.offset)
        self.fake.create_table(TABLE, ("pk",))
        self.store = MemoryStore()
        self.redis = redis_client
        self.sink = RedisSink("cache", redis_client)
        self.sink.prepare(list(VIEWS))
        self.running: list[tuple[Supervisor, threading.Thread]] = []

    def pipeline(self, generation_of: Any) -> Pipeline:
        return Pipeline(VIEWS, {("redis", "cache"): self.sink}, self.store, generation_of)

    def start(self) -> Supervisor:
        sup = Supervisor(
            [TABLE],
            self.fake,
            self.store,
            self.pipeline,
            SupervisorSettings(
                lease_duration=1.0,
                worker=WorkerSettings(poll_interval=0.01, busy_poll_interval=0.0),
            ),  # starting_positions left out: LATEST, the default
        )
        t = threading.Thread(target=sup.run, daemon=True)
        t.start()
        self.running.append((sup, t))
        return sup

    def opened(self, sup: Supervisor) -> None:
        """Wait until ``sup``'s worker has read the shard (a first, empty page)."""
        deadline = time.monotonic() + 10
        while not any(r.worker.caught_up for r in list(sup.running.values())):
            assert time.monotonic() < deadline, "the shard was never opened"
            time.sleep(0.02)

    def stop(self, sup: Supervisor, graceful: bool = True) -> None:
        for pair in list(self.running):
            if pair[0] is sup:
                if graceful:
                    sup.request_stop()
                else:  # a crash: the workers stop, nothing is released
                    sup.stopping.set()
                    for run in list(sup.running.values()):
                        run.stop.set()
                    sup.held.clear()
                pair[1].join(20)
                self.running.remove(pair)

    def sink_keys(self) -> dict[str, Any]:
        return redis_view_keys(self.redis)

    def wait_for(self, key: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while key not in self.sink_keys():
            assert time.monotonic() < deadline, f"{key} never arrived: {self.sink_keys()}"
            time.sleep(0.05)


@pytest.fixture
def bed(redis_client: Any) -> Iterator[Bed]:
    b = Bed(redis_client)
    yield b
    for sup, t in b.running:
        sup.request_stop()
        t.join(20)


def test_latest_survives_a_restart_before_any_record_arrived(bed: Bed) -> None:
    """The lease's checkpoint stayed the string LATEST until a record was applied, so a
    restart reopened the shard at LATEST: what was written while the daemon was down
    never arrived — on a quiet table, indefinitely."""
    bed.fake.put_item(TABLE, {"pk": "history", "v": 1, "g": "a"})  # before the first lease
    bed.offset = 0.0
    first = bed.start()
    bed.opened(first)
    bed.stop(first)
    bed.fake.put_item(TABLE, {"pk": "while-down", "v": 2, "g": "a"})
    bed.start()
    bed.wait_for("fk:while-down")
    bed.fake.put_item(TABLE, {"pk": "after", "v": 3, "g": "a"})
    bed.wait_for("fk:after")
    assert "fk:history" not in bed.sink_keys()  # LATEST: history before the first lease is not read


def test_latest_survives_a_crash_and_a_lease_move(bed: Bed) -> None:
    bed.offset = 0.0
    first = bed.start()
    bed.opened(first)
    bed.stop(first, graceful=False)  # its lease stays held until it expires
    bed.fake.put_item(TABLE, {"pk": "while-down", "v": 2, "g": "a"})
    bed.start()  # another process takes the expired lease
    bed.wait_for("fk:while-down")


def test_latest_reopened_skips_only_records_from_before_the_first_opening(bed: Bed) -> None:
    """The reopening reads from TRIM_HORIZON: the history before the first lease is
    skipped (and counted), all of it checkpointed, and only what came after is applied."""
    from prometheus_client import REGISTRY

    def before_start() -> float:
        return (
            REGISTRY.get_sample_value("viewkeeper_records_before_start_total", {"table": TABLE})
            or 0.0
        )

    for i in range(30):
        bed.fake.put_item(TABLE, {"pk": f"old{i}", "v": i, "g": "a"})
    bed.offset = 0.0
    first = bed.start()
    bed.opened(first)
    bed.stop(first)
    counted = before_start()
    bed.fake.put_item(TABLE, {"pk": "new", "v": 1, "g": "a"})
    second = bed.start()
    bed.wait_for("fk:new")
    assert not [k for k in bed.sink_keys() if k.startswith("fk:old")]
    assert before_start() - counted == 30
    bed.stop(second)
    (lease,) = bed.store.list_leases(TABLE)
    assert lease.checkpoint == bed.fake.last_sequence
