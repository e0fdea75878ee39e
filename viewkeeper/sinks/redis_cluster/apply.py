"""``apply`` on a cluster: each change in steps of one slot each (README.md, "The protocol").

Step O reads the item's owner record (its slot) and notes there the entries the change may
write that the record does not list; step E writes and retracts entries in their own slots,
versioned at each entry; step F writes the owner record only if it is still what step O read.
A stale change, or one that lost to a newer one, retracts what it may have written (E, then
P forgets what it noted). Every step is idempotent, so a crash or a lost reply anywhere is
repaired by sending the same records again: the checkpoint moves only once every step of
every change was acknowledged. All changes of a batch go through each step together, one
script call per slot, every node's calls sent at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from viewkeeper.projection.entries import amount_range
from viewkeeper.sinks.base import APPLIED, STALE, Change, Collision, Outcome, Result
from viewkeeper.sinks.encoding import EncodeError
from viewkeeper.sinks.redis.apply import _amount_in_range
from viewkeeper.sinks.redis.packing import (
    _KIND,
    _L,
    _REDIS_TYPE,
    _b,
    _describe,
    _entry_args,
    _len_at,
    _Reject,
    _text,
    pack_version,
)
from viewkeeper.sinks.redis_cluster.claims import _Claims
from viewkeeper.sinks.redis_cluster.connection import Call

_PER_CALL = 400  # entries (or records) per script call; a slot's share of a batch is smaller


def _where(change: Change) -> str:
    return f"view {change.view.name}, item {change.item_key!r}: "


def _version_end(raw: bytes, p: int = 0) -> int:
    lg = raw[p]
    return p + 2 + lg + raw[p + 1 + lg]


def _parts_of(body: bytes) -> list[bytes]:
    """The entries' places in an owner record's body (``t L(#k) k [L(#m) m]`` each, a
    counter's amount after it); none for a tombstone (``~time``)."""
    out: list[bytes] = []
    p = 0
    if body[:1] == b"~":
        return out
    while p < len(body):
        start = p
        t = body[p : p + 1]
        n, p = _len_at(body, p + 1)
        p += n
        if t not in (b"V", b"v"):
            n, p = _len_at(body, p)
            p += n
        out.append(body[start:p])
        if t in (b"v", b"h", b"z"):  # a counter: its amount
            n, p = _len_at(body, p)
            p += n
    return out


def _pending_of(raw: bytes | None) -> list[tuple[bytes, bytes]]:
    """A pending list: (version noted, entry part) pairs."""
    out: list[tuple[bytes, bytes]] = []
    p = 0
    while raw and p < len(raw):
        n, p = _len_at(raw, p)
        ver = raw[p : p + n]
        n, p = _len_at(raw, p + n)
        out.append((ver, raw[p : p + n]))
        p += n
    return out


def _place(part: bytes) -> tuple[str, bytes, bytes]:
    """(type, key, field or member) of an entry's place."""
    t = chr(part[0])
    n, p = _len_at(part, 1)
    key = part[p : p + n]
    if t in "Vv":
        return t, key, b""
    n, q = _len_at(part, p + n)
    return t, key, part[q : q + n]


def _part(t: str, key: bytes, sub: bytes) -> bytes:
    head = t.encode() + _L(len(key)) + key
    return head if t in "Vv" else head + _L(len(sub)) + sub


@dataclass(slots=True)
class _Work:
    """One change on its way through the steps."""

    index: int
    change: Change
    owner: bytes  # view id ':' item key: who claims its entries
    version: bytes  # packed
    body: bytes  # the new owner record's body
    writes: dict[bytes, tuple[str, bytes, bytes, bytes, bytes]]  # part -> t, key, x, y, ttl
    keys: tuple[bytes, bytes, bytes]  # the owner slot's claims, owner records, pending lists
    slot: int
    read: bytes = b""  # the record's version step O (or the last F) read; b"" for none
    listed: set[bytes] = field(default_factory=set)  # entries of the record read
    retracted: set[bytes] = field(default_factory=set)  # pending parts retracted at version
    ops: list[tuple[bytes, bytes, str, bytes, bytes, bytes, bytes, bytes]] = field(
        default_factory=list
    )
    then: str = ""  # 'F', 'P' or '' (done) after the ops
    forget_at: bytes = b""  # P: the version the cleanup retracted at
    forget: list[bytes] = field(default_factory=list)
    result: Result | None = None
    collisions: list[Collision] = field(default_factory=list)
    error: str | None = None


class _Apply(_Claims):
    """``apply``: the steps of every change of a batch, each step sent for all at once."""

    def _apply(self, changes: Sequence[Change], now: float) -> list[Result]:
        self._ensure_ready()
        results: list[Result | None] = [None] * len(changes)
        works: list[_Work] = []
        stamp = b"%d" % int(now)
        seen: set[tuple[bytes, bytes]] = set()
        for i, change in enumerate(changes):
            try:
                w = self._work(i, change, stamp)
            except (_Reject, EncodeError, TypeError, ValueError) as exc:
                results[i] = Result(Outcome.ERROR, error=_where(change) + str(exc))
                continue
            if (w.owner, w.version) in seen:  # a duplicate in the batch: stale, as a replay
                results[i] = STALE
                continue
            seen.add((w.owner, w.version))
            works.append(w)
        self._step_o(works, stamp)
        active = [w for w in works if w.result is None]
        while active:
            self._step_e(active, stamp)  # replies come once its replicas have the entries
            self._step_f(active, stamp)
            active = [w for w in active if w.result is None]
        for w in works:
            results[w.index] = w.result
        return [r if r is not None else Result(Outcome.ERROR, error="not applied") for r in results]

    def _work(self, index: int, change: Change, stamp: bytes) -> _Work:
        view = change.view
        item = _b(change.item_key)
        vid = self._view_id(view.name)
        writes: dict[bytes, tuple[str, bytes, bytes, bytes, bytes]] = {}
        types: dict[bytes, str] = {}
        for entry in change.entries:
            t, key, _ident, a, b = _entry_args(entry, self._entry_prefix)
            ty = t.decode()
            if key.startswith(self._prefix):
                raise _Reject(
                    f"entry key {_text(key)!r} is inside viewkeeper's bookkeeping prefix "
                    f"{self.key_prefix!r}; use another key in the view"
                )
            if _REDIS_TYPE[types.setdefault(key, ty)] != _REDIS_TYPE[ty]:
                raise _Reject(
                    f"the view yields both a {_KIND[types[key]]} and a {_KIND[ty]} at key "
                    f"{_text(key)!r}; a key has one type"
                )
            x, y, ttl = (b"", a, b) if ty == "V" else (a, b, b"")
            place = _part(ty, key, x)
            twin = _part(ty.swapcase(), key, x)  # a counter and an entry at one place
            if twin in writes:
                raise _Reject(
                    f"the view yields both a {_KIND[ty.swapcase()]} and a {_KIND[ty]} for "
                    f"{_describe(ty, key, x)}; a counter shares its place with nothing else"
                )
            if ty in "vhz" and place in writes:  # one item counted twice: amounts add up
                total = int(writes[place][3]) + int(y)
                y = _amount_in_range(t, key, x, total)
            writes[place] = (ty, key, x, y, ttl)  # duplicates: the last counts
        body = (
            b"".join(
                p + (_L(len(w[3])) + w[3] if w[0] in "vhz" else b"") for p, w in writes.items()
            )
            if writes
            else b"~" + stamp
        )
        bucket = self._bucket(item)
        keys = self._owner_keys(view, bucket)
        return _Work(
            index,
            change,
            vid + b":" + item,
            pack_version(change.version),
            body,
            writes,
            keys,
            self._bucket_slot(bucket),
        )

    # -- step O ------------------------------------------------------------------------------
    def _step_o(self, works: list[_Work], stamp: bytes) -> None:
        groups: dict[bytes, list[_Work]] = {}
        for w in works:
            if w.result is None:
                groups.setdefault(w.keys[1], []).append(w)
        calls: list[Call] = []
        members: list[list[_Work]] = []
        for ws in groups.values():
            for j in range(0, len(ws), _PER_CALL):
                part = ws[j : j + _PER_CALL]
                args = [b"%d" % len(part)]
                for w in part:
                    args += [w.owner.split(b":", 1)[1], w.version, b"%d" % len(w.writes), *w.writes]
                calls.append(self._call(b"O", part[0].keys, part, args, stamp))
                members.append(part)
        replies = self._send(calls, members)
        for reply, part in zip(replies, members, strict=True):
            if isinstance(reply, BaseException):
                for w in part:
                    w.result = Result(
                        Outcome.ERROR,
                        error=_where(w.change) + f"Redis rejected the change: {reply}",
                    )
                continue
            codes = reply[0]
            for j, w in enumerate(part):
                rec, praw = reply[2 + 2 * j], reply[3 + 2 * j]
                self._learn(w, rec)
                pending = _pending_of(praw or None)
                if codes[j : j + 1] == b"s":
                    self._clean(w, [p for p in w.writes if p not in w.listed], pending)
                else:
                    self._go(w, pending, first=True)

    def _learn(self, w: _Work, rec: Any) -> None:
        if rec:
            end = _version_end(rec)
            w.read, w.listed = rec[:end], set(_parts_of(rec[end:]))
        else:
            w.read, w.listed = b"", set()

    def _go(self, w: _Work, pending: list[tuple[bytes, bytes]], first: bool) -> None:
        """Retract what the record read and the pending list hold that the change does not
        (and, the first time, write every entry) at the change's version: then step F."""
        gone = {p for p in w.listed if p not in w.writes}
        for _, p in pending:
            if p not in w.writes:
                gone.add(p)
                w.retracted.add(p)
        ops = [self._op(b"r", w, p, w.version) for p in sorted(gone)]
        if first:
            ops += [self._op(b"w", w, p, w.version) for p in w.writes]
        w.ops, w.then = ops, "F"

    def _clean(self, w: _Work, mine: list[bytes], pending: list[tuple[bytes, bytes]]) -> None:
        """A stale (or losing) change: retract, at or below the record's version, what it may
        have written that the record does not list, and the pending parts; then P forgets
        them. STALE."""
        parts = set(mine) | {p for _, p in pending if p not in w.listed}
        w.ops = [self._op(b"r", w, p, w.read) for p in sorted(parts)]
        w.then, w.forget_at, w.forget = ("P" if parts else ""), w.read, sorted(parts)
        if not parts:
            w.result = STALE

    def _op(
        self, kind: bytes, w: _Work, part: bytes, at: bytes
    ) -> tuple[bytes, bytes, str, bytes, bytes, bytes, bytes, bytes]:
        if kind == b"w":
            t, key, x, y, ttl = w.writes[part]
        else:
            t, key, x = _place(part)
            y = ttl = b""
        return (kind, w.owner, t, key, x, y, ttl, at)

    # -- step E ------------------------------------------------------------------------------
    def _step_e(self, works: list[_Work], stamp: bytes) -> None:
        per_slot: dict[int, list[tuple[_Work, list[int]]]] = {}
        for w in works:
            mine: dict[int, list[int]] = {}
            for j, op in enumerate(w.ops):
                mine.setdefault(self._slot(op[3]), []).append(j)
            for slot, js in mine.items():
                per_slot.setdefault(slot, []).append((w, js))
        calls: list[Call] = []
        members: list[list[tuple[_Work, int]]] = []
        for slot, groups in per_slot.items():
            chunks: list[list[tuple[_Work, list[int]]]] = [[]]
            size = 0
            for group in groups:  # a change's entries in a slot stay in one call
                if size and size + len(group[1]) > _PER_CALL:
                    chunks.append([])
                    size = 0
                chunks[-1].append(group)
                size += len(group[1])
            for chunk in chunks:
                keys = [self._claims_key(slot)]
                index: dict[bytes, int] = {}
                args = [b"%d" % len(chunk)]
                part: list[tuple[_Work, int]] = []
                for w, js in chunk:
                    args.append(b"%d" % len(js))
                    for k in js:
                        kind, owner, t, key, x, y, ttl, at = w.ops[k]
                        if key not in index:
                            keys.append(key)
                            index[key] = len(keys)
                        args += [kind, owner, at, t.encode(), b"%d" % index[key], x, y, ttl]
                        part.append((w, k))
                views = sorted({w.change.view.name for w, _ in chunk})
                calls.append((keys, [b"E", stamp, *self._checks(views, slot), *args]))
                members.append(part)
        slots = [self._slot(c[0][0]) for c in calls]
        checked = [self._checked(sorted({w.change.view.name for w, _ in m})) for m in members]
        replies = self._run(calls)
        self._refused(replies, checked, slots)
        for reply, part in zip(replies, members, strict=True):
            if isinstance(reply, BaseException):  # the call failed whole: its changes too
                for w, _ in part:
                    w.error = _where(w.change) + f"Redis rejected the change: {reply}"
                    w.then = "X"
                continue
            codes = reply[0]
            for j, (w, k) in enumerate(part):
                code, detail = codes[j : j + 1], reply[2 + j]
                _, _, t, key, x, _, _, _ = w.ops[k]
                if code == b"x" and not detail:  # another entry of its group failed
                    w.then = "X"
                elif code == b"x":
                    w.error = self._refusal(w.change, t, key, x, bytes(detail))
                    w.then = "X"
                elif code == b"c":
                    vid, _, other = bytes(detail).partition(b":")
                    name = self._view_name(vid)
                    who = _text(other)
                    if name != w.change.view.name:
                        who += f" (view {name})"
                    w.collisions.append(Collision(_describe(t, key, x), who))
        for w in works:
            w.ops = []

    def _refusal(self, change: Change, t: str, key: bytes, x: bytes, detail: bytes) -> str:
        """The message of an entry the script refused (README.md, "The protocol")."""
        what, _, value = detail.partition(b": ")
        place = _describe(t, key, x)
        if what == b"type":
            return (
                f"key {_text(key)!r} holds a {_text(value)}, view {change.view.name} writes a "
                f"{_KIND[t]} there (item {change.item_key!r}); delete or rename that key, or "
                "change the view so that each Redis key keeps one type"
            )
        if what == b"claimed":
            if value[:1] == b"#":  # another view's counter
                owner = f"view {self._view_name(value[1:].split(b'#')[0])}"
            else:
                vid, _, other = value.partition(b":")
                owner = f"view {self._view_name(vid)}, item {_text(other)!r}"
            return _where(change) + (
                f"{place} is already written by {owner}: a counter is the sum of one view's "
                "items, so nothing of the change was written there; give the counter a key "
                "of its own"
            )
        if what == b"integer":
            return _where(change) + (
                f"{place} holds {_text(value)[:100]!r}, not an integer: it was written outside "
                "viewkeeper; nothing of the change was written there; delete it and rebuild "
                "the view (viewkeeper rebuild)"
            )
        if what == b"overflow":
            top = amount_range(t == "z")[1]
            return _where(change) + (
                f"the sum at {place} would be {_text(value)}, outside +/-{top} (what "
                + ("a sorted-set score holds exactly" if t == "z" else "a Redis integer holds")
                + "); nothing of the change was written there; count in a larger unit, or "
                "split the counter"
            )
        return _where(change) + f"Redis rejected the change: {_text(detail)}"

    # -- steps F and P -----------------------------------------------------------------------
    def _step_f(self, works: list[_Work], stamp: bytes) -> None:
        groups: dict[tuple[str, bytes], list[_Work]] = {}
        for w in works:
            if w.then == "X":  # an entry refused: the change is an error; undo what it added
                w.result = Result(Outcome.ERROR, error=w.error)
                mine = [p for p in w.writes if p not in w.listed]
                w.ops = [self._op(b"r", w, p, w.version) for p in mine]
                w.then = "E"
            elif w.then in ("F", "P"):
                groups.setdefault((w.then, w.keys[1]), []).append(w)
            elif w.then == "" and w.result is None:
                w.result = STALE
        undo = [w for w in works if w.then == "E"]
        if undo:
            for w in undo:
                w.then = ""
            self._step_e(undo, stamp)
        calls: list[Call] = []
        members: list[tuple[str, list[_Work]]] = []
        for (step, _), ws in groups.items():
            for j in range(0, len(ws), _PER_CALL):
                part = ws[j : j + _PER_CALL]
                args = [b"%d" % len(part)]
                for w in part:
                    item = w.owner.split(b":", 1)[1]
                    if step == "F":
                        args += [item, w.read, w.version, w.body, b"%d" % len(w.retracted)]
                        args += sorted(w.retracted)
                    else:
                        args += [item, w.forget_at, b"%d" % len(w.forget), *w.forget]
                calls.append(self._call(step.encode(), part[0].keys, part, args, stamp))
                members.append((step, part))
        replies = self._send(calls, [m for _, m in members])
        for reply, (step, part) in zip(replies, members, strict=True):
            if isinstance(reply, BaseException):
                for w in part:  # F: entries written, no record: undone at the next round
                    w.error = _where(w.change) + f"Redis rejected the change: {reply}"
                    w.then = "X" if step == "F" else ""
                    w.result = None if step == "F" else STALE
                continue
            codes = reply[0]
            for j, w in enumerate(part):
                code = codes[j : j + 1]
                if step == "P":
                    w.then, w.result = "", STALE
                    continue
                rec, praw = reply[2 + 2 * j], reply[3 + 2 * j]
                if code == b"1":
                    w.then = ""
                    w.result = (
                        Result(Outcome.APPLIED, collisions=tuple(w.collisions))
                        if w.collisions
                        else APPLIED
                    )
                elif code == b"s":  # lost to a newer change: undo what it may have written
                    self._learn(w, rec)
                    self._clean(w, [p for p in w.writes if p not in w.listed], [])
                else:  # moved below the change's version: retract what it adds, F again
                    self._learn(w, rec)
                    self._go(w, _pending_of(praw or None), first=False)

    # -- plumbing ----------------------------------------------------------------------------
    def _call(
        self,
        step: bytes,
        keys: tuple[bytes, bytes, bytes],
        part: list[_Work],
        args: list[bytes],
        stamp: bytes,
    ) -> Call:
        views = sorted({w.change.view.name for w in part})
        slot = part[0].slot
        return list(keys), [step, stamp, *self._checks(views, slot), *args]

    def _send(self, calls: list[Call], members: list[list[_Work]]) -> list[Any]:
        """Run the O, F or P calls; a call that failed whole (bookkeeping damaged outside
        viewkeeper) ends its changes as errors, having noted or written nothing in that slot."""
        if not calls:
            return []
        slots = [m[0].slot for m in members]
        checked = [self._checked(sorted({w.change.view.name for w in m})) for m in members]
        replies = self._run(calls)
        for reply in replies:
            if not isinstance(reply, BaseException) and (not isinstance(reply, list) or not reply):
                raise self._unexpected(reply)
        self._refused(replies, checked, slots)
        return replies
