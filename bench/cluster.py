"""Redis Cluster vs standalone Redis (issue #15): the same pages and views through
:class:`~viewkeeper.sinks.redis_cluster.RedisClusterSink` on the test bed's cluster (3 masters
+ 3 replicas) and :class:`~viewkeeper.sinks.redis.RedisSink` on the test bed's Redis, in one
run.

1. Throughput and CPU. The pages are :mod:`bench.redis_pipeline`'s
   (:func:`~bench.redis_pipeline.steady_pages`: 1000 records, ~1.4 KB each, 80 % MODIFY /
   15 % INSERT / 5 % REMOVE, remapped onto a :data:`~bench.redis_pipeline.KEY_SPACE`-item
   table), every item first stored once (:func:`~bench.redis_pipeline.warm_pages`, untimed)
   and every round's sequence numbers shifted above what is stored: the steady state of a
   cache, no round a replay. Each contender is its own ``Pipeline`` and sink, fed through
   the daemon's ``ShardWorker`` (:func:`bench.shard.worker_feed`); the contenders run
   interleaved round by round, each figure the best of its rounds. Two views:

   - ``Value`` (``order:{id}`` -> 4 fields, one entry per item);
   - a 3-entry view, :func:`_multi`: the three views of :mod:`bench.redis_pipeline` yielded
     by one function (the ``Value`` card, the ``customer:{id}:orders`` and ``status:{s}``
     sorted-set members; the last moves between sets on every update). Its sinks have their
     own ``key_prefix`` and ``entry_prefix`` (:data:`MULTI`), apart from the ``Value`` view.

   and two contenders per view: standalone, and cluster with the client the daemon builds
   (:func:`viewkeeper.sinks.connect.redis_cluster_client`). The cluster sink sends its script
   calls itself: grouped per master, each group on that node's own plain pipeline, the
   masters at once, each pipeline ending in ``WAIT <n>`` (n = every replica the master
   listed itself at its previous pipeline: a batch is acknowledged once all of them have its
   writes; every script call writes, a call that checks no view counting itself in its
   slot's ``'#w'`` field) and then ``CLUSTER NODES`` + ``INFO replication`` (its replicas,
   for the next pipeline), so no ``COMMAND GETKEYS`` is expected; its row stays as
   evidence. Every view is armed as the daemon arms it (``write_claim`` of a new marker,
   then ``expect``), so each script call checks the marker and write counter of its slot.

   Per round: wall time; this process's CPU (``time.process_time``); the servers' CPU
   (``INFO cpu`` ``used_cpu_user + used_cpu_sys``, after - before: the standalone server,
   or the sum over the cluster's 6 nodes, the replicas' share shown; each side's idle CPU,
   measured beforehand for 3 s, is subtracted over the round's wall time); ``INFO
   commandstats``: ``EVALSHA`` calls on the masters and ``COMMAND GETKEYS`` calls on every
   node; and the changes given to ``sink.apply`` (a page's newest record per item). At the
   end both views' cards are read back from both sides and must be equal.

2. Bookkeeping bytes per item, one-entry ``Value`` view: :data:`MEMORY_ITEMS` items written
   with ``apply`` as :mod:`bench.memory` does, ``used_memory`` (``INFO memory``) after -
   before summed over the cluster's masters (each replica holds a copy more), minus the
   same delta for plain ``SET`` of the same keys and values, / N; standalone the same way in
   the same run, each sink with its default ``owner_buckets``. The cluster's fixed cost, the
   view's marker in each of the 16,384 slots' ``vk:{TAG}:c`` hashes (written by
   ``write_claim`` before any item), is measured apart and not counted per item. A second
   reading, ``MEMORY USAGE ... SAMPLES 0`` of every ``vk:`` key, splits the per-item cost
   into owner records and claims.

Both servers are FLUSHALLed (every master of the cluster): run this only against a test bed
of your own. ``python -m bench.cluster --profile [--quick]`` prints a cProfile of one round
of the ``Value`` view for each contender instead of the table (this thread only, with the
CPU of the sink's pipeline threads beside it, and the CPU spent parsing the ``CLUSTER NODES``
replies that end each pipeline, in every thread).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bench.common import PAGE_RECORDS, Row, rate
from bench.redis_pipeline import (
    ENV_REDIS,
    KEY_NAMES,
    KEY_SPACE,
    QUICK_KEY_SPACE,
    SEQ_STEP,
    TABLE,
    _by_customer,
    _by_status,
    _card,
    make_view,
    service_url,
    shift_sequences,
    steady_pages,
    warm_pages,
)
from bench.shard import Outcomes, worker_feed

__all__ = ["ENV_REDIS_CLUSTER", "run"]

ENV_REDIS_CLUSTER = "VIEWKEEPER_TEST_REDIS_CLUSTER_URL"
PAGES = 5  # per round: the cluster sink is slow (bench/README.md), 5,000 records a round
QUICK_PAGES = 2
MEMORY_ITEMS = 100_000
QUICK_MEMORY_ITEMS = 20_000
MEMORY_TARGET = 150.0  # bytes of bookkeeping per item on the cluster, one-entry view (#15)
MULTI = "vkm:"  # the 3-entry view's key_prefix, and (as "m:") its entry_prefix
BATCH = 1000


def cluster_url() -> str:
    """The test bed's cluster, or a clear error saying how to start one."""
    url = os.environ.get(ENV_REDIS_CLUSTER, "").strip()
    if not url:
        raise RuntimeError(
            f"{ENV_REDIS_CLUSTER} is not set. bench.cluster needs a Redis Cluster (and "
            f"{ENV_REDIS}): the test bed starts one (3 masters + 3 replicas, needs redis-server "
            "and redis-cli) and exports its URL:\n"
            "    .venv/bin/python -m tests.testbed run -- .venv/bin/python -m bench.run cluster\n"
            "or keep it up with `.venv/bin/python -m tests.testbed serve` and paste its export "
            "lines. The module FLUSHALLs every master: never point it at a cluster you keep."
        )
    return url


# --- the servers ----------------------------------------------------------------------------
class _Servers:
    """One side (standalone or cluster): the sink's client, and a plain connection to each
    node for INFO (masters first)."""

    def __init__(self, cluster: bool) -> None:
        import redis

        from viewkeeper.sinks.connect import redis_client, redis_cluster_client

        self.cluster = cluster
        if cluster:
            self.client: Any = redis_cluster_client(cluster_url(), socket_timeout=60)
            nodes = sorted(
                self.client.get_nodes(), key=lambda n: (n.server_type != "primary", n.port)
            )
            self.nodes = [redis.Redis(host=n.host, port=n.port) for n in nodes]
            self.masters = [n.server_type == "primary" for n in nodes]
        else:
            self.client = redis_client(service_url(ENV_REDIS), socket_timeout=60)
            self.nodes = [self.client]
            self.masters = [True]

    def flushall(self) -> None:
        for node, master in zip(self.nodes, self.masters, strict=True):
            if master:
                node.flushall()

    def cpu(self) -> tuple[float, float]:
        """(CPU seconds of the masters, of the replicas) so far."""
        out = [0.0, 0.0]
        for node, master in zip(self.nodes, self.masters, strict=True):
            info = node.info("cpu")
            out[0 if master else 1] += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return out[0], out[1]

    def calls(self) -> tuple[int, int]:
        """(EVALSHA calls on the masters, COMMAND GETKEYS calls on every node) so far."""
        evalsha = getkeys = 0
        for node, master in zip(self.nodes, self.masters, strict=True):
            stats = node.info("commandstats")
            if master:
                evalsha += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
            getkeys += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
        return evalsha, getkeys

    def used_memory(self) -> int:
        """``used_memory`` summed over the masters."""
        return sum(
            int(node.info("memory")["used_memory"])
            for node, master in zip(self.nodes, self.masters, strict=True)
            if master
        )

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self.cluster:
            self.client.close()


def _sink(servers: _Servers, **options: Any) -> Any:
    from viewkeeper.sinks.redis import RedisSink
    from viewkeeper.sinks.redis_cluster import RedisClusterSink

    cls = RedisClusterSink if servers.cluster else RedisSink
    return cls("cache", servers.client, **options)


def _arm(sink: Any, view: Any, marker: str) -> None:
    """As the daemon arms a view: its claim with a new marker, then the checks of it."""
    from viewkeeper.sinks.base import Claim, Owner

    sink.prepare([view])
    sink.write_claim(view, Claim(Owner("bench/orders", "bench-coordination", "bench"), marker))
    sink.expect(view, marker)


# --- the views and the contenders -----------------------------------------------------------
def _multi(order: dict[str, Any]) -> Iterator[Any]:
    """3 entries per item: redis_pipeline's three views in one."""
    yield _card(order)
    yield _by_customer(order)
    yield _by_status(order)


class _Contender:
    """One view in its own Pipeline and sink, fed through the shard worker."""

    def __init__(self, servers: _Servers, view: Any, **options: Any) -> None:
        from viewkeeper.coordination.memory import MemoryStore
        from viewkeeper.projection.registry import ViewRegistry
        from viewkeeper.runtime.pipeline import Pipeline

        registry = ViewRegistry()
        registry.add(view)
        self.servers = servers
        self.view = view
        self.sink = _sink(servers, **options)
        _arm(self.sink, view, f"bench-{view.name}")
        self.changes = 0  # changes given to sink.apply (a page's records, newest per item)
        apply = self.sink.apply

        def counted(changes: Sequence[Any]) -> Any:
            self.changes += len(changes)
            return apply(changes)

        self.sink.apply = counted
        pipeline = Pipeline(registry, {("redis", "cache"): self.sink}, MemoryStore(), _zero)
        self.outcomes = Outcomes(pipeline)  # fails the round on a dead-lettered record

    def feed(self, pages: Sequence[bytes]) -> Callable[[], None]:
        return worker_feed(self.outcomes, TABLE, KEY_NAMES, pages)


def _zero(view: str) -> int:
    return 0


def _timed(c: _Contender, fn: Callable[[], None], idle: float) -> list[float]:
    """[wall, client CPU, masters' CPU, replicas' CPU, EVALSHA calls, COMMAND GETKEYS calls,
    changes] of one round; the servers' CPU net of their idle CPU over the round (``idle``
    CPU-s per second, spread over masters and replicas as the nodes are)."""
    gc.collect()
    e0, g0 = c.servers.calls()
    m0, r0 = c.servers.cpu()
    n0 = c.changes
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m1, r1 = c.servers.cpu()
    e1, g1 = c.servers.calls()
    share = sum(c.servers.masters) / len(c.servers.masters)
    return [
        wall,
        cpu,
        m1 - m0 - idle * wall * share,
        r1 - r0 - idle * wall * (1 - share),
        float(e1 - e0),
        float(g1 - g0),
        float(c.changes - n0),
    ]


def _cards(servers: _Servers, keys: list[str]) -> list[Any]:
    out: list[Any] = []
    for lo in range(0, len(keys), BATCH):
        pipe = servers.client.pipeline(transaction=False)
        for key in keys[lo : lo + BATCH]:
            pipe.get(key)
        out += pipe.execute()
    return out


def _idle_cpu(servers: _Servers, seconds: float) -> float:
    """The servers' own CPU while nothing is sent (cron, the cluster bus): CPU-s per
    second."""
    m0, r0 = servers.cpu()
    time.sleep(seconds)
    m1, r1 = servers.cpu()
    return (m1 - m0 + r1 - r0) / seconds


# --- memory ---------------------------------------------------------------------------------
def _memory_usage(servers: _Servers, pattern: bytes) -> dict[str, int]:
    """``MEMORY USAGE … SAMPLES 0`` of the keys matching, by kind: ``o`` owner records,
    ``c`` claims (with the markers), ``p`` pending lists, ``other``; ``keys`` counts them."""
    keys = list(servers.client.scan_iter(match=pattern, count=10_000))
    out = {"o": 0, "c": 0, "p": 0, "other": 0, "keys": len(keys)}
    for lo in range(0, len(keys), BATCH):
        part = keys[lo : lo + BATCH]
        pipe = servers.client.pipeline(transaction=False)
        for key in part:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(part, pipe.execute(), strict=True):
            if b":o:" in key:
                kind = "o"
            elif b":p:" in key:
                kind = "p"
            elif key.endswith(b":c") or b":c:" in key:
                kind = "c"
            else:
                kind = "other"
            out[kind] += int(used or 0)
    return out


def _bookkeeping(servers: _Servers, n: int) -> dict[str, Any]:
    """Bytes of the one-entry view's bookkeeping for ``n`` items written through the sink,
    on a FLUSHALLed side: per item (used_memory and MEMORY USAGE) and the fixed part."""
    from bench.memory import _value, _view
    from viewkeeper.projection.entries import Value
    from viewkeeper.projection.versions import Version
    from viewkeeper.sinks.base import Change

    servers.flushall()
    view = _view()
    sink = _sink(servers)
    u0 = servers.used_memory()
    _arm(sink, view, "bench-memory")  # the cluster: the marker in every slot
    u1 = servers.used_memory()
    fixed = _memory_usage(servers, b"vk:*")
    seq = 10**20 + 4_000_000_000
    for lo in range(0, n, BATCH):
        changes = [
            Change(view, key, Version(0, str(seq + i * 7)), [Value(f"order:{key}", _value(i))])
            for i in range(lo, min(lo + BATCH, n))
            for key in (f"o-{i:08d}",)
        ]
        results = sink.apply(changes)
        if any(r.outcome.value != "applied" for r in results):
            raise AssertionError(f"not every change applied: {results[:3]!r}")
    u2 = servers.used_memory()
    grown = _memory_usage(servers, b"vk:*")
    owner_keys = list(servers.client.scan_iter(match=b"vk:*:o:*", count=10_000))
    pipe = servers.client.pipeline(transaction=False)
    for key in owner_keys[:50]:
        pipe.object("encoding", key)
    encodings = sorted({e.decode() for e in pipe.execute()})
    claim_keys = [
        k
        for k in servers.client.scan_iter(match=b"vk:*c*", count=10_000)
        if k.endswith(b":c") or b":c:" in k
    ]
    pipe = servers.client.pipeline(transaction=False)
    for key in claim_keys[:50]:
        pipe.object("encoding", key)
    claim_enc = sorted({e.decode() for e in pipe.execute()})

    servers.flushall()
    p0 = servers.used_memory()
    for lo in range(0, n, BATCH):
        pipe = servers.client.pipeline(transaction=False)
        for i in range(lo, min(lo + BATCH, n)):
            pipe.set(f"order:o-{i:08d}", _value(i))
        pipe.execute()
    plain = servers.used_memory() - p0
    servers.flushall()
    kinds = ("o", "c", "p", "other")
    return {
        "fixed": u1 - u0,
        "fixed_keys": fixed["keys"],
        "per_item": (u2 - u1 - plain) / n,
        "plain": plain / n,
        "owners": grown["o"] / n,
        "claims": (grown["c"] - fixed["c"]) / n,
        "pending": grown["p"] / n,
        "usage": sum(grown[k] - fixed[k] for k in kinds) / n,
        "owner_buckets": sink.owner_buckets,
        "encodings": "/".join(encodings),
        "claim_encodings": "/".join(claim_enc),
    }


# --- the run --------------------------------------------------------------------------------
# name -> (side, view)
CONTENDERS = {
    "value standalone": ("standalone", "value"),
    "value cluster": ("cluster", "value"),
    "multi standalone": ("standalone", "multi"),
    "multi cluster": ("cluster", "multi"),
}


def _setup(
    quick: bool, names: Sequence[str] = tuple(CONTENDERS)
) -> tuple[dict[str, _Contender], dict[str, _Servers], list[bytes], int]:
    """The servers (FLUSHALLed), the contenders (armed and warmed: one version of every
    item, untimed) and the pages."""
    service_url(ENV_REDIS)  # fail at once, before any work, when a URL is missing
    cluster_url()
    key_space = QUICK_KEY_SPACE if quick else KEY_SPACE
    base = steady_pages(QUICK_PAGES if quick else PAGES, key_space=key_space)
    servers = {"standalone": _Servers(False), "cluster": _Servers(True)}
    servers["standalone"].flushall()
    servers["cluster"].flushall()
    views = {"value": make_view(_card, "card"), "multi": make_view(_multi, "multi")}
    options: dict[str, dict[str, Any]] = {
        "value": {},
        "multi": {"key_prefix": MULTI, "entry_prefix": "m:"},
    }
    contenders = {}
    for name in names:
        side, view = CONTENDERS[name]
        contenders[name] = _Contender(servers[side], views[view], **options[view])
    warm = warm_pages(key_space)
    for c in contenders.values():
        c.feed(warm)()  # untimed
        c.outcomes.applied = c.outcomes.stale = c.changes = 0
    return contenders, servers, base, key_space


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    nrounds = 2 if quick else 3
    contenders, servers, base, key_space = _setup(quick)
    count = len(base) * PAGE_RECORDS
    idle = {id(s): _idle_cpu(s, 3.0) for s in servers.values()}
    best: dict[str, list[float]] = {n: [float("inf")] * 7 for n in contenders}
    step = 0
    for _ in range(nrounds):
        for name, c in contenders.items():
            step += 1  # pages newer than anything stored: no round is a replay
            fn = c.feed(shift_sequences(base, SEQ_STEP * step))
            times = _timed(c, fn, idle[id(c.servers)])
            best[name] = [min(a, b) for a, b in zip(best[name], times, strict=True)]
    for name, c in contenders.items():
        if c.outcomes.applied < 0.8 * count * nrounds:  # a replay would come back stale
            raise AssertionError(
                f"{name}: only {c.outcomes.applied} of {count * nrounds} applied, "
                f"{c.outcomes.stale} stale"
            )
    applied = {n: c.outcomes.applied for n, c in contenders.items()}
    if len(set(applied.values())) != 1:
        raise AssertionError(f"the contenders applied different changes: {applied}")
    for prefix in ("", "m:"):  # the views' entries, read back from both sides, are the same
        keys = [f"{prefix}order:o-{i:08d}" for i in range(key_space)]
        a, b = _cards(servers["standalone"], keys), _cards(servers["cluster"], keys)
        if a != b:
            wrong = [k for k, x, y in zip(keys, a, b, strict=True) if x != y]
            raise AssertionError(f"{len(wrong)} cards differ between the sides: {wrong[:3]}")
        if sum(1 for x in a if x is not None) < key_space // 2:
            raise AssertionError(f"fewer than half the {key_space} cards live")
    del contenders

    n = QUICK_MEMORY_ITEMS if quick else MEMORY_ITEMS
    mem = {side: _bookkeeping(s, n) for side, s in servers.items()}
    for s in servers.values():
        s.close()
    return _rows(best, count, n, idle[id(servers["cluster"])], mem)


def _rows(
    best: dict[str, list[float]], count: int, n: int, idle: float, mem: dict[str, Any]
) -> list[Row]:
    rates = {k: rate(count, v[0]) for k, v in best.items()}
    cpu_us = {k: v[1] / count * 1e6 for k, v in best.items()}
    server_us = {k: (v[2] + v[3]) / count * 1e6 for k, v in best.items()}
    rows: list[Row] = []
    for view, what in (("value", "Value view (1 entry)"), ("multi", "3-entry view")):
        s, c = f"{view} standalone", f"{view} cluster"
        changes = best[c][6]
        rows += [
            Row(f"cluster: pages -> {what} -> standalone Redis (baseline)", rates[s], "rec/s"),
            Row.compare(f"cluster: {what} -> Redis Cluster (3 masters + 3 replicas) vs "
                        "standalone", rates[c], "rec/s", rates[s], None),
            Row.compare(f"cluster: {what}, client CPU per record, cluster vs standalone",
                        cpu_us[c], "µs", cpu_us[s], None),
            Row.compare(f"cluster: {what}, server CPU per record (6 nodes, replicas "
                        f"{best[c][3] / count * 1e6:.1f} µs, idle subtracted) vs standalone",
                        server_us[c], "µs", server_us[s], None),
            Row.compare(f"cluster: {what}, EVALSHA per change ({changes / count:.2f} changes "
                        "per record), cluster vs standalone", best[c][4] / changes, "calls",
                        best[s][4] / best[s][6], None),
            Row(f"cluster: {what}, redis-py COMMAND GETKEYS round trips per change (cluster)",
                best[c][5] / changes, "calls"),
        ]  # fmt: skip
    rows.append(Row("cluster: the cluster's idle CPU (6 nodes, nothing sent), subtracted above",
                    idle * 1e3, "ms/s"))  # fmt: skip
    ms, mc = mem["standalone"], mem["cluster"]
    rows += [
        Row(f"cluster: bookkeeping per item, Value view, on the cluster (used_memory of the "
            f"masters, {n:,} items, owner_buckets={mc['owner_buckets']}; target <= "
            f"{MEMORY_TARGET:.0f} B)", mc["per_item"], "B/item",
            met=mc["per_item"] <= MEMORY_TARGET),
        Row.compare(f"cluster: same, cluster vs standalone (owner_buckets={ms['owner_buckets']})",
                    mc["per_item"], "B/item", ms["per_item"], None),
        Row.compare(f"cluster: same by MEMORY USAGE of vk:*: owner records {mc['owners']:.1f} "
                    f"({mc['encodings']}) + claims {mc['claims']:.1f} ({mc['claim_encodings']}) "
                    f"+ pending {mc['pending']:.1f}; standalone {ms['owners']:.1f} + "
                    f"{ms['claims']:.1f}", mc["usage"], "B/item", ms["usage"], None),
        Row(f"cluster: fixed cost of the first view, its markers ({mc['fixed_keys']:,} vk: keys "
            "before any item; used_memory of the masters)",
            mc["fixed"] / 2**20, "MiB"),
        Row(f"cluster: plain SET of the same keys and values, per item (standalone "
            f"{ms['plain']:.0f} B)", mc["plain"], "B/item"),
    ]  # fmt: skip
    return rows


class _ParseTimer:
    """Wraps the ``CLUSTER NODES`` reply callback (redis-py's ``parse_cluster_nodes``) of every
    node the cluster client knows: calls, and the CPU of the calling thread (any thread, the
    sink's pipeline threads included) spent in it."""

    def __init__(self, client: Any) -> None:
        import threading

        self.calls = 0
        self.cpu = 0.0
        self._lock = threading.Lock()
        for node in client.get_nodes():
            callbacks = client.get_redis_connection(node).response_callbacks
            callbacks["CLUSTER NODES"] = self._wrap(callbacks["CLUSTER NODES"])

    def _wrap(self, parse: Callable[..., Any]) -> Callable[..., Any]:
        def timed(response: Any, **options: Any) -> Any:
            t0 = time.thread_time()
            try:
                return parse(response, **options)
            finally:
                spent = time.thread_time() - t0
                with self._lock:
                    self.calls += 1
                    self.cpu += spent

        return timed


def _cluster_nodes_stats(servers: _Servers) -> tuple[int, int]:
    """(CLUSTER NODES calls, their usec) on the masters so far (``INFO commandstats``)."""
    calls = usec = 0
    for node, master in zip(servers.nodes, servers.masters, strict=True):
        if master:
            stat = node.info("commandstats").get("cmdstat_cluster|nodes", {})
            calls += int(stat.get("calls", 0))
            usec += int(stat.get("usec", 0))
    return calls, usec


def profile(quick: bool) -> None:
    """cProfile of one round of the Value view on each side (after the warm-up). cProfile
    follows the calling thread only; the CPU of other threads (the cluster sink's pipelines)
    is printed beside it, and so is the CPU spent parsing ``CLUSTER NODES`` replies in every
    thread (:class:`_ParseTimer`)."""
    import cProfile
    import pstats

    names = ("value standalone", "value cluster")
    contenders, servers, base, _ = _setup(quick, names)
    timer = _ParseTimer(servers["cluster"].client)
    for step, name in enumerate(names, 1):
        c = contenders[name]
        fn = c.feed(shift_sequences(base, SEQ_STEP * step))
        e0, g0 = c.servers.calls()
        n0, u0 = _cluster_nodes_stats(c.servers) if c.servers.cluster else (0, 0)
        k0, s0 = timer.calls, timer.cpu
        prof = cProfile.Profile()
        t0, p0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        prof.runcall(fn)
        wall = time.perf_counter() - t0
        cpu, main = time.process_time() - p0, time.thread_time() - m0
        e1, g1 = c.servers.calls()
        n1, u1 = _cluster_nodes_stats(c.servers) if c.servers.cluster else (0, 0)
        parsed, parse_cpu = timer.calls - k0, timer.cpu - s0
        # cProfile sees this thread only: the cluster sink's per-master pipelines run in its
        # thread pool, whose CPU shows here as the difference
        print(f"\n=== {name}: {len(base) * PAGE_RECORDS} records, {c.changes} changes, "
              f"{e1 - e0} EVALSHA, {g1 - g0} COMMAND GETKEYS; {wall:.2f} s wall under the "
              f"profiler; CPU {cpu:.2f} s, of which this thread {main:.2f} s, other threads "
              f"{cpu - main:.2f} s (not in the profile) ===")  # fmt: skip
        if c.servers.cluster:
            print(f"CLUSTER NODES replies parsed (parse_cluster_nodes, every thread): {parsed}, "
                  f"{parse_cpu * 1e3:.1f} ms CPU = {parse_cpu / cpu:.2%} of the process's CPU "
                  f"({parse_cpu / max(parsed, 1) * 1e6:.0f} µs each); on the masters "
                  f"{n1 - n0} CLUSTER NODES calls, {(u1 - u0) / 1e3:.1f} ms")  # fmt: skip
        stats = pstats.Stats(prof, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(30)
    for s in servers.values():
        s.flushall()
        s.close()


if __name__ == "__main__":  # .venv/bin/python -m bench.cluster [--quick] [--profile]
    from bench.common import print_table

    if "--profile" in sys.argv:
        profile("--quick" in sys.argv)
    else:
        print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
