"""The chaos workload: a seeded writer on a small key space, through boto3 on moto.

Items of the chaos table (hash key ``pk`` S, range key ``sk`` N) have ``status``, ``owner``,
``n`` (an int, sometimes a decimal) and sometimes ``tags`` (a string set). The writer is the
table's only writer, so it keeps an exact model of which keys exist and what they hold, and
picks among:

- ``create`` (put_item) and ``upsert`` (update_item on a missing key: moto emits two INSERTs)
- ``replace`` (put_item over a live item: everything may move at once)
- ``status`` (moves the SetMember, retracts/restores the OpenSearch document at "hidden",
  drops/restores the sorted-set member at "shipped"), ``owner`` (moves the SortedSetMember
  and the HashField to another key), ``n`` (the score), ``tags`` (ADD/REMOVE of a set), and
  ``multi`` (several at once)
- ``touch`` (a put_item that changes nothing: moto still emits a MODIFY)
- ``delete`` (and later re-creates of the same key: tombstones must not block them)

The sequence of operations is fixed by the seed; how it interleaves with the faults is not
(threads, process start-up times), which is why a failure report carries the daemon logs.
Bursts (many operations on a few keys with no pause) put several records of one item in one
GetRecords page.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from decimal import Decimal
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

__all__ = ["OWNERS", "STATUSES", "Writer", "make_keys"]

STATUSES = ("new", "paid", "shipped", "hidden")
OWNERS = ("ana", "bo", "cy", "dee", "eli")
TAGS = ("red", "green", "blue", "fragile")

Key = tuple[str, int]
_NAMES = {"#s": "status", "#o": "owner", "#n": "n", "#t": "tags"}  # status, owner: reserved


def make_keys(n: int) -> list[Key]:
    """``n`` item keys: pk ``k0``..., each with range keys 0..2."""
    return [(f"k{i // 3}", i % 3) for i in range(n)]


def _key_attrs(key: Key) -> dict[str, Any]:
    return {"pk": {"S": key[0]}, "sk": {"N": str(key[1])}}


class Writer:
    """Writes until stopped; ``ops`` counts what it did by kind."""

    def __init__(
        self,
        db: Any,
        table: str,
        keys: list[Key],
        rng: random.Random,
        *,
        pause: float = 0.015,
        burst_chance: float = 0.03,
    ) -> None:
        self.db = db
        self.table = table
        self.keys = keys
        self.rng = rng
        self.pause = pause
        self.burst_chance = burst_chance
        self.live: dict[Key, dict[str, Any]] = {}
        self.ops: Counter[str] = Counter()
        self.errors: list[str] = []
        self.bursts = 0
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    # --- values -------------------------------------------------------------------------------
    def _n(self) -> dict[str, str]:
        if self.rng.random() < 0.15:
            return {"N": str(Decimal(self.rng.randrange(-400, 4000)) / 4)}
        return {"N": str(self.rng.randrange(-100, 1000))}

    def _item(self, key: Key) -> dict[str, Any]:
        item: dict[str, Any] = {
            **_key_attrs(key),
            "status": {"S": self.rng.choice(STATUSES)},
            "owner": {"S": self.rng.choice(OWNERS)},
            "n": self._n(),
        }
        if self.rng.random() < 0.4:
            item["tags"] = {"SS": self.rng.sample(TAGS, self.rng.randint(1, 3))}
        return item

    # --- one operation ------------------------------------------------------------------------
    def step(self, key: Key | None = None) -> str:
        key = key if key is not None else self.rng.choice(self.keys)
        cur = self.live.get(key)
        if cur is None:
            kind = "upsert" if self.rng.random() < 0.25 else "create"
            if self.rng.random() < 0.03:
                kind = "delete-missing"
        else:
            kind = self.rng.choices(
                ("replace", "status", "owner", "n", "tags", "multi", "touch", "delete"),
                (10, 22, 16, 12, 8, 10, 4, 18),
            )[0]
        try:
            self._do(kind, key, cur)
        except (ClientError, BotoCoreError) as exc:
            self.errors.append(f"{kind} {key}: {exc}")
            self._resync(key)
        self.ops[kind] += 1
        return kind

    def _update(self, key: Key, expr: str, values: dict[str, Any] | None = None) -> None:
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "Key": _key_attrs(key),
            "UpdateExpression": expr,
            "ReturnValues": "ALL_NEW",
        }
        if values:
            kwargs["ExpressionAttributeValues"] = values
        names = {k: v for k, v in _NAMES.items() if k in expr}
        if names:
            kwargs["ExpressionAttributeNames"] = names
        self.live[key] = self.db.update_item(**kwargs)["Attributes"]

    def _do(self, kind: str, key: Key, cur: dict[str, Any] | None) -> None:
        db, table, rng = self.db, self.table, self.rng
        if kind in ("create", "replace"):
            item = self._item(key)
            db.put_item(TableName=table, Item=item)
            self.live[key] = item
        elif kind == "upsert":
            item = self._item(key)
            values = {":s": item["status"], ":o": item["owner"], ":n": item["n"]}
            self._update(key, "SET #s = :s, #o = :o, #n = :n", values)
        elif kind == "touch":
            assert cur is not None
            db.put_item(TableName=table, Item=cur)
        elif kind == "delete":
            db.delete_item(TableName=table, Key=_key_attrs(key))
            self.live.pop(key, None)
        elif kind == "delete-missing":
            db.delete_item(TableName=table, Key=_key_attrs(key))
        elif kind == "status":
            self._update(key, "SET #s = :s", {":s": {"S": rng.choice(STATUSES)}})
        elif kind == "owner":
            self._update(key, "SET #o = :o", {":o": {"S": rng.choice(OWNERS)}})
        elif kind == "n":
            self._update(key, "SET #n = :n", {":n": self._n()})
        elif kind == "tags":
            if cur is not None and "tags" in cur and rng.random() < 0.4:
                self._update(key, "REMOVE #t")
            else:
                self._update(key, "ADD #t :t", {":t": {"SS": [rng.choice(TAGS)]}})
        elif kind == "multi":
            values = {
                ":s": {"S": rng.choice(STATUSES)},
                ":o": {"S": rng.choice(OWNERS)},
                ":n": self._n(),
            }
            self._update(key, "SET #s = :s, #o = :o, #n = :n", values)
        else:
            raise AssertionError(kind)

    def _resync(self, key: Key) -> None:
        """After a failed call the write may or may not have happened: read it back."""
        try:
            got = self.db.get_item(TableName=self.table, Key=_key_attrs(key), ConsistentRead=True)
        except (ClientError, BotoCoreError):
            return
        if "Item" in got:
            self.live[key] = got["Item"]
        else:
            self.live.pop(key, None)

    # --- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.is_set():
            if self.rng.random() < self.burst_chance:
                hot = self.rng.sample(self.keys, 2)
                for _ in range(self.rng.randint(5, 20)):
                    self.step(self.rng.choice(hot))
                self.bursts += 1
                continue
            self.step()
            if self.pause:
                self.stop.wait(self.rng.uniform(0, 2 * self.pause))

    def start(self) -> None:
        self.stop.clear()
        self._thread = threading.Thread(target=self.run, name="chaos-writer", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def write(self, count: int) -> None:
        """``count`` operations in the calling thread (the focused scenarios)."""
        for _ in range(count):
            self.step()
