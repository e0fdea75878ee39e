"""I1, checked: the sinks against the projection of a full table scan.

The expected state is computed here from the view functions and the scanned items, with
this module's own reading of the entry types (not viewkeeper's sink code):

- Redis: every key outside the bookkeeping prefix (``vk:``), by type: a string's value, a
  hash's fields and values, a set's members, a sorted set's members and scores. Values that
  are not str/bytes are compared as JSON (``{"n": 12.5}`` equals ``{"n":12.50}``).
- OpenSearch: every document readers see through the alias (``live_documents``), by id
  (the item key ``pk|sk`` unless the view has ``doc_id=``), body compared as JSON.

Each difference is one entry: **missing** (expected, absent), **stale** (present with another
value or score, or a key of the wrong type), **orphaned** (present, not expected). A fourth
count looks under the hood: viewkeeper's Redis owner records must list exactly the entries
each live item owns (a wrong owner record is an orphan or a stale entry waiting to happen).
On a Redis Cluster (the cluster sink, ``redis_sink=``) a fifth: the live entry claims of the
sink's slots must be exactly the entries the projection yields, each claimed by its item (a
live claim no item yields is an entry a later sweep or change would not retract).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from opensearchpy import NotFoundError

from viewkeeper import HashField, SetMember, SortedSetMember, Value
from viewkeeper.projection.api import View
from viewkeeper.projection.registry import ViewRegistry
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.stream.values import decode_image

__all__ = [
    "CheckReport",
    "Counts",
    "check_sinks",
    "compare_claims",
    "compare_docs",
    "compare_redis",
    "expected_docs",
    "expected_redis",
    "read_redis",
    "scan_items",
]

# key -> (redis type, content): string -> the value; hash -> {field: value};
# set -> {member: None}; zset -> {member: score}
RedisState = dict[str, tuple[str, Any]]


@dataclass
class Counts:
    missing: int = 0
    stale: int = 0
    orphaned: int = 0
    compared: int = 0
    examples: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # the keys / document ids of the examples

    def add(self, kind: str, what: str, where: str = "") -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {what}")
            self.where.append(where)

    @property
    def total(self) -> int:
        return self.missing + self.stale + self.orphaned

    def line(self) -> str:
        return (
            f"missing {self.missing}, stale {self.stale}, orphaned {self.orphaned} "
            f"(of {self.compared})"
        )


@dataclass
class CheckReport:
    items: int
    redis: Counts
    opensearch: Counts
    owner_records: Counts
    claims: Counts | None = None  # the cluster sink's live entry claims (compare_claims)

    @property
    def ok(self) -> bool:
        claims = self.claims.total if self.claims is not None else 0
        return not (self.redis.total or self.opensearch.total or self.owner_records.total or claims)

    def summary(self) -> str:
        lines = [
            f"table items: {self.items}",
            f"redis entries:       {self.redis.line()}",
            f"opensearch docs:     {self.opensearch.line()}",
            f"redis owner records: {self.owner_records.line()}",
        ]
        parts = [
            ("redis", self.redis),
            ("opensearch", self.opensearch),
            ("owner records", self.owner_records),
        ]
        if self.claims is not None:
            lines.append(f"redis entry claims:  {self.claims.line()}")
            parts.append(("claims", self.claims))
        for name, counts in parts:
            lines += [f"  {name} {e}" for e in counts.examples]
        return "\n".join(lines)


# --- the table ------------------------------------------------------------------------------
def scan_items(db: Any, table: str) -> list[dict[str, Any]]:
    """Every item of ``table`` as plain Python values (a consistent scan)."""
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = db.scan(**kwargs)
        items += [decode_image(i) for i in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _key_part(value: Any) -> str:
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("|", "\\|")
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"the checker only knows str and number keys, not {value!r}")


def item_key(item: Mapping[str, Any], key_names: Sequence[str]) -> str:
    """The documented item key: key values in schema order joined by ``|``."""
    return "|".join(_key_part(item[k]) for k in key_names)


# --- normal forms -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A value as JSON reads it back (Decimal -> number, set -> sorted list)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, Decimal):
            return float(obj)
        if isinstance(obj, set | frozenset):
            return sorted(obj)
        if isinstance(obj, bytes):
            return base64.b64encode(obj).decode()
        raise TypeError(repr(obj))

    return json.loads(json.dumps(value, default=default))


def _text(member: Any) -> str:
    if isinstance(member, str):
        return member
    if isinstance(member, bool):
        return "true" if member else "false"
    if isinstance(member, bytes):
        return member.decode("utf-8", "surrogateescape")
    return str(member)


def _same_value(expected: Any, actual: bytes) -> bool:
    if isinstance(expected, bytes):
        return actual == expected
    if isinstance(expected, str):
        return actual == expected.encode()
    try:
        return bool(json.loads(actual) == _plain(expected))
    except ValueError:
        return False


def _entries(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, Value | HashField | SetMember | SortedSetMember):
        return [result]
    return list(result)


# --- Redis ----------------------------------------------------------------------------------
def expected_redis(items: Iterable[Mapping[str, Any]], views: Iterable[View]) -> RedisState:
    want: RedisState = {}
    for item in items:
        for view in views:
            for e in _entries(view.func(dict(item))):
                if isinstance(e, Value):
                    want[e.key] = ("string", e.value)
                elif isinstance(e, HashField):
                    want.setdefault(e.key, ("hash", {}))[1][e.field] = e.value
                elif isinstance(e, SetMember):
                    want.setdefault(e.key, ("set", {}))[1][_text(e.member)] = None
                elif isinstance(e, SortedSetMember):
                    want.setdefault(e.key, ("zset", {}))[1][_text(e.member)] = float(e.score)
                else:
                    raise TypeError(f"view {view.name} yielded {e!r}")
    return want


def read_redis(client: Any, prefix: str = "vk:") -> RedisState:
    """Every key outside ``prefix`` with its content (``client`` returns bytes)."""
    got: RedisState = {}
    for raw in client.scan_iter(count=1000):
        key = raw.decode("utf-8", "surrogateescape")
        if key.startswith(prefix):
            continue
        kind = client.type(raw).decode()
        if kind == "string":
            got[key] = (kind, client.get(raw))
        elif kind == "hash":
            got[key] = (kind, {_text(f): v for f, v in client.hgetall(raw).items()})
        elif kind == "set":
            got[key] = (kind, {_text(m): None for m in client.smembers(raw)})
        elif kind == "zset":
            got[key] = (kind, {_text(m): s for m, s in client.zrange(raw, 0, -1, withscores=True)})
        elif kind != "none":
            got[key] = (kind, None)
    return got


def compare_redis(want: RedisState, got: RedisState) -> Counts:
    c = Counts()
    for key in sorted(want.keys() | got.keys()):
        wtype: str | None
        gtype: str | None
        wval: Any
        gval: Any
        wtype, wval = want.get(key, (None, None))
        gtype, gval = got.get(key, (None, None))
        if wtype == "string" or (wtype is None and gtype == "string"):
            c.compared += 1
            if gtype is None:
                c.add("missing", f"{key} = {wval!r}")
            elif wtype is None:
                c.add("orphaned", f"{key} = {gval!r}")
            elif gtype != "string" or not _same_value(wval, gval):
                c.add("stale", f"{key}: want {wval!r}, got {gtype} {gval!r}")
            continue
        if wtype is None and gtype not in ("hash", "set", "zset"):
            c.compared += 1
            c.add("orphaned", f"{key}: a {gtype}")
            continue
        wmembers: dict[str, Any] = wval or {}
        gmembers: dict[str, Any] = gval or {}
        if wtype is not None and gtype is not None and gtype != wtype:
            for m in wmembers:
                c.add("stale", f"{key} {m}: want a {wtype}, the key is a {gtype}")
            c.compared += len(wmembers)
            continue
        for m in sorted(wmembers.keys() | gmembers.keys()):
            c.compared += 1
            where = f"{key} [{m}]"
            if m not in gmembers:
                c.add("missing", f"{where} = {wmembers[m]!r}")
            elif m not in wmembers:
                c.add("orphaned", f"{where} = {gmembers[m]!r}")
            elif wtype == "hash" and not _same_value(wmembers[m], gmembers[m]):
                c.add("stale", f"{where}: want {wmembers[m]!r}, got {gmembers[m]!r}")
            elif wtype == "zset" and float(gmembers[m]) != wmembers[m]:
                c.add("stale", f"{where}: want score {wmembers[m]!r}, got {gmembers[m]!r}")
    return c


def _idents(item: Mapping[str, Any], view: View) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for e in _entries(view.func(dict(item))):
        if isinstance(e, Value):
            out.add(("V", e.key, ""))
        elif isinstance(e, HashField):
            out.add(("H", e.key, e.field))
        elif isinstance(e, SetMember):
            out.add(("S", e.key, _text(e.member)))
        else:
            out.add(("Z", e.key, _text(e.member)))
    return out


def compare_owner_records(
    items: Sequence[Mapping[str, Any]], views: Iterable[View], sink: Any,
    key_names: Sequence[str],
) -> Counts:  # fmt: skip
    """viewkeeper's bookkeeping: each live item's owner record lists exactly its entries;
    items that are gone own nothing (a tombstone, or no record)."""
    c = Counts()
    by_key = {item_key(i, key_names): i for i in items}
    for view in views:
        seen: set[str] = set()
        for rec in sink.iter_owner_records(view):
            seen.add(rec.item_key)
            has = set(rec.entries)
            item = by_key.get(rec.item_key)
            c.compared += 1
            if item is None:
                if has:
                    c.add("orphaned", f"{view.name} {rec.item_key!r} (gone) owns {sorted(has)}")
                continue
            want = _idents(item, view)
            if has != want:
                c.add(
                    "stale",
                    f"{view.name} {rec.item_key!r} records {sorted(has)}, owns {sorted(want)}",
                )
        for key in by_key.keys() - seen:
            c.compared += 1
            c.add("missing", f"{view.name} {key!r} has no owner record")
    return c


def _claimed_ident(identity: bytes) -> tuple[str, str, str]:
    """An entry identity as the Redis sinks store it (their README, "Encodings": ``V key`` |
    ``H L(key) key field`` | ``S L(key) key member`` | ``Z L(key) key member``, ``L(n)`` one
    byte below 253, else 0xfd and 4 bytes) as (type, key, field or member)."""
    kind = chr(identity[0])
    if kind == "V":
        return kind, _text(identity[1:]), ""
    n, p = identity[1], 2
    if n >= 253:
        n, p = int.from_bytes(identity[2:6], "big"), 6
    return kind, _text(identity[p : p + n]), _text(identity[p + n :])


def compare_claims(
    items: Sequence[Mapping[str, Any]], views: Iterable[View], sink: Any,
    key_names: Sequence[str], redis_client: Any, prefix: str = "vk:",
) -> Counts:  # fmt: skip
    """The cluster sink's bookkeeping in the entries' slots (``sink.iter_claims()``, read
    once: it reads every slot): the live claims of each view are exactly the entries its items
    yield, each claimed by its own item. A live claim no item yields is **orphaned** (whatever
    its entry holds: nothing will retract it), an entry without a live claim **missing**, one
    claimed by another item **stale**. Claims name their view by its short id, which the
    registry hash ``vk:views`` maps back (``#<id>`` -> name: the Redis sink's README)."""
    registry = redis_client.hgetall(f"{prefix}views".encode())
    names = {k[1:]: _text(v) for k, v in registry.items() if k.startswith(b"#") and k != b"#"}
    got: dict[str, dict[tuple[str, str, str], str]] = {}
    for cl in sink.iter_claims():
        if cl.live:
            name = names.get(cl.view_id, f"#{_text(cl.view_id)}")
            got.setdefault(name, {})[_claimed_ident(cl.identity)] = cl.item_key
    c = Counts()
    views = list(views)
    for view in views:
        want = {ident: item_key(item, key_names) for item in items for ident in _idents(item, view)}
        has = got.get(view.name, {})
        for ident in sorted(want.keys() | has.keys()):
            c.compared += 1
            where = f"{view.name} {ident}"
            if ident not in has:
                c.add("missing", f"{where}: no live claim (item {want[ident]!r} yields it)")
            elif ident not in want:
                c.add("orphaned", f"{where}: claimed live by {has[ident]!r}, yielded by none")
            elif has[ident] != want[ident]:
                c.add("stale", f"{where}: claimed by {has[ident]!r}, yielded by {want[ident]!r}")
    known = {v.name for v in views}
    for name in sorted(got.keys() - known):  # other views of the registry are not checked
        if name.startswith("#"):  # an id the registry does not name: whose are they?
            c.compared += len(got[name])
            c.add("orphaned", f"{len(got[name])} live claims of an unknown view id {name}")
    return c


# --- OpenSearch ---------------------------------------------------------------------------------
def expected_docs(
    items: Iterable[Mapping[str, Any]], view: View, key_names: Sequence[str]
) -> dict[str, Any]:
    want: dict[str, Any] = {}
    for item in items:
        body = view.func(dict(item))
        if body is None:
            continue
        doc_id = item_key(item, key_names) if view.doc_id is None else view.doc_id(dict(item))
        want[doc_id] = _plain(body)
    return want


def compare_docs(want: Mapping[str, Any], got: Mapping[str, Any], index: str = "") -> Counts:
    c = Counts()
    for doc_id in sorted(want.keys() | got.keys()):
        c.compared += 1
        where = f"{index}/{doc_id}"
        if doc_id not in got:
            c.add("missing", f"{where} = {want[doc_id]!r}", where)
        elif doc_id not in want:
            c.add("orphaned", f"{where} = {got[doc_id]!r}", where)
        elif _plain(got[doc_id]) != want[doc_id]:
            c.add("stale", f"{where}: want {want[doc_id]!r}, got {got[doc_id]!r}", where)
    return c


# --- everything -------------------------------------------------------------------------------
def check_sinks(
    *,
    db: Any,
    table: str,
    key_names: Sequence[str],
    registry: ViewRegistry,
    redis_client: Any,
    opensearch: OpenSearchSink,
    redis_sink: Any = None,
) -> CheckReport:
    """Scan the table, project it, and compare every sink of every view of ``table``.
    ``redis_sink``: the sink whose bookkeeping is read (default: a standalone RedisSink on
    ``redis_client``); a cluster sink (it has ``iter_claims``) adds the claims' count."""
    items = scan_items(db, table)
    views = registry.by_table(table)
    redis_views = [v for v in views if v.kind == "redis"]
    redis_counts = compare_redis(expected_redis(items, redis_views), read_redis(redis_client))
    os_counts = Counts()
    for view in (v for v in views if v.kind == "opensearch"):
        try:
            got = opensearch.live_documents(view)
        except NotFoundError:  # no alias (yet): readers find nothing, so neither do we
            got = {}
        part = compare_docs(expected_docs(items, view, key_names), got, view.index or "")
        for name in ("missing", "stale", "orphaned", "compared"):
            setattr(os_counts, name, getattr(os_counts, name) + getattr(part, name))
        os_counts.examples += part.examples
        os_counts.where += part.where
    sink = redis_sink if redis_sink is not None else RedisSink("cache", redis_client)
    owners = compare_owner_records(items, redis_views, sink, key_names)
    claims = None
    if hasattr(sink, "iter_claims"):
        claims = compare_claims(items, redis_views, sink, key_names, redis_client)
    return CheckReport(len(items), redis_counts, os_counts, owners, claims)
