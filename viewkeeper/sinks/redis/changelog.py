"""Change-log views on Redis: one Redis Stream entry per record, appended once.

Owns the sink's ``append`` (change-log groups in calls of ``redis_apply.lua``, which checks
the view's claim first as for any change), the keys of a change-log view and their
maintenance (purge, wipe). README.md, "Change-log views".

Exactly once: records of one shard reach ``append`` in stream order (a worker applies its
pages in order; a page read again after a crash or a lease move starts at a checkpoint, so
it repeats a prefix). The script keeps, per (view, shard), the highest sequence it appended
and appends a record only above it, in the same atomic call as the XADD: a record sent
again (a replay, kill -9 between the append and the checkpoint, two processes overlapping
on a shard during a lease move) answers STALE. A dead letter replayed, and a record the
Lambda handler applies (it knows no shard), come with shard ``''``: each is remembered by its
sequence in a key of its own, ``vk:cl:{TAG}:VIEW:r:SEQUENCE``, expiring after
``tombstone_retention`` (48 h: the stream keeps records 24 h).

A record dead-lettered for the view (``Append.failed``, or an append the sink refused) is
noted in that key (``dl``, for :data:`DEAD_LETTER_NOTE_TTL`): both ways it may be appended
later — its dead letter replayed, or a re-read of its page once it can be mapped, even below
the mark — append it only while the note says ``dl`` and replace it, so the other way
answers STALE; a note for a record the mark passed without a note records it as appended
(another process appended it). A dead letter replayed after the note expired (30 days)
whose record a re-read had appended is appended again: the one case left.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import Any

from redis.crc import key_slot

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import APPLIED, STALE, Append, Outcome, Result, SinkError
from viewkeeper.sinks.encoding import EncodeError, redis_value
from viewkeeper.sinks.redis.apply import _again, _read
from viewkeeper.sinks.redis.connection import _is_transient, log
from viewkeeper.sinks.redis.maintenance import _Maintenance
from viewkeeper.sinks.redis.packing import _b, _Batch, _text, tag_for_slot

_PER_CALL = 256  # appends per script call (a page of a view is usually one call)
_MAX_FIELDS = 1000  # fields of one stream entry (the script unpacks them into one XADD)
DEAD_LETTER_NOTE_TTL = 30 * 24 * 3600  # how long a dead-lettered record's note is kept


def slot_tag(key: bytes) -> bytes:
    """A hash tag that puts bookkeeping ``...{TAG}...`` in ``key``'s cluster slot: the key's
    own tag (the text between its first ``{`` and the next ``}``, when not empty), else the
    key itself when it has no braces, else a short tag found to hash to the key's slot (a
    key whose braces are not a tag: wrapping it in ``{}`` would hash another text)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    elif b"}" not in key:
        return key
    return tag_for_slot(key_slot(key))


def group_args(
    keys: tuple[bytes, bytes, bytes],
    prefix: bytes,
    retention: float,
    appends: Sequence[Append],
    indexes: list[int],
    now: float,
    results: list[Any],
) -> tuple[list[int], list[bytes]] | None:
    """The change-log group of ``redis_apply.lua`` for appends of one view (its stream, high-
    water hash and replay prefix ``keys``), and per append sent its index (-1: the note of an
    append refused here, whose ERROR is put in ``results``). None when nothing is sent. Both
    Redis sinks send it (the cluster sink in the stream key's slot)."""
    view = appends[indexes[0]].view
    stream, hw, rp = keys
    if stream.startswith(prefix):
        for i in indexes:
            results[i] = Result(Outcome.ERROR, f"view {view.name}: stream key refused")
        return None
    cap, age = view.options.get("maxlen"), view.options.get("max_age")
    minid = b"%d" % max(0, int((now - age) * 1000)) if age else b""
    args: list[bytes] = []
    sent: list[int] = []
    for i in indexes:
        a = appends[i]
        if a.failed:
            args += (_b(a.shard), b"%d" % int(a.sequence), b"-1")
            sent.append(i)
            continue
        try:
            if len(a.body) > _MAX_FIELDS:
                raise EncodeError(f"{len(a.body)} fields; a stream entry takes {_MAX_FIELDS}")
            fields = [x for k, v in a.body.items() for x in (_b(k), redis_value(v))]
        except (EncodeError, TypeError, ValueError) as exc:
            results[i] = Result(Outcome.ERROR, f"view {view.name}, item {a.item_key!r}: {exc}")
            args += (_b(a.shard), b"%d" % int(a.sequence), b"-1")  # dead-lettered: noted
            sent.append(-1)
            continue
        args += (_b(a.shard), b"%d" % int(a.sequence), b"%d" % len(a.body), *fields)
        sent.append(i)
    if not sent:
        return None
    ttl = b"%d" % max(1, int(retention))
    notes = b"%d" % DEAD_LETTER_NOTE_TTL
    head = [b"", stream, hw, rp, b"%d" % cap if cap else b"", minid, ttl, notes]
    head.append(b"%d" % len(sent))
    return sent, head + args


def read_codes(
    appends: Sequence[Append],
    indexes: list[int],
    reply: Any,
    results: list[Result | None],
    error: Callable[[Append, str], Result],
    unexpected: Callable[[Any], Exception],
) -> None:
    """The results of one change-log group's reply (``indexes``: as group_args gave them)."""
    if isinstance(reply, Exception):  # the call was refused whole
        for i in indexes:
            if i >= 0:
                results[i] = error(appends[i], _text(str(reply).encode()))
        return
    codes = reply[0] if isinstance(reply, list) and reply else None
    if not isinstance(codes, bytes) or len(codes) != len(indexes):
        raise unexpected(reply)
    details = iter(reply[2:])
    for i, code in zip(indexes, codes, strict=True):
        if i < 0:  # the note of an append refused before it was sent
            if code == 101:  # b"e": its detail is in the reply too
                next(details)
            continue
        if code == 49:  # b"1"
            results[i] = APPLIED
        elif code == 48:  # b"0": appended before
            results[i] = STALE
        elif code == 101:  # b"e"
            results[i] = error(appends[i], _text(next(details)))
        else:
            raise unexpected(reply)


def purge_marks(client: Any, hw: bytes, cutoff: int) -> int:
    """Forget the high-water marks of shards that appended nothing since ``cutoff`` (their
    records are out of the stream's 24 hours); both Redis sinks' purge."""
    marks = client.hgetall(hw)
    old = [f for f, t in marks.items() if f[:1] == b"@" and t.isdigit() and int(t) < cutoff]
    if old:
        client.hdel(hw, *[x for f in old for x in (f, f[1:])])
    return len(old)


def wipe_changelog(client: Any, keys: tuple[bytes, bytes, bytes]) -> int:
    """Delete a change-log view's stream (not a key of another type: not ours), its
    high-water hash and replay keys; the stream entries deleted. Both Redis sinks' wipe."""
    stream, hw, rp = keys
    n = 0
    if client.type(stream) == b"stream":
        n = int(client.xlen(stream))
        client.delete(stream)
    client.delete(hw)
    pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", rp) + b"*"
    for key in client.scan_iter(match=pattern, count=1000):
        client.delete(key)
    return n


class _Changelog(_Maintenance):
    """The ``Sink`` protocol's ``append``, and purge and wipe for change-log views."""

    def changelog_keys(self, view: View) -> tuple[bytes, bytes, bytes]:
        """The stream key, its high-water hash and the prefix of its replay keys (the last
        two in the stream key's slot: ``vk:cl:{TAG}:VIEW:hw`` and ``...:r:``)."""
        stream = self._entry_prefix + _b(str(view.options["stream"]))
        head = self._prefix + b"cl:{" + slot_tag(stream) + b"}:" + _b(view.name)
        return stream, head + b":hw", head + b":r:"

    def check_changelog(self, view: View, streams: dict[bytes, str]) -> None:
        """Refuse a stream key inside the bookkeeping prefix, or one that another
        change-log view of ``streams`` (stream key -> view, filled here) appends to: each
        record would land there once per view (prepare calls it)."""
        stream = self.changelog_keys(view)[0]
        other = streams.setdefault(stream, view.name)
        if other != view.name:
            raise SinkError(
                f"views {other} and {view.name} both append to the Redis stream "
                f"{_text(stream)!r} of redis sink {self.name!r}: each change would be there "
                "twice; give each view its own stream= (or make one view of the two)"
            )
        if stream.startswith(self._prefix):
            raise SinkError(
                f"view {view.name}: stream {_text(stream)!r} is inside viewkeeper's bookkeeping "
                f"prefix {self.key_prefix!r} of redis sink {self.name!r}; use another key"
            )

    def _append(self, appends: Sequence[Append], now: float) -> list[Result]:
        """Send the appends grouped per view (in order within a view), pipelined on one
        connection; resend what got no reply; read the codes."""
        self._ensure_ready()
        results: list[Result | None] = [None] * len(appends)
        stamp = b"%d" % int(now)
        per_view: dict[str, list[int]] = {}
        for i, a in enumerate(appends):
            per_view.setdefault(a.view.name, []).append(i)
        batches: list[_Batch] = []
        view_of: dict[int, str] = {}  # id(batch) -> its view
        for name, indexes in per_view.items():
            for start in range(0, len(indexes), _PER_CALL):
                batch = self._group(appends, indexes[start : start + _PER_CALL], now, results)
                if batch is not None:
                    batches.append(batch)
                    view_of[id(batch)] = name
        # One call at a time, each answered before the next is sent: a later call of the
        # same view must never run after an earlier one was refused (OOM, READONLY, ...), or
        # its high-water mark would pass the earlier call's records, which would then answer
        # stale when sent again (tests/test_changelog_attack.py).
        refused: set[str] = set()
        for b in batches:
            if view_of[id(b)] in refused:  # after a call refused whole: not sent (ERROR)
                b.reply = SinkError("not sent: an earlier call of this view was refused")
                continue
            try:
                with self._connection() as conn:
                    conn.send_packed_command([self._command(b, stamp)])
                    _read(conn, b)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
            if _again(b.reply):
                self._with_retry(partial(self._resend, [b], stamp))
            if isinstance(b.reply, list) and b.reply and b.reply[0] == b"L":
                break  # a lost claim: the later calls would be refused too; nothing written
            if isinstance(b.reply, Exception):
                # refused whole (nothing of it written): a later call of the view would raise
                # the mark past its records, which a re-read would then take for appended;
                # they and the view's later ones end ERROR (dead-lettered), noted so that
                # their replays and a re-read append them once between them
                refused.add(view_of[id(b)])
        for name in refused:
            self._note_refused(appends, [b for b in batches if view_of[id(b)] == name], now)
        self._refuse_lost(batches)
        self._learn_counters(batches)
        for b in batches:
            self._append_results(appends, b, results)
        out = [r for r in results if r is not None]
        if len(out) != len(appends):  # never checkpoint past an append without an answer
            raise AssertionError(f"{len(appends) - len(out)} appends got no result")
        return out

    def _note_refused(self, appends: Sequence[Append], batches: list[_Batch], now: float) -> None:
        """Note, in calls of their own, the appends of calls refused whole or not sent (see
        :meth:`_append`); a note refused too is logged (its record may then be appended
        twice: by a re-read and by its dead letter's replay)."""
        notes = [
            Append(a.view, a.shard, a.sequence, a.item_key, {}, a.created_at, failed=True)
            for b in batches
            if isinstance(b.reply, Exception)
            for a in (appends[i] for i in b.indexes if i >= 0)
        ]
        for start in range(0, len(notes), _PER_CALL):
            chunk = notes[start : start + _PER_CALL]
            batch = self._group(chunk, list(range(len(chunk))), now, [None] * len(chunk))
            if batch is None:
                continue
            try:
                with self._connection() as conn:
                    conn.send_packed_command([self._command(batch, b"%d" % int(now))])
                    _read(conn, batch)
            except Exception as exc:
                batch.reply = exc
            if not isinstance(batch.reply, list):
                log.error(
                    "redis sink %s (%s): view %s: could not note %d dead-lettered change-log "
                    "records (%s); a re-read of their page and their replay may both append "
                    "them",
                    self.name,
                    self.where,
                    chunk[0].view.name,
                    len(chunk),
                    batch.reply,
                )

    def _group(
        self, appends: Sequence[Append], indexes: list[int], now: float, results: list[Any]
    ) -> _Batch | None:
        """One script call's change-log group for appends of one view (see redis_apply.lua);
        an append that cannot be encoded gets its ERROR in ``results`` instead."""
        view = appends[indexes[0]].view
        group = group_args(
            self.changelog_keys(view),
            self._prefix,
            self.tombstone_retention,
            appends,
            indexes,
            now,
            results,
        )
        if group is None:
            return None
        batch = _Batch(group[0], [], [group[1]])
        self._check(batch, view.name)
        return batch

    def _append_results(
        self, appends: Sequence[Append], b: _Batch, results: list[Result | None]
    ) -> None:
        read_codes(appends, b.indexes, b.reply, results, self._append_error, self._unexpected)

    def _append_error(self, a: Append, text: str) -> Result:
        return Result(
            Outcome.ERROR,
            f"view {a.view.name}, item {a.item_key!r}: Redis rejected the append: "
            f"{self._scrub(text)}",
        )

    # -- maintenance ---------------------------------------------------------------------
    def sweep(self, view: View, generation: int, now: float, keep: Collection[str] = ()) -> int:
        if view.changelog:
            raise SinkError(f"view {view.name} is a change-log view: there is nothing to sweep")
        return super().sweep(view, generation, now, keep)

    def purge_tombstones(self, view: View | str, older_than: float | None = None) -> int:
        """For a change-log view: forget the high-water marks of shards that appended
        nothing since ``older_than`` (their records are out of the stream's 24 hours); the
        replay keys expire by themselves."""
        if isinstance(view, str) or not view.changelog:
            return super().purge_tombstones(view, older_than)
        cutoff = int(self._clock() - self.tombstone_retention if older_than is None else older_than)
        hw = self.changelog_keys(view)[1]
        return int(self._with_retry(partial(purge_marks, self._client, hw, cutoff)))

    def wipe(self, view: View) -> int:
        """For a change-log view: delete its stream and its bookkeeping (a take-over);
        returns the number of stream entries deleted."""
        if not view.changelog:
            return super().wipe(view)
        keys = self.changelog_keys(view)
        return int(self._with_retry(partial(wipe_changelog, self._client, keys)))
