"""Change-log views on a cluster: each view's appends in its stream key's slot.

Owns ``append`` and the change-log side of prepare, write_claim, purge and wipe. A change-log
view's keys — its stream, its high-water hash, its replay keys, and here its claim (marker
and write counter) — share the stream key's slot (``slot_tag``), so the standalone sink's
change-log group of ``redis_apply.lua`` (README.md of the Redis sink, "Change-log views")
runs there unchanged, every key declared. Calls of one view are sent one at a time, each
answered before the next, as on standalone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from functools import partial

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import Append, Outcome, Result, SinkError
from viewkeeper.sinks.redis.changelog import (
    _PER_CALL,
    group_args,
    purge_marks,
    read_codes,
    slot_tag,
    wipe_changelog,
)
from viewkeeper.sinks.redis.connection import apply_script
from viewkeeper.sinks.redis.packing import _b, _text
from viewkeeper.sinks.redis_cluster.connection import Call, log
from viewkeeper.sinks.redis_cluster.maintenance import _Maintenance

_APPLY = apply_script()
_SCRIPT = (_APPLY, hashlib.sha1(_APPLY).hexdigest().encode())


class _Changelog(_Maintenance):
    """The ``Sink`` protocol's ``append``, and the rest for change-log views."""

    def changelog_keys(self, view: View) -> tuple[bytes, bytes, bytes]:
        """The stream key, its high-water hash and the prefix of its replay keys, as on
        standalone (the last two in the stream key's slot)."""
        stream = self._entry_prefix + _b(str(view.options["stream"]))
        head = self._prefix + b"cl:{" + slot_tag(stream) + b"}:" + _b(view.name)
        return stream, head + b":hw", head + b":r:"

    def _stream_claim(self, view: View) -> bytes:
        """The view's marker and write counter, in the stream key's slot."""
        return self.changelog_keys(view)[1][: -len(b"hw")] + b"ns"

    def prepare(self, views: Sequence[View]) -> None:
        self._ensure_ready()
        streams: dict[bytes, str] = {}
        for view in views:
            self._view_id(view.name)
            if view.changelog:
                stream = self.changelog_keys(view)[0]
                other = streams.setdefault(stream, view.name)
                if other != view.name:
                    raise SinkError(
                        f"views {other} and {view.name} both append to the Redis stream "
                        f"{_text(stream)!r} of redis sink {self.name!r}: each change would be "
                        "there twice; give each view its own stream= (or make one view of the "
                        "two)"
                    )
                if stream.startswith(self._prefix):
                    raise SinkError(
                        f"view {view.name}: stream {_text(stream)!r} is inside viewkeeper's "
                        f"bookkeeping prefix {self.key_prefix!r} of redis sink {self.name!r}; "
                        "use another key"
                    )

    def _write_markers(self, view: View, marker: bytes) -> None:
        if not view.changelog:
            super()._write_markers(view, marker)
            return
        self._set([([self._stream_claim(view)], [b"marker", marker])])  # 'lost' dropped too

    # -- append ------------------------------------------------------------------------------
    def append(self, appends: Sequence[Append]) -> list[Result]:
        """Change-log entries, each appended once; one Result per append."""
        self._ensure_ready()
        self._local.seen = {}  # what a failed call left: not ours
        now = self._clock()
        results: list[Result | None] = [None] * len(appends)
        per_view: dict[str, list[int]] = {}
        for i, a in enumerate(appends):
            per_view.setdefault(a.view.name, []).append(i)
        for indexes in per_view.values():
            view = appends[indexes[0]].view
            refused: BaseException | None = None
            for start in range(0, len(indexes), _PER_CALL):
                chunk = indexes[start : start + _PER_CALL]
                group = group_args(
                    self.changelog_keys(view),
                    self._prefix,
                    self.tombstone_retention,
                    appends,
                    chunk,
                    now,
                    results,
                )
                if group is None:
                    continue
                sent, args = group
                if refused is not None:  # after a call refused whole: not sent (ERROR), noted
                    read_codes(
                        appends, sent, refused, results, self._append_error, self._unexpected
                    )
                    self._note(view, [appends[i] for i in sent if i >= 0], now)
                    continue
                reply = self._send_group(view, appends, sent, args, now)
                if isinstance(reply, BaseException):
                    refused = reply
                    self._note(view, [appends[i] for i in sent if i >= 0], now)
                read_codes(appends, sent, reply, results, self._append_error, self._unexpected)
        out = [r for r in results if r is not None]
        if len(out) != len(appends):  # never checkpoint past an append without an answer
            raise AssertionError(f"{len(appends) - len(out)} appends got no result")
        self._commit_seen()
        return out

    def _send_group(
        self, view: View, appends: Sequence[Append], sent: list[int], args: list[bytes], now: float
    ) -> object:
        stream, hw, rp = self.changelog_keys(view)
        claim = self._stream_claim(view)
        keys = [stream, hw, claim]
        for i in sent:
            if i >= 0:
                keys.append(rp + b"%d" % int(appends[i].sequence))
        checks: list[bytes] = [b"0"]
        checked: list[str] = []
        marker = self._markers.get(view.name)
        slot = self._slot(stream)
        if marker is not None:
            with self._seen_lock:
                seen = self._seen.get((view.name, slot), 0)
            checks = [b"1", claim, marker, b"%d" % seen]
            checked = [view.name]
        call: Call = (keys, [b"%d" % int(now), b"", b"1", *checks, *args])
        (reply,) = self._run([call], _SCRIPT)
        self._refused([reply], [checked], [slot])
        return reply

    def _note(self, view: View, refused: list[Append], now: float) -> None:
        """Note appends of a call refused whole as dead-lettered (README.md of the Redis
        sink, "Change-log views"); a note refused too is logged."""
        notes = [
            Append(a.view, a.shard, a.sequence, a.item_key, {}, a.created_at, failed=True)
            for a in refused
        ]
        for start in range(0, len(notes), _PER_CALL):
            chunk = notes[start : start + _PER_CALL]
            scratch: list[Result | None] = [None] * len(chunk)
            group = group_args(
                self.changelog_keys(view),
                self._prefix,
                self.tombstone_retention,
                chunk,
                list(range(len(chunk))),
                now,
                scratch,
            )
            if group is None:
                continue
            reply = self._send_group(view, chunk, group[0], group[1], now)
            if not isinstance(reply, list):
                log.error(
                    "redis sink %s (%s): view %s: could not note %d dead-lettered change-log "
                    "records (%s); a re-read of their page and their replay may both append "
                    "them",
                    self.name,
                    self.where,
                    view.name,
                    len(chunk),
                    reply,
                )

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
        """For a change-log view: forget the high-water marks of shards that appended nothing
        since ``older_than``; the replay keys expire by themselves."""
        if isinstance(view, str) or not view.changelog:
            return super().purge_tombstones(view, older_than)
        cutoff = int(self._clock() - self.tombstone_retention if older_than is None else older_than)
        hw = self.changelog_keys(view)[1]
        return int(self._with_retry(partial(purge_marks, self._client, hw, cutoff)))

    def wipe(self, view: View) -> int:
        """For a change-log view: delete its stream and its bookkeeping (a take-over)."""
        if not view.changelog:
            return super().wipe(view)
        keys = self.changelog_keys(view)
        return int(self._with_retry(partial(wipe_changelog, self._client, keys)))
