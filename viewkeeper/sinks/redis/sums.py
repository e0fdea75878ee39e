"""Counters through a rebuild: the rebuild's own sums, and retractions refused on the way.

Owns ``begin_rebuild`` (a view's counters summed again, beside the live ones, from what items
write at generations above the floor), the settling of those sums at the end of the sweep
(every counter of the view set to its rebuilt sum: what was changed or lost outside
viewkeeper is repaired), and :meth:`_Sums._retract_all`, the sweep's and the wipe's
retractions retried while they make progress (a counter's partial sum may leave its range
in one order and not in another). README.md, "Counters".
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Sequence
from functools import partial

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import Change, Outcome, SinkError
from viewkeeper.sinks.redis.apply import _Apply
from viewkeeper.sinks.redis.packing import _b, _Batch, _packed_int

log = logging.getLogger("viewkeeper.sinks.redis")

# Whether packed generation a is below b (packing.py: length first, then the bytes), for the
# scripts below; bytewise, as redis_apply.lua's newer(): Lua's '<' on strings uses strcoll.
_BELOW = (
    "local function below(a, b) if #a ~= #b then return #a < #b end "
    "for i = 1, #a do local x, y = string.byte(a, i), string.byte(b, i) "
    "if x ~= y then return x < y end end return false end "
)
_FINALIZE_SLICE = 500  # counter identities per script call when a rebuild settles its sums


class _Sums(_Apply):
    """The rebuild's sums of a view's counters, and retractions retried."""

    def _sums_key(self, view: View | str) -> bytes:
        name = view if isinstance(view, str) else view.name
        return self._prefix + _b(name) + b":sums"  # beside the owner records (apply script)

    def begin_rebuild(self, view: View, floor: int) -> None:
        """From now on the apply script also sums each counter of ``view`` over the items
        written at generations above the floor (in ``vk:{view}:sums``): ``floor``, or the
        highest generation a change to the view's counters had (field ``top``) if higher.
        :meth:`sweep` sets the counters to those sums. Sums another rebuild began (running,
        or stopped) are joined, not replaced: they count every item above their floor, which
        is at or below this one (``top`` only grows), so they serve this rebuild too; a new
        token (field ``shadow_id``) tells a rebuild that ends first to leave them in place."""
        if view.changelog:
            return
        script = _BELOW + (
            "redis.call('HSET', KEYS[1], 'shadow_id', ARGV[2]) "
            "if redis.call('HEXISTS', KEYS[1], 'shadow') == 1 then return 0 end "
            "local top, g = redis.call('HGET', KEYS[1], 'top'), ARGV[1] "
            "if top and below(g, top) then g = top end "
            "redis.call('DEL', KEYS[2]) redis.call('HDEL', KEYS[1], 'sweeping') "
            "redis.call('HSET', KEYS[1], 'shadow', g, 'shadow_epoch', ARGV[2]) return 1"
        )
        ns, sums = self._claim_key(view), self._sums_key(view)
        token = uuid.uuid4().hex  # also the sums' epoch when they are made here
        self._with_retry(lambda: self._client.eval(script, 2, ns, sums, _packed_int(floor), token))

    def _sweeping(self, view: View, generation: int) -> tuple[bytes, bytes] | None:
        """The sweep of a rebuild of ``view`` at ``generation`` starts, before it lists the
        owner records: when the sums' floor is below ``generation`` (once this sweep is
        done, every record is above it: the sums are complete), from now on a change at or
        below the floor marks what it moves unknown (field ``sweeping``), and the sums'
        token and epoch now are returned (a rebuild joining later changes the token; sums
        made again, the epoch). None when there are no sums for this sweep (none began, one
        settled them, or they began above it)."""
        script = _BELOW + (
            "local f, g = redis.call('HGET', KEYS[1], 'shadow'), ARGV[1] "
            "if not f or not below(f, g) then return false end "
            "redis.call('HSET', KEYS[1], 'sweeping', '1') "
            "return redis.call('HMGET', KEYS[1], 'shadow_id', 'shadow_epoch')"
        )
        ns, gen = self._claim_key(view), _packed_int(generation)
        got = self._with_retry(lambda: self._client.eval(script, 1, ns, gen))
        return None if not got else (got[0] or b"", got[1] or b"")

    def _retract_all(self, what: str, changes: Sequence[Change], now: float) -> int:
        """Apply ``changes`` (retractions: no entries), those refused again after the others
        while that makes progress; raises SinkError naming what stays refused."""
        applied, todo = 0, list(changes)
        refused: list[tuple[Change, str | None]] = []
        while todo:
            refused = []
            for i in range(0, len(todo), self.batch_size):
                part = todo[i : i + self.batch_size]
                for change, result in zip(part, self._apply(part, now), strict=True):
                    if result.outcome is Outcome.APPLIED:
                        applied += 1
                    elif result.outcome is Outcome.ERROR:
                        refused.append((change, result.error))
            if not refused or len(refused) == len(todo):
                break
            todo = [c for c, _ in refused]
        if refused:
            raise SinkError(
                f"{what}: {len(refused)} item(s) could not be retracted, first "
                f"{refused[0][0].item_key!r}: {refused[0][1]}; their entries stay (the view's "
                "other items were retracted): fix the cause and run it again"
            )
        return applied

    def _finish_sums(self, view: View, sweep: tuple[bytes, bytes], keep: Collection[str]) -> int:
        """The end of a rebuild: each counter of ``view`` set to the rebuild's sum (the live
        sums equal them unless something outside viewkeeper changed a counter), then the
        sums dropped unless a rebuild joined them since ``token`` was read (it settles them
        again at its end). Returns how many were repaired."""
        ns, sums = self._claim_key(view), self._sums_key(view)
        token, epoch = sweep
        if keep:  # their contributions are in the live sums only: nothing can be settled
            log.warning(
                "view %s: counters not settled from the rebuild's sums: %d item(s) could not "
                "be re-read and keep their contributions; rebuild again once they can",
                view.name,
                len(keep),
            )
            self._close_sums(ns, sums, token)
            return 0
        mine = self._view_id(view.name) + b"#"
        idents = set(self._with_retry(lambda: list(self._client.hkeys(sums))))
        idents = {i for i in idents if i[:1] in (b"V", b"H", b"Z")}  # counter identities
        for bucket in range(self.owner_buckets):
            key = self._claims + b"%d" % bucket

            def scan(k: bytes = key) -> list[tuple[bytes, bytes]]:
                return list(self._client.hscan_iter(k, count=1000))

            idents.update(i for i, claim in self._with_retry(scan) if claim.startswith(mine))
        repaired, skipped, ordered = 0, 0, sorted(idents)
        for i in range(0, len(ordered), _FINALIZE_SLICE):
            part = ordered[i : i + _FINALIZE_SLICE]
            args = [b"#", ns, sums, self._view_id(view.name), epoch, b"%d" % len(part)]
            batch = _Batch([], [], [args + part])
            self._check(batch, view.name)
            codes = self._with_retry(partial(self._finalize_call, batch))
            if codes.count(b"n"):
                log.warning(
                    "view %s: the rebuild's sums were settled or made again by another rebuild",
                    view.name,
                )
                return repaired
            repaired += codes.count(b"1")
            skipped += codes.count(b"s")
        if skipped:
            log.warning(
                "view %s: %d counter(s) left as they are after the rebuild: held by another "
                "view, of another type, moved by a record read before the rebuild began, or "
                "a partial sum out of range",
                view.name,
                skipped,
            )
        if repaired:
            log.warning(
                "view %s: the rebuild repaired %d counter(s) that differed from the sum over "
                "the table's items (changed or deleted outside viewkeeper)",
                view.name,
                repaired,
            )
        self._close_sums(ns, sums, token)
        return repaired

    def _finalize_call(self, batch: _Batch) -> bytes:
        with self._connection() as conn:
            conn.send_packed_command([self._command(batch, b"%d" % int(self._clock()))])
            batch.reply = conn.read_response()
        self._refuse_lost([batch])  # NamespaceLost when a claim check failed
        self._learn_counters([batch])
        codes = batch.reply[0] if isinstance(batch.reply, list) and batch.reply else None
        if not isinstance(codes, bytes):
            raise self._unexpected(batch.reply)
        return codes

    def _close_sums(self, ns: bytes, sums: bytes, token: bytes) -> None:
        """Drop the rebuild's sums, unless another rebuild began meanwhile (a script: the
        check and the delete are one step)."""
        script = (
            "if redis.call('HGET', KEYS[1], 'shadow_id') == ARGV[1] then "
            "redis.call('HDEL', KEYS[1], 'shadow', 'shadow_id', 'shadow_epoch', 'sweeping') "
            "redis.call('DEL', KEYS[2]) end"
        )
        self._with_retry(lambda: self._client.eval(script, 2, ns, sums, token))
