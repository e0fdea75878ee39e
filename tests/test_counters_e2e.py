"""Aggregate views end to end: Counter and SortedSetCounter sums kept by the real
``viewkeeper run`` from moto's DynamoDB Streams into the real Redis, through kill -9 and live
rebuilds.

A seeded random workload (boto3, one writer) on a small key space of orders
(tests/views_e2e/counter_views.py): creates, full replacements, no-op rewrites, updates of
one to three attributes (status, customer, day, total, adjust, lines: moving contributions
between counters and changing amounts, 0 and negative included, some beyond 15 digits),
atomic ADDs to the total, deletes and re-creates. Meanwhile the daemon is killed with
SIGKILL at random moments and restarted (the lease expires; the next life reads again from
the checkpoint: records applied and read again must not count twice), after about half of
the kills with the checkpoint moved back 1-80 records (what a kill between an apply and its
checkpoint leaves, as in tests/test_changelog_e2e.py: more records applied twice), and
``viewkeeper rebuild`` runs twice in the background (the named views, then ``--table``)
while the writer keeps writing (it rewrites every item under a new generation and retracts
what older generations own: sums must neither double nor lose contributions).

At the end the writer stops, the rebuilds have ended (exit 0), and the daemon drains (its
lease's checkpoint reaches the last record of moto's stream); then every counter in Redis is
compared exactly with the sums computed from a full Scan of the table: the number at each
key / hash field / sorted-set member is the sum of the amounts of the items that yield it,
and nothing else is in Redis (``vk:`` bookkeeping aside). Then, under the hood, each live
item's owner records must list exactly its contributions (the amounts a later change
retracts) and deleted items must own nothing. There must be no dead letter, and the daemon
must stop cleanly on SIGTERM.

``VIEWKEEPER_COUNTERS_SEED`` fixes the operations and the schedule of kills and rebuilds (not
their timing against the daemon); a failure prints the seed, a diff and the daemon's log.
``VIEWKEEPER_COUNTERS_OPS`` sets the number of operations (default 1500).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from tests.chaos.daemons import CliJob, Daemon
from tests.helpers import redis_view_keys, vk, write_config
from tests.testbed.dynamo import boto3_client
from tests.views_e2e import counter_views
from viewkeeper import Counter, SortedSetCounter
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.model import Lease, LeaseState
from viewkeeper.sinks.redis import RedisSink

TABLE = counter_views.TABLE
VIEWS = "tests.views_e2e.counter_views"
VIEW_FUNCS: tuple[Callable[[dict[str, Any]], Iterable[Any] | None], ...] = (
    counter_views.order_stats,
    counter_views.order_adjust,
)

KEYS = [f"o{i}" for i in range(30)]
STATUSES = ("open", "paid", "shipped", "refunded")
CUSTOMERS = tuple(f"c{i}" for i in range(6))
DAYS = ("d1", "d2", "d3", "d4")
PRODUCTS = tuple(f"p{i}" for i in range(5))
NAMES = {
    "#status": "status",
    "#customer": "customer_id",
    "#day": "day",
    "#total": "total_cents",
    "#adjust": "adjust",
    "#lines": "lines",
}

_ser = TypeSerializer()
_de = TypeDeserializer()


# --- the workload ----------------------------------------------------------------------------
def total(rng: random.Random) -> int:
    """total_cents: mostly positive, often 0 or negative (refunds), sometimes large (the
    sorted-set counter's sums stay far below 2**53: 30 items of at most 1e13)."""
    r = rng.random()
    if r < 0.12:
        return 0
    if r < 0.3:
        return -rng.randrange(1, 50_000)
    if r < 0.9:
        return rng.randrange(1, 100_000)
    return rng.choice((-1, 1)) * rng.randrange(10**12, 10**13)


def adjust(rng: random.Random) -> int:
    """adjust: signed, 0 often, up to 2e17 (sums of 30 items stay within int64)."""
    r = rng.random()
    if r < 0.2:
        return 0
    if r < 0.75:
        return rng.randrange(-1000, 1000)
    return rng.choice((-1, 1)) * rng.randrange(10**15, 2 * 10**17)


def lines(rng: random.Random) -> list[dict[str, Any]]:
    """0-3 order lines; the same product may come twice; quantities of any sign."""
    return [
        {"p": rng.choice(PRODUCTS), "qty": rng.randrange(-5, 21)} for _ in range(rng.randrange(4))
    ]


def new_order(rng: random.Random, pk: str) -> dict[str, Any]:
    order: dict[str, Any] = {
        "pk": pk,
        "status": rng.choice(STATUSES),
        "customer_id": rng.choice(CUSTOMERS),
        "day": rng.choice(DAYS),
        "total_cents": total(rng),
        "adjust": adjust(rng),
    }
    if rng.random() < 0.6:
        order["lines"] = lines(rng)
    return order


def attr(value: Any) -> Any:
    """A Python value as a DynamoDB attribute value (boto3's serializer)."""
    return _ser.serialize(value)


class Writer:
    """The table's only writer: it knows which keys exist (not what the oracle is: that is
    computed from a Scan at the end)."""

    def __init__(self, db: Any, rng: random.Random) -> None:
        self.db = db
        self.rng = rng
        self.live: dict[str, dict[str, Any]] = {}
        self.done: Tally[str] = Tally()

    def put(self, order: dict[str, Any]) -> None:
        item = {k: attr(v) for k, v in order.items()}
        self.db.put_item(TableName=TABLE, Item=item)
        self.live[order["pk"]] = order

    def step(self) -> None:
        rng = self.rng
        pk = rng.choice(KEYS)
        if pk not in self.live:
            self.put(new_order(rng, pk))  # a create, or a re-create after a delete
            self.done["create"] += 1
            return
        r = rng.random()
        if r < 0.12:
            self.db.delete_item(TableName=TABLE, Key={"pk": {"S": pk}})
            del self.live[pk]
            self.done["delete"] += 1
            if rng.random() < 0.3:  # re-created at once
                self.put(new_order(rng, pk))
                self.done["re-create"] += 1
        elif r < 0.22:
            self.put(new_order(rng, pk))
            self.done["replace"] += 1
        elif r < 0.27:
            self.put(dict(self.live[pk]))  # nothing changes (moto still emits a MODIFY)
            self.done["touch"] += 1
        elif r < 0.37:
            delta = rng.randrange(-3000, 3000)
            self.db.update_item(
                TableName=TABLE,
                Key={"pk": {"S": pk}},
                UpdateExpression="ADD #total :d",
                ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeNames={"#total": "total_cents"},
                ExpressionAttributeValues={":d": {"N": str(delta)}},
            )
            self.live[pk]["total_cents"] += delta
            self.done["add"] += 1
        else:
            self.update(pk)

    def update(self, pk: str) -> None:
        """SET 1-3 attributes (moving contributions between counters, changing amounts), or
        REMOVE the lines."""
        rng = self.rng
        order = self.live[pk]
        fresh = new_order(rng, pk)
        fresh.setdefault("lines", lines(rng))
        names = rng.sample(sorted(NAMES), rng.randrange(1, 4))
        sets, values = [], {}
        removes = []
        for name in names:
            field = NAMES[name]
            if field == "lines" and "lines" in order and rng.random() < 0.3:
                removes.append(name)
                continue
            sets.append(f"{name} = :{field}")
            values[f":{field}"] = attr(fresh[field])
        expr = " ".join(
            part
            for part in (
                "SET " + ", ".join(sets) if sets else "",
                "REMOVE " + ", ".join(removes) if removes else "",
            )
            if part
        )
        kwargs: dict[str, Any] = {
            "TableName": TABLE,
            "Key": {"pk": {"S": pk}},
            "UpdateExpression": expr,
            "ConditionExpression": "attribute_exists(pk)",
            "ExpressionAttributeNames": {n: NAMES[n] for n in names},
        }
        if values:
            kwargs["ExpressionAttributeValues"] = values
        self.db.update_item(**kwargs)
        for name in names:
            field = NAMES[name]
            if name in removes:
                order.pop(field, None)
            else:
                order[field] = fresh[field]
        self.done["update"] += 1
        for name in names:
            self.done[("remove " if name in removes else "set ") + NAMES[name]] += 1


# --- the oracle and the comparison -------------------------------------------------------------
def scan(db: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": TABLE, "ConsistentRead": True}
    while True:
        page = db.scan(**kwargs)
        items += [{k: _de.deserialize(v) for k, v in i.items()} for i in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def oracle(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Every counter the views' items yield, with its exact sum, in the form of
    :func:`tests.helpers.redis_view_keys`: a string key's integer as text, a hash's fields as
    text, a sorted set's members with float scores (exact: sums stay below 2**53)."""
    strings: dict[str, int] = {}
    fields: dict[str, dict[str, int]] = {}
    members: dict[str, dict[str, int]] = {}
    for item in items:
        for func in VIEW_FUNCS:
            for entry in func(item) or ():
                if isinstance(entry, Counter) and entry.field is None:
                    strings[entry.key] = strings.get(entry.key, 0) + entry.amount
                elif isinstance(entry, Counter):
                    into, field = fields.setdefault(entry.key, {}), str(entry.field)
                    into[field] = into.get(field, 0) + entry.amount
                elif isinstance(entry, SortedSetCounter):
                    into = members.setdefault(entry.key, {})
                    member = str(entry.member)
                    into[member] = into.get(member, 0) + entry.amount
                else:
                    raise AssertionError(f"the counter views yield only counters: {entry!r}")
    out: dict[str, Any] = {k: str(v) for k, v in strings.items()}
    out.update({k: {f: str(v) for f, v in h.items()} for k, h in fields.items()})
    for k, z in members.items():
        assert all(abs(v) <= 2**53 for v in z.values()), "the workload must keep scores exact"
        out[k] = {m: float(v) for m, v in z.items()}
    return out


def contributions(item: dict[str, Any], func: Any) -> dict[tuple[str, str, str], int]:
    """What one item adds to each counter, by identity as the owner records spell it (``v``
    a key, ``h`` a hash field, ``z`` a sorted-set member; an item yielding one counter twice
    adds both amounts)."""
    out: dict[tuple[str, str, str], int] = {}
    for entry in func(item) or ():
        if isinstance(entry, Counter):
            ident = ("v", entry.key, "") if entry.field is None else ("h", entry.key, entry.field)
        else:
            ident = ("z", entry.key, str(entry.member))
        out[ident] = out.get(ident, 0) + entry.amount
    return out


def owner_record_problems(items: list[dict[str, Any]], client: Any) -> list[str]:
    """Under the hood: each view's owner record of a live item lists exactly the counters it
    contributes to, with its amounts (what a later change retracts); a deleted item owns
    nothing. A wrong record is a wrong sum waiting for the item's next change."""
    sink = RedisSink("cache", client)
    by_key = {item["pk"]: item for item in items}
    out: list[str] = []
    for func in VIEW_FUNCS:
        name = func.__name__
        seen: set[str] = set()
        for rec in sink.iter_owner_records(name):
            seen.add(rec.item_key)
            has = dict(zip(rec.entries, rec.amounts, strict=True))
            item = by_key.get(rec.item_key)
            want = {} if item is None else contributions(item, func)
            if has != want:
                out.append(f"  {name} {rec.item_key!r} records {has}, contributes {want}")
        out += [f"  {name} {k!r}: no owner record" for k in sorted(by_key.keys() - seen)]
    return out


def diff(want: dict[str, Any], got: dict[str, Any], limit: int = 80) -> list[str]:
    """One line per key (or hash field / member) that differs."""
    out: list[str] = []
    for key in sorted(set(want) | set(got)):
        w, g = want.get(key), got.get(key)
        if w == g:
            continue
        if isinstance(w, dict) and isinstance(g, dict):
            for sub in sorted(set(w) | set(g)):
                if w.get(sub) != g.get(sub):
                    out.append(
                        f"  {key} [{sub}]: want {w.get(sub, '<absent>')!r}, "
                        f"redis has {g.get(sub, '<absent>')!r}"
                    )
        else:
            shown_w = "<absent>" if w is None else repr(w)
            shown_g = "<absent>" if g is None else repr(g)
            out.append(f"  {key}: want {shown_w}, redis has {shown_g}")
    if len(out) > limit:
        out = [*out[:limit], f"  ... and {len(out) - limit} more"]
    return out


# --- the daemon's progress -----------------------------------------------------------------------
def stream_sequences(dynamodb_url: str) -> list[str]:
    """The sequence numbers of every record of the table's stream, in order."""
    streams = boto3_client("dynamodbstreams", dynamodb_url)
    db = boto3_client("dynamodb", dynamodb_url)
    arn = db.describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
    out: list[str] = []
    for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        it = streams.get_shard_iterator(
            StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while it:
            page = streams.get_records(ShardIterator=it, Limit=1000)
            if not page["Records"]:
                break
            out += [r["dynamodb"]["SequenceNumber"] for r in page["Records"]]
            it = page.get("NextShardIterator")
    return out


def lease_of(store: DynamoDBStore) -> Lease | None:
    try:
        found = store.list_leases(TABLE)
    except ClientError:  # the first daemon has not made the coordination table yet
        return None
    assert len(found) <= 1, found  # moto's stream has one shard
    return found[0] if found else None


def rewind(store: DynamoDBStore, rng: random.Random, read: list[str]) -> int:
    """Move the shard's checkpoint back 1-80 records (1 when moved): the next life reads
    again records that were applied, as after a kill between an apply and its checkpoint.
    ``read``: the stream's sequence numbers, in order."""
    lease = lease_of(store)
    if lease is None or lease.checkpoint is None or lease.checkpoint not in read:
        return 0
    at = read.index(lease.checkpoint)
    store.reset_lease(
        TABLE, lease.shard_id, read[max(0, at - rng.randrange(1, 80))], LeaseState.ACTIVE
    )
    return 1


# --- the test ----------------------------------------------------------------------------------
def test_counters_stay_exact_through_kill_9_and_live_rebuilds(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    dynamodb_url: str,
    redis_url: str,
) -> None:
    seed = int(os.environ.get("VIEWKEEPER_COUNTERS_SEED") or random.randrange(2**31))
    ops = int(os.environ.get("VIEWKEEPER_COUNTERS_OPS") or 1500)
    rerun = f"seed {seed} (rerun: VIEWKEEPER_COUNTERS_SEED={seed} VIEWKEEPER_COUNTERS_OPS={ops})"
    print(f"counters e2e: {rerun}")
    rng = random.Random(seed)  # the schedule and the daemon's settings
    started = time.monotonic()

    make_table(dynamodb, TABLE)
    config = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=[VIEWS],
        tables={TABLE: {"starting_position": "TRIM_HORIZON"}},
        worker={"poll_interval": 0.05, "lease_duration": 2.0, "batch_size": rng.choice((5, 25))},
    )
    coordination = yaml.safe_load(config.read_text())["coordination"]["table"]
    store = DynamoDBStore(dynamodb, coordination)
    log = tmp_path / "daemon.log"
    tool_log = tmp_path / "tools.log"
    daemon = Daemon("a", config, log)
    writer = Writer(dynamodb, random.Random(seed + 1))  # the operations, in a fixed order
    downs = random.Random(seed + 2)  # drawn at kills (their moment depends on the daemon)

    # The schedule, fixed by the seed: rebuilds started at about 25 % and 60 % of the run;
    # kills due at 5 random operations and a few operations after the first rebuild starts
    # (its handshake or its scan). A kill due is made once the daemon's current life has held
    # the lease (a new token) for 0.2-2.5 s, so that it hits work in progress; the daemon
    # stays down 0-1.5 s while the writer goes on.
    rebuild_at = {
        rng.randrange(ops // 5, ops * 3 // 10): ["order_stats", "order_adjust"],
        rng.randrange(ops // 2, ops * 13 // 20): ["--table", TABLE],
    }
    first_rebuild = min(rebuild_at)
    kill_at = Tally(rng.sample(range(ops // 10, ops * 9 // 10), 5))
    kill_at[first_rebuild + rng.randrange(1, 40)] += 1
    kills_due = 0
    token_killed: str | None = None  # the lease's token when the daemon was last killed
    held_since: float | None = None  # when the lease was first seen taken by this life
    hold = downs.uniform(0.2, 2.5)  # how long the next life works before its kill
    restart_at: float | None = None
    jobs: list[CliJob] = []
    rebuilds_done: list[str] = []
    kills = rewinds = kills_in_rebuild = 0

    def failure(what: str) -> str:
        return (
            f"{what}\n{rerun}\noperations: {dict(writer.done)}\nkills {kills} (rewinds "
            f"{rewinds}, during a rebuild {kills_in_rebuild}), daemon starts {daemon.starts}, "
            f"rebuilds: {rebuilds_done}\n"
            "--- daemon log (tail) ---\n"
            f"{daemon.tail(80)}\n--- tools ---\n"
            f"{tool_log.read_text()[-3000:] if tool_log.exists() else ''}"
        )

    def poll_jobs() -> None:
        for job in list(jobs):
            code = job.poll()
            if code is None:
                continue
            jobs.remove(job)
            out = job.output()
            last = out.strip().splitlines()[-1] if out.strip() else ""
            what = " ".join(job.args[1 : job.args.index("-c")])
            rebuilds_done.append(f"rebuild {what}: exit {code} in {job.seconds:.1f}s")
            assert code == 0, failure(f"rebuild {job.args} failed (exit {code}):\n{out[-3000:]}")
            print(f"rebuild {what} -> {last}")

    try:
        for _ in range(5):  # a few items before the daemon ever starts (TRIM_HORIZON)
            writer.step()
        daemon.start()
        i = 0
        while i < ops or jobs or kills_due:  # until the rebuilds have ended, the kills made
            if restart_at is not None and time.monotonic() >= restart_at:
                daemon.start()
                restart_at = None
            if daemon.check_exit() is not None:
                raise AssertionError(failure(f"the daemon exited on its own: {daemon}"))
            kills_due += kill_at[i]
            if kills_due and daemon.alive():
                lease = lease_of(store)
                if lease is None or not lease.owner or lease.token == token_killed:
                    held_since = None
                elif held_since is None:
                    held_since = time.monotonic()
                elif time.monotonic() - held_since >= hold:
                    daemon.kill()
                    kills += 1
                    kills_in_rebuild += bool(jobs)
                    kills_due -= 1
                    token_killed, held_since = lease.token, None
                    hold = downs.uniform(0.2, 2.5)
                    restart_at = time.monotonic() + downs.uniform(0.0, 1.5)
                    if downs.random() < 0.5:  # what a kill between apply and checkpoint leaves
                        rewinds += rewind(store, downs, stream_sequences(dynamodb_url))
            if i in rebuild_at:
                args = ["rebuild", *rebuild_at[i], "-c", str(config)]
                args += ["--segments", str(rng.choice((1, 3))), "--handshake-timeout", "60"]
                jobs.append(CliJob(args, out=tmp_path / f"rebuild-{i}.out", log=tool_log))
            poll_jobs()
            writer.step()
            i += 1
            assert time.monotonic() - started < 240, failure("the workload did not end in 240 s")
            time.sleep(downs.uniform(0.0, 0.01))
        writing = time.monotonic() - started
        poll_jobs()
        assert not jobs and len(rebuilds_done) == 2, failure("the rebuilds did not end")
        if restart_at is not None or not daemon.alive():
            daemon.start()
            restart_at = None

        # The drain: the daemon's checkpoint reaches the stream's last record.
        end = stream_sequences(dynamodb_url)[-1]
        deadline = time.monotonic() + 120
        while True:
            lease = lease_of(store)
            if lease is not None and lease.owner and lease.checkpoint == end:
                break
            if daemon.check_exit() is not None:
                raise AssertionError(failure(f"the daemon exited on its own: {daemon}"))
            assert time.monotonic() < deadline, failure(
                f"the daemon did not reach the stream's end {end} in 120 s: lease {lease}"
            )
            time.sleep(0.2)
        drained = time.monotonic() - started

        items = scan(dynamodb)
        want = oracle(items)
        got = redis_view_keys(redis_client)
        problems = diff(want, got)
        assert not problems, failure(
            f"{len(problems)} counter(s) differ from the sums of a full Scan "
            f"({len(items)} items, {len(want)} keys):\n" + "\n".join(problems)
        )
        wrong = owner_record_problems(items, redis_client)
        assert not wrong, failure(
            "the sums are right, but owner records are wrong:\n" + "\n".join(wrong[:40])
        )
        dead = vk("deadletters", "list", "-c", str(config), "--json")
        assert dead.returncode == 0, dead.stderr
        assert json.loads(dead.stdout) == [], failure(f"dead letters: {dead.stdout[:3000]}")
        code = daemon.terminate()
        assert code == 0, failure(f"the daemon's SIGTERM drain exited {code}")
        print(
            f"ok: {i} operations {dict(writer.done)}, {kills} kills ({rewinds} with a rewind, "
            f"{kills_in_rebuild} during a rebuild), "
            f"{daemon.starts} daemon starts, rebuilds {rebuilds_done}; writing {writing:.1f}s, "
            "drained at "
            f"{drained:.1f}s; {len(items)} items, {len(want)} counter keys compared"
        )
    finally:
        for job in jobs:
            job.kill()
        daemon.close()


def test_the_oracle_sums_what_the_views_yield() -> None:
    """The oracle itself, on two hand-made orders (amounts as DynamoDB's Decimals)."""
    a = {
        "pk": "o1",
        "status": "paid",
        "customer_id": "c1",
        "day": "d1",
        "total_cents": Decimal(-250),
        "adjust": Decimal(0),
        "lines": [{"p": "p1", "qty": Decimal(2)}, {"p": "p1", "qty": Decimal(-2)}],
    }
    b = {**a, "pk": "o2", "total_cents": Decimal(1000), "adjust": Decimal(10**17)}
    del b["lines"]
    want = oracle([a, b])
    assert want["orders:count:paid"] == "2"
    assert want["customer:c1:spent"] == "750"
    assert want["day:d1"] == {"revenue": "750"}
    assert want["customers:by_spend"] == {"c1": 750.0}
    assert want["adj:day:d1"] == str(10**17)
    assert want["adj:status:paid"] == {"c1": str(10**17)}
    assert want["adj:product:p1:sold"] == "0"  # yielded (twice, by one item): present, 0
    assert want["adj:day:d1:products"] == {"p1": 0.0}
    assert len(want) == 8
    assert contributions(a, counter_views.order_adjust) == {
        ("v", "adj:day:d1", ""): 0,
        ("h", "adj:status:paid", "c1"): 0,
        ("v", "adj:product:p1:sold", ""): 0,
        ("z", "adj:day:d1:products", "p1"): 0,
    }
    assert diff(want, {**want, "adj:day:d1": "1", "stray": "2"}) == [
        f"  adj:day:d1: want {str(10**17)!r}, redis has '1'",
        "  stray: want <absent>, redis has '2'",
    ]
