"""One sink namespace, one source (#13 case 11, the suspected recreated coordination table,
#19): a sink that lost its data is noticed within seconds and reported; another
deployment's namespace is refused at start, or taken over on purpose. Fake stream and
memory coordination store in-process, with the real Redis (a private one where it must
come back empty)."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from tests.helpers import redis_view_keys, registry_of, view_for, write_config
from tests.test_sink_opensearch import ORDERS, up
from tests.testbed import RedisServer
from tests.views_e2e.fake_views import expected
from viewkeeper import Value, redis_view
from viewkeeper.app import App
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.versions import Version
from viewkeeper.runtime.namespaces import NamespaceOwned, Namespaces
from viewkeeper.runtime.rebuild import rebuild
from viewkeeper.runtime.supervisor import Supervisor, SupervisorFatal
from viewkeeper.sinks.base import Change, NamespaceLost, Owner
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.fake import FakeStream

TABLE = "fk"


class Deployment:
    """One viewkeeper deployment: a config, a (fake) source table, a coordination store."""

    def __init__(
        self,
        tmp_path: Path,
        redis_url: str,
        fake: FakeStream,
        store: MemoryStore,
        *,
        views: str = "tests.views_e2e.fake_views",
        table: str = TABLE,
        coordination: str | None = None,
        opensearch: dict[str, Any] | None = None,
        **worker: Any,
    ) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.fake, self.store, self.table = fake, store, table
        cfg = write_config(
            tmp_path,
            dynamodb_url="http://127.0.0.1:9",  # never used: the client is the fake stream
            redis_url=redis_url,
            views=[views],
            worker={"poll_interval": 0.02, "lease_duration": 1.0, **worker},
            **({"coordination": {"table": coordination}} if coordination else {}),
            **({"opensearch": opensearch} if opensearch else {}),
        )
        self.app = App.from_file(str(cfg), client=fake, store=store)
        self.threads: list[tuple[Supervisor, threading.Thread]] = []
        self.errors: list[BaseException] = []

    def start(self) -> Supervisor:
        self.app.claim()
        if self.app.config.worker.on_sink_loss == "rebuild":
            self.app.enable_auto_rebuild()
        sup = self.app.supervisor(
            verify_interval=0.2, starting_positions={self.table: "TRIM_HORIZON"}
        )

        def run() -> None:
            try:
                sup.run()
            except BaseException as exc:
                self.errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append((sup, t))
        return sup

    def stop(self) -> None:
        for sup, t in self.threads:
            sup.request_stop()
            t.join(20)
        self.threads.clear()
        self.app.close()

    def rebuild(self, **kwargs: Any) -> Any:
        return rebuild(
            list(self.app.registry),
            self.app.registry,
            self.fake,
            self.store,
            self.app.pipeline,
            self.app.rebuild_settings(segments=1, handshake_timeout=10),
            out=io.StringIO(),
            namespaces=self.app.namespaces,
            **kwargs,
        )


def wait_for(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lost_metric(view: str = "fk_card") -> float:
    return REGISTRY.get_sample_value("viewkeeper_sink_data_lost_total", {"view": view}) or 0.0


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _fake() -> FakeStream:
    fake = FakeStream()
    fake.create_table(TABLE, ("pk",))
    return fake


def _converged(client: Any, fake: FakeStream) -> bool:
    return redis_view_keys(client) == expected(fake.contents(TABLE))


# --- a Redis that comes back empty ---------------------------------------------------------
def test_a_redis_that_comes_back_empty_is_reported_within_seconds_and_rebuilt(
    tmp_path: Path, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #13 case 11: Redis restarted without persistence in the middle of a stream; the
    sink's retry absorbed the outage, nothing was logged above INFO, and `status` showed
    the shard healthy while most items were gone from the cache."""
    client = redis.Redis.from_url(private_redis.url)
    fake = _fake()
    dep = Deployment(tmp_path, private_redis.url, fake, MemoryStore())
    for i in range(40):
        fake.put_item(TABLE, {"pk": f"k{i}", "v": i, "g": "ab"[i % 2]})
    before = lost_metric()
    try:
        dep.start()
        wait_for(lambda: _converged(client, fake), "the first drain")
        with caplog.at_level(logging.ERROR, logger="viewkeeper.runtime.namespaces"):
            private_redis.kill()  # a node replaced: it comes back empty
            private_redis.start()
            fake.put_item(TABLE, {"pk": "k1", "v": 100, "g": "a"})
            started = time.monotonic()
            wait_for(
                lambda: (
                    dep.store.view_states().get("fk_card")
                    and dep.store.view_states()["fk_card"].needs_rebuild
                ),
                "the loss to be reported",
            )
            noticed = time.monotonic() - started
        assert noticed < 10
        assert "SINK DATA LOST" in caplog.text and "rebuild fk_card" in caplog.text
        assert lost_metric() == before + 1
        from viewkeeper.ops.status import collect, format_table

        text = format_table(collect(dep.store, [TABLE]))
        assert "ATTENTION view fk_card needs a rebuild" in text
        wait_for(lambda: "fk:k1" in redis_view_keys(client), "the stream to go on")
        assert not _converged(client, fake)  # the items that did not change are missing
        dep.rebuild()
        assert _converged(client, fake)
        assert not dep.store.view_states()["fk_card"].needs_rebuild
    finally:
        dep.stop()


def test_a_redis_flushed_while_the_stream_is_quiet_is_noticed_without_a_write(
    tmp_path: Path, redis_client: Any
) -> None:
    fake = _fake()
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    dep = Deployment(tmp_path, url, fake, MemoryStore())
    fake.put_item(TABLE, {"pk": "a", "v": 1, "g": "a"})
    try:
        dep.start()
        wait_for(lambda: _converged(redis_client, fake), "the first drain")
        redis_client.flushall()
        wait_for(lambda: dep.store.view_states()["fk_card"].needs_rebuild, "the periodic check")
    finally:
        dep.stop()


def test_on_sink_loss_rebuild_restores_the_view_by_itself(
    tmp_path: Path, redis_client: Any
) -> None:
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    fake = _fake()
    dep = Deployment(tmp_path, url, fake, MemoryStore(), on_sink_loss="rebuild")
    for i in range(20):
        fake.put_item(TABLE, {"pk": f"k{i}", "v": i, "g": "a"})
    try:
        dep.start()
        wait_for(lambda: _converged(redis_client, fake), "the first drain")
        redis_client.flushall()
        wait_for(lambda: _converged(redis_client, fake), "the automatic rebuild", 30)
        wait_for(lambda: not dep.store.view_states()["fk_card"].needs_rebuild, "the mark cleared")
    finally:
        dep.stop()


# --- one namespace, one source ---------------------------------------------------------------
def test_a_second_deployment_writing_the_same_redis_view_is_refused_and_writes_nothing(
    tmp_path: Path, redis_client: Any
) -> None:
    """#19: two deployments (two tables, two coordination tables) declaring a view of the
    same name on one Redis compared versions of unrelated streams. The second is refused at
    start with one line naming both owners and the fix."""
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    first = Deployment(tmp_path / "a", url, _fake(), MemoryStore())
    first.fake.put_item(TABLE, {"pk": "a", "v": 1, "g": "a"})
    first.app.claim()
    first.app.supervisor(starting_positions={TABLE: "TRIM_HORIZON"}).run(until_caught_up=True)
    before = redis_view_keys(redis_client)
    other = FakeStream()
    other.create_table("fk-other", ("pk",))
    other.put_item("fk-other", {"pk": "a", "v": 99, "g": "a"})
    second = Deployment(
        tmp_path / "b", url, other, MemoryStore(), views="tests.views_e2e.other_table",
        table="fk-other",
    )  # fmt: skip
    with pytest.raises(NamespaceOwned) as refused:
        second.app.claim()
    message = str(refused.value)
    assert "fk_card" in message and "table/fk " in message.replace(",", " ") + " "
    assert "table/fk-other" in message and "--take-over" in message
    assert redis_view_keys(redis_client) == before
    first.app.close()
    second.app.close()


def test_take_over_stops_the_old_deployment_and_rebuilds_from_the_new_table(
    tmp_path: Path, redis_client: Any
) -> None:
    from viewkeeper.cli import _take_over

    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    first = Deployment(tmp_path / "a", url, _fake(), MemoryStore())
    for i in range(10):
        first.fake.put_item(TABLE, {"pk": f"k{i}", "v": i, "g": "a"})
    other = FakeStream()
    other.create_table("fk-other", ("pk",))
    other.put_item("fk-other", {"pk": "x", "v": 7, "g": "a"})
    second = Deployment(
        tmp_path / "b", url, other, MemoryStore(), views="tests.views_e2e.other_table",
        table="fk-other",
    )  # fmt: skip
    try:
        first.start()
        wait_for(lambda: _converged(redis_client, first.fake), "the first deployment")
        taken = second.app.claim(take_over=("fk_card",))
        assert [t.view for t in taken] == ["fk_card"]
        first.fake.put_item(TABLE, {"pk": "k1", "v": 50, "g": "a"})  # its next write ...
        wait_for(lambda: first.errors, "the first deployment to stop")  # ... stops it
        assert isinstance(first.errors[0], SupervisorFatal)
        assert "taken over" in str(first.errors[0])
        _take_over(second.app, taken, 0.0)
        second.rebuild()
        assert redis_view_keys(redis_client) == {"fk:x": "other-7"}
    finally:
        first.stop()
        second.stop()


def test_a_coordination_table_made_again_is_refused(tmp_path: Path, redis_client: Any) -> None:
    """Suspected in #13, confirmed: a coordination table that was deleted and created again
    (it is created when missing) restarted generations at 0, and every later write was
    stale against what the sink held after a rebuild, silently, forever."""
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    fake = _fake()
    fake.put_item(TABLE, {"pk": "a", "v": 1, "g": "a"})
    dep = Deployment(tmp_path / "a", url, fake, MemoryStore(), coordination="vk-coord-x")
    dep.app.claim()
    dep.rebuild()  # generation 1 in the sink
    dep.app.close()
    # the same coordination table's name, made again: a new id, generations from 0
    again = Deployment(tmp_path / "b", url, fake, MemoryStore(), coordination="vk-coord-x")
    with pytest.raises(NamespaceOwned, match="deleted and made again"):
        again.app.claim()
    again.app.close()


def test_a_coordination_table_behind_the_sinks_generation_is_refused(
    tmp_path: Path, redis_client: Any
) -> None:
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    fake = _fake()
    store = MemoryStore()
    dep = Deployment(tmp_path, url, fake, store, coordination="vk-coord-y")
    dep.app.claim()
    dep.rebuild()
    dep.rebuild()
    dep.app.close()
    store._gens["fk_card"] = 1  # restored from a backup taken between the two rebuilds
    again = Deployment(tmp_path / "again", url, fake, store, coordination="vk-coord-y")
    with pytest.raises(NamespaceOwned, match="holds generation 2 but the coordination table"):
        again.app.claim()
    again.app.close()


def test_an_opensearch_index_deleted_under_the_daemon_is_reported_and_rebuilt(
    tmp_path: Path, redis_client: Any, os_client: Any, os_prefix: str, opensearch_url: str
) -> None:
    """The same for OpenSearch: the index was recreated empty behind the alias on the next
    write (a SinkUnavailable retried away), and nothing said that its documents were gone."""
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    fake = FakeStream()
    fake.create_table("rb-items", ("pk",))
    for i in range(5):
        fake.put_item("rb-items", {"pk": f"k{i}", "group": "a", "n": i})
    dep = Deployment(
        tmp_path, url, fake, MemoryStore(), views="tests.views_e2e.rebuild_v1", table="rb-items",
        opensearch={"search": {"hosts": [opensearch_url], "index_prefix": os_prefix}},
    )  # fmt: skip
    alias = f"{os_prefix}items"

    def count() -> int:
        from opensearchpy import NotFoundError

        try:
            os_client.indices.refresh(index=alias)
            return int(os_client.count(index=alias)["count"])
        except NotFoundError:  # the index is gone until the sink makes it again
            return -1

    try:
        dep.start()
        wait_for(lambda: count() == 5, "the first drain")
        os_client.indices.delete(index=f"{alias}.vk-live")
        fake.put_item("rb-items", {"pk": "k1", "group": "b", "n": 10})
        wait_for(
            lambda: (s := dep.store.view_states().get("doc")) is not None and s.needs_rebuild,
            "the loss to be reported",
        )
        wait_for(lambda: count() == 1, "the stream to go on into the new index")
        dep.rebuild()
        assert count() == 5  # k0..k4
        assert not dep.store.view_states()["doc"].needs_rebuild
    finally:
        dep.stop()


# --- found by an adversarial review of the namespace logic ----------------------------------
OWNER_A = Owner("arn:aws:dynamodb:us-east-1:1:table/orders", "vk-coord", "deployment-a")
OWNER_B = Owner("arn:aws:dynamodb:us-east-1:1:table/orders-v2", "vk-coord-2", "deployment-b")


@redis_view(table="atk", redis="cache", name="atk_vals")
def atk_vals(item: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"atk:{item['id']}", item["v"])


VALS = view_for(atk_vals)


def put(item: str, seq: int, value: str, gen: int = 1) -> Change:
    return Change(VALS, item, Version(gen, str(seq)), [Value(f"atk:{item}", value)])


def redis_namespaces(sink: RedisSink, store: MemoryStore) -> Namespaces:
    return Namespaces(registry_of(VALS), {("redis", "cache"): sink}, store, {"atk": OWNER_A})


def os_namespaces(
    sink: OpenSearchSink, store: MemoryStore, *views: View, owner: Owner = OWNER_A
) -> Namespaces:
    return Namespaces(
        registry_of(*views),
        {("opensearch", "search"): sink},
        store,
        {v.table: owner for v in views},
    )


@pytest.fixture
def make_sink(os_client: Any, os_prefix: str) -> Iterator[Callable[..., OpenSearchSink]]:
    made: list[OpenSearchSink] = []

    def factory(**kwargs: Any) -> OpenSearchSink:
        kwargs.setdefault("index_prefix", os_prefix)
        kwargs.setdefault("index_settings", {"number_of_replicas": 0})
        sink = OpenSearchSink("search", os_client, **kwargs)
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.close()


def test_a_second_loss_during_the_automatic_rebuild_is_rebuilt_too(
    tmp_path: Any, redis_client: Any
) -> None:
    """``worker.on_sink_loss: rebuild``: "a rebuild of the view started by the daemon ...
    the rebuild restores the rest and clears the mark -- only if no other loss was recorded
    while it ran". Redis loses its data; the automatic rebuild starts. While it scans,
    Redis loses its data again (the node is replaced again, a second FLUSHALL). The second
    loss is recorded (so the first rebuild rightly does not clear the mark), but its
    ``on_loss`` is dropped: the automatic rebuild's set still holds the view, and
    nothing starts a rebuild once the first one ends. The items scanned before the second
    loss stayed missing, the view marked, for good (I1). The automatic rebuild now runs
    again for a view still marked when it ends."""
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    fake = _fake()
    dep = Deployment(tmp_path, url, fake, MemoryStore(), on_sink_loss="rebuild")
    for i in range(40):
        fake.put_item("fk", {"pk": f"k{i}", "v": i, "g": "a"})
    real_scan = fake.scan
    scans = [0]
    armed = threading.Event()

    def scan(*args: Any, **kwargs: Any) -> Any:
        page = real_scan(*args, **kwargs)
        if armed.is_set():
            scans[0] += 1
            if scans[0] == 3:  # half of the rebuild's segments are written: lost again
                redis_client.flushall()
        return page

    setattr(fake, "scan", scan)  # noqa: B010 - an instance attribute over the method
    try:
        dep.start()
        wait_for(lambda: _converged(redis_client, fake), "the first drain")
        armed.set()
        redis_client.flushall()  # the first loss: the automatic rebuild starts
        wait_for(lambda: scans[0] >= 3, "the automatic rebuild's scan")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = dep.store.view_states()["fk_card"]
            if _converged(redis_client, fake) and not state.needs_rebuild:
                return
            time.sleep(0.2)
        have = set(redis_view_keys(redis_client))
        missing = sorted(k for k in expected(fake.contents("fk")) if k not in have)
        pytest.fail(
            f"30 s after the second loss: needs_rebuild={state.needs_rebuild} "
            f"({state.reason}); {len(missing)} keys missing, e.g. {missing[:5]}"
        )
    finally:
        dep.stop()


def test_a_take_over_is_not_undone_by_a_late_write_of_the_old_deployment(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """ "One namespace, one source": ``rebuild --take-over`` claims the index, waits
    ``--take-over-grace`` (60 s) for the old daemons to notice (they verify() every 5 s),
    wipes, rebuilds. A Redis sink refuses the old deployment's writes at once, per call;
    the OpenSearch sink has no per-write fence: an old daemon paused past the grace (GC, a
    frozen VM, a request retried behind 429s) lands its put after the wipe. Its document
    carries the old deployment's generation (3, it ran rebuilds), above the new
    deployment's first rebuild (1): the new scan's put of the same item is a noop (STALE,
    same item key, higher generation), and the sweep (< 1) keeps it. The old table's data
    stayed in the new deployment's index for good (I1). A take-over now raises the new
    deployment's generation above the one the old claim announced."""
    store_old, store_new = MemoryStore(), MemoryStore()
    old = make_sink()
    old.prepare([ORDERS])
    ns_old = os_namespaces(old, store_old, ORDERS, owner=OWNER_A)
    ns_old.claim()
    for _ in range(3):  # three rebuilds of the old deployment (each announces its generation)
        ns_old.announce(ORDERS, store_old.raise_generation(ORDERS.name))
    old.apply([up(ORDERS, "o-1", 100, {"src": "old"}, gen=3)])

    # the old daemon's next batch is built and its request held (paused process)
    gate, held = threading.Event(), threading.Event()
    real_post = old._post

    def post(*args: Any) -> Any:
        held.set()
        gate.wait(30)
        return real_post(*args)

    setattr(old, "_post", post)  # noqa: B010 - an instance attribute over the method
    errors: list[BaseException] = []

    def run_old() -> None:
        try:
            old.apply([up(ORDERS, "o-1", 200, {"src": "old"}, gen=3),
                       up(ORDERS, "o-3", 200, {"src": "old"}, gen=3)])  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run_old)
    t.start()
    assert held.wait(10)

    # the new deployment: take-over, (grace), wipe, rebuild at its generation 1
    new = make_sink()
    new.prepare([ORDERS])
    ns_new = os_namespaces(new, store_new, ORDERS, owner=OWNER_B)
    taken = ns_new.claim(take_over=(ORDERS.name,))
    assert [x.view for x in taken] == [ORDERS.name]
    new.wipe(ORDERS)
    gate.set()  # the old daemon wakes up: its request goes out
    t.join(30)
    gen = store_new.raise_generation(ORDERS.name)
    marker = ns_new.announce(ORDERS, gen)
    new.apply([up(ORDERS, "o-1", 0, {"src": "new"}, gen=gen)])  # the new table holds o-1 only
    new.sweep(ORDERS, gen, 0.0)
    ns_new.rebuilt(ORDERS, marker)

    docs = new.live_documents(ORDERS)
    assert docs == {"o-1": {"src": "new"}}, f"the old deployment's documents stay: {docs}"


def test_two_daemons_starting_together_do_not_report_a_loss_that_never_happened(
    redis_client: Any,
) -> None:
    """Two daemons of one new deployment start at once (two replicas, a fleet restart
    after the coordination table was created). Daemon A finds no claim and no recorded
    marker: ``_fresh`` records its marker in the coordination table, then writes the claim
    to Redis -- two round trips. Daemon B claims in between: no claim in Redis, but a
    recorded marker, which is exactly the picture of a Redis that lost its data: B reports
    "SINK DATA LOST", marks the view needs_rebuild (and, with on_sink_loss: rebuild,
    rebuilds it) although nothing was ever written, let alone lost. A new claim is now
    written to the sink before the coordination table records it (and read the other way
    round), so that picture only ever means lost data."""
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    store = MemoryStore()
    sink_a = RedisSink("cache", url=url, owner_buckets=16)
    sink_b = RedisSink("cache", url=url, owner_buckets=16)
    ns_a, ns_b = redis_namespaces(sink_a, store), redis_namespaces(sink_b, store)
    real_write = sink_a.write_claim

    def write_claim(view: View, claim: Any) -> None:
        ns_b.claim()  # daemon B starts between A's two writes
        real_write(view, claim)

    setattr(sink_a, "write_claim", write_claim)  # noqa: B010 - an instance attribute over the method
    ns_a.claim()
    for ns, sink in ((ns_a, sink_a), (ns_b, sink_b)):
        try:
            sink.apply([put("i1", 1, "one")])
        except NamespaceLost as exc:
            ns.lost(sink, exc)
    state = store.view_states()[VALS.name]
    assert not state.needs_rebuild, f"a loss reported on a new namespace: {state.reason}"
    sink_a.close()
    sink_b.close()


def test_two_first_claims_that_both_find_nothing_agree_on_one_marker(
    redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The chaos run (seed 1690984119, short mode): daemons a and b of a new deployment both
    logged "claimed" for chaos_owner_doc at the same second, and b then reported SINK DATA
    LOST ("re-armed by another process after losing its data") for a sink that lost nothing.
    Both read no claim and no recorded marker, so both made a fresh claim with a marker of
    their own: A wrote its claim, B wrote its claim over it, B recorded its marker, A
    recorded its own over that. The sink then held B's marker and the coordination table
    A's: A's next write was refused, and A, finding a marker in the sink the table did not
    know, reported a loss. Here the two claims are interleaved exactly so; neither process
    may report a loss, and both write."""
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    store = MemoryStore()
    sink_a = RedisSink("cache", url=url, owner_buckets=16)
    sink_b = RedisSink("cache", url=url, owner_buckets=16)
    ns_a, ns_b = redis_namespaces(sink_a, store), redis_namespaces(sink_b, store)
    both_read = threading.Barrier(2, timeout=10)
    a_wrote, b_recorded = threading.Event(), threading.Event()
    write_a, write_b, set_marker = sink_a.write_claim, sink_b.write_claim, store.set_marker

    def claim_a(view: View, claim: Any) -> None:
        both_read.wait()  # both found nothing before either wrote
        write_a(view, claim)
        a_wrote.set()

    def claim_b(view: View, claim: Any) -> None:
        both_read.wait()
        assert a_wrote.wait(10)
        write_b(view, claim)  # B's claim over A's

    def record(view: str, marker: str) -> None:
        if threading.current_thread().name == "a":
            assert b_recorded.wait(10)  # A's marker recorded over B's
        set_marker(view, marker)
        if threading.current_thread().name == "b":
            b_recorded.set()

    setattr(sink_a, "write_claim", claim_a)  # noqa: B010 - an instance attribute over the method
    setattr(sink_b, "write_claim", claim_b)  # noqa: B010
    setattr(store, "set_marker", record)  # noqa: B010
    errors: list[BaseException] = []

    def run(ns: Namespaces) -> None:
        try:
            ns.claim()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(ns,), name=n) for n, ns in (("a", ns_a), ("b", ns_b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    with caplog.at_level(logging.ERROR, logger="viewkeeper.runtime.namespaces"):
        for i, (ns, sink) in enumerate(((ns_a, sink_a), (ns_b, sink_b))):
            try:
                results = sink.apply([put(f"i{i}", 1, "one")])
            except NamespaceLost as exc:
                ns.lost(sink, exc)
                results = sink.apply([put(f"i{i}", 1, "one")])
            assert [r.outcome.value for r in results] == ["applied"]
    state = store.view_states()[VALS.name]
    assert not state.needs_rebuild, f"a loss reported on a new namespace: {state.reason}"
    assert "SINK DATA LOST" not in caplog.text, caplog.text
    sink_a.close()
    sink_b.close()
