"""Maintenance on a cluster: sweep, purge and wipe over every master, and records read back.

Owns the ``Sink`` protocol's sweep (README.md, "Rebuild"), purge_tombstones and wipe, the
readers checkers and tests use (iter_owner_records, owned_entries, iter_claims), and
prepare, apply, append, ping and close. Owner records and claims are read bucket by bucket
and slot by slot with pipelines (redis-py sends each node its share at once); every write
goes through the steps of apply.py or the script's K step, each re-checking what it read.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from viewkeeper.projection.api import View
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Outcome, Result, SinkError, SinkUnavailable
from viewkeeper.sinks.redis.packing import (
    Ident,
    OwnerRecord,
    _b,
    _len_at,
    _parse_record,
    _text,
    pack_version,
)
from viewkeeper.sinks.redis_cluster.apply import _Apply, _Work
from viewkeeper.sinks.redis_cluster.connection import SLOTS, log

_TOP = Version(2**63, "0")  # above any version a deployment writes: the wipe's retractions


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """One field of a slot's bookkeeping hash (README.md, "Key layout"): an entry's claim, a
    counter's claim, an item's contribution to a counter, or an owner's retraction mark."""

    field: bytes
    identity: bytes
    view_id: bytes
    item_key: str  # "" for a counter's claim
    kind: str  # "claim", "counter", "contribution" or "mark"
    generation: int  # of the version (0 for a counter's claim)
    deleted_at: int | None  # a mark: when it was raised
    raw: bytes = b""  # the field's value

    @property
    def live(self) -> bool:
        """Something an item owns now (an entry, or its part of a counter)."""
        return self.kind in ("claim", "contribution")


def _parse_claim(field: bytes, raw: bytes) -> ClaimRecord:
    if field[:1] not in (b"-", b"&") and raw[:1] == b"#":  # '#' view id '#' contributors
        return ClaimRecord(field, field, raw[1:].split(b"#")[0], "", "counter", 0, None, raw)
    if field[:1] in (b"-", b"&"):
        n, p = _len_at(field, 1)
        owner, identity = field[p : p + n], field[p + n :]
        q = 0
        kind = "mark" if field[:1] == b"-" else "contribution"
    else:
        n, p = _len_at(raw, 1)
        owner, identity = raw[p : p + n], field
        q = p + n
        kind = "claim"
    lg = raw[q]
    gen = int.from_bytes(raw[q + 1 : q + 1 + lg])
    end = q + 2 + lg + raw[q + 1 + lg]
    vid, _, item = owner.partition(b":")
    at = int(raw[end:]) if kind == "mark" else None
    return ClaimRecord(field, identity, vid, _text(item), kind, gen, at, raw)


def _place_of(identity: bytes) -> tuple[str, bytes, bytes]:
    """(type, key, field or member) of an entry identity (README.md of the Redis sink,
    "Encodings")."""
    t = chr(identity[0])
    if t == "V":
        return t, identity[1:], b""
    n, p = _len_at(identity, 1)
    return t, identity[p : p + n], identity[p + n :]


class _Maintenance(_Apply):
    """What runs beside the stream, and the ``Sink`` protocol's plain methods."""

    # -- the Sink protocol -----------------------------------------------------------------
    def prepare(self, views: Sequence[View]) -> None:
        """Load the script, check the bucket count, register the views' ids."""
        self._ensure_ready()
        for view in views:
            self._view_id(view.name)

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        """One Result per change, in order; raises SinkUnavailable after ``retry_seconds``."""
        self._local.seen = {}  # what a failed call left: not ours
        try:
            out: list[Result] = []
            for i in range(0, len(changes), self.batch_size):
                out += self._apply(changes[i : i + self.batch_size], self._clock())
            self._commit_seen()
            return out
        except SinkUnavailable:
            self._ready = False
            raise

    def begin_rebuild(self, view: View, floor: int) -> None:
        """Nothing to begin: no view on a cluster holds sums over items (counters)."""

    def ping(self) -> None:
        self._with_retry(self._client.ping)
        self._refuse_standalone()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._owns_client:
            self._client.close()

    # -- rebuild, purge, wipe --------------------------------------------------------------
    def sweep(self, view: View, generation: int, now: float, keep: Collection[str] = ()) -> int:
        """Retract what items of older generations own (their records, through apply's
        steps), then every claim of the view still live below ``generation`` that no record
        lists (an item whose record a node lost, a change that died between its steps):
        each at ``(generation, 0)``, re-checked in its slot. Items in ``keep`` are left."""
        changes = [
            Change(view, rec.item_key, Version(generation, "0"), [])
            for rec in self.iter_owner_records(view)
            if rec.version.generation < generation and rec.entries and rec.item_key not in keep
        ]
        retracted = self._retract_all(f"view {view.name}: the sweep", changes, now)
        floor = generation
        left = [
            c
            for c in self.iter_claims(view)
            if c.live and c.generation < floor and c.item_key not in keep
        ]
        self._retract_claims(view, left, Version(generation, "0"), now)
        self._settle_counters(view)
        return retracted + len(left)

    def _settle_counters(self, view: View) -> None:
        """Set each of the view's counters to the sum its claim keeps of its contributions
        (step S, each counter atomically): a counter changed or deleted outside viewkeeper is
        repaired, as on standalone. Logged: how many."""
        per_slot: dict[int, list[ClaimRecord]] = {}
        for c in self.iter_claims(view):
            if c.kind == "counter":
                per_slot.setdefault(self._slot(_place_of(c.identity)[1]), []).append(c)
        mine = b"#" + self._view_id(view.name) + b"#"
        calls: list[tuple[list[bytes], list[bytes]]] = []
        for slot, claims in per_slot.items():
            for first in range(0, len(claims), 200):
                keys = [self._claims_key(slot)]
                args = [b"%d" % len(claims[first : first + 200])]
                for claim in claims[first : first + 200]:
                    t, key, sub = _place_of(claim.identity)
                    keys.append(key)
                    args += [t.lower().encode(), b"%d" % len(keys), sub, mine]
                calls.append((keys, [b"S", b"0", b"0", *args]))
        codes = b"".join(r[0] for r in self._run(calls) if not isinstance(r, BaseException))
        if codes.count(b"1") or codes.count(b"s"):
            log.warning(
                "redis sink %s (%s): view %s: %d counter(s) set to the sum of their "
                "contributions (changed outside viewkeeper), %d left alone (their place holds "
                "another type)",
                self.name,
                self.where,
                view.name,
                codes.count(b"1"),
                codes.count(b"s"),
            )

    def purge_tombstones(self, view: View | str, older_than: float | None = None) -> int:
        """Forget owner tombstones and entries' retraction marks written before
        ``older_than`` (default: now - retention), each re-checked where it is; returns how
        many owner tombstones."""
        cutoff = int(self._clock() - self.tombstone_retention if older_than is None else older_than)
        name = view if isinstance(view, str) else view.name
        purge = self._client.register_script(_load_purge())
        purged = 0
        per_key: dict[bytes, list[bytes]] = {}
        for rec in self.iter_owner_records(name):
            if rec.deleted_at is not None and rec.deleted_at < cutoff:
                item = _b(rec.item_key)
                per_key.setdefault(self._owner_keys(name, self._bucket(item))[1], []).append(item)
        for key, items in per_key.items():
            purged += self._with_retry(
                lambda k=key, i=items: int(purge(keys=[k], args=[cutoff, *i]))  # type: ignore[misc]
            )
        per_slot: dict[int, list[bytes]] = {}
        for c in self.iter_claims(name):
            if c.deleted_at is not None and c.deleted_at < cutoff:
                per_slot.setdefault(self._slot(_place_of(c.identity)[1]), []).append(c.field)
        calls = [
            ([self._claims_key(slot)], [b"K", b"0", b"0", b"%d" % cutoff, *ids])
            for slot, ids in per_slot.items()
        ]
        forgotten = sum(
            r[0].count(b"1") for r in self._run(calls) if not isinstance(r, BaseException)
        )
        log.debug(
            "redis sink %s: view %s: %d entry tombstones forgotten", self.name, name, forgotten
        )
        return purged

    def wipe(self, view: View) -> int:
        """Retract every entry the view owns (at a version above any a deployment writes),
        then delete its owner records, pending lists, claims and markers."""
        changes = [
            Change(view, r.item_key, _TOP, []) for r in self.iter_owner_records(view) if r.entries
        ]
        retracted = self._retract_all(f"view {view.name}: the wipe", changes, self._clock())
        left = [c for c in self.iter_claims(view) if c.live]
        self._retract_claims(view, left, _TOP, self._clock())
        retracted += len(left)
        keys = [k for b in range(self.owner_buckets) for k in self._owner_keys(view, b)[1:]]
        for i in range(0, len(keys), 1000):
            part = keys[i : i + 1000]

            def delete(part: list[bytes] = part) -> None:
                pipe = self._client.pipeline(transaction=False)
                for k in part:
                    pipe.delete(k)
                pipe.execute()

            self._with_retry(delete)
        vid = self._view_id(view.name)
        marks = [b"#" + vid, b"#" + vid + b"n"]
        per_slot: dict[int, list[bytes]] = {}
        for c in self.iter_claims(view):
            per_slot.setdefault(self._slot(_place_of(c.identity)[1]), []).append(c.field)
        for first in range(0, SLOTS, 2048):

            def forget(first: int = first) -> None:
                pipe = self._client.pipeline(transaction=False)
                for slot in range(first, min(first + 2048, SLOTS)):
                    pipe.hdel(self._claims_key(slot), *marks, *per_slot.get(slot, []))
                pipe.execute()

            self._with_retry(forget)
        return retracted

    def _retract_all(self, what: str, changes: list[Change], now: float) -> int:
        done = 0
        failed: list[str] = []
        for i in range(0, len(changes), self.batch_size):
            part = changes[i : i + self.batch_size]
            for c, r in zip(part, self._apply(part, now), strict=True):
                if r.outcome is Outcome.ERROR:
                    failed.append(f"{c.item_key}: {r.error}")
                elif r.outcome is Outcome.APPLIED:
                    done += 1
        if failed:
            raise SinkError(
                f"redis sink {self.name!r}: {what}: {len(failed)} retraction(s) refused, "
                f"first: {failed[0]}"
            )
        return done

    def _retract_claims(
        self, view: View, claims: list[ClaimRecord], at: Version, now: float
    ) -> None:
        """Retract entries by their claims alone (no record lists them), each only if its
        claim is still that item's below ``at``."""
        if not claims:
            return
        log.warning(
            "redis sink %s (%s): view %s: %d entr(ies) claimed below generation %d that no "
            "owner record lists (a node lost records, or a change died between its steps): "
            "retracting them",
            self.name,
            self.where,
            view.name,
            len(claims),
            at.generation,
        )
        works = []
        packed = pack_version(at)
        for i, c in enumerate(claims):
            t, key, sub = _place_of(c.identity)
            if c.kind == "contribution":
                t = t.lower()  # the counter's entry type
            change = Change(view, c.item_key, at, [])
            w = _Work(
                i, change, c.view_id + b":" + _b(c.item_key), packed, b"", {}, (b"", b"", b""), 0
            )
            w.ops = [(b"r", w.owner, t, key, sub, b"", b"", packed)]
            works.append(w)
        self._step_e(works, b"%d" % int(now))
        refused = [f"{w.change.item_key}: {w.error}" for w in works if w.then == "X"]
        if refused:
            raise SinkError(
                f"redis sink {self.name!r}: view {view.name}: {len(refused)} retraction(s) of "
                f"entries no record lists were refused, first: {refused[0]}"
            )

    # -- readers (checkers, tests) -----------------------------------------------------------
    def owned_entries(self, view: View | str, item_key: str) -> list[Ident] | None:
        """The identities the item owns (``[]`` for a tombstone), or None without a record."""
        item = _b(item_key)
        key = self._owner_keys(view, self._bucket(item))[1]
        raw = self._with_retry(lambda: self._client.hget(key, item))
        return None if raw is None else list(_parse_record(item, raw).entries)

    def iter_owner_records(self, view: View | str) -> Iterator[OwnerRecord]:
        """Every owner record of the view (tombstones included), bucket by bucket."""
        for first in range(0, self.owner_buckets, 512):
            keys = [
                self._owner_keys(view, b)[1]
                for b in range(first, min(first + 512, self.owner_buckets))
            ]
            for _, fields in self._hash_all(keys):
                for item, raw in fields.items():
                    yield _parse_record(item, raw)

    def iter_claims(self, view: View | str | None = None) -> Iterator[ClaimRecord]:
        """Every entry claim (of ``view``, or all), slot by slot (the slots' bookkeeping hashes
        listed by a SCAN of every master)."""
        vid = None if view is None else self._view_id(view if isinstance(view, str) else view.name)
        pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", self._prefix) + b"{*}:c"

        def listed() -> list[bytes]:  # SCAN filters on the server: one pass per master
            return sorted(set(self._client.scan_iter(match=pattern, count=10000, _type="hash")))

        keys = self._with_retry(listed)
        for first in range(0, len(keys), 2048):
            for _, fields in self._hash_all(keys[first : first + 2048]):
                for ident, raw in fields.items():
                    if ident[:1] == b"#":
                        continue  # a view's marker or write counter
                    c = _parse_claim(ident, raw)
                    if vid is None or c.view_id == vid:
                        yield c

    def pending_count(self, view: View | str) -> int:
        """How many items have pending entries (a change between its steps, or one that
        died there and was not sent again yet): for checkers and tests."""
        keys = [self._owner_keys(view, b)[2] for b in range(self.owner_buckets)]
        return sum(len(f) for _, f in self._hash_all(keys))

    def _hash_all(self, keys: list[bytes]) -> list[tuple[bytes, dict[bytes, bytes]]]:
        def scan() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hscan(key, 0, count=1000)
            return list(pipe.execute())

        out = []
        for key, (cursor, fields) in zip(keys, self._with_retry(scan), strict=True):
            if cursor:  # past listpack size: scan it to the end
                fields = self._with_retry(partial(self._hscan_all, key))
            out.append((key, fields))
        return out

    def _hscan_all(self, key: bytes) -> dict[bytes, bytes]:
        return dict(self._client.hscan_iter(key, count=1000))


def _load_purge() -> bytes:
    from importlib import resources

    return resources.files("viewkeeper.sinks.redis").joinpath("redis_purge.lua").read_bytes()
