"""Applying changes: a batch of changes in script calls of ``redis_apply.lua``.

Owns encoding a change's arguments (keys inside the bookkeeping prefix and one type per key
refused), cutting the changes into calls (:data:`_SLICE` changes, the server's query limit),
sending them pipelined on one connection, resending what got no reply or NOSCRIPT, a call
refused whole resent one change per call, and reading each reply into one Result per change
(applied, stale, collisions, errors). README.md, "Batches" and "A change is all or nothing".
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import redis
from redis.exceptions import NoScriptError

from viewkeeper.projection.entries import MAX_TTL, amount_range
from viewkeeper.sinks.base import APPLIED, STALE, Change, Collision, Outcome, Result
from viewkeeper.sinks.encoding import EncodeError
from viewkeeper.sinks.redis.claims import _Claims
from viewkeeper.sinks.redis.connection import _is_transient
from viewkeeper.sinks.redis.packing import (
    _KIND,
    _REDIS_TYPE,
    Entries,
    _b,
    _Batch,
    _describe,
    _entry_args,
    _packed_int,
    _part,
    _Reject,
    _resp,
    _text,
)

_COUNTERS = (b"v", b"h", b"z")
_SLICE = 64  # changes per script call; the next batch is encoded while Redis runs one
_HEAD = 1024  # bytes of a call that are not its changes' arguments (EVALSHA sha ... ), at most


def _amount_in_range(t: bytes, key: bytes, sub: bytes, total: int) -> bytes:
    """The sum of the amounts one item yields for one counter, within the counter's range."""
    low, top = amount_range(t == b"z")
    if not low <= total <= top:
        raise _Reject(
            f"the view yields {_describe(t.decode(), key, sub)} more than once and its amounts "
            f"add up to {total}, outside what the counter holds (+/-{top}); nothing was written"
        )
    return b"%d" % total


def _read(conn: Any, batch: _Batch | None) -> None:
    if batch is not None:
        try:
            batch.reply = conn.read_response()
        except redis.ResponseError as exc:  # this call's error, e.g. NOSCRIPT
            batch.reply = exc


def _again(reply: Any) -> bool:
    """Whether a reply means "send it again": none yet, NOSCRIPT or a transient error."""
    return (
        reply is None
        or isinstance(reply, NoScriptError)
        or (isinstance(reply, Exception) and _is_transient(reply))
    )


class _Apply(_Claims):
    """The sink's ``apply``: changes to script calls, replies to results."""

    def _apply(self, changes: Sequence[Change], now: float) -> list[Result]:
        """Send the changes in batches (see :meth:`_batches`) on one connection, one script
        call each, reading a batch's reply only after sending the next, so Redis runs one
        batch while we encode the next. Whatever did not get a reply (connection lost,
        NOSCRIPT, BUSY...) is sent again by :meth:`_resend`."""
        self._ensure_ready()
        results: list[Result | None] = [None] * len(changes)
        batches: list[_Batch] = []
        stamp = b"%d" % int(now)
        todo = self._batches(changes, results)
        try:
            with self._connection() as conn:
                waiting: _Batch | None = None
                for batch in todo:
                    batches.append(batch)
                    # a health check would read a pending reply
                    conn.send_packed_command(
                        [self._command(batch, stamp)], check_health=waiting is None
                    )
                    _read(conn, waiting)
                    waiting = batch
                _read(conn, waiting)
        except Exception as exc:
            if not _is_transient(exc):
                raise
        batches.extend(todo)  # the batches not sent yet
        if any(_again(b.reply) for b in batches):
            self._with_retry(partial(self._resend, batches, stamp))
        self._refuse_lost(batches)
        batches = self._split_refused(batches, stamp)
        self._refuse_lost(batches)  # a change resent alone checks the claims again
        self._learn_counters(batches)
        for b in batches:
            self._results(changes, b, results)
        out = [r for r in results if r is not None]
        if len(out) != len(changes):  # a batch lost on the way: never checkpoint past it
            raise AssertionError(f"{len(changes) - len(out)} changes got no result")
        return out

    def _batches(self, changes: Sequence[Change], results: list[Result | None]) -> Iterator[_Batch]:
        """The changes' arguments in batches of at most :data:`_SLICE` changes and at most
        ``client-query-buffer-limit`` bytes; a change Redis would refuse gets its ERROR in
        ``results`` instead (nothing of it is sent)."""
        batch, used, budget = _Batch([], [], []), 0, self._max_query - _HEAD
        for i, change in enumerate(changes):
            try:
                args, entries = self._args_for(change)
                size = self._size(args, entries)
            except (_Reject, EncodeError, TypeError, ValueError) as exc:
                results[i] = Result(Outcome.ERROR, self._where(change) + str(exc))
                continue
            if batch.indexes and (len(batch.indexes) == _SLICE or used + size > budget):
                yield batch
                batch, used = _Batch([], [], []), 0
            batch.indexes.append(i)
            batch.entries.append(entries)
            batch.args.append(args)
            self._check(batch, change.view.name)
            used += size
        if batch.indexes:
            yield batch

    def _size(self, args: list[bytes], entries: Entries) -> int:
        """The bytes one change adds to a call (RESP framing counted high); raises _Reject
        when an argument is over ``proto-max-bulk-len`` or the change over the query limit."""
        size = sum(map(len, args)) + 16 * len(args)
        if size > self._max_bulk:  # cheap test first: no argument is larger than the sum
            j = max(range(len(args)), key=lambda j: len(args[j]))
            if len(args[j]) > self._max_bulk:
                raise _Reject(
                    f"the {_part(j, entries)} is {len(args[j])} bytes, over the Redis "
                    f"server's bulk length limit (proto-max-bulk-len, {self._max_bulk} bytes): "
                    "nothing was sent; make it smaller in the view (e.g. store a reference to "
                    "the data), or raise proto-max-bulk-len on the server"
                )
        if size > self._max_query - _HEAD:
            raise _Reject(
                f"the change's {len(entries)} entries are {size} bytes in all, over the Redis "
                f"server's client-query-buffer-limit ({self._max_query} bytes) for one call: "
                "nothing was sent; make the item's entries fewer or smaller, or raise "
                "client-query-buffer-limit on the server"
            )
        return size

    def _command(self, batch: _Batch, stamp: bytes) -> bytes:
        head = [b"EVALSHA", self._apply_sha, b"0", stamp, self._claims, self._nbuckets]
        head.append(b"%d" % len(batch.checks))
        seen = self._seen
        for view, key, marker in batch.checks:
            head += (key, marker, b"%d" % seen.get(view, 0))
        return _resp(head + [a for change in batch.args for a in change])

    def _resend(self, batches: list[_Batch], stamp: bytes) -> None:
        for _ in range(3):
            todo = [b for b in batches if _again(b.reply)]
            if not todo:
                return
            if any(isinstance(b.reply, NoScriptError) for b in todo):
                self._load_apply_script()  # after a restart or SCRIPT FLUSH
            with self._connection() as conn:
                conn.send_packed_command([self._command(b, stamp) for b in todo])
                for b in todo:
                    _read(conn, b)
            for b in todo:
                if isinstance(b.reply, Exception) and _is_transient(b.reply):
                    raise b.reply
            # the changes before a transient failure inside the batch were applied: sent
            # again, they answer stale (as after a lost reply), the sink holds them either way
        raise redis.ConnectionError("NOSCRIPT right after SCRIPT LOAD: is a proxy in the way?")

    def _split_refused(self, batches: list[_Batch], stamp: bytes) -> list[_Batch]:
        """A call Redis refused as a whole (none is foreseen: arguments over the server's
        limits are not sent, see :meth:`_size`) is sent again one change per call, so that
        only the changes at fault fail. One call at a time, each reply read before the next
        is sent: Redis closes the connection after a protocol error, and the reset would
        lose the replies of the calls before it."""
        out: list[_Batch] = []
        for b in batches:
            if not isinstance(b.reply, Exception) or len(b.indexes) == 1:
                out.append(b)
                continue
            for i, e, a in zip(b.indexes, b.entries, b.args, strict=True):
                single = _Batch([i], [e], [a], checks=b.checks)
                self._with_retry(partial(self._resend, [single], stamp))
                out.append(single)
        return out

    def _results(self, changes: Sequence[Change], b: _Batch, results: list[Result | None]) -> None:
        reply = b.reply
        if isinstance(reply, Exception):  # the call of this one change was refused
            for i in b.indexes:
                results[i] = self._rejected(changes[i], reply)
            return
        codes = reply[0] if isinstance(reply, list) and reply else None
        if not isinstance(codes, bytes) or len(codes) != len(b.indexes):
            raise self._unexpected(reply)
        details = iter(reply[2:])  # reply[1]: the claims' write counters
        for i, entries, code in zip(b.indexes, b.entries, codes, strict=True):
            if code == 49:  # b"1"
                results[i] = APPLIED
            elif code == 48:  # b"0"
                results[i] = STALE
            elif code == 101:  # b"e": a Redis error stopped this change
                results[i] = self._rejected(changes[i], next(details))
            elif code == 120:  # b"x": see _result
                results[i] = self._result(changes[i], entries, next(details))
            else:  # never read an answer this client does not know as applied
                raise self._unexpected(reply)

    def _rejected(self, change: Change, error: Exception | bytes) -> Result:
        text = _text(error) if isinstance(error, bytes) else str(error)
        return Result(
            Outcome.ERROR,
            self._where(change) + f"Redis rejected the change: {self._scrub(text)}",
        )

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            yield conn
        except BaseException:
            conn.disconnect()  # unread replies would be read as the next command's
            raise
        finally:
            pool.release(conn)

    @staticmethod
    def _where(change: Change) -> str:
        return f"view {change.view.name}, item {change.item_key!r}: "

    def _args_for(self, change: Change) -> tuple[list[bytes], Entries]:
        """The script's arguments for one change (see redis_apply.lua), and its entries."""
        item = _b(change.item_key)
        view = change.view
        owner = self._owner_prefix.get(view.name)
        if owner is None:
            owner = self._owner_prefix[view.name] = self._prefix + _b(view.name) + b":o:"
        version = change.version
        generation = self._generations.get(version.generation)
        if generation is None:
            generation = self._generations[version.generation] = _packed_int(version.generation)
        args = [
            owner + b"%d" % (zlib.crc32(item) % self.owner_buckets),
            item,
            self._view_id(view.name),
            generation + _packed_int(int(version.sequence)),
            b"%d" % len(change.entries),
        ]
        entries: Entries = []
        if len(change.entries) == 1:
            t, key, ident, a, b = _entry_args(change.entries[0], self._entry_prefix)
            if key.startswith(self._prefix):
                raise self._in_prefix(key)
            args += (t, key, a, b)
            entries.append((t.decode(), key, ident, a))
            return args, entries
        per_ident: dict[bytes, tuple[bytes, bytes, bytes, bytes]] = {}
        types: dict[bytes, bytes] = {}
        total: dict[bytes, int] = {}
        for entry in change.entries:
            t, key, ident, a, b = _entry_args(entry, self._entry_prefix)
            if key.startswith(self._prefix):
                raise self._in_prefix(key)
            if _REDIS_TYPE[types.setdefault(key, t).decode()] != _REDIS_TYPE[t.decode()]:
                raise _Reject(
                    f"the view yields both a {_KIND[types[key].decode()]} and a "
                    f"{_KIND[t.decode()]} at key {_text(key)!r}; a key has one type"
                )
            seen = per_ident.get(ident)
            if seen is not None and (seen[0] in _COUNTERS) != (t in _COUNTERS):
                raise _Reject(
                    f"the view yields both a {_KIND[seen[0].decode()]} and a "
                    f"{_KIND[t.decode()]} for {_describe(t.decode(), key, a)}; a counter "
                    "shares its place with nothing else"
                )
            if t in _COUNTERS:  # one item counted twice: amounts add up, checked once added
                total[ident] = total.get(ident, 0) + int(b)
            per_ident[ident] = (t, key, a, b)
        args[4] = b"%d" % len(per_ident)  # duplicates: the last one counts (a counter: the sum)
        for ident, (t, key, a, b) in per_ident.items():
            if ident in total:
                b = _amount_in_range(t, key, a, total[ident])
            args += (t, key, a, b)
            entries.append((t.decode(), key, ident, a))
        return args, entries

    def _in_prefix(self, key: bytes) -> _Reject:
        return _Reject(
            f"entry key {_text(key)!r} is inside viewkeeper's bookkeeping "
            f"prefix {self.key_prefix!r}; use another key in the view"
        )

    def _result(self, change: Change, entries: Entries, reply: Any) -> Result:
        code = int(reply[0])
        if code == -2:  # arguments this client does not send: the script refused them
            t, key, _, sub = entries[int(reply[1]) - 1]
            what, arg = _text(reply[2]), _text(reply[3])
            entry = _describe(t, key, sub) if t in _KIND else f"entry {_text(key)!r}"
            return Result(
                Outcome.ERROR,
                self._where(change)
                + f"the {what} {arg[:100]!r} of {entry} is not one Redis takes (a ttl is "
                f"whole seconds from 1 to {MAX_TTL}, a score a number, an amount an integer "
                "in its counter's range), nothing of the change was written; the view API "
                "does not build such an entry: was it changed after it was built?",
            )
        if code == -3:  # a counter's sum: not an integer where it is kept, or out of range
            what, value, kind = _text(reply[1]), _text(reply[2]), _text(reply[3])
            place = _describe(kind, reply[4], reply[5])
            if what == "integer":
                return Result(
                    Outcome.ERROR,
                    self._where(change)
                    + f"{place} holds {value[:100]!r}, not an integer: it was written outside "
                    "viewkeeper; nothing of the change was written; delete it and rebuild "
                    "the view (viewkeeper rebuild)",
                )
            top = amount_range(kind == "z")[1]
            return Result(
                Outcome.ERROR,
                self._where(change)
                + f"the sum at {place} would be {value}, outside +/-{top} (what "
                + ("a sorted-set score holds exactly" if kind == "z" else "a Redis integer holds")
                + "); nothing of the change was written; count in a larger unit, or split "
                "the counter (or, if it was changed outside viewkeeper, rebuild the view: "
                "viewkeeper rebuild)",
            )
        if code == -4:  # a counter claimed by another view or by an item's entry
            t, key, ident, sub = entries[int(reply[1]) - 1]
            other_view, other_item = self._claim_owner(ident, reply[2])
            owner = f"view {other_view}" + (f", item {other_item!r}" if other_item else "")
            return Result(
                Outcome.ERROR,
                self._where(change)
                + f"{_describe(t, key, sub)} is already written by {owner}: a counter is the "
                "sum of one view's items, so nothing of the change was written; give the "
                "counter a key of its own",
            )
        if code == -1:
            t, key, _, _ = entries[int(reply[1]) - 1]
            return Result(
                Outcome.ERROR,
                (
                    f"key {_text(key)!r} holds a {_text(reply[2])}, view {change.view.name} writes "
                    f"a {_KIND[t]} there (item {change.item_key!r}); delete or rename that key, or "
                    "change the view so that each Redis key keeps one type"
                ),
            )
        collisions = []
        for j in range(1, len(reply), 2):
            t, key, ident, sub = entries[int(reply[j]) - 1]
            other_view, other_item = self._claim_owner(ident, reply[j + 1])
            if other_view != change.view.name:
                other_item = f"{other_item} (view {other_view})"
            collisions.append(Collision(_describe(t, key, sub), other_item))
        return Result(Outcome.APPLIED, collisions=collisions)

    def _claim_owner(self, ident: bytes, claim: bytes) -> tuple[str, str]:
        i = 0
        while i < len(claim) and claim[i : i + 1].isdigit():
            i += 1
        if claim[i : i + 1] == b"#":  # a counter: the view's items contribute to it
            return self._view_name(claim[:i]), ""
        if claim[i : i + 1] == b"=":
            item = ident[claim[i + 1] : claim[i + 1] + claim[i + 2]]
        else:
            item = claim[i + 1 :]
        return self._view_name(claim[:i]), _text(item)
