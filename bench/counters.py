"""Aggregate views on Redis: records/s of a view yielding 3 counters per item
(``Counter`` / ``SortedSetCounter``) against the ``Value`` view of
:mod:`bench.redis_pipeline`, on the same pages, same Redis; and the bookkeeping bytes per
(item, counter) contribution.

The pages are :mod:`bench.redis_pipeline`'s (:func:`~bench.redis_pipeline.steady_pages`:
1000 records, ~1.4 KB each, 80 % MODIFY / 15 % INSERT / 5 % REMOVE, on a
:data:`~bench.redis_pipeline.KEY_SPACE`-item table, one customer per order, 5,000
customers), every round's sequence numbers shifted above everything stored, so no round is
a replay. Two contenders, each its own ``Pipeline`` and ``RedisSink`` on the one Redis
(disjoint keys), warmed once with :func:`~bench.redis_pipeline.warm_pages` (untimed), run
interleaved round by round; each figure is the best of its rounds (wall clock: Redis' own
work, here the sums in ``redis_apply.lua``, is part of the price):

- ``value``: the ``Value`` view of the other Redis rows (``order:{id}`` → 4 fields; the
  newest record of each item per page, versioned, owner bookkeeping). The baseline.
- ``counters``: :func:`_stats`, the README's ``order_stats``: per item
  ``Counter("orders:count:{status}")`` (amount 1), ``Counter("customer:{id}:spent",
  amount=cents)`` and ``SortedSetCounter("customers:by_spend", member=customer id,
  amount=cents)``, cents = the item's Decimal ``total`` x 100. On these pages a MODIFY
  changes the status (``version % 6``) and the total (drawn again) of its item, so nearly
  every update retracts and adds all three contributions.

Each round is the daemon's path, as the ``redis_pipeline`` rows: a ``ShardWorker`` reads
the pages as one shard (:func:`bench.shard.worker_feed`; ``parse_records`` →
``Pipeline.process`` → the sink, the collector paused per page). Besides the wall clock, each
round records this process's CPU time and Redis's (``INFO cpu``, ``used_cpu_user +
used_cpu_sys`` after - before): the client's and the server's price per record.

The counter view's sink has its own ``key_prefix`` (:data:`COUNTER_PREFIX`), so its owner
records (``vkc:stats:o:*``) and the claims it adds (``vkc:c:*``: one field per counter)
are apart from the ``Value`` view's (``vk:card:o:*``, ``vk:c:*``). After all rounds:
``MEMORY USAGE ... SAMPLES 0`` of those hashes; bookkeeping per contribution = (owner
hashes + claim hashes) / contributions, the contributions (items x 3) counted in the owner
records and checked against the claims' contributor counts. Every sum is checked against
the owner records' amounts and against the ``Value`` view's cards of the same items
(both views saw the same records).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import orjson

from bench.common import PAGE_RECORDS, Row, rate
from bench.redis_pipeline import (
    KEY_NAMES,
    KEY_SPACE,
    QUICK_KEY_SPACE,
    SEQ_STEP,
    TABLE,
    _card,
    make_view,
    redis_client,
    shift_sequences,
    steady_pages,
    warm_pages,
)
from bench.shard import Outcomes, worker_feed

COUNTER_PREFIX = "vkc:"  # the counter view's sink: its claims in vkc:c:*, its own to measure
VALUE_PREFIX = "vk:"  # the default
STATUS = "orders:count:"
SPENT = "customer:{}:spent"
BOARD = "customers:by_spend"


def _stats(order: dict[str, Any]) -> Iterator[Any]:
    """The aggregate view: 3 counters per item (the README's ``order_stats``)."""
    from viewkeeper import Counter, SortedSetCounter

    cents = int(order["total"] * 100)  # exact: total is a Decimal with 2 places
    yield Counter(STATUS + order["status"])
    yield Counter(SPENT.format(order["customer_id"]), amount=cents)
    yield SortedSetCounter(BOARD, member=order["customer_id"], amount=cents)


class _Contender:
    """One view in its own Pipeline and RedisSink, fed through the shard worker."""

    def __init__(self, client: Any, view: Any, key_prefix: str) -> None:
        from viewkeeper.coordination.memory import MemoryStore
        from viewkeeper.projection.registry import ViewRegistry
        from viewkeeper.runtime.pipeline import Pipeline
        from viewkeeper.sinks.redis import RedisSink

        registry = ViewRegistry()
        registry.add(view)
        self.view = view
        self.sink = RedisSink("cache", client, key_prefix=key_prefix)
        self.sink.prepare([view])
        pipeline = Pipeline(registry, {("redis", "cache"): self.sink}, MemoryStore(), _zero)
        self.outcomes = Outcomes(pipeline)  # fails the round on a dead-lettered record

    def feed(self, pages: Sequence[bytes]) -> Callable[[], None]:
        return worker_feed(self.outcomes, TABLE, KEY_NAMES, pages)


def _zero(view: str) -> int:
    return 0


def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _timed(client: Any, fn: Callable[[], None]) -> tuple[float, float, float]:
    """(wall, this process's CPU, Redis's CPU) seconds of one round, after a collection."""
    import gc

    gc.collect()
    r0, t0, c0 = _redis_cpu(client), time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, _redis_cpu(client) - r0


def _pipelined(client: Any, keys: Sequence[bytes], *calls: str) -> list[list[Any]]:
    """Per key, the replies of ``calls`` (``"get"``, ``"hlen"``, ``"memory"``,
    ``"encoding"``, ``"hgetall"``), pipelined 1000 keys at a time."""
    out: list[list[Any]] = []
    for lo in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for key in keys[lo : lo + 1000]:
            for call in calls:
                if call == "memory":
                    pipe.memory_usage(key, samples=0)
                elif call == "encoding":
                    pipe.object("encoding", key)
                else:
                    getattr(pipe, call)(key)
        replies = pipe.execute()
        n = len(calls)
        out += [replies[i : i + n] for i in range(0, len(replies), n)]
    return out


def _hashes(client: Any, pattern: bytes) -> tuple[int, int, int, dict[str, int]]:
    """(keys, fields, MEMORY USAGE bytes, keys per encoding) of the hashes matching."""
    keys = list(client.scan_iter(match=pattern, count=1000))
    fields = used = 0
    encodings: dict[str, int] = {}
    for hlen, memory, enc in _pipelined(client, keys, "hlen", "memory", "encoding"):
        fields += int(hlen)
        used += int(memory or 0)
        encodings[enc.decode()] = encodings.get(enc.decode(), 0) + 1
    return len(keys), fields, used, encodings


def _sums(client: Any) -> dict[tuple[str, str], int]:
    """Every counter as Redis holds it: (key, member or "") -> value."""
    out: dict[tuple[str, str], int] = {}
    for pattern in (STATUS + "*", SPENT.format("*")):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for key, (value,) in zip(keys, _pipelined(client, keys, "get"), strict=True):
            out[(key.decode(), "")] = int(value)
    for member, score in client.zrange(BOARD, 0, -1, withscores=True):
        if score != int(score):
            raise AssertionError(f"{BOARD} {member!r}: score {score} is not an integer")
        out[(BOARD, member.decode())] = int(score)
    return out


def _check_and_measure(client: Any, value: _Contender, counters: _Contender) -> dict[str, Any]:
    """After the rounds: the sums checked two ways, then the memory of the bookkeeping."""
    live: dict[str, Any] = {}
    tombstones = 0
    expected: dict[tuple[str, str], int] = {}
    formula = 0  # the sink README's estimate: 3 + len(key) + len(field or member) + digits
    for rec in counters.sink.iter_owner_records(counters.view):
        if rec.tombstone:
            tombstones += 1
            continue
        live[rec.item_key] = rec
        for (kind, key, sub), amount in zip(rec.entries, rec.amounts, strict=True):
            if kind not in "vhz" or amount is None:
                raise AssertionError(f"{rec.item_key}: unexpected entry {kind} {key} {sub}")
            ident = (key, sub)
            expected[ident] = expected.get(ident, 0) + amount
            formula += 3 + len(key) + len(sub) + len(str(amount))
    contributions = sum(len(r.entries) for r in live.values())
    if contributions != 3 * len(live):
        raise AssertionError(f"{contributions} contributions for {len(live)} items, not 3 each")
    held = _sums(client)
    if held != expected:
        wrong = [k for k in set(held) | set(expected) if held.get(k) != expected.get(k)]
        raise AssertionError(f"{len(wrong)} counters differ from their contributions: {wrong[:5]}")

    # The same sums from the Value view's cards of the same items (the same records).
    from_cards: dict[tuple[str, str], int] = {}
    items = [r.item_key for r in value.sink.iter_owner_records(value.view) if not r.tombstone]
    cards = _pipelined(client, [f"order:{i}".encode() for i in items], "get")
    value_live = len(items)
    for item, (raw,) in zip(items, cards, strict=True):
        if raw is None or item not in live:
            raise AssertionError(f"{item}: live in the Value view, card {raw!r}")
        card = orjson.loads(raw)
        cents = int(Decimal(str(card["total"])) * 100)
        for ident, amount in (
            ((STATUS + card["status"], ""), 1),
            ((SPENT.format(card["customer_id"]), ""), cents),
            ((BOARD, card["customer_id"]), cents),
        ):
            from_cards[ident] = from_cards.get(ident, 0) + amount
    if value_live != len(live) or from_cards != held:
        raise AssertionError(
            f"the counters disagree with the Value view's cards ({len(live)} vs {value_live} "
            "live items)"
        )

    # Claims: one field per counter, '<view id>#<contributors>'.
    claims_keys = claims_fields = claims_bytes = 0
    contributors = 0
    claims_enc: dict[str, int] = {}
    keys = list(client.scan_iter(match=COUNTER_PREFIX.encode() + b"c:*", count=1000))
    for fields, memory, enc in _pipelined(client, keys, "hgetall", "memory", "encoding"):
        claims_keys += 1
        claims_fields += len(fields)
        contributors += sum(int(v.rsplit(b"#", 1)[1]) for v in fields.values())
        claims_bytes += int(memory or 0)
        claims_enc[enc.decode()] = claims_enc.get(enc.decode(), 0) + 1
    if claims_fields != len(expected) or contributors != contributions:
        raise AssertionError(
            f"claims: {claims_fields} counters, {contributors} contributors; the owner records "
            f"say {len(expected)} and {contributions}"
        )
    owners = _hashes(client, f"{COUNTER_PREFIX}{counters.view.name}:o:*".encode())
    value_owners = _hashes(client, f"{VALUE_PREFIX}{value.view.name}:o:*".encode())
    value_claims = _hashes(client, f"{VALUE_PREFIX}c:*".encode())
    data_keys = [
        k
        for p in (STATUS + "*", SPENT.format("*"), BOARD)
        for k in client.scan_iter(match=p, count=1000)
    ]
    data = sum(int(m or 0) for (m,) in _pipelined(client, data_keys, "memory"))
    return {
        "items": len(live),
        "tombstones": tombstones,
        "contributions": contributions,
        "counters": len(expected),
        "formula": formula / contributions,
        "owners": owners,
        "claims": (claims_keys, claims_fields, claims_bytes, claims_enc),
        "value_items": value_live,
        "value_owners": value_owners,
        "value_claims": value_claims,
        "data": data,
    }


def _enc(encodings: dict[str, int]) -> str:
    return ", ".join(f"{n} {e}" for e, n in sorted(encodings.items()))


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    client = redis_client()
    npages = 6 if quick else 20
    nrounds = 2 if quick else 5
    key_space = QUICK_KEY_SPACE if quick else KEY_SPACE
    base = steady_pages(npages, key_space=key_space)
    count = npages * PAGE_RECORDS

    client.flushall()
    contenders = {
        "value": _Contender(client, make_view(_card, "card"), VALUE_PREFIX),
        "counters": _Contender(client, make_view(_stats, "stats"), COUNTER_PREFIX),
    }
    warm = warm_pages(key_space)
    for c in contenders.values():
        c.feed(warm)()
        c.outcomes.applied = c.outcomes.stale = 0
    del warm
    best: dict[str, list[float]] = {n: [float("inf")] * 3 for n in contenders}
    step = 0
    for _ in range(nrounds):
        for name, c in contenders.items():
            step += 1  # pages newer than anything stored: no round is a replay
            times = _timed(client, c.feed(shift_sequences(base, SEQ_STEP * step)))
            best[name] = [min(a, b) for a, b in zip(best[name], times, strict=True)]
    applied = {n: c.outcomes.applied for n, c in contenders.items()}
    for name, c in contenders.items():
        if c.outcomes.applied < 0.8 * count * nrounds:  # a replay would come back stale
            raise AssertionError(
                f"{name}: only {c.outcomes.applied} of {count * nrounds} applied, "
                f"{c.outcomes.stale} stale"
            )
    if applied["value"] != applied["counters"]:
        raise AssertionError(f"the views applied different changes: {applied}")
    m = _check_and_measure(client, contenders["value"], contenders["counters"])
    client.flushall()
    client.close()

    rates = {n: rate(count, b[0]) for n, b in best.items()}
    cpus = {n: rate(count, b[1]) for n, b in best.items()}
    redis_us = {n: b[2] / count * 1e6 for n, b in best.items()}
    n_contrib, n_items = m["contributions"], m["items"]
    o_keys, o_fields, o_bytes, o_enc = m["owners"]
    c_keys, c_fields, c_bytes, c_enc = m["claims"]
    vo_keys, vo_fields, vo_bytes, vo_enc = m["value_owners"]
    vc_keys, vc_fields, vc_bytes, _ = m["value_claims"]
    per_contrib = (o_bytes + c_bytes) / n_contrib
    rows = [
        Row("counters: pages -> Value view -> Redis (baseline)", rates["value"], "rec/s"),
        Row.compare("counters: Counter view (3 counters per item) vs Value view",
                    rates["counters"], "rec/s", rates["value"], None),
        Row.compare("counters: client CPU only, Counter view vs Value (rec per CPU-second)",
                    cpus["counters"], "rec/s", cpus["value"], None),
        Row.compare("counters: Redis CPU per record (lower is better), Counter view vs Value",
                    redis_us["counters"], "µs", redis_us["value"], None),
        Row(f"counters: bookkeeping per (item, counter) contribution (owner records "
            f"{o_bytes / n_contrib:.1f} + claims {c_bytes / n_contrib:.1f}; {n_contrib:,} "
            f"contributions of {n_items:,} items; README estimate of the entry alone "
            f"{m['formula']:.1f})", per_contrib, "B/contrib"),
        Row(f"counters: Counter view, owner records per item ({o_fields:,} records incl. "
            f"{m['tombstones']:,} tombstones, {o_keys:,} hashes: {_enc(o_enc)})",
            o_bytes / n_items, "B/item"),
        Row(f"counters: Counter view, claims per counter ({c_fields:,} claims in {c_keys:,} "
            f"hashes: {_enc(c_enc)})", c_bytes / c_fields, "B/counter"),
        Row(f"counters: Value view, owner records per item ({vo_fields:,} records, "
            f"{vo_keys:,} hashes: {_enc(vo_enc)})", vo_bytes / m["value_items"], "B/item"),
        Row(f"counters: Value view, claims per item ({vc_fields:,} claims, {vc_keys:,} hashes)",
            vc_bytes / m["value_items"], "B/item"),
        Row("counters: distinct counters (6 statuses + 2 per customer)", m["counters"],
            "counters"),
        Row("counters: the counters' own data (keys + the sorted set), per counter",
            m["data"] / m["counters"], "B/counter"),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":  # .venv/bin/python -m bench.counters [--quick]
    from bench.common import print_table

    print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
